"""The SQLite read models are exactly a fold of the log, batch after batch, crash or not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest
from gpuwarden.projections import model as m
from gpuwarden.projections import queries as q
from gpuwarden.projections import store as store_mod
from gpuwarden.projections.errors import ProjectionStoreError
from gpuwarden.projections.store import ProjectionStore
from gpuwarden.projections.tables import EVENT_INDEXES
from hypothesis import given
from hypothesis import strategies as st

from tests.test_projections_log import T0, ListLog, sample_log


def t(seconds: float) -> str:
    value = m.format_time(T0 + timedelta(seconds=seconds))
    assert value is not None
    return value


EXPECTED_TASKS = [
    m.TaskRow(id="t1", name="train", owner="alice", image="img:1", state="completed",
              attempts=2, current_attempt=2, node="n2", gpus=("G3",),
              last_fault="gpu_hardware", failure_reason=None, submitted_at=t(3),
              updated_at=t(25)),
    m.TaskRow(id="t2", name="serve", owner="bob", image="bad:0", state="failed",
              attempts=1, current_attempt=1, node="n1", gpus=("G2",),
              last_fault="image_error", failure_reason="not_target_fault",
              submitted_at=t(16), updated_at=t(21)),
    m.TaskRow(id="t3", name="notebook", owner="carol", image="img:2", state="cancelled",
              attempts=2, current_attempt=2, node=None, gpus=(), last_fault="node_lost",
              failure_reason=None, submitted_at=t(27), updated_at=t(35)),
]  # fmt: skip
EXPECTED_ATTEMPTS = [
    m.AttemptRow(task="t1", attempt=1, node="n1", gpus=("G1",), container_id="c1",
                 scheduled_at=t(4), started_at=t(6), exited_at=t(7), exit_code=None,
                 signal=9, oom=False, error=None, fault="gpu_hardware", rule="xid_79",
                 outcome="rebuilt"),
    m.AttemptRow(task="t1", attempt=2, node="n2", gpus=("G3",), container_id="c2",
                 scheduled_at=t(13), started_at=t(15), exited_at=t(23), exit_code=0,
                 fault="completed", rule="exit_zero", outcome="completed"),
    m.AttemptRow(task="t2", attempt=1, node="n1", gpus=("G2",), scheduled_at=t(17),
                 exited_at=t(19), error="image not found", fault="image_error",
                 rule="start_failed", outcome="failed"),
    m.AttemptRow(task="t3", attempt=1, node="n1", gpus=("G2",), container_id="c3",
                 scheduled_at=t(29), started_at=t(31), fault="node_lost", rule="node_lost",
                 outcome="rebuilt"),
]  # fmt: skip
EXPECTED_GPUS = [
    m.GpuRow(uuid="G1", node="n1", index=0, model="H100", memory_mb=81920,
             quarantined=False, fault_count=1),
    m.GpuRow(uuid="G2", node="n1", index=1, model="H100", memory_mb=81920,
             allocated_task="t3", allocated_attempt=1),
    m.GpuRow(uuid="G3", node="n2", index=0, model="A100", memory_mb=40960),
]  # fmt: skip
EXPECTED_NODES = [
    m.NodeRow(name="n1", runtime="docker", state="alive", gpus=("G1", "G2"),
              last_heartbeat=t(90)),
    m.NodeRow(name="n2", runtime="docker", state="alive", gpus=("G3",), last_heartbeat=t(2)),
]  # fmt: skip


def sorted_rows(rows: Any) -> list[Any]:
    return sorted(rows, key=repr)


async def snapshot(store: ProjectionStore) -> dict[str, Any]:
    return {
        "tasks": await q.tasks(store),
        "attempts": await q.attempts(store),
        "gpus": await q.gpus(store),
        "nodes": await q.nodes(store),
        "events": await q.events(store),
        "checkpoint": await store.checkpoint(),
    }


def test_fold_of_the_sample_gives_the_hand_computed_rows() -> None:
    model = m.fold(sample_log().stored)
    assert sorted_rows(model.tasks.values()) == sorted_rows(EXPECTED_TASKS)
    assert sorted_rows(model.attempts.values()) == sorted_rows(EXPECTED_ATTEMPTS)
    assert sorted_rows(model.gpus.values()) == sorted_rows(EXPECTED_GPUS)
    assert sorted_rows(model.nodes.values()) == sorted_rows(EXPECTED_NODES)


async def test_store_equals_the_fold(tmp_path: Path) -> None:
    stored = sample_log().stored
    async with ProjectionStore(tmp_path) as store:
        assert store.path == tmp_path / "projections.sqlite3"
        assert await store.catch_up(ListLog(stored), batch_size=7) == len(stored)
        snap = await snapshot(store)
    assert snap["tasks"] == EXPECTED_TASKS
    assert snap["attempts"] == EXPECTED_ATTEMPTS
    assert snap["gpus"] == EXPECTED_GPUS
    assert snap["nodes"] == EXPECTED_NODES
    assert [r.seq for r in snap["events"]] == [s.seq for s in stored]
    assert snap["events"] == [m.index_row(s) for s in stored]


async def test_undecodable_events_are_indexed_not_dropped(tmp_path: Path) -> None:
    async with ProjectionStore(tmp_path) as store:
        await store.catch_up(ListLog(sample_log().stored))
        bad = await q.events(store, type=m.INVALID_TYPE)
    assert len(bad) == 1
    assert (bad[0].seq, bad[0].task, bad[0].error) == (38, "t9", "unknown event type")
    assert bad[0].payload == '{"type":"task.exploded","id":"x"}'


async def test_applying_a_batch_twice_changes_nothing(tmp_path: Path) -> None:
    stored = sample_log().stored
    async with ProjectionStore(tmp_path) as store:
        assert await store.apply(stored[:20]) == 20
        first = await snapshot(store)
        assert await store.apply(stored[:20]) == 0
        assert await snapshot(store) == first
        # An overlapping batch applies only what is past the checkpoint.
        assert await store.apply(stored[10:30]) == 10
        assert await store.apply(stored) == len(stored) - 30
        assert await store.apply(stored) == 0
        assert (await snapshot(store))["tasks"] == EXPECTED_TASKS


async def test_a_store_killed_mid_rebuild_resumes_to_the_same_result(tmp_path: Path) -> None:
    stored = sample_log().stored
    log = ListLog(stored)
    async with ProjectionStore(tmp_path / "whole") as whole:
        await whole.rebuild(log)
        expected = await snapshot(whole)
    path = tmp_path / "killed"
    async with ProjectionStore(path) as store:
        await store.reset()
        for start in range(0, 17, 4):  # committed batches, then the "crash"
            await store.apply(stored[start : min(start + 4, 17)])
        assert await store.checkpoint() == 17
    async with ProjectionStore(path) as store:  # reopened: rows come back from SQLite
        assert await store.checkpoint() == 17
        await store.catch_up(log, batch_size=5)
        assert await snapshot(store) == expected


async def test_rows_reload_from_sqlite_when_the_cache_is_evicted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "CACHE_LIMIT", 2)
    async with ProjectionStore(tmp_path) as store:
        await store.catch_up(ListLog(sample_log().stored), batch_size=3)
        assert await q.tasks(store) == EXPECTED_TASKS
        assert await q.attempts(store) == EXPECTED_ATTEMPTS
        assert await q.gpus(store) == EXPECTED_GPUS


async def test_a_failed_commit_leaves_rows_and_checkpoint_as_they_were(tmp_path: Path) -> None:
    stored = sample_log().stored
    async with ProjectionStore(tmp_path) as store:
        await store.apply(stored[:10])
        before = await snapshot(store)
        # The writer fails after the batch's rows, before COMMIT (at the checkpoint).
        await store.db.execute(
            "CREATE TRIGGER explode BEFORE UPDATE ON checkpoint WHEN NEW.last_seq = 20 "
            "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
        )
        with pytest.raises(ProjectionStoreError, match="disk on fire"):
            await store.apply(stored[10:20])
        assert await snapshot(store) == before
        await store.db.execute("DROP TRIGGER explode")
        await store.apply(stored)
        assert await q.tasks(store) == EXPECTED_TASKS
        assert await q.attempts(store) == EXPECTED_ATTEMPTS


async def test_follow_applies_live_events(tmp_path: Path) -> None:
    stored = sample_log().stored
    log = ListLog(stored[:10])
    async with ProjectionStore(tmp_path) as store:
        await store.catch_up(log)
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.follow, log)
            for item in stored[10:]:
                log.append_stored(item)
            with anyio.fail_after(5):
                await store.wait_for(len(stored))
            tg.cancel_scope.cancel()
        assert await q.tasks(store) == EXPECTED_TASKS
        assert await store.checkpoint() == len(stored)


async def test_rebuild_reports_progress_and_starts_from_scratch(tmp_path: Path) -> None:
    stored = sample_log().stored
    seen: list[tuple[int, int | None]] = []
    async with ProjectionStore(tmp_path) as store:
        await store.apply(stored[:5])
        await store.rebuild(ListLog(stored), progress=lambda d, n: seen.append((d, n)),
                            batch_size=10)  # fmt: skip
        assert await q.nodes(store) == EXPECTED_NODES
    assert seen[0] == (0, 38) and seen[-1] == (38, 38)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


async def test_an_old_schema_is_dropped_and_rebuilt(tmp_path: Path) -> None:
    stored = sample_log().stored
    async with ProjectionStore(tmp_path) as store:
        await store.apply(stored)
        await store.db.execute("UPDATE meta SET value = '0' WHERE key = 'schema'")
    async with ProjectionStore(tmp_path) as store:
        assert await store.checkpoint() == 0
        await store.catch_up(ListLog(stored))
        assert await q.tasks(store) == EXPECTED_TASKS


class DyingLog(ListLog):
    """A log whose reader dies after `limit` events, as a killed rebuild would."""

    def __init__(self, stored: list[Any], limit: int) -> None:
        super().__init__(stored)
        self.limit = limit

    async def read(self, from_seq: int = 1, until_seq: int | None = None, subject: Any = None):  # type: ignore[no-untyped-def]
        count = 0
        async for item in super().read(from_seq, until_seq, subject):
            if count == self.limit:
                raise ConnectionError("killed")
            count += 1
            yield item


async def test_a_real_rebuild_killed_midway_resumes_with_its_indexes(tmp_path: Path) -> None:
    stored = sample_log().stored
    async with ProjectionStore(tmp_path) as store:
        with pytest.raises(ConnectionError, match="killed"):
            await store.rebuild(DyingLog(stored, 25), batch_size=4)
        assert 0 < await store.checkpoint() <= 25
    async with ProjectionStore(tmp_path) as store:  # reopening restores the indexes
        await store.catch_up(ListLog(stored), batch_size=5)
        assert await q.tasks(store) == EXPECTED_TASKS
        assert await q.attempts(store) == EXPECTED_ATTEMPTS
        assert [r.seq for r in await q.events(store, task="t2")] == [16, 17, 18, 19, 20, 21, 22]
        async with store.db.execute("SELECT name FROM sqlite_master WHERE type='index'") as cur:
            names = {row[0] for row in await cur.fetchall()}
        assert set(EVENT_INDEXES) <= names


async def test_a_store_that_cannot_open_does_not_leave_its_connection_thread(
    tmp_path: Path,
) -> None:
    import threading

    from gpuwarden.projections.store import ProjectionStore

    def connections() -> set[threading.Thread]:  # aiosqlite's worker threads, by name
        return {t for t in threading.enumerate() if "connection_worker" in t.name}

    bad = tmp_path / "p.sqlite3"
    bad.write_bytes(b"this is not a SQLite database" * 100)
    before = connections()
    with pytest.raises(Exception):  # noqa: B017 - whatever SQLite says about it
        await ProjectionStore(bad).open()
    for thread in connections() - before:  # ours, if any, must have been closed
        thread.join(5)
        assert not thread.is_alive()


async def test_rebuild_indexes_events_in_its_writer_process_as_apply_does(
    tmp_path: Path,
) -> None:
    """The rebuild's writer process builds index rows from the raw bytes; every kind of
    stored event (with headers, without its bytes, undecodable) must come out as the
    parent's own `index_row` makes it."""
    import msgspec

    stored = sample_log().stored
    assert any(s.event is None for s in stored) and all(s.data for s in stored)
    stored[3] = msgspec.structs.replace(stored[3], headers={"Gw-Basis": "3", "Gw-Trigger": "1-3"})
    stored[5] = msgspec.structs.replace(stored[5], data=b"")  # built in the parent instead
    async with ProjectionStore(tmp_path) as store:
        assert await store.rebuild(ListLog(stored), batch_size=6) == len(stored)
        snap = await snapshot(store)
    assert snap["events"] == [m.index_row(s) for s in stored]
    assert snap["events"][3].headers == {"Gw-Basis": "3", "Gw-Trigger": "1-3"}
    assert (snap["tasks"], snap["attempts"]) == (EXPECTED_TASKS, EXPECTED_ATTEMPTS)


@pytest.mark.parametrize(
    "value",
    [
        datetime(2025, 1, 1, tzinfo=UTC),
        datetime(2025, 1, 1, 0, 0, 1, 1, tzinfo=UTC),
        datetime(2025, 6, 30, 23, 59, 59, 120000, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2025, 1, 1, 12, 30, tzinfo=timezone(timedelta(hours=2))),
        datetime(2025, 1, 1, 12, 30, 0, 5),  # naive: taken as UTC
    ],
)
def test_format_time_is_utc_isoformat_with_microseconds(value: datetime) -> None:
    utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    assert m.format_time(value) == utc.isoformat(timespec="microseconds")


@given(st.datetimes(timezones=st.just(UTC)))
def test_format_time_agrees_with_isoformat_for_any_utc_time(value: datetime) -> None:
    assert m.format_time(value) == value.isoformat(timespec="microseconds")


def test_a_start_after_the_task_ended_does_not_revive_it() -> None:
    """A cancel can race the run: the container's start (and its exit) land after the
    task.cancelled, and the read model must keep saying cancelled, as the engine does."""
    from gpuwarden.engine.core import events as ev

    from tests.test_projections_log import LogBuilder

    b = LogBuilder()
    b.add(ev.NodeRegistered, node="n1", runtime="sim", gpus=(ev.GpuInfo(uuid="G1", index=0),))
    b.add(ev.TaskSubmitted, task_id="t", name="t", image="i", command=("x",), actor="api")
    b.add(ev.TaskScheduled, task_id="t", attempt=1, node="n1", gpu_uuids=("G1",))
    b.add(ev.TaskCancelled, task_id="t", reason="by owner", attempt=1, actor="api")
    b.add(ev.ContainerStarted, task_id="t", attempt=1, node="n1", container_id="c1")
    b.add(ev.ContainerExited, task_id="t", attempt=1, node="n1", container_id="c1", exit_code=137)
    assert m.fold(b.stored).tasks["t"].state == "cancelled"
