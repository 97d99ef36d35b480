"""Every audit-query filter, against a real SQLite file built from the sample log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from gpuwarden.engine.core import events as ev
from gpuwarden.projections import queries as q
from gpuwarden.projections.errors import TimeFormatError
from gpuwarden.projections.store import ProjectionStore

from tests.test_projections_log import T0, ListLog, sample_log


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ProjectionStore]:
    async with ProjectionStore(tmp_path) as opened:
        await opened.catch_up(ListLog(sample_log().stored))
        yield opened


async def seqs(store: ProjectionStore, **filters: object) -> list[int]:
    return [row.seq for row in await q.events(store, **filters)]  # type: ignore[arg-type]


async def test_no_filter_lists_every_event_in_log_order(store: ProjectionStore) -> None:
    assert await seqs(store) == list(range(1, 39))


async def test_filter_by_task(store: ProjectionStore) -> None:
    assert await seqs(store, task="t2") == [16, 17, 18, 19, 20, 21, 22]


async def test_filter_by_task_and_attempt(store: ProjectionStore) -> None:
    # GPU allocations carry the task too, so they show up in the task's story; the
    # rebuild decision is filed under the attempt it starts (its `attempt` field).
    assert await seqs(store, task="t1", attempt=2) == [12, 13, 14, 15, 23, 24, 25, 26]


async def test_filter_by_gpu(store: ProjectionStore) -> None:
    assert await seqs(store, gpu="G1") == [5, 8, 10, 11, 36]


async def test_filter_by_node(store: ProjectionStore) -> None:
    assert await seqs(store, node="n2") == [2, 13, 14, 15, 23, 26]


async def test_filter_by_type_exact_and_glob(store: ProjectionStore) -> None:
    assert await seqs(store, type="fault.classified") == [9, 20, 24, 33]
    assert await seqs(store, type="node.*") == [1, 2, 32, 37]
    assert await seqs(store, type="!invalid") == [38]


async def test_filter_by_time_window(store: ProjectionStore) -> None:
    since = T0 + timedelta(seconds=30)
    until = T0 + timedelta(seconds=33)
    assert await seqs(store, since=since, until=until) == [30, 31, 32, 33]
    # A time in another zone means the same instant.
    plus2 = timezone(timedelta(hours=2))
    assert await seqs(store, since=since.astimezone(plus2), until=until) == [30, 31, 32, 33]


async def test_limit_keeps_the_newest_still_in_order(store: ProjectionStore) -> None:
    assert await seqs(store, task="t1", limit=3) == [24, 25, 26]


async def test_filters_combine(store: ProjectionStore) -> None:
    assert await seqs(store, node="n1", type="container.*", task="t3") == [31]
    assert await seqs(store, gpu="G2", task="t2", since=T0 + timedelta(seconds=20)) == [22]


async def test_task_tasks_gpus_nodes(store: ProjectionStore) -> None:
    assert [t.id for t in await q.tasks(store)] == ["t1", "t2", "t3"]
    assert [t.id for t in await q.tasks(store, state="failed")] == ["t2"]
    one = await q.task(store, "t1")
    assert one is not None and one.state == "completed"
    assert await q.task(store, "nope") is None
    assert [g.uuid for g in await q.gpus(store)] == ["G1", "G2", "G3"]
    assert [(n.name, n.state) for n in await q.nodes(store)] == [("n1", "alive"), ("n2", "alive")]
    assert [a.attempt for a in await q.attempts(store, "t1")] == [1, 2]


async def test_rows_turn_back_into_the_recorded_events(store: ProjectionStore) -> None:
    original = sample_log().stored
    back = q.stored_events(await q.events(store))
    assert [s.event for s in back] == [s.event for s in original]
    assert back[-1].event is None and back[-1].error == "unknown event type"


async def test_a_task_query_uses_the_task_index(store: ProjectionStore) -> None:
    sql = "EXPLAIN QUERY PLAN SELECT * FROM events WHERE task = ? ORDER BY seq"
    async with store.db.execute(sql, ("t1",)) as cur:
        plan = " ".join(str(row[-1]) for row in await cur.fetchall())
    assert "events_task" in plan and "TEMP B-TREE" not in plan


NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2h", NOW - timedelta(hours=2)),
        ("30m", NOW - timedelta(minutes=30)),
        ("1d", NOW - timedelta(days=1)),
        ("45s", NOW - timedelta(seconds=45)),
        ("1w", NOW - timedelta(weeks=1)),
        ("1.5h", NOW - timedelta(minutes=90)),
        ("2025-02-28T10:00:00Z", datetime(2025, 2, 28, 10, tzinfo=UTC)),
        ("2025-02-28T12:00:00+02:00", datetime(2025, 2, 28, 10, tzinfo=UTC)),
        ("2025-02-28T10:00:00", datetime(2025, 2, 28, 10, tzinfo=UTC)),
        ("2025-02-28", datetime(2025, 2, 28, tzinfo=UTC)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    assert q.parse_time(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "2x", "yesterday", "h2", "2025-13-01"])
def test_parse_time_refuses_nonsense(text: str) -> None:
    with pytest.raises(TimeFormatError, match="duration like 30m"):
        q.parse_time(text, NOW)


def test_sample_subjects_are_per_aggregate() -> None:
    assert sample_log().stored[4].subject == ev.gpu_subject("G1") + ".engine"
