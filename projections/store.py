"""The read models in SQLite, kept in step with the log.

A projection that can fall behind or crash must never double-count or skip an event:
each batch's rows and the last applied stream sequence commit in ONE transaction, and
events at or below the checkpoint are skipped, so re-applying is a no-op and a crash
between batches loses nothing. aiosqlite costs about 100 µs per await, so a batch is a
handful of `executemany` calls, not one statement per event.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import os
import queue
import sqlite3
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple, Protocol, TypeVar

import aiosqlite
import anyio
import msgspec
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectSendStream
from gpuwarden.engine.ports import StoredEvent
from gpuwarden.projections.errors import ProjectionStoreError
from gpuwarden.projections.model import (
    AttemptRow,
    EventRow,
    GpuRow,
    Model,
    NodeRow,
    ReadModelAdmission,
    TaskRow,
    keys_of,
    project_rows,
    project_values,
)
from gpuwarden.projections.writer import EVENTS_INSERT, HEADER, RAW_EVENTS, frame, unframe
from gpuwarden.projections.writer import Statement as _Statement
from gpuwarden.projections.writer import inserts as _inserts

DB_NAME: Final = "projections.sqlite3"
SCHEMA_VERSION: Final = "2"
DEFAULT_BATCH: Final = 2000
CACHE_LIMIT: Final = 200_000  # rows kept in memory between batches
# The meta key holding the identity of the GW_EVENTS stream the read models were folded
# from (stream_guard's JSON), so a read can tell when the log was replaced under them.
STREAM_META: Final = "stream"

Progress = Callable[[int, int | None], None]
_T = TypeVar("_T")
# WAL with synchronous=NORMAL: a commit is not fsynced, so a power cut may lose the last
# few transactions, never tear one. That is safe here: each batch commits with its
# checkpoint, so a lost tail only moves the checkpoint back and the log (the truth) is
# re-applied from there.
PRAGMAS: Final = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA temp_store=MEMORY",
    "PRAGMA cache_size=-65536",
)

# A rebuild's writer lets the WAL grow to about 40 MiB between checkpoints (the default
# is 4 MiB): index pages that change again and again are copied into the database once
# per checkpoint, and fewer checkpoints cut the writer's work by a tenth. The last
# checkpoint runs when the writer closes the database, inside the rebuild.
REBUILD_PRAGMAS: Final = (*PRAGMAS, "PRAGMA wal_autocheckpoint=10000")


class ReadableLog(Protocol):
    """The part of the EventLog port the projections read."""

    def read(
        self, from_seq: int = 1, until_seq: int | None = None, subject: str | None = None
    ) -> AsyncIterator[StoredEvent]: ...

    def subscribe(
        self, from_seq: int = 1, subject: str | None = None
    ) -> AsyncIterator[StoredEvent]: ...

    async def last_seq(self, subject: str | None = None) -> int: ...


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


def _task_params(r: TaskRow) -> tuple[Any, ...]:
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


def _attempt_params(r: AttemptRow) -> tuple[Any, ...]:
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


def _gpu_params(r: GpuRow) -> tuple[Any, ...]:
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


def _node_params(r: NodeRow) -> tuple[Any, ...]:
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


_INSERT_EVENT: Final = EVENTS_INSERT
_UPSERT_TASK: Final = _upsert("tasks", TaskRow)
_UPSERT_ATTEMPT: Final = _upsert("attempts", AttemptRow)
_UPSERT_GPU: Final = _upsert("gpus", GpuRow)
_UPSERT_NODE: Final = _upsert("nodes", NodeRow)
_CHUNK: Final = 500  # SQLite host parameters per IN (...) list
# A writer process that says nothing for this long while it owes an answer is hung.
WRITER_DEADLINE: Final = 60.0
WRITER_IN_FLIGHT: Final = 4  # batches sent to the writer process and not yet answered
PIPE_BYTES: Final = 1 << 20


def _chunks(values: Iterable[Any]) -> Iterable[list[Any]]:
    items = list(values)
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


class _Folded(NamedTuple):
    tables: list[tuple[str, list[tuple[Any, ...]]]]  # (INSERT head, rows) per table
    last: int
    size: int


class _Prepared(NamedTuple):
    statements: list[_Statement]
    last: int
    size: int


class _Loaded(NamedTuple):
    tasks: list[Any]
    attempts: list[Any]
    gpus: list[Any]
    nodes: list[Any]


# --- the writer connection (its calls run in a worker thread, one at a time) ---------


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in PRAGMAS:
        conn.execute(pragma)
    return conn


def _set_checkpoint(conn: sqlite3.Connection, last: int) -> None:
    conn.execute("UPDATE checkpoint SET last_seq = ? WHERE id = 1", (last,))


def _write(conn: sqlite3.Connection, statements: list[_Statement], last: int) -> None:
    """One batch and its checkpoint in one transaction: all of it or none of it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, params in statements:
            conn.execute(sql, params)
        _set_checkpoint(conn, last)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _select_in(conn: sqlite3.Connection, sql: str, keys: list[Any]) -> list[Any]:
    rows: list[Any] = []
    for chunk in _chunks(keys):
        marks = ",".join("?" * len(chunk))
        rows.extend(conn.execute(sql.format(marks=marks), chunk).fetchall())
    return rows


def _gpu_nodes(conn: sqlite3.Connection) -> list[Any]:
    return conn.execute("SELECT uuid, node FROM gpus WHERE node IS NOT NULL").fetchall()


def _read_rows(
    conn: sqlite3.Connection, tasks: list[str], gpus: list[str], nodes: list[str]
) -> _Loaded:
    """The persisted rows of these tasks (with their attempts), GPUs and nodes."""
    return _Loaded(
        tasks=_select_in(conn, "SELECT * FROM tasks WHERE id IN ({marks})", tasks),
        attempts=_select_in(conn, "SELECT * FROM attempts WHERE task IN ({marks})", tasks),
        gpus=_select_in(conn, "SELECT * FROM gpus WHERE uuid IN ({marks})", gpus),
        nodes=_select_in(conn, "SELECT * FROM nodes WHERE name IN ({marks})", nodes),
    )


class _Job:
    """One call queued for the writer thread; awaiting it gives its result or error."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[Any] = self.loop.create_future()

    def run(self, conn: sqlite3.Connection) -> None:
        try:
            value, error = self.fn(conn, *self.args), None
        except BaseException as exc:  # handed to the awaiting task, never lost here
            value, error = None, exc
        try:
            self.loop.call_soon_threadsafe(self._settle, value, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _settle(self, value: Any, error: BaseException | None) -> None:
        if self.future.done():  # the waiter was cancelled
            return
        if error is None:
            self.future.set_result(value)
        else:
            self.future.set_exception(error)

    async def result(self) -> Any:
        return await self.future


class _Writer:
    """A stdlib sqlite3 connection owned by one dedicated thread.

    aiosqlite costs a round trip (about 100 µs) per statement; here a whole batch is one
    job. `submit` is synchronous, so the thread starts writing at once while the caller
    folds the next batch, and jobs run in submission order: a load queued after a commit
    sees that commit.
    """

    def __init__(self, path: Path) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.conn = _connect(path)
        self.max_params = self.conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self._thread = threading.Thread(
            target=self._serve, name=f"projections-writer {path.name}", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                job.run(self.conn)
        finally:
            self.conn.close()

    def submit(self, fn: Callable[..., Any], *args: Any) -> _Job:
        job = _Job(fn, args)
        self._jobs.put(job)
        return job

    async def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        result: _T = await self.submit(fn, *args).result()
        return result

    async def close(self) -> None:
        self._jobs.put(None)
        await anyio.to_thread.run_sync(self._thread.join)


# --- the store -----------------------------------------------------------------------


class ProjectionStore:
    """Read models in one SQLite file, with their checkpoint in the same transactions."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.path = path / DB_NAME if path.is_dir() else path
        self._db: aiosqlite.Connection | None = None
        self._writer: _Writer | None = None
        self._model = Model()
        self._admitting: ReadModelAdmission | None = None
        self._cache_complete = False  # every persisted row is in self._model
        self._checkpoint = 0
        self._planned = 0  # last sequence folded into memory (committed or in flight)
        self._waiters: list[tuple[int, anyio.Event]] = []

    # lifecycle ------------------------------------------------------------------------

    async def open(self) -> ProjectionStore:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(self.path, isolation_level=None)
        self._db = db
        try:
            for pragma in PRAGMAS:
                await db.execute(pragma)
            await self._ensure_schema()
            self._writer = await anyio.to_thread.run_sync(_Writer, self.path)
        except BaseException:
            # aiosqlite's thread is not a daemon: left open, it would hang the exit.
            with anyio.CancelScope(shield=True):
                self._db = None
                await db.close()
            raise
        return self

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()
            self._writer = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def __aenter__(self) -> ProjectionStore:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise ProjectionStoreError(f"projection store {self.path} is not open")
        return self._db

    @property
    def writer(self) -> _Writer:
        if self._writer is None:
            raise ProjectionStoreError(f"projection store {self.path} is not open")
        return self._writer

    async def _ensure_schema(self) -> None:
        db = self.db
        await db.executescript(SCHEMA)
        async with db.execute("SELECT value FROM meta WHERE key = 'schema'") as cur:
            found = await cur.fetchone()
        if found is not None and found[0] != SCHEMA_VERSION:
            # Read models are disposable: an old layout is dropped and rebuilt from the log.
            await self._drop()
            await db.executescript(SCHEMA)
        await db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,)
        )
        self._checkpoint = self._planned = await self._read_checkpoint()
        async with db.execute("SELECT 1 FROM tasks UNION ALL SELECT 1 FROM gpus LIMIT 1") as cur:
            empty = await cur.fetchone() is None
        async with db.execute("SELECT 1 FROM nodes LIMIT 1") as cur:
            empty = empty and await cur.fetchone() is None
        self._model = Model()
        self._admitting = None
        self._cache_complete = empty

    async def _drop(self) -> None:
        for table in TABLES:
            await self.db.execute(f"DROP TABLE IF EXISTS {table}")

    async def reset(self) -> None:
        """Empty every read model and the checkpoint (the start of a rebuild)."""
        await self._drop()
        await self._ensure_schema()

    # meta -----------------------------------------------------------------------------

    async def meta(self, key: str) -> str | None:
        """A value of the meta table (None when unset); it goes with the read models,
        so a rebuild or a new schema drops it."""
        async with self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value)
        )

    # checkpoint -----------------------------------------------------------------------

    async def _read_checkpoint(self) -> int:
        async with self.db.execute("SELECT last_seq FROM checkpoint WHERE id = 1") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def checkpoint(self) -> int:
        """The last stream sequence whose effects are committed."""
        return await self._read_checkpoint()

    async def wait_for(self, seq: int) -> None:
        """Return once events up to `seq` are committed (callers add their own deadline)."""
        if self._checkpoint >= seq:
            return
        done = anyio.Event()
        self._waiters.append((seq, done))
        await done.wait()

    # writing --------------------------------------------------------------------------

    async def apply(self, batch: Sequence[StoredEvent]) -> int:
        """Apply a batch in one transaction; returns how many events were new."""
        prepared = await self._prepare(batch)
        if prepared is None:
            return 0
        await self._commit(prepared)
        self._evict_if_large()
        return prepared.size

    async def _prepare(self, batch: Sequence[StoredEvent]) -> _Prepared | None:
        """Fold a batch into memory and freeze its SQL parameters (no write yet)."""
        folded = await self._fold(batch)
        if folded is None:
            return None
        limit = self.writer.max_params
        statements: list[_Statement] = []
        for head, rows in folded.tables:
            statements += _inserts(head, rows, limit)
        return _Prepared(statements=statements, last=folded.last, size=folded.size)

    async def _fold(self, batch: Sequence[StoredEvent], raw: bool = False) -> _Folded | None:
        """Fold a batch into memory and freeze the rows it writes (no write yet).

        With `raw`, the events index goes as the stored events themselves (sequence,
        subject, headers, bytes, and the time as text) under RAW_EVENTS, for the writer
        process to decode and index on its own core; only an event without its bytes
        gets its row built here. That relies on `event` being the decoding of `data`,
        as it is for everything read from JetStream (`stored_event`); a log that pairs
        bytes with some other event must not be rebuilt this way.
        """
        fresh: list[StoredEvent] = []
        last = self._planned
        for stored in batch:
            if stored.seq > last:
                fresh.append(stored)
                last = stored.seq
        if not fresh:
            return None
        await self._load(fresh)
        model = self._model
        admission = await self._admission()
        try:
            # Each event is admitted against the rows as the events before it left them.
            admitted = admission.admitted
            if raw:
                rows, stored_rows = [], []
                for stored in fresh:
                    stored = admitted(stored)
                    if stored.event is not None and stored.data:
                        at = project_rows(model, stored.event)
                        stored_rows.append(
                            (stored.seq, stored.subject, stored.headers or None, stored.data, at)
                        )
                    else:
                        rows.append(project_values(model, stored))
                events = [(_INSERT_EVENT, rows), (RAW_EVENTS, stored_rows)]
            else:
                rows = [project_values(model, admitted(stored)) for stored in fresh]
                events = [(_INSERT_EVENT, rows)]
            tables = [
                *events,
                (_UPSERT_TASK, [_task_params(model.tasks[k]) for k in model.dirty_tasks]),
                (_UPSERT_ATTEMPT,
                 [_attempt_params(model.attempts[k]) for k in model.dirty_attempts]),
                (_UPSERT_GPU, [_gpu_params(model.gpus[k]) for k in model.dirty_gpus]),
                (_UPSERT_NODE, [_node_params(model.nodes[k]) for k in model.dirty_nodes]),
            ]  # fmt: skip
        except BaseException:
            self._forget()
            raise
        model.clear_dirty()
        self._planned = last
        return _Folded(tables=[(h, rows) for h, rows in tables if rows], last=last, size=len(fresh))

    def _forget(self) -> None:
        """Memory holds changes that will not be committed: drop it, reload from SQLite."""
        self._model = Model()
        self._admitting = None
        self._cache_complete = False
        self._planned = self._checkpoint

    def _large(self) -> bool:
        model = self._model
        return len(model.tasks) + len(model.attempts) + len(model.gpus) > CACHE_LIMIT

    def _evict_if_large(self) -> None:
        if self._large():
            self._model = Model()
            self._cache_complete = False

    async def _commit(self, prepared: _Prepared) -> None:
        await self._settle(self.writer.submit(_write, prepared.statements, prepared.last), prepared)

    async def _settle(self, job: _Job, prepared: _Prepared) -> None:
        """Wait for a batch's commit; only then is its checkpoint the store's."""
        try:
            # The transaction runs whole in the writer thread; a cancel waits for it, so
            # memory never disagrees with what SQLite committed.
            with anyio.CancelScope(shield=True):
                await job.result()
        except BaseException:
            self._forget()
            raise
        self._checkpoint = prepared.last
        self._wake(prepared.last)

    async def _admission(self) -> ReadModelAdmission:
        """Admission over the current model; the GPUs' nodes seeded from the GPU rows."""
        admission = self._admitting
        if admission is None:
            admission = ReadModelAdmission(self._model)
            if not self._cache_complete:
                for uuid, node in await self.writer.call(_gpu_nodes):
                    admission.seed_gpu(uuid, node)
            else:
                for row in self._model.gpus.values():
                    if row.node is not None:
                        admission.seed_gpu(row.uuid, row.node)
            self._admitting = admission
        admission.model = self._model  # the model is replaced when memory is evicted
        return admission

    async def _load(self, batch: Sequence[StoredEvent]) -> None:
        """Bring the rows a batch touches into memory (unless memory already has all)."""
        if self._cache_complete:
            return
        keys = keys_of(batch)
        model = self._model
        loaded = await self.writer.call(
            _read_rows,
            [k for k in keys.tasks if k not in model.tasks],
            [k for k in keys.gpus if k not in model.gpus],
            [k for k in keys.nodes if k not in model.nodes],
        )
        for values in loaded.tasks:
            model.tasks[values[0]] = task_row(values)
        for values in loaded.attempts:
            model.attempts[(values[0], values[1])] = attempt_row(values)
        for values in loaded.gpus:
            model.gpus[values[0]] = gpu_row(values)
        for values in loaded.nodes:
            model.nodes[values[0]] = node_row(values)

    def _wake(self, last: int) -> None:
        waiting = []
        for seq, done in self._waiters:
            if seq <= last:
                done.set()
            else:
                waiting.append((seq, done))
        self._waiters = waiting

    # following the log ----------------------------------------------------------------

    async def catch_up(
        self,
        log: ReadableLog,
        batch_size: int = DEFAULT_BATCH,
        progress: Progress | None = None,
    ) -> int:
        """Apply everything after the checkpoint up to the log's current end."""
        end = await _end_of(log)
        if progress is not None:
            progress(self._checkpoint, end)
        send, receive = anyio.create_memory_object_stream[list[StoredEvent]](2)
        with _first_error():
            async with anyio.create_task_group() as tg:
                tg.start_soon(_read_batches, log, self._checkpoint + 1, end, batch_size, send)
                async with receive:
                    await self._apply_stream(receive, progress, end)
        return self._checkpoint

    async def _apply_stream(
        self,
        batches: AsyncIterator[list[StoredEvent]],
        progress: Progress | None,
        end: int | None,
    ) -> None:
        """Fold batch k+1 in memory while batch k commits in the writer thread.

        At most one commit is in flight. A load of rows from SQLite (when memory does not
        hold them all) queues behind it in the same thread, so it never sees a
        half-written transaction.
        """
        pending: tuple[_Job, _Prepared] | None = None

        async def settle() -> None:
            nonlocal pending
            if pending is not None:
                job, prepared = pending
                pending = None
                await self._settle(job, prepared)
                if progress is not None:
                    progress(self._checkpoint, end)

        try:
            async for batch in batches:
                prepared = await self._prepare(batch)
                if prepared is None:
                    continue
                await settle()
                job = self.writer.submit(_write, prepared.statements, prepared.last)
                pending = (job, prepared)
                if self._large():
                    await settle()
                    self._evict_if_large()
        finally:
            with anyio.CancelScope(shield=True):
                await settle()

    async def follow(self, log: ReadableLog, batch_size: int = DEFAULT_BATCH) -> None:
        """Apply live events forever, batching whatever has arrived since the last commit."""
        send, receive = anyio.create_memory_object_stream[StoredEvent](batch_size * 4)
        with _first_error():
            async with anyio.create_task_group() as tg:
                tg.start_soon(_forward, log.subscribe(self._checkpoint + 1), send)
                async with receive:
                    async for first in receive:
                        batch = [first]
                        while len(batch) < batch_size:
                            try:
                                batch.append(receive.receive_nowait())
                            except (anyio.WouldBlock, anyio.EndOfStream):
                                break
                        await self.apply(batch)

    async def rebuild(
        self,
        log: ReadableLog,
        progress: Progress | None = None,
        batch_size: int = DEFAULT_BATCH,
        meta: Mapping[str, str] | None = None,
    ) -> int:
        """Drop every read model and fold the whole log again.

        `meta` is recorded in the emptied store before the fold (the identity of the
        stream it folds), so a rebuild that is killed leaves it with what it came from.

        The fold stays here; the SQLite writes and the index build run in a writer
        process on another core (a thread would only take turns under the GIL). Batches
        commit there as they go, each with its checkpoint, so a rebuild that is killed
        resumes with `catch_up`. The indexes are kept up as rows go in: that costs the
        writer time it has spare, while building them at the end cost the whole rebuild
        that time.
        """
        writer = await _WriterProcess.start()
        try:
            await self.reset()
            for key, value in (meta or {}).items():
                await self.set_meta(key, value)
            await writer.open(self.path)
            end = await _end_of(log)
            if progress is not None:
                progress(self._checkpoint, end)
            send, receive = anyio.create_memory_object_stream[list[StoredEvent]](2)
            with _first_error():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_read_batches, log, self._checkpoint + 1, end, batch_size, send)
                    async with receive:
                        with _frozen_heap():
                            await self._feed(writer, receive, progress, end)
            await writer.finish(SCHEMA, WRITER_DEADLINE)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await writer.close()  # it commits the batches it got whole, then exits
                self._checkpoint = await self._read_checkpoint()
                self._forget()
                self._wake(self._checkpoint)
            raise
        await writer.close()
        return self._checkpoint

    async def _feed(
        self,
        writer: _WriterProcess,
        batches: AsyncIterator[list[StoredEvent]],
        progress: Progress | None,
        end: int | None,
    ) -> None:
        """Fold each batch and hand its rows to the writer process, a few batches ahead."""
        sent: deque[int] = deque()

        async def settle(keep: int) -> None:
            while len(sent) > keep:
                committed = await writer.answer()
                if committed != sent.popleft():
                    raise ProjectionStoreError(f"writer process committed {committed} out of order")
                self._checkpoint = committed
                self._wake(committed)
                if progress is not None:
                    progress(committed, end)

        async for batch in batches:
            folded = await self._fold(batch, raw=True)
            if folded is None:
                continue
            writer.send(["batch", folded.last, folded.tables])
            sent.append(folded.last)
            await settle(WRITER_IN_FLIGHT)
            if self._large():  # rows evicted from memory reload from committed SQLite
                await settle(0)
                self._evict_if_large()
        await settle(0)


class _WriterProcess:
    """projections/writer.py in a child process, fed length-prefixed msgpack on stdin.

    A thread writes to the pipe (the write releases the GIL, and the fold never waits
    for the child to drain it). Every wait has a deadline, an error in the child comes
    back as its traceback in a ProjectionStoreError, and the child exits at the end of
    its input, so it never outlives this process.
    """

    def __init__(self, process: Process, pipe: int) -> None:
        self._process = process
        assert process.stdout is not None
        self._replies = BufferedByteReceiveStream(process.stdout)
        self._outbox: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        self._sender = threading.Thread(
            target=_pump, args=(pipe, self._outbox), name="projections-writer-pipe", daemon=True
        )
        self._sender.start()

    @classmethod
    async def start(cls) -> _WriterProcess:
        command = [sys.executable, "-m", "gpuwarden.projections.writer"]
        child_end, pipe = os.pipe()
        try:
            with suppress(OSError, AttributeError):  # a larger pipe: fewer wake-ups
                fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            process = await anyio.open_process(command, stdin=child_end, stderr=None)
        except BaseException:
            os.close(pipe)
            raise
        finally:
            os.close(child_end)
        return cls(process, pipe)

    async def open(self, path: Path) -> None:
        self.send(["open", str(path), REBUILD_PRAGMAS])

    def send(self, message: Any) -> None:
        self._outbox.put(frame(message))

    async def answer(self, deadline: float = WRITER_DEADLINE) -> int:
        """The sequence of the next batch the child committed."""
        try:
            with anyio.fail_after(deadline):
                (size,) = HEADER.unpack(await self._replies.receive_exactly(HEADER.size))
                reply = unframe(await self._replies.receive_exactly(size))
        except TimeoutError:
            raise ProjectionStoreError(
                f"projection writer process gave no answer for {deadline:.0f}s"
            ) from None
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
            raise ProjectionStoreError(
                f"projection writer process exited (code {self._process.returncode})"
            ) from None
        if reply[0] == "error":
            raise ProjectionStoreError(f"projection writer process failed:\n{reply[1]}")
        last: int = reply[1]
        return last

    async def finish(self, script: str, deadline: float) -> None:
        self.send(["finish", script])
        await self.answer(deadline)

    async def close(self) -> None:
        """End its input (it commits what it got whole, then exits) and reap it."""
        with anyio.CancelScope(shield=True):
            self._outbox.put(None)
            try:
                with anyio.fail_after(WRITER_DEADLINE):
                    await self._process.wait()
            except TimeoutError:
                self._process.kill()  # the pipe breaks, so the sender thread ends too
            await self._process.aclose()
            await anyio.to_thread.run_sync(self._sender.join, WRITER_DEADLINE)


def _pump(pipe: int, outbox: queue.SimpleQueue[bytearray | None]) -> None:
    """Write each framed message to the child until told to stop or the pipe breaks."""
    try:
        while (data := outbox.get()) is not None:
            view = memoryview(data)
            while view:
                view = view[os.write(pipe, view) :]
    except OSError:  # the child is gone; its exit or silence is reported by `answer`
        pass
    finally:
        os.close(pipe)


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """Keep the collector off the objects that existed before a bulk fold.

    A rebuild allocates millions of short-lived rows; every full collection would walk
    the whole heap again for nothing (about 5% of a rebuild). Frozen objects are still
    collected once unfrozen.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def _first_error() -> Iterator[None]:
    """Callers catch the log's or SQLite's own error, not a task group's wrapper."""
    try:
        yield
    except BaseExceptionGroup as group:
        while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
            group = group.exceptions[0]
        raise group from None


async def _end_of(log: ReadableLog) -> int | None:
    last_seq = getattr(log, "last_seq", None)
    if last_seq is None:
        return None
    end: int = await last_seq()
    return end


async def _read_batches(
    log: ReadableLog,
    from_seq: int,
    until_seq: int | None,
    batch_size: int,
    send: MemoryObjectSendStream[list[StoredEvent]],
) -> None:
    async with send:
        if until_seq is not None and until_seq < from_seq:
            return
        batch: list[StoredEvent] = []
        # The consumer closes its end when it fails: its error is the one to report.
        with suppress(anyio.BrokenResourceError):
            async for stored in log.read(from_seq, until_seq):
                batch.append(stored)
                if len(batch) >= batch_size:
                    await send.send(batch)
                    batch = []
            if batch:
                await send.send(batch)


async def _forward(
    source: AsyncIterator[StoredEvent], send: MemoryObjectSendStream[StoredEvent]
) -> None:
    async with send:
        async for stored in source:
            await send.send(stored)


async def open_store(data_dir: str | Path) -> ProjectionStore:
    """The projection store of a data directory, opened."""
    return await ProjectionStore(Path(data_dir) / DB_NAME).open()
