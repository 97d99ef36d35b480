"""Two engines, one cluster: allocation is a compare-and-set, so no GPU is handed out twice.

Two Engine instances on separate NATS connections follow the same log and both try to
place 200 tasks submitted concurrently through the API onto 64 declared GPUs. The
whole log is then read back: between a `gpu.allocated` and its `gpu.released` no
second allocation of that GPU may appear. Agents' exits (exit 0) free GPUs wave by
wave, so the tasks that waited as `task.pending` get placed, until all 200 complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from gpuwarden.adapters.api_service import CREATE, ApiService
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.engine.clock import VirtualClock
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.ports import ConcurrencyError, StoredEvent
from gpuwarden.engine.runtime import Engine
from nats.aio.client import Client as NatsClient

from tests.test_api_service import start_service, stop

T0 = datetime(2026, 3, 1, tzinfo=UTC)
NODES, GPUS_PER_NODE, TASKS = 8, 8, 200
SIZES = (1, 2, 1, 4, 1, 8, 2, 1, 3, 1)  # GPUs per task, cycled: demand far above 64


@dataclass
class Side:
    """One engine with its own connection, log and command bus."""

    nc: NatsClient
    engine: Engine
    task: asyncio.Task[None]


@pytest.fixture
async def engines(nats_server: EmbeddedNats) -> AsyncIterator[list[Side]]:
    sides: list[Side] = []
    try:
        for n in range(2):
            nc = await connect(nats_server.url, name=f"engine-{n}")
            log = JetStreamEventLog(nc, heartbeat_s=0.5, timeout_s=5.0)
            await log.ensure_streams()
            bus = JetStreamCommandBus(nc, timeout_s=5.0)
            engine = Engine(log, bus, VirtualClock(T0))
            task = asyncio.create_task(engine.run())
            sides.append(Side(nc, engine, task))
        with anyio.fail_after(10):
            for side in sides:
                await side.engine.caught_up.wait()
        yield sides
    finally:
        for side in sides:
            side.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await side.task
            await side.nc.close()


async def register_cluster(log: JetStreamEventLog) -> None:
    for n in range(NODES):
        node = f"node{n}"
        gpus = tuple(
            ev.GpuInfo(uuid=f"GPU-{n}-{i}", index=i, model="H100", memory_mb=81920)
            for i in range(GPUS_PER_NODE)
        )
        event = ev.NodeRegistered(
            id=f"reg-{node}", at=T0, actor="test", node=node, runtime="sim", gpus=gpus
        )
        await log.append(ev.subject_of(event), [event], 0)


async def submit_all(nc: NatsClient) -> list[str]:
    limit = anyio.Semaphore(32)

    async def one(k: int) -> str:
        body = {
            "image": "gpuwarden-test:latest",
            "command": ["sleep", str(k)],
            "gpus": SIZES[k % len(SIZES)],
            "owner": f"user{k % 7}",
            "request_id": f"job-{k}",
        }
        async with limit:
            reply = await nc.request(CREATE, json.dumps(body).encode(), timeout=10)
        answer: dict[str, Any] = json.loads(reply.data)
        assert "task_id" in answer, answer
        return str(answer["task_id"])

    return list(await asyncio.gather(*(one(k) for k in range(TASKS))))


async def settle(sides: list[Side]) -> None:
    """Both engines have folded everything and have nothing left to decide."""
    for _ in range(2):  # one engine's last decision may wake the other
        for side in sides:
            await side.engine.wait_idle(timeout_s=20)


async def exit_running(log: JetStreamEventLog, engine: Engine, wave: int) -> int:
    """As the agents would: every live attempt's container exits with code 0."""
    exits = []
    for task in engine.state.tasks.values():
        attempt = task.current
        if task.status == "running" and attempt is not None and attempt.live:
            exits.append(
                ev.ContainerExited(
                    id=f"exit-{task.spec.task_id}-{attempt.n}",
                    at=T0,
                    actor=f"agent:{attempt.node}",
                    correlation_id=task.spec.task_id,
                    task_id=task.spec.task_id,
                    attempt=attempt.n,
                    node=attempt.node,
                    container_id=f"c-{wave}-{task.spec.task_id}",
                    exit_code=0,
                )
            )
    await asyncio.gather(*(log.append(ev.subject_of(e), [e]) for e in exits))
    return len(exits)


def double_allocations(records: list[StoredEvent]) -> list[str]:
    """Every allocation of a GPU some live attempt still held, in log order."""
    holder: dict[str, tuple[str, int]] = {}
    problems = []
    for record in records:
        event = record.event
        if isinstance(event, ev.GpuAllocated):
            if event.gpu_uuid in holder:
                problems.append(
                    f"seq {record.seq}: {event.gpu_uuid} to {event.task_id}/{event.attempt} "
                    f"while held by {holder[event.gpu_uuid]}"
                )
            holder[event.gpu_uuid] = (event.task_id, event.attempt)
        elif isinstance(event, ev.GpuReleased):
            if holder.get(event.gpu_uuid) == (event.task_id, event.attempt):
                del holder[event.gpu_uuid]
            else:
                problems.append(f"seq {record.seq}: {event.gpu_uuid} released by a non-holder")
    return problems


def scheduled_gpus_agree(records: list[StoredEvent]) -> list[str]:
    """Each task.scheduled names exactly the GPUs allocated to that attempt, on its node."""
    allocated: dict[tuple[str, int], set[tuple[str, str]]] = {}
    problems = []
    for record in records:
        event = record.event
        if isinstance(event, ev.GpuAllocated):
            key = (event.task_id, event.attempt)
            allocated.setdefault(key, set()).add((event.gpu_uuid, event.node))
        elif isinstance(event, ev.TaskScheduled):
            want = {(u, event.node) for u in event.gpu_uuids}
            if allocated.get((event.task_id, event.attempt)) != want:
                problems.append(f"seq {record.seq}: {event.task_id} scheduled without its GPUs")
    return problems


async def test_two_engines_never_allocate_one_gpu_twice_and_every_task_completes(
    engines: list[Side], nats_client: NatsClient, event_log: JetStreamEventLog
) -> None:
    await register_cluster(event_log)
    api = ApiService(nats_client, event_log, VirtualClock(T0), trust_owner_field=True)
    api_task = await start_service(api)
    try:
        task_ids = await submit_all(nats_client)
    finally:
        await stop(api_task)
    assert len(set(task_ids)) == TASKS
    watcher = engines[0].engine
    waves = 0
    pending_seen = 0
    with anyio.fail_after(60):
        while True:
            await settle(engines)
            statuses = Counter(t.status for t in watcher.state.tasks.values())
            if statuses["completed"] == TASKS:
                break
            waiting = [t for t in watcher.state.tasks.values() if t.status == "pending"]
            assert all(t.pending_reason for t in waiting), "a waiting task has no reason"
            pending_seen = max(pending_seen, len(waiting))
            assert sum(len(g) for g in _held(watcher)) <= NODES * GPUS_PER_NODE
            exited = await exit_running(event_log, watcher, waves)
            assert exited, f"stuck: nothing runs, {statuses} ({waiting[:1]})"
            waves += 1
    records = [r async for r in event_log.read()]
    assert double_allocations(records) == []
    assert scheduled_gpus_agree(records) == []
    types = Counter(ev.type_of(r.event) for r in records if r.event is not None)
    assert types["task.completed"] == TASKS and types["task.scheduled"] == TASKS
    assert (
        types["gpu.allocated"]
        == types["gpu.released"]
        == sum(SIZES[k % len(SIZES)] for k in range(TASKS))
    )
    assert types["task.pending"] >= pending_seen > 0, "no task ever had to wait"
    assert waves > 1
    # the race really happened: both engines got decisions into the log
    assert all(sum(s.engine.metrics.decisions.values()) > 0 for s in engines)
    for side in engines:  # both engines agree on the final state: every GPU free
        state = side.engine.state
        assert all(g.holder is None for g in state.gpus.values())
        assert all(t.status == "completed" for t in state.tasks.values())


def _held(engine: Engine) -> list[tuple[str, ...]]:
    return [
        a.gpu_uuids
        for t in engine.state.tasks.values()
        if (a := t.current) is not None and a.live and t.status == "running"
    ]


async def test_a_task_too_big_for_the_free_gpus_waits_with_a_reason_and_runs_later(
    engines: list[Side], event_log: JetStreamEventLog
) -> None:
    await register_cluster(event_log)
    big = [_submitted(f"big{n}", 8) for n in range(NODES + 1)]
    for event in big:
        await event_log.append(ev.subject_of(event), [event], 0)
    await settle(engines)
    last = engines[0].engine.state.tasks["big8"]
    assert last.status == "pending"
    assert last.pending_reason == "waiting for 8 free GPUs on one node"
    await exit_running(event_log, engines[0].engine, 0)
    await settle(engines)
    for side in engines:
        assert side.engine.state.tasks["big8"].status == "running"
    records = [r async for r in event_log.read()]
    assert double_allocations(records) == []


def _submitted(task_id: str, gpus: int) -> ev.TaskSubmitted:
    return ev.TaskSubmitted(
        id=f"sub-{task_id}",
        at=T0,
        actor="test",
        correlation_id=task_id,
        task_id=task_id,
        name=task_id,
        image="img",
        command=("x",),
        gpus=gpus,
    )


def test_the_checker_catches_a_double_allocation() -> None:
    def alloc(seq: int, task: str) -> StoredEvent:
        event = ev.GpuAllocated(
            id=f"a{seq}", at=T0, actor="engine", gpu_uuid="G", node="n", task_id=task, attempt=1
        )
        return StoredEvent(seq=seq, subject=ev.subject_of(event), event=event)

    assert len(double_allocations([alloc(1, "t1"), alloc(2, "t2")])) == 1


async def test_a_batch_sharing_ids_with_another_engines_decision_is_a_lost_cas(
    event_log: JetStreamEventLog,
) -> None:
    """Both engines derive the same ids for the same placement; the loser must see a
    ConcurrencyError (decide again), not an EventLogError that stops its engine."""

    def alloc(uuid: str, task: str) -> ev.GpuAllocated:
        return ev.GpuAllocated(
            id=f"alloc-{task}-{uuid}",
            at=T0,
            actor="engine",
            gpu_uuid=uuid,
            node="n",
            task_id=task,
            attempt=1,
        )

    winner = [alloc("G1", "t1"), alloc("G2", "t2")]
    await event_log.append_batch(winner, {ev.gpu_subject("G1"): 0, ev.gpu_subject("G2"): 0})
    loser = [alloc("G1", "t1"), alloc("G3", "t3")]
    before = await event_log.last_seq()
    with pytest.raises(ConcurrencyError):
        await event_log.append_batch(loser, {ev.gpu_subject("G1"): 0, ev.gpu_subject("G3"): 0})
    assert await event_log.last_seq() == before
