"""A hand-written log for the read-side tests, and an in-memory EventLog to feed it.

The list-backed log stands in for JetStream only where a test is about the
projection's own logic; tests in test_projections_nats.py run the same folds against a
real nats-server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.ports import StoredEvent

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


class LogBuilder:
    """Events with ids e001.., one second apart, each on its aggregate's subject."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start
        self.stored: list[StoredEvent] = []

    def add(self, cls: type[Any], *, after: float = 1.0, **fields: Any) -> Any:
        self.now += timedelta(seconds=after)
        seq = len(self.stored) + 1
        fields.setdefault("actor", "engine")
        event = cls(id=f"e{seq:03d}", at=self.now, **fields)
        self.stored.append(
            StoredEvent(seq=seq, subject=ev.subject_of(event), event=event, data=ev.encode(event))
        )
        return event

    def invalid(self, subject: str, data: bytes, error: str) -> None:
        seq = len(self.stored) + 1
        self.stored.append(
            StoredEvent(seq=seq, subject=subject, event=None, data=data, error=error)
        )


def _within(stored: str, subject: str | None) -> bool:
    """As the JetStream log reads an aggregate: its subjects of either scheme."""
    return subject is None or ev.aggregate_of_subject(stored) == ev.aggregate_of_subject(subject)


class ListLog:
    """An in-memory EventLog (read side only): reads, and a live subscription."""

    def __init__(self, stored: Iterable[StoredEvent] = ()) -> None:
        self.stored = list(stored)
        self._grown = anyio.Event()

    def append_stored(self, stored: StoredEvent) -> None:
        self.stored.append(stored)
        self._grown.set()
        self._grown = anyio.Event()

    async def last_seq(self, subject: str | None = None) -> int:
        matching = [s.seq for s in self.stored if _within(s.subject, subject)]
        return matching[-1] if matching else 0

    async def read(
        self, from_seq: int = 1, until_seq: int | None = None, subject: str | None = None
    ) -> AsyncIterator[StoredEvent]:
        for stored in list(self.stored):
            if stored.seq < from_seq or (until_seq is not None and stored.seq > until_seq):
                continue
            if _within(stored.subject, subject):
                yield stored

    async def subscribe(
        self, from_seq: int = 1, subject: str | None = None
    ) -> AsyncIterator[StoredEvent]:
        index = 0
        while True:
            while index < len(self.stored):
                stored = self.stored[index]
                index += 1
                if stored.seq >= from_seq and _within(stored.subject, subject):
                    yield stored
            await self._grown.wait()


def sample_log() -> LogBuilder:
    """Every event type at least once, over three tasks, two nodes and three GPUs.

    t1: attempt 1 on n1/G1 dies with an Xid 79 -> gpu_hardware, rebuilt (counted) on
        n2/G3 as attempt 2, completes.
    t2: attempt 1 on n1/G2 cannot start (bad image) -> failed, not_target_fault.
    t3: pending, attempt 1 on n1/G2, n1 lost -> node_lost, rebuild decided, cancelled.
    """
    b = LogBuilder()
    g1 = ev.GpuInfo(uuid="G1", index=0, model="H100", memory_mb=81920)
    g2 = ev.GpuInfo(uuid="G2", index=1, model="H100", memory_mb=81920)
    g3 = ev.GpuInfo(uuid="G3", index=0, model="A100", memory_mb=40960)
    b.add(ev.NodeRegistered, node="n1", runtime="docker", gpus=(g1, g2), actor="agent:n1")
    b.add(ev.NodeRegistered, node="n2", runtime="docker", gpus=(g3,), actor="agent:n2")
    sub1 = b.add(
        ev.TaskSubmitted,
        task_id="t1",
        name="train",
        image="img:1",
        command=("python", "train.py"),
        owner="alice",
        actor="api",
        correlation_id="t1",
    )
    sch = b.add(
        ev.TaskScheduled,
        task_id="t1",
        attempt=1,
        node="n1",
        gpu_uuids=("G1",),
        causation_id=sub1.id,
        correlation_id="t1",
    )
    b.add(ev.GpuAllocated, gpu_uuid="G1", node="n1", task_id="t1", attempt=1, causation_id=sch.id)
    b.add(
        ev.ContainerStarted, task_id="t1", attempt=1, node="n1", container_id="c1", actor="agent:n1"
    )
    exit1 = b.add(
        ev.ContainerExited,
        task_id="t1",
        attempt=1,
        node="n1",
        container_id="c1",
        exit_code=None,
        signal=9,
        actor="agent:n1",
    )
    xid = b.add(
        ev.GpuFault,
        gpu_uuid="G1",
        node="n1",
        kind="xid",
        xid=79,
        detail="fallen off the bus",
        actor="agent:n1",
    )
    cls1 = b.add(
        ev.FaultClassified,
        task_id="t1",
        attempt=1,
        fault="gpu_hardware",
        rule="xid_79",
        evidence=(exit1.id, xid.id),
        causation_id=xid.id,
    )
    b.add(ev.GpuQuarantined, gpu_uuid="G1", node="n1", reason="xid 79", causation_id=cls1.id)
    b.add(ev.GpuReleased, gpu_uuid="G1", node="n1", task_id="t1", attempt=1, causation_id=cls1.id)
    reb = b.add(
        ev.RebuildDecided,
        task_id="t1",
        attempt=2,
        previous_attempt=1,
        fault="gpu_hardware",
        counted=True,
        rule=None,
        not_before=T0 + timedelta(seconds=20),
        exclude_gpus=("G1",),
        causation_id=cls1.id,
    )
    sch2 = b.add(
        ev.TaskScheduled, task_id="t1", attempt=2, node="n2", gpu_uuids=("G3",), causation_id=reb.id
    )
    b.add(ev.GpuAllocated, gpu_uuid="G3", node="n2", task_id="t1", attempt=2, causation_id=sch2.id)
    b.add(
        ev.ContainerStarted, task_id="t1", attempt=2, node="n2", container_id="c2", actor="agent:n2"
    )
    # t2: bad image
    b.add(
        ev.TaskSubmitted,
        task_id="t2",
        name="serve",
        image="bad:0",
        command=("x",),
        owner="bob",
        actor="api",
    )
    b.add(ev.TaskScheduled, task_id="t2", attempt=1, node="n1", gpu_uuids=("G2",))
    b.add(ev.GpuAllocated, gpu_uuid="G2", node="n1", task_id="t2", attempt=1)
    sf = b.add(
        ev.ContainerStartFailed,
        task_id="t2",
        attempt=1,
        node="n1",
        error="image not found",
        actor="agent:n1",
    )
    cls2 = b.add(
        ev.FaultClassified,
        task_id="t2",
        attempt=1,
        fault="image_error",
        rule="start_failed",
        evidence=(sf.id,),
        causation_id=sf.id,
    )
    b.add(
        ev.TaskFailed,
        task_id="t2",
        attempt=1,
        fault="image_error",
        reason="not_target_fault",
        causation_id=cls2.id,
    )
    b.add(ev.GpuReleased, gpu_uuid="G2", node="n1", task_id="t2", attempt=1)
    # t1 finishes
    exit2 = b.add(
        ev.ContainerExited,
        task_id="t1",
        attempt=2,
        node="n2",
        container_id="c2",
        exit_code=0,
        actor="agent:n2",
    )
    cls3 = b.add(
        ev.FaultClassified,
        task_id="t1",
        attempt=2,
        fault="completed",
        rule="exit_zero",
        evidence=(exit2.id,),
        causation_id=exit2.id,
    )
    b.add(ev.TaskCompleted, task_id="t1", attempt=2, causation_id=cls3.id)
    b.add(ev.GpuReleased, gpu_uuid="G3", node="n2", task_id="t1", attempt=2)
    # t3: node lost, then cancelled
    b.add(
        ev.TaskSubmitted,
        task_id="t3",
        name="notebook",
        image="img:2",
        command=("sh",),
        gpus=1,
        owner="carol",
        actor="api",
    )
    b.add(ev.TaskPending, task_id="t3", reason="no free GPU")
    b.add(ev.TaskScheduled, task_id="t3", attempt=1, node="n1", gpu_uuids=("G2",))
    b.add(ev.GpuAllocated, gpu_uuid="G2", node="n1", task_id="t3", attempt=1)
    b.add(ev.ContainerStarted, task_id="t3", attempt=1, node="n1", container_id="c3")
    lost = b.add(ev.NodeLost, node="n1", last_heartbeat_at=T0 + timedelta(seconds=25))
    cls4 = b.add(
        ev.FaultClassified,
        task_id="t3",
        attempt=1,
        fault="node_lost",
        rule="node_lost",
        evidence=(lost.id,),
        causation_id=lost.id,
    )
    b.add(
        ev.RebuildDecided,
        task_id="t3",
        attempt=2,
        previous_attempt=1,
        fault="node_lost",
        counted=False,
        rule=0,
        not_before=T0 + timedelta(seconds=60),
        exclude_nodes=("n1",),
        causation_id=cls4.id,
    )
    b.add(ev.TaskCancelled, task_id="t3", reason="user asked", actor="api")
    b.add(ev.GpuRestored, gpu_uuid="G1", node="n1", reason="reset ok")
    b.add(ev.NodeRecovered, node="n1", last_heartbeat_at=T0 + timedelta(seconds=90))
    b.invalid("gw.evt.task.t9", b'{"type":"task.exploded","id":"x"}', "unknown event type")
    return b


def test_sample_log_covers_every_event_type() -> None:
    seen = {ev.type_of(s.event) for s in sample_log().stored if s.event is not None}
    assert seen == set(ev.EVENT_TYPES)


async def test_list_log_reads_a_range_and_a_subject() -> None:
    log = ListLog(sample_log().stored)
    got = [s.seq async for s in log.read(3, 5)]
    assert got == [3, 4, 5]
    t2 = [s.seq async for s in log.read(subject=ev.task_subject("t2"))]
    assert t2 and all(log.stored[n - 1].subject.startswith("gw.evt.task.t2.") for n in t2)
