"""How long after a container dies does the node agent know how it ended?

The agent's path: Docker's `die` event reaches DockerRuntime.watch(), which inspects
the container (exit code, OOMKilled, Error) and yields an observation with ExitInfo.
The floor is Docker's own event stream: when a raw subscriber receives `die`. Both are
measured in the same run, on the same containers, from the container's FinishedAt.

    DOCKER_HOST=unix:///tmp/dk/docker.sock .venv/bin/python -m bench.bench_docker [samples]
"""

from __future__ import annotations

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
from gpuwarden.engine.commands import RunCommand
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


def main() -> None:
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    started = time.monotonic()
    raw_ms, observed_ms = anyio.run(measure, samples)
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
    print(f"  (wall {time.monotonic() - started:.1f} s)")


if __name__ == "__main__":
    main()
