"""How long after a container dies is its `container.exited` stored in the log?

Three clocks on the same containers, in the same run, all from the container's own
FinishedAt: Docker's raw event stream (when a bare subscriber receives `die`: the
floor), DockerRuntime.watch() + inspect (when the agent knows how it ended), and the
whole node agent (adapters/agent.py, commanded over the real bus) until its
`container.exited` is stored in the real JetStream log of an embedded nats-server.

    DOCKER_HOST=unix:///tmp/dk/docker.sock .venv/bin/python -m bench.bench_docker [samples]
"""

from __future__ import annotations

import functools
import statistics
import sys
import threading
import time
import uuid
from contextlib import aclosing
from typing import Any

import anyio
import docker
from gpuwarden.adapters.docker_runtime import DockerRuntime
from gpuwarden.engine.core.commands import RunCommand
from gpuwarden.engine.ids import new_id

IMAGE = "gpuwarden-test:latest"
WARMUP = 2
DEADLINE_S = 20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class RawDieListener:
    """A bare SDK subscriber: when does Docker's `die` event arrive at all?"""

    def __init__(self, client: docker.DockerClient, node: str) -> None:
        self.received: dict[str, float] = {}
        self.changed = threading.Condition()
        self.stream = client.events(
            decode=True,
            filters={"type": "container", "event": "die", "label": f"gpuwarden.node={node}"},
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for raw in self.stream:
                now = time.time()
                with self.changed:
                    self.received[raw["Actor"]["ID"]] = now
                    self.changed.notify_all()
        except Exception:
            pass  # closed

    def wait_for(self, container_id: str) -> float:
        with self.changed:
            if not self.changed.wait_for(lambda: container_id in self.received, DEADLINE_S):
                raise TimeoutError(f"no raw die event for {container_id}")
            return self.received[container_id]

    def close(self) -> None:
        self.stream.close()
        self.thread.join(5)


async def measure(samples: int) -> tuple[list[float], list[float]]:
    client = docker.from_env()
    node = f"bench-{uuid.uuid4().hex[:8]}"
    runtime = DockerRuntime(client, node, gpu_mode="declared")
    raw = RawDieListener(client, node)
    observed: dict[str, tuple[float, Any]] = {}
    arrived = anyio.Event()
    subscribed = anyio.Event()
    raw_ms: list[float] = []
    observed_ms: list[float] = []

    async def watcher() -> None:
        nonlocal arrived
        async with aclosing(runtime.watch(ready=subscribed)) as observations:
            async for observation in observations:
                if observation.kind == "exited":
                    observed[observation.container_id] = (time.time(), observation.exit)
                    arrived.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher)
            await subscribed.wait()
            for i in range(samples + WARMUP):
                cmd = RunCommand(
                    id=new_id(),
                    node=node,
                    task_id=f"bench-{i}",
                    attempt=1,
                    image=IMAGE,
                    command=("sh", "-c", "exit 0"),
                )
                container_id = await runtime.run(cmd)
                with anyio.fail_after(DEADLINE_S):
                    while container_id not in observed:
                        arrived = anyio.Event()
                        await arrived.wait()
                raw_at = await anyio.to_thread.run_sync(raw.wait_for, container_id)
                seen_at, info = observed[container_id]
                died = info.finished_at.timestamp()
                if i >= WARMUP:
                    raw_ms.append((raw_at - died) * 1000)
                    observed_ms.append((seen_at - died) * 1000)
                await runtime.remove(cmd.task_id, cmd.attempt)
            tg.cancel_scope.cancel()
    finally:
        raw.close()
        for container in client.containers.list(
            all=True, filters={"label": f"gpuwarden.node={node}"}
        ):
            container.remove(force=True)
        client.close()
    return raw_ms, observed_ms


async def measure_agent(samples: int) -> tuple[list[float], list[float]]:
    """The whole agent: run command over the bus, kill, container.exited stored."""
    import tempfile
    from pathlib import Path

    from gpuwarden.adapters.agent import Agent
    from gpuwarden.adapters.command_bus import JetStreamCommandBus
    from gpuwarden.adapters.embedded_nats import EmbeddedNats
    from gpuwarden.adapters.event_log import JetStreamEventLog
    from gpuwarden.adapters.heartbeats import NatsHeartbeats
    from gpuwarden.adapters.nats_connection import connect
    from gpuwarden.adapters.nvml_probe import declared_inventory
    from gpuwarden.engine.clock import SystemClock
    from gpuwarden.engine.core import events as ev

    client = docker.from_env()
    node = f"bench-{uuid.uuid4().hex[:8]}"
    raw = RawDieListener(client, node)
    raw_ms: list[float] = []
    stored_ms: list[float] = []
    stored: dict[tuple[str, int], tuple[float, str]] = {}
    started: dict[tuple[str, int], str] = {}
    news = anyio.Event()
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(Path(tmp) / "nats")
        url = await server.start()
        nc = await connect(url)
        try:
            log = JetStreamEventLog(nc)
            await log.ensure_streams()
            bus = JetStreamCommandBus(nc, poll_s=0.2)
            agent = Agent(
                node,
                log,
                bus,
                DockerRuntime(client, node, gpu_mode="declared"),
                declared_inventory(node, 1, "bench", 0),
                heartbeats=NatsHeartbeats(nc),
                clock=SystemClock(),
                inventory_source="declared",
                stop_timeout_s=1,
            )

            async def follow() -> None:
                nonlocal news
                async for record in log.subscribe(1):
                    event = record.event
                    if isinstance(event, ev.ContainerExited):
                        stored[(event.task_id, event.attempt)] = (time.time(), event.container_id)
                    elif isinstance(event, ev.ContainerStarted):
                        started[(event.task_id, event.attempt)] = event.container_id
                    news.set()

            async def wait_for(key: tuple[str, int], table: dict[Any, Any]) -> None:
                nonlocal news
                with anyio.fail_after(DEADLINE_S):
                    while key not in table:
                        news = anyio.Event()
                        await news.wait()

            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                await tg.start(agent.run)
                for i in range(samples + WARMUP):
                    key = (f"agent-{i}", 1)
                    await bus.send(
                        RunCommand(
                            id=new_id(),
                            node=node,
                            task_id=key[0],
                            attempt=1,
                            image=IMAGE,
                            command=("sh", "-c", "sleep 30"),
                        )
                    )
                    await wait_for(key, started)
                    container = client.containers.get(started[key])
                    await anyio.to_thread.run_sync(container.kill)
                    await wait_for(key, stored)
                    raw_at = await anyio.to_thread.run_sync(raw.wait_for, started[key])
                    container.reload()
                    died = parse_finished(container.attrs["State"]["FinishedAt"])
                    if i >= WARMUP:
                        raw_ms.append((raw_at - died) * 1000)
                        stored_ms.append((stored[key][0] - died) * 1000)
                    await anyio.to_thread.run_sync(functools.partial(container.remove, force=True))
                tg.cancel_scope.cancel()
        finally:
            raw.close()
            await nc.close()
            await server.stop()
            for leftover in client.containers.list(
                all=True, filters={"label": f"gpuwarden.node={node}"}
            ):
                leftover.remove(force=True)
            client.close()
    return raw_ms, stored_ms


def parse_finished(text: str) -> float:
    from gpuwarden.adapters.docker_runtime import parse_docker_time

    moment = parse_docker_time(text)
    assert moment is not None
    return moment.timestamp()


def main() -> None:
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    started = time.monotonic()
    raw_ms, observed_ms = anyio.run(measure, samples)
    agent_raw_ms, stored_ms = anyio.run(measure_agent, samples)
    raw50, raw99 = percentile(raw_ms, 0.5), percentile(raw_ms, 0.99)
    obs50, obs99 = percentile(observed_ms, 0.5), percentile(observed_ms, 0.99)
    print(f"container death -> knowing how it ended, {samples} samples, same run")
    print(f"  raw Docker 'die' event received    p50 {raw50:7.2f} ms   p99 {raw99:7.2f} ms")
    print(f"  DockerRuntime.watch() + inspect    p50 {obs50:7.2f} ms   p99 {obs99:7.2f} ms")
    print(
        f"  ratio (watch / raw)                p50 {obs50 / raw50:7.2f} x    "
        f"p99 {obs99 / raw99:7.2f} x"
    )
    print(
        f"  added by watch+inspect             p50 {obs50 - raw50:+7.2f} ms  mean "
        f"{statistics.fmean(o - r for o, r in zip(observed_ms, raw_ms, strict=True)):+.2f} ms"
    )
    araw50, araw99 = percentile(agent_raw_ms, 0.5), percentile(agent_raw_ms, 0.99)
    st50, st99 = percentile(stored_ms, 0.5), percentile(stored_ms, 0.99)
    print(f"container killed -> container.exited stored by the agent, {samples} samples")
    print(f"  raw Docker 'die' event received    p50 {araw50:7.2f} ms   p99 {araw99:7.2f} ms")
    print(f"  agent: container.exited stored     p50 {st50:7.2f} ms   p99 {st99:7.2f} ms")
    print(
        f"  ratio (stored / raw)               p50 {st50 / araw50:7.2f} x    "
        f"p99 {st99 / araw99:7.2f} x"
    )
    print(f"  (wall {time.monotonic() - started:.1f} s)")


if __name__ == "__main__":
    main()
