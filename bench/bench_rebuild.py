"""Process killed -> replacement container running: gpuwarden vs Docker's own restart.

The promise of gpuwarden is a judged rebuild (classify, decide, place, start) at about
the cost of a blind restart. The baseline is Docker restarting the same workload
itself (`restart_policy={"Name": "on-failure"}`) on the same engine, in the same run,
with samples interleaved so that load on the shared machine hits both alike.

Workload: `sh -c 'sleep 600 & wait $!'`. The fault: `docker exec <c> kill -9 <sleep>`, so
the container's main process exits 137 (Docker does not restart a container after a
`docker kill`: that counts as a manual stop). Each sample is a fresh container / task,
so Docker's restart delay (100 ms, doubling) is at its first step.
Both latencies are read from the daemon's own clock: the killed instance's FinishedAt
to the replacement's StartedAt. gpuwarden runs the real Engine (SystemClock; evidence
window 0, backoff 0) and the real Agent over a real nats-server; its "logged" column
adds the time until `container.started` of the new attempt is in the event log.

    DOCKER_HOST=unix:///tmp/dk/docker.sock .venv/bin/python -m bench.bench_rebuild [samples]
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import docker
from gpuwarden.adapters.agent import Agent
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.docker_runtime import DockerRuntime, parse_docker_time
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.heartbeats import NatsHeartbeats
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.adapters.nvml_probe import declared_inventory
from gpuwarden.engine.clock import SystemClock
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.policy import Policy
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.runtime import Engine

IMAGE = "gpuwarden-test:latest"
WORKLOAD = ["sh", "-c", "sleep 600 & wait $!"]
KILL = ["sh", "-c", "kill -9 $(pidof sleep)"]
POLICY = Policy(evidence_window_s=0.0, backoff_initial_s=0.0, backoff_max_s=0.0, max_rebuilds=100)
BENCH_LABEL = "gpuwarden.bench"
WARMUP = 2
DEADLINE_S = 30
GOAL = 1.2


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _state(client: docker.DockerClient, container_id: str) -> dict[str, Any]:
    state: dict[str, Any] = client.api.inspect_container(container_id)["State"]
    return state


def _gap_ms(finished: str, started: str) -> float:
    end, up = parse_docker_time(finished), parse_docker_time(started)
    assert end is not None and up is not None, (finished, started)
    return (up - end).total_seconds() * 1000


def _kill_inside(client: docker.DockerClient, container_id: str) -> None:
    exec_id = client.api.exec_create(container_id, KILL)["Id"]
    client.api.exec_start(exec_id)


# --- the baseline: Docker restarts it ---------------------------------------------------


def docker_sample(client: docker.DockerClient, token: str) -> float:
    container = client.containers.run(
        IMAGE,
        WORKLOAD,
        labels={BENCH_LABEL: token},
        network_mode="none",
        detach=True,
        restart_policy={"Name": "on-failure"},
    )
    first = _state(client, container.id)["StartedAt"]
    _kill_inside(client, container.id)
    deadline = time.monotonic() + DEADLINE_S
    while True:  # polled; the latency itself comes from the daemon's timestamps
        state = _state(client, container.id)
        if state["Running"] and state["StartedAt"] != first:
            return _gap_ms(state["FinishedAt"], state["StartedAt"])
        if time.monotonic() > deadline:
            raise TimeoutError(f"Docker did not restart {container.id[:12]}: {state}")
        time.sleep(0.005)


# --- gpuwarden: engine + agent rebuild it -----------------------------------------------


class Gpuwarden:
    """Engine and agent in the background; `sample()` kills one task's process."""

    def __init__(self, log: JetStreamEventLog, client: docker.DockerClient, token: str) -> None:
        self.log = log
        self.client = client
        self.node = f"bench-{token}"
        bus = JetStreamCommandBus(log.nc, poll_s=1.0)
        runtime = DockerRuntime(client, self.node, gpu_mode="declared", labels={BENCH_LABEL: token})
        self.engine = Engine(log, bus, SystemClock(), POLICY)
        self.agent = Agent(
            self.node,
            log,
            bus,
            runtime,
            declared_inventory(self.node, 64, "bench"),
            heartbeats=NatsHeartbeats(log.nc),
            clock=SystemClock(),
            inventory_source="declared",
            stop_timeout_s=0,
        )
        self.started: dict[tuple[str, int], tuple[ev.ContainerStarted, float]] = {}
        self.arrived = anyio.Event()

    async def follow(self) -> None:
        async with aclosing(self.log.subscribe(1)) as records:  # type: ignore[type-var]
            async for record in records:
                if isinstance(record.event, ev.ContainerStarted):
                    key = (record.event.task_id, record.event.attempt)
                    self.started[key] = (record.event, time.time())
                    self.arrived.set()
                    self.arrived = anyio.Event()

    async def wait_started(self, task_id: str, attempt: int) -> tuple[ev.ContainerStarted, float]:
        with anyio.fail_after(DEADLINE_S):
            while (task_id, attempt) not in self.started:
                await self.arrived.wait()
        return self.started[(task_id, attempt)]

    async def sample(self) -> tuple[float, float]:
        task_id = f"bench-{uuid.uuid4().hex[:10]}"
        submitted = ev.TaskSubmitted(
            id=new_id(),
            at=datetime.now(UTC),
            actor="api",
            task_id=task_id,
            name=task_id,
            image=IMAGE,
            command=tuple(WORKLOAD),
        )
        await self.log.append(ev.task_subject(task_id), [submitted], 0)
        first, _ = await self.wait_started(task_id, 1)
        await anyio.to_thread.run_sync(_kill_inside, self.client, first.container_id)
        second, logged_at = await self.wait_started(task_id, 2)
        old = await anyio.to_thread.run_sync(_state, self.client, first.container_id)
        new = await anyio.to_thread.run_sync(_state, self.client, second.container_id)
        finished = parse_docker_time(old["FinishedAt"])
        assert finished is not None
        return _gap_ms(old["FinishedAt"], new["StartedAt"]), (
            logged_at - finished.timestamp()
        ) * 1000


async def measure(samples: int) -> dict[str, list[float]]:
    client = docker.from_env(timeout=60)
    token = uuid.uuid4().hex[:8]
    results: dict[str, list[float]] = {"docker": [], "gpuwarden": [], "logged": []}
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(Path(tmp) / "nats")
        await server.start()
        nc = await connect(server.url, name="bench-rebuild")
        background: list[asyncio.Task[None]] = []
        try:
            log = JetStreamEventLog(nc)
            await log.ensure_streams()
            gw = Gpuwarden(log, client, token)
            background.append(asyncio.create_task(gw.engine.run()))
            background.append(asyncio.create_task(gw.agent.run()))
            background.append(asyncio.create_task(gw.follow()))
            with anyio.fail_after(DEADLINE_S):
                await gw.engine.caught_up.wait()
                await gw.agent.ready.wait()
            for i in range(WARMUP + samples):
                raw = await anyio.to_thread.run_sync(docker_sample, client, token)
                rebuilt, logged = await gw.sample()
                if i >= WARMUP:
                    results["docker"].append(raw)
                    results["gpuwarden"].append(rebuilt)
                    results["logged"].append(logged)
        finally:
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await nc.close()
            await server.stop()
            for container in client.containers.list(
                all=True, sparse=True, filters={"label": f"{BENCH_LABEL}={token}"}
            ):
                with contextlib.suppress(docker.errors.NotFound):
                    container.remove(force=True)
            client.close()
    return results


def report(results: dict[str, list[float]]) -> None:
    def line(name: str, values: list[float]) -> str:
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        mean = statistics.fmean(values)
        return f"{name:<34} p50 {p50:7.1f} ms   p99 {p99:7.1f} ms   mean {mean:7.1f} ms"

    docker_ms, gw_ms = results["docker"], results["gpuwarden"]
    print(f"kill -> replacement running, {len(docker_ms)} samples each (daemon timestamps)")
    print(line("Docker restart_policy on-failure", docker_ms))
    print(line("gpuwarden engine+agent rebuild", gw_ms))
    print(line("gpuwarden, until logged", results["logged"]))
    p50 = percentile(gw_ms, 0.5) / percentile(docker_ms, 0.5)
    p99 = percentile(gw_ms, 0.99) / percentile(docker_ms, 0.99)
    verdict = "meets" if p50 <= GOAL else "misses"
    print(f"ratio gpuwarden/Docker: p50 {p50:.2f}x, p99 {p99:.2f}x ({verdict} goal <= {GOAL}x)")


def main() -> None:
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    report(anyio.run(measure, samples))


if __name__ == "__main__":
    main()
