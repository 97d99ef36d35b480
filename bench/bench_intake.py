"""Task intake end to end: submit through the API to `task.scheduled` stored.

A client keeps `--inflight` create requests open on `gw.api.bench.task.create` (NATS
request-reply to the ApiService, which validates and appends `task.submitted` as a
compare-and-set); the Engine folds the submission, places it and appends the
allocation with `task.scheduled`. Every task carries a request id, so its task id is
known at send time and a follower of the log times each one from send to scheduled.
The baseline is the raw JetStream append rate (`js.publish_async`, pipelined, same
payloads and the same fsync-always embedded server) in the same run; the ratio is
tasks scheduled per second over raw appends per second. Each scheduled task costs at
least three appends (submitted, allocated, scheduled), plus two request round trips.

A first phase sends tasks one at a time (latency without queueing), the second keeps
K in flight (throughput; its latency includes the queue in front of the engine).

Run: .venv/bin/python -m bench.bench_intake [--tasks N] [--inflight K] [--unloaded M]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
from gpuwarden.adapters.api_service import ApiService, api_subject
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.engine.clock import SystemClock
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.intake import task_id_for_request
from gpuwarden.engine.runtime import Engine
from nats.aio.client import Client as NatsClient
from nats.js import api

GPUS_PER_NODE = 8
OWNER = "bench"
CREATE = api_subject(OWNER, "create")  # the principal's own subject


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def request_body(k: int) -> bytes:
    body = {
        "image": "pytorch/pytorch:2.3",
        "command": ["python", "train.py", f"--seed={k}"],
        "gpus": 1,
        "owner": OWNER,
        "name": f"job-{k}",
        "request_id": f"r{k}",
    }
    return json.dumps(body).encode()


async def register(log: JetStreamEventLog, nodes: int) -> None:
    now = datetime.now(UTC)
    for n in range(nodes):
        gpus = tuple(
            ev.GpuInfo(uuid=f"GPU-{n}-{i}", index=i, model="H100", memory_mb=81920)
            for i in range(GPUS_PER_NODE)
        )
        event = ev.NodeRegistered(
            id=f"reg-{n}", at=now, actor="bench", node=f"node{n}", runtime="sim", gpus=gpus
        )
        await log.append(ev.subject_of(event), [event], 0)


async def raw_appends(nc: NatsClient, total: int) -> float:
    """Pipelined js.publish_async of task.submitted-sized payloads: appends per second."""
    js = nc.jetstream()
    await js.add_stream(
        api.StreamConfig(name="BENCH_RAW", subjects=["bench.raw.>"], storage=api.StorageType.FILE)
    )
    now = datetime.now(UTC)
    payloads = [
        ev.encode(
            ev.TaskSubmitted(
                id=f"raw{k}",
                at=now,
                actor="api",
                task_id=f"raw{k}",
                name=f"job-{k}",
                image="pytorch/pytorch:2.3",
                command=("python", "train.py", f"--seed={k}"),
            )
        )
        for k in range(total)
    ]
    start = time.perf_counter()
    futures = [
        await js.publish_async(f"bench.raw.{k}", data, headers={"Nats-Msg-Id": f"raw{k}"})
        for k, data in enumerate(payloads)
    ]
    await asyncio.gather(*futures)
    return total / (time.perf_counter() - start)


class Phase:
    """One batch of submissions: throughput and each task's submit->scheduled time."""

    def __init__(self, first: int, count: int, inflight: int) -> None:
        self.first, self.count, self.inflight = first, count, inflight
        self.sent: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.replies: list[float] = []
        self.finished = anyio.Event()
        self.start = 0.0

    def scheduled(self, task_id: str, at: float) -> None:
        if task_id in self.sent and task_id not in self.done:
            self.done[task_id] = at
            if len(self.done) >= self.count:
                self.finished.set()

    async def run(self, nc: NatsClient) -> None:
        limit = anyio.Semaphore(self.inflight)

        async def one(k: int) -> None:
            async with limit:
                self.sent[task_id_for_request(OWNER, f"r{k}")] = t0 = time.perf_counter()
                reply = await nc.request(CREATE, request_body(k), timeout=30)
                self.replies.append(time.perf_counter() - t0)
                answer = json.loads(reply.data)
                if "error" in answer:
                    raise RuntimeError(answer["error"])

        self.start = time.perf_counter()
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for k in range(self.first, self.first + self.count):
                    tg.start_soon(one, k)
            await self.finished.wait()

    @property
    def rate(self) -> float:
        return self.count / (max(self.done.values()) - self.start)

    @property
    def latencies(self) -> list[float]:
        return [self.done[t] - self.sent[t] for t in self.sent]


async def intake(url: str, phases: list[Phase]) -> int:
    """Runs the phases against one engine and one API service; returns engine conflicts."""
    conns = [await connect(url, name=f"bench-{n}") for n in range(3)]
    engine_nc, api_nc, client_nc = conns
    engine_log = JetStreamEventLog(engine_nc, timeout_s=10)
    await engine_log.ensure_streams()
    api_log = JetStreamEventLog(api_nc, timeout_s=10)
    watch_log = JetStreamEventLog(client_nc, timeout_s=10)
    total = sum(p.count for p in phases)
    await register(engine_log, (total + GPUS_PER_NODE - 1) // GPUS_PER_NODE)
    engine = Engine(engine_log, JetStreamCommandBus(engine_nc), SystemClock())
    service = ApiService(api_nc, api_log, SystemClock())

    async def follow() -> None:
        async for record in watch_log.subscribe(await watch_log.last_seq() + 1):
            if isinstance(record.event, ev.TaskScheduled):
                for phase in phases:
                    phase.scheduled(record.event.task_id, time.perf_counter())

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            await tg.start(service.serve)
            tg.start_soon(follow)
            await anyio.sleep(0.2)  # the follower's consumer is in place
            for phase in phases:
                await phase.run(client_nc)
            tg.cancel_scope.cancel()
    finally:
        for nc in conns:
            with contextlib.suppress(Exception):
                await nc.close()
    return engine.metrics.conflicts


def report(title: str, phase: Phase) -> None:
    ms = 1000
    lat, rep = phase.latencies, phase.replies
    print(f"  {title}: {phase.count} tasks, {phase.inflight} in flight: {phase.rate:,.0f} tasks/s")
    print(
        f"    submit -> task.scheduled stored: p50 {percentile(lat, 0.5) * ms:.1f} ms, "
        f"p99 {percentile(lat, 0.99) * ms:.1f} ms, mean {statistics.fmean(lat) * ms:.1f} ms"
    )
    print(
        f"    create reply (task.submitted stored): p50 {percentile(rep, 0.5) * ms:.1f} ms, "
        f"p99 {percentile(rep, 0.99) * ms:.1f} ms"
    )


async def main(tasks: int, inflight: int, unloaded: int) -> None:
    quiet = Phase(0, unloaded, 1)
    loaded = Phase(unloaded, tasks, inflight)
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats(Path(tmp) / "nats") as server:
            conflicts = await intake(server.url, [quiet, loaded])
            nc = await connect(server.url, name="bench-raw")
            try:
                raw = await raw_appends(nc, tasks * 3)
            finally:
                await nc.close()
    print("intake through the API service to task.scheduled (1 engine, fsync always)")
    report("unloaded", quiet)
    report("loaded", loaded)
    print(f"  engine conflicts: {conflicts}")
    print(f"raw JetStream appends (publish_async, pipelined): {raw:,.0f} appends/s")
    print(f"ratio loaded tasks/s over raw appends/s: {loaded.rate / raw:.3f}")
    print(f"ratio events stored/s (3 per task) over raw appends/s: {3 * loaded.rate / raw:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--unloaded", type=int, default=100, help="tasks sent one at a time")
    options = parser.parse_args()
    anyio.run(main, options.tasks, options.inflight, options.unloaded)
