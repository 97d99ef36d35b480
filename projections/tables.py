"""The read models' SQLite tables: their schema, and how rows map to and from columns.

The store writes rows as parameter tuples (`*_params`, under the INSERT heads below)
and the audit queries read them back (`task_row`, `event_row`, ...); both sides of a
column's encoding (a tuple of GPUs as JSON text, a flag as 0/1) live here together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec
from gpuwarden.projections.model import AttemptRow, EventRow, GpuRow, NodeRow, TaskRow
from gpuwarden.projections.writer import EVENTS_INSERT

# A store of another version is dropped on open and rebuilt from the log.
SCHEMA_VERSION: Final = "2"
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoint (
    id INTEGER PRIMARY KEY CHECK (id = 1), last_seq INTEGER NOT NULL);
INSERT OR IGNORE INTO checkpoint (id, last_seq) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, subject TEXT NOT NULL, type TEXT NOT NULL,
    task TEXT, attempt INTEGER, gpu TEXT, node TEXT, container TEXT, at TEXT,
    actor TEXT, id TEXT, causation TEXT, correlation TEXT, error TEXT,
    headers TEXT, payload TEXT NOT NULL);
-- An index entry is (column, rowid) and seq is the rowid, so each of these also
-- returns one task's (GPU's, node's) events in log order without a sort.
CREATE INDEX IF NOT EXISTS events_task ON events (task) WHERE task IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_gpu ON events (gpu) WHERE gpu IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_node ON events (node) WHERE node IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_type ON events (type);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
CREATE INDEX IF NOT EXISTS events_id ON events (id) WHERE id IS NOT NULL;
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, name TEXT, owner TEXT, image TEXT, state TEXT NOT NULL,
    attempts INTEGER NOT NULL, current_attempt INTEGER, node TEXT, gpus TEXT NOT NULL,
    last_fault TEXT, failure_reason TEXT, submitted_at TEXT, updated_at TEXT)
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_state ON tasks (state);
CREATE TABLE IF NOT EXISTS attempts (
    task TEXT NOT NULL, attempt INTEGER NOT NULL, node TEXT, gpus TEXT NOT NULL,
    container_id TEXT, scheduled_at TEXT, started_at TEXT, exited_at TEXT,
    exit_code INTEGER, signal INTEGER, oom INTEGER NOT NULL, error TEXT, fault TEXT,
    rule TEXT, outcome TEXT, PRIMARY KEY (task, attempt)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gpus (
    uuid TEXT PRIMARY KEY, node TEXT, "index" INTEGER, model TEXT, memory_mb INTEGER,
    quarantined INTEGER NOT NULL, allocated_task TEXT, allocated_attempt INTEGER,
    fault_count INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, runtime TEXT, state TEXT NOT NULL, gpus TEXT NOT NULL,
    last_heartbeat TEXT) WITHOUT ROWID;
"""
EVENT_INDEXES: Final = (
    "events_task",
    "events_gpu",
    "events_node",
    "events_type",
    "events_at",
    "events_id",
)
TABLES: Final = ("events", "tasks", "attempts", "gpus", "nodes", "checkpoint", "meta")


# --- rows <-> SQLite -----------------------------------------------------------------


_json: Final = msgspec.json.Encoder()
_unjson: Final = msgspec.json.Decoder()


def _fields(cls: type[msgspec.Struct]) -> tuple[str, ...]:
    return cls.__struct_fields__


def _text(values: tuple[str, ...]) -> str:
    return _json.encode(values).decode()


def task_params(r: TaskRow) -> tuple[Any, ...]:
    return (
        r.id,
        r.name,
        r.owner,
        r.image,
        r.state,
        r.attempts,
        r.current_attempt,
        r.node,
        _text(r.gpus),
        r.last_fault,
        r.failure_reason,
        r.submitted_at,
        r.updated_at,
    )


def attempt_params(r: AttemptRow) -> tuple[Any, ...]:
    return (
        r.task,
        r.attempt,
        r.node,
        _text(r.gpus),
        r.container_id,
        r.scheduled_at,
        r.started_at,
        r.exited_at,
        r.exit_code,
        r.signal,
        int(r.oom),
        r.error,
        r.fault,
        r.rule,
        r.outcome,
    )


def gpu_params(r: GpuRow) -> tuple[Any, ...]:
    return (
        r.uuid,
        r.node,
        r.index,
        r.model,
        r.memory_mb,
        int(r.quarantined),
        r.allocated_task,
        r.allocated_attempt,
        r.fault_count,
    )


def node_params(r: NodeRow) -> tuple[Any, ...]:
    return (r.name, r.runtime, r.state, _text(r.gpus), r.last_heartbeat)


def _row_kwargs(cls: type[msgspec.Struct], values: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(_fields(cls), values, strict=True))


def task_row(values: Sequence[Any]) -> TaskRow:
    kw = _row_kwargs(TaskRow, values)
    kw["gpus"] = tuple(_unjson.decode(kw["gpus"]))
    return TaskRow(**kw)


def attempt_row(values: Sequence[Any]) -> AttemptRow:
    kw = _row_kwargs(AttemptRow, values)
    kw["gpus"] = tuple(_unjson.decode(kw["gpus"]))
    kw["oom"] = bool(kw["oom"])
    return AttemptRow(**kw)


def gpu_row(values: Sequence[Any]) -> GpuRow:
    kw = _row_kwargs(GpuRow, values)
    kw["quarantined"] = bool(kw["quarantined"])
    return GpuRow(**kw)


def node_row(values: Sequence[Any]) -> NodeRow:
    kw = _row_kwargs(NodeRow, values)
    kw["gpus"] = tuple(_unjson.decode(kw["gpus"]))
    return NodeRow(**kw)


def event_row(values: Sequence[Any]) -> EventRow:
    kw = _row_kwargs(EventRow, values)
    kw["headers"] = _unjson.decode(kw["headers"]) if kw["headers"] else {}
    return EventRow(**kw)


def _upsert(table: str, cls: type[msgspec.Struct]) -> str:
    names = ", ".join(f'"{n}"' for n in _fields(cls))
    return f"INSERT OR REPLACE INTO {table} ({names}) VALUES "


INSERT_EVENT: Final = EVENTS_INSERT
UPSERT_TASK: Final = _upsert("tasks", TaskRow)
UPSERT_ATTEMPT: Final = _upsert("attempts", AttemptRow)
UPSERT_GPU: Final = _upsert("gpus", GpuRow)
UPSERT_NODE: Final = _upsert("nodes", NodeRow)
