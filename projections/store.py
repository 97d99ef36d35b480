"""The read models in SQLite, kept in step with the log.

A projection that can fall behind or crash must never double-count or skip an event:
each batch's rows and the last applied stream sequence commit in ONE transaction, and
events at or below the checkpoint are skipped, so re-applying is a no-op and a crash
between batches loses nothing. aiosqlite costs about 100 µs per await, so a batch is a
handful of `executemany` calls, not one statement per event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple, Protocol

import aiosqlite
import anyio
import msgspec
from anyio.streams.memory import MemoryObjectSendStream
from gpuwarden.engine.ports import StoredEvent
from gpuwarden.projections.errors import ProjectionStoreError
from gpuwarden.projections.model import (
    AttemptRow,
    EventRow,
    GpuRow,
    Model,
    NodeRow,
    TaskRow,
    keys_of,
    project,
)

DB_NAME: Final = "projections.sqlite3"
SCHEMA_VERSION: Final = "2"
DEFAULT_BATCH: Final = 2000
CACHE_LIMIT: Final = 200_000  # rows kept in memory between batches

Progress = Callable[[int, int | None], None]


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


def _to_params(row: msgspec.Struct) -> tuple[Any, ...]:
    values = msgspec.structs.astuple(row)
    return tuple(_json.encode(v).decode() if isinstance(v, tuple) else v for v in values)


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


def _event_params(row: EventRow) -> tuple[Any, ...]:
    return (
        row.seq,
        row.subject,
        row.type,
        row.task,
        row.attempt,
        row.gpu,
        row.node,
        row.container,
        row.at,
        row.actor,
        row.id,
        row.causation,
        row.correlation,
        row.error,
        _json.encode(row.headers).decode() if row.headers else None,
        row.payload,
    )


def _upsert(table: str, cls: type[msgspec.Struct]) -> str:
    names = ", ".join(f'"{n}"' for n in _fields(cls))
    marks = ", ".join("?" for _ in _fields(cls))
    return f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})"


_INSERT_EVENT: Final = f"INSERT INTO events VALUES ({', '.join('?' * 16)})"
_UPSERT_TASK: Final = _upsert("tasks", TaskRow)
_UPSERT_ATTEMPT: Final = _upsert("attempts", AttemptRow)
_UPSERT_GPU: Final = _upsert("gpus", GpuRow)
_UPSERT_NODE: Final = _upsert("nodes", NodeRow)
_CHUNK: Final = 500  # SQLite host parameters per IN (...) list


def _chunks(values: Iterable[Any]) -> Iterable[list[Any]]:
    items = list(values)
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


class _Prepared(NamedTuple):
    events: list[tuple[Any, ...]]
    rows: list[tuple[str, list[tuple[Any, ...]]]]
    last: int
    size: int


# --- the store -----------------------------------------------------------------------


class ProjectionStore:
    """Read models in one SQLite file, with their checkpoint in the same transactions."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.path = path / DB_NAME if path.is_dir() else path
        self._db: aiosqlite.Connection | None = None
        self._model = Model()
        self._cache_complete = False  # every persisted row is in self._model
        self._checkpoint = 0
        self._planned = 0  # last sequence folded into memory (committed or in flight)
        self._waiters: list[tuple[int, anyio.Event]] = []

    # lifecycle ------------------------------------------------------------------------

    async def open(self) -> ProjectionStore:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(self.path, isolation_level=None)
        self._db = db
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=NORMAL",
            "PRAGMA temp_store=MEMORY",
            "PRAGMA cache_size=-65536",
        ):
            await db.execute(pragma)
        await self._ensure_schema()
        return self

    async def close(self) -> None:
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
        self._cache_complete = empty

    async def _drop(self) -> None:
        for table in TABLES:
            await self.db.execute(f"DROP TABLE IF EXISTS {table}")

    async def reset(self) -> None:
        """Empty every read model and the checkpoint (the start of a rebuild)."""
        await self._drop()
        await self._ensure_schema()

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
        try:
            events = [_event_params(project(model, stored)) for stored in fresh]
            rows = [
                (_UPSERT_TASK, [_to_params(model.tasks[k]) for k in model.dirty_tasks]),
                (_UPSERT_ATTEMPT, [_to_params(model.attempts[k]) for k in model.dirty_attempts]),
                (_UPSERT_GPU, [_to_params(model.gpus[k]) for k in model.dirty_gpus]),
                (_UPSERT_NODE, [_to_params(model.nodes[k]) for k in model.dirty_nodes]),
            ]
        except BaseException:
            self._forget()
            raise
        model.clear_dirty()
        self._planned = last
        return _Prepared(events=events, rows=rows, last=last, size=len(fresh))

    def _forget(self) -> None:
        """Memory holds changes that will not be committed: drop it, reload from SQLite."""
        self._model = Model()
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
        db = self.db
        try:
            await db.execute("BEGIN IMMEDIATE")
            try:
                await db.executemany(_INSERT_EVENT, prepared.events)
                for sql, params in prepared.rows:
                    if params:
                        await db.executemany(sql, params)
                await db.execute(
                    "UPDATE checkpoint SET last_seq = ? WHERE id = 1", (prepared.last,)
                )
                await db.execute("COMMIT")
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await db.execute("ROLLBACK")
                raise
        except BaseException:
            self._forget()
            raise
        self._checkpoint = prepared.last
        self._wake(prepared.last)

    async def _load(self, batch: Sequence[StoredEvent]) -> None:
        """Bring the rows a batch touches into memory (unless memory already has all)."""
        if self._cache_complete:
            return
        keys = keys_of(batch)
        model = self._model
        tasks = [k for k in keys.tasks if k not in model.tasks]
        for chunk in _chunks(tasks):
            marks = ",".join("?" * len(chunk))
            for values in await self._fetch(f"SELECT * FROM tasks WHERE id IN ({marks})", chunk):
                model.tasks[values[0]] = task_row(values)
            sql = f"SELECT * FROM attempts WHERE task IN ({marks})"
            for values in await self._fetch(sql, chunk):
                model.attempts[(values[0], values[1])] = attempt_row(values)
        for uuids in _chunks(k for k in keys.gpus if k not in model.gpus):
            sql = f"SELECT * FROM gpus WHERE uuid IN ({','.join('?' * len(uuids))})"
            for values in await self._fetch(sql, uuids):
                model.gpus[values[0]] = gpu_row(values)
        for names in _chunks(k for k in keys.nodes if k not in model.nodes):
            sql = f"SELECT * FROM nodes WHERE name IN ({','.join('?' * len(names))})"
            for values in await self._fetch(sql, names):
                model.nodes[values[0]] = node_row(values)

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async with self.db.execute(sql, params) as cur:
            return list(await cur.fetchall())

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
        """Fold batch k+1 in memory while batch k commits in SQLite's thread.

        At most one commit is in flight. Loading rows from SQLite (when memory does not
        hold them all) waits for it, so a load never sees a half-written transaction.
        """

        async def commit(prepared: _Prepared, done: anyio.Event) -> None:
            await self._commit(prepared)
            done.set()
            if progress is not None:
                progress(self._checkpoint, end)

        previous: anyio.Event | None = None
        async with anyio.create_task_group() as tg:
            async for batch in batches:
                if previous is not None and not self._cache_complete:
                    await previous.wait()
                prepared = await self._prepare(batch)
                if prepared is None:
                    continue
                if previous is not None:
                    await previous.wait()
                previous = anyio.Event()
                tg.start_soon(commit, prepared, previous)
                if self._large():
                    await previous.wait()
                    self._evict_if_large()

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
    ) -> int:
        """Drop every read model and fold the whole log again.

        Batches commit as they go, so a rebuild that is killed resumes with `catch_up`.
        """
        await self.reset()
        # Building the index once at the end is cheaper than growing it row by row; if
        # the rebuild is killed, the next open re-creates it (CREATE ... IF NOT EXISTS).
        for name in EVENT_INDEXES:
            await self.db.execute(f"DROP INDEX IF EXISTS {name}")
        last = await self.catch_up(log, batch_size=batch_size, progress=progress)
        await self.db.executescript(SCHEMA)
        return last


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
