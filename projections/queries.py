"""Audit queries over the read models.

Every query reads SQLite, never the log, so an operator's question costs milliseconds
even on a log of millions of events; the events index keeps the recorded payloads, so
a query result can be turned back into the events themselves (`stored_events`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from gpuwarden.engine.core.errors import EventDecodeError
from gpuwarden.engine.core.events import decode
from gpuwarden.engine.ports import StoredEvent
from gpuwarden.projections.errors import TimeFormatError
from gpuwarden.projections.model import (
    INVALID_TYPE,
    AttemptRow,
    EventRow,
    GpuRow,
    NodeRow,
    TaskRow,
    format_time,
)
from gpuwarden.projections.store import ProjectionStore
from gpuwarden.projections.tables import attempt_row, event_row, gpu_row, node_row, task_row

_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: datetime) -> datetime:
    """`2h`, `30m`, `1d`, `45s`, `1w` ago from `now`, or an ISO-8601 time (UTC if naive)."""
    match = _DURATION.match(text)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        return now - timedelta(seconds=seconds)
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise TimeFormatError(
            f"cannot read time {text!r}: use a duration like 30m, 2h, 1d or ISO-8601 "
            "like 2025-01-31T12:00:00Z"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def _rows(store: ProjectionStore, sql: str, params: Iterable[Any] = ()) -> list[Any]:
    async with store.db.execute(sql, tuple(params)) as cur:
        return list(await cur.fetchall())


async def events(
    store: ProjectionStore,
    *,
    task: str | None = None,
    attempt: int | None = None,
    gpu: str | None = None,
    node: str | None = None,
    type: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
) -> list[EventRow]:
    """Indexed events matching every given filter, in log order (the newest last).

    `type` may end in `*` (`gpu.*`); `limit` keeps the newest N. Undecodable events
    (type '!invalid') have no time, so a `since`/`until` filter leaves them out.
    """
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("task", task), ("attempt", attempt), ("gpu", gpu), ("node", node)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if type is not None:
        if type.endswith("*"):
            where.append("type GLOB ?")
        else:
            where.append("type = ?")
        params.append(type)
    if since is not None:
        where.append("at >= ?")
        params.append(format_time(since))
    if until is not None:
        where.append("at <= ?")
        params.append(format_time(until))
    sql = "SELECT * FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if limit is not None:
        sql = f"SELECT * FROM ({sql} ORDER BY seq DESC LIMIT ?) ORDER BY seq"
        params.append(limit)
    else:
        sql += " ORDER BY seq"
    return [event_row(values) for values in await _rows(store, sql, params)]


async def events_by_ids(store: ProjectionStore, ids: Iterable[str]) -> list[EventRow]:
    """Events by their ids (evidence named by a classification), in log order."""
    wanted = sorted(set(ids))
    if not wanted:
        return []
    sql = f"SELECT * FROM events WHERE id IN ({','.join('?' * len(wanted))}) ORDER BY seq"
    return [event_row(values) for values in await _rows(store, sql, wanted)]


async def tasks(store: ProjectionStore, state: str | None = None) -> list[TaskRow]:
    if state is None:
        rows = await _rows(store, "SELECT * FROM tasks ORDER BY submitted_at, id")
    else:
        sql = "SELECT * FROM tasks WHERE state = ? ORDER BY submitted_at, id"
        rows = await _rows(store, sql, (state,))
    return [task_row(values) for values in rows]


async def task(store: ProjectionStore, task_id: str) -> TaskRow | None:
    rows = await _rows(store, "SELECT * FROM tasks WHERE id = ?", (task_id,))
    return task_row(rows[0]) if rows else None


async def attempts(store: ProjectionStore, task_id: str | None = None) -> list[AttemptRow]:
    if task_id is None:
        rows = await _rows(store, "SELECT * FROM attempts ORDER BY task, attempt")
    else:
        sql = "SELECT * FROM attempts WHERE task = ? ORDER BY attempt"
        rows = await _rows(store, sql, (task_id,))
    return [attempt_row(values) for values in rows]


async def gpus(store: ProjectionStore) -> list[GpuRow]:
    rows = await _rows(store, 'SELECT * FROM gpus ORDER BY node, "index", uuid')
    return [gpu_row(values) for values in rows]


async def nodes(store: ProjectionStore) -> list[NodeRow]:
    return [node_row(values) for values in await _rows(store, "SELECT * FROM nodes ORDER BY name")]


def stored_event(row: EventRow) -> StoredEvent:
    """The recorded event behind an index row (undecodable ones keep their error)."""
    data = row.payload.encode()
    if row.type == INVALID_TYPE:
        return StoredEvent(
            seq=row.seq,
            subject=row.subject,
            event=None,
            data=data,
            error=row.error,
            headers=row.headers,
        )
    try:
        event = decode(data)
    except EventDecodeError as exc:
        return StoredEvent(
            seq=row.seq,
            subject=row.subject,
            event=None,
            data=data,
            error=str(exc),
            headers=row.headers,
        )
    return StoredEvent(
        seq=row.seq, subject=row.subject, event=event, data=data, headers=row.headers
    )


def stored_events(rows: Iterable[EventRow]) -> list[StoredEvent]:
    return [stored_event(row) for row in rows]
