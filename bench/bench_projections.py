"""Projection rebuild rate and audit-query latency, against baselines in the same run.

1. Rebuild: events/s folded into SQLite by `ProjectionStore.rebuild` from a real
   JetStream log (embedded nats-server, fsync always), against a raw ordered read of
   the same stream (`JetStreamEventLog.read`, nothing else). Goal ratio >= 0.6.
2. Audit query: p99 of one task's events (`queries.events(task=...)`) in a store of
   1,000,000 events, built directly with the writer (`apply`); build time reported.
   Goal <= 10 ms.

Run: .venv/bin/python -m bench.bench_projections [--events N] [--big N] [--only rebuild|query]
     [--profile FILE]  (cProfile of the rebuilds only, for `python -m pstats FILE`)
"""

from __future__ import annotations

import argparse
import cProfile
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.ports import StoredEvent
from gpuwarden.projections import queries as q
from gpuwarden.projections.store import ProjectionStore

T0 = datetime(2025, 1, 1, tzinfo=UTC)
NODES = 16
GPUS_PER_NODE = 8


def _task_events(rng: random.Random, n: int, at: datetime) -> list[Any]:
    """One task's life: about ten events, a rebuild now and then, faults included."""
    tid = f"task-{n:07d}"
    out: list[Any] = []
    k = 0

    def add(cls: type[Any], **fields: Any) -> None:
        nonlocal k
        k += 1
        out.append(cls(id=f"{tid}-{k:02d}", at=at + timedelta(seconds=k), actor="engine",
                       correlation_id=tid, **fields))  # fmt: skip

    add(ev.TaskSubmitted, task_id=tid, name="job", image="img:1", command=("python", "x.py"),
        owner=f"user{n % 50}")  # fmt: skip
    attempts = 2 if rng.random() < 0.15 else 1
    for attempt in range(1, attempts + 1):
        node = rng.randrange(NODES)
        gpu = f"GPU-{node:02d}-{rng.randrange(GPUS_PER_NODE)}"
        add(ev.TaskScheduled, task_id=tid, attempt=attempt, node=f"node{node}",
            gpu_uuids=(gpu,))  # fmt: skip
        add(ev.GpuAllocated, gpu_uuid=gpu, node=f"node{node}", task_id=tid, attempt=attempt)
        add(ev.ContainerStarted, task_id=tid, attempt=attempt, node=f"node{node}",
            container_id=f"c{n}-{attempt}")  # fmt: skip
        last = attempt == attempts
        if not last:
            add(ev.GpuFault, gpu_uuid=gpu, node=f"node{node}", kind="xid", xid=79)
        add(ev.ContainerExited, task_id=tid, attempt=attempt, node=f"node{node}",
            container_id=f"c{n}-{attempt}", exit_code=0 if last else None,
            signal=None if last else 9)  # fmt: skip
        fault = "completed" if last else "gpu_hardware"
        add(ev.FaultClassified, task_id=tid, attempt=attempt, fault=fault, rule="r",
            evidence=(out[-1].id,))  # fmt: skip
        add(ev.GpuReleased, gpu_uuid=gpu, node=f"node{node}", task_id=tid, attempt=attempt)
        if not last:
            add(ev.RebuildDecided, task_id=tid, attempt=attempt + 1, previous_attempt=attempt,
                fault=fault, counted=True, rule=None, not_before=at)  # fmt: skip
    add(ev.TaskCompleted, task_id=tid, attempt=attempts)
    return out


def synthetic(total: int, seed: int = 7) -> Iterator[Any]:
    """`total` events: node registrations, then tasks interleaved 32 at a time."""
    rng = random.Random(seed)
    count = 0
    for node in range(NODES):
        gpus = tuple(ev.GpuInfo(uuid=f"GPU-{node:02d}-{i}", index=i, model="H100",
                                memory_mb=81920) for i in range(GPUS_PER_NODE))  # fmt: skip
        yield ev.NodeRegistered(id=f"reg-{node}", at=T0, actor=f"agent:node{node}",
                                node=f"node{node}", runtime="docker", gpus=gpus)  # fmt: skip
        count += 1
    n = 0
    active: list[list[Any]] = []
    while count < total:
        while len(active) < 32:
            active.append(_task_events(rng, n, T0 + timedelta(seconds=n)))
            n += 1
        lane = active[rng.randrange(len(active))]
        yield lane.pop(0)
        count += 1
        if not lane:
            active.remove(lane)


def stored_stream(total: int) -> Iterator[StoredEvent]:
    for seq, event in enumerate(synthetic(total), start=1):
        yield StoredEvent(seq=seq, subject=ev.subject_of(event), event=event,
                          data=ev.encode(event))  # fmt: skip


# --- 1. rebuild vs raw ordered read ------------------------------------------------


async def bench_rebuild(events: int, workdir: Path, profile: str | None = None) -> None:
    from gpuwarden.adapters.embedded_nats import EmbeddedNats
    from gpuwarden.adapters.event_log import JetStreamEventLog
    from gpuwarden.adapters.nats_connection import connect

    async with EmbeddedNats(workdir / "nats") as server:
        nc = await connect(server.url, name="bench")
        try:
            log = JetStreamEventLog(nc)
            await log.ensure_streams()
            started = time.perf_counter()
            stream = list(stored_stream(events))
            for stored in stream[:-1]:
                await nc.publish(stored.subject, stored.data,
                                 headers={"Nats-Msg-Id": stored.event.id})  # type: ignore[union-attr]  # fmt: skip
            # One connection's messages are stored in order: the last one's ack covers all.
            last = stream[-1]
            await log.js.publish(last.subject, last.data, timeout=60)
            assert await log.last_seq() == events
            print(f"log: {events} events published in {time.perf_counter() - started:.1f}s "
                  "(fsync always)")  # fmt: skip
            raw_rates, fold_rates = [], []
            profiler = cProfile.Profile() if profile else None
            for _ in range(2):
                t = time.perf_counter()
                n = 0
                async for _stored in log.read():
                    n += 1
                assert n == events
                raw_rates.append(events / (time.perf_counter() - t))
                async with ProjectionStore(workdir / f"rebuild-{len(fold_rates)}") as store:
                    if profiler is not None:
                        profiler.enable()
                    t = time.perf_counter()
                    assert await store.rebuild(log) == events
                    fold_rates.append(events / (time.perf_counter() - t))
                    if profiler is not None:
                        profiler.disable()
        finally:
            await nc.close()
    if profiler is not None and profile:
        profiler.dump_stats(profile)
    raw, fold = max(raw_rates), max(fold_rates)
    print(f"raw ordered read:     {raw:>10,.0f} events/s")
    print(f"projection rebuild:   {fold:>10,.0f} events/s (into SQLite, WAL, one tx per batch)")
    print(f"ratio rebuild/raw:    {fold / raw:.2f}  (goal >= 0.6)")


# --- 2. audit query on a big store ---------------------------------------------------


async def bench_query(big: int, workdir: Path, samples: int = 400) -> None:
    async with ProjectionStore(workdir / "big") as store:
        started = time.perf_counter()
        batch: list[StoredEvent] = []
        for stored in stored_stream(big):
            batch.append(stored)
            if len(batch) == 5000:
                await store.apply(batch)
                batch = []
        if batch:
            await store.apply(batch)
        built = time.perf_counter() - started
        print(f"store: {big:,} events written in {built:.1f}s ({big / built:,.0f} events/s)")
        tasks = [t.id for t in await q.tasks(store)]
        rng = random.Random(3)
        timings = []
        for _ in range(samples):
            task_id = rng.choice(tasks)
            t = time.perf_counter()
            rows = await q.events(store, task=task_id)
            timings.append((time.perf_counter() - t) * 1000)
            assert rows
        timings.sort()
        p50 = statistics.median(timings)
        p99 = timings[int(len(timings) * 0.99) - 1]
        print(f"one task's events ({len(tasks):,} tasks): p50 {p50:.2f} ms, p99 {p99:.2f} ms "
              "(goal p99 <= 10 ms)")  # fmt: skip


async def main(events: int, big: int, only: str | None, profile: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="gw-bench-proj-") as tmp:
        if only in (None, "rebuild"):
            await bench_rebuild(events, Path(tmp), profile)
        if only in (None, "query"):
            await bench_query(big, Path(tmp))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--big", type=int, default=1_000_000)
    parser.add_argument("--only", choices=("rebuild", "query"), default=None)
    parser.add_argument("--profile", default=None, help="write a cProfile of the rebuilds here")
    options = parser.parse_args()
    anyio.run(main, options.events, options.big, options.only, options.profile)
