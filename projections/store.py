"""The read models in SQLite, kept in step with the log.

A projection that can fall behind or crash must never double-count or skip an event:
each batch's rows and the last applied stream sequence commit in ONE transaction, and
events at or below the checkpoint are skipped, so re-applying is a no-op and a crash
between batches loses nothing.

One writer, one reader. Every batch (apply, catch_up, follow, rebuild) is written by
a writer process (projections/writer_process.py): reading the log and folding it hold
the GIL, so only a writer on another core lets a rebuild keep up with the log
(bench_projections, rebuild/raw, when the process came in: 0.41-0.44 with a writer
thread, 0.61-0.65 with the process). The fold stays here and runs a few batches ahead
of the commits. The store's aiosqlite connection reads: rows a batch needs that memory
does not hold (never one a batch in flight writes: those are in memory), the
checkpoint, the meta table, and the audit queries (projections/queries.py); it also
makes the schema and sets meta.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple

import aiosqlite
import anyio
from anyio.streams.memory import MemoryObjectSendStream
from gpuwarden.engine.ports import ReadableLog, StoredEvent
from gpuwarden.projections.errors import ProjectionStoreError
from gpuwarden.projections.model import (
    Model,
    ReadModelAdmission,
    keys_of,
    project_rows,
    project_values,
)
from gpuwarden.projections.tables import (
    INSERT_EVENT,
    SCHEMA,
    SCHEMA_VERSION,
    TABLES,
    UPSERT_ATTEMPT,
    UPSERT_GPU,
    UPSERT_NODE,
    UPSERT_TASK,
    attempt_params,
    attempt_row,
    gpu_params,
    gpu_row,
    node_params,
    node_row,
    task_params,
    task_row,
)
from gpuwarden.projections.writer import RAW_EVENTS
from gpuwarden.projections.writer_process import WRITER_DEADLINE, WriterProcess

DB_NAME: Final = "projections.sqlite3"
DEFAULT_BATCH: Final = 2000
CACHE_LIMIT: Final = 200_000  # rows kept in memory between batches
# The meta key holding the identity of the GW_EVENTS stream the read models were folded
# from (stream_guard's JSON), so a read can tell when the log was replaced under them.
STREAM_META: Final = "stream"
WRITER_IN_FLIGHT: Final = 4  # batches sent to the writer process and not yet answered
_CHUNK: Final = 500  # SQLite host parameters per IN (...) list

Progress = Callable[[int, int | None], None]
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


class _Folded(NamedTuple):
    tables: list[tuple[str, list[tuple[Any, ...]]]]  # (INSERT head, rows) per table
    last: int
    size: int


# --- the store -----------------------------------------------------------------------


class ProjectionStore:
    """Read models in one SQLite file, with their checkpoint in the same transactions."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.path = path / DB_NAME if path.is_dir() else path
        self._db: aiosqlite.Connection | None = None
        self._writer: WriterProcess | None = None  # started by the first write
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
        except BaseException:
            # aiosqlite's thread is not a daemon: left open, it would hang the exit.
            with anyio.CancelScope(shield=True):
                self._db = None
                await db.close()
            raise
        return self

    async def close(self) -> None:
        await self._stop_writer()
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
        async with self._writes():
            folded = await self._fold(batch)
            if folded is None:
                return 0
            await self._send(folded)
            await self._settle(0)
        self._evict_if_large()
        return folded.size

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
                events = [(INSERT_EVENT, rows), (RAW_EVENTS, stored_rows)]
            else:
                rows = [project_values(model, admitted(stored)) for stored in fresh]
                events = [(INSERT_EVENT, rows)]
            tables = [
                *events,
                (UPSERT_TASK, [task_params(model.tasks[k]) for k in model.dirty_tasks]),
                (UPSERT_ATTEMPT,
                 [attempt_params(model.attempts[k]) for k in model.dirty_attempts]),
                (UPSERT_GPU, [gpu_params(model.gpus[k]) for k in model.dirty_gpus]),
                (UPSERT_NODE, [node_params(model.nodes[k]) for k in model.dirty_nodes]),
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

    async def _writing(self) -> WriterProcess:
        """The writer process, started with the store's pragmas on the first write."""
        if self._writer is None:
            if self._db is None:
                raise ProjectionStoreError(f"projection store {self.path} is not open")
            writer = await WriterProcess.start()
            writer.open(self.path, PRAGMAS)
            self._writer = writer
        return self._writer

    async def _stop_writer(self) -> None:
        """End the writer process; it commits the batches it got whole, then exits."""
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.close()

    async def _send(self, folded: _Folded) -> None:
        (await self._writing()).send_batch(folded.last, folded.tables)

    async def _settle(
        self, keep: int, progress: Progress | None = None, end: int | None = None
    ) -> None:
        """Wait until at most `keep` batches are in flight; a batch's checkpoint is the
        store's once the writer has committed it. A cancel waits for the answers owed."""
        writer = self._writer
        if writer is None:
            return
        with anyio.CancelScope(shield=True):
            while writer.in_flight > keep:
                committed = await writer.committed()
                self._checkpoint = committed
                self._wake(committed)
                if progress is not None:
                    progress(committed, end)

    @asynccontextmanager
    async def _writes(self) -> AsyncIterator[None]:
        """Sending batches to the writer. After any error the writer is stopped (what it
        got whole is committed), memory is dropped and the checkpoint read back, so
        memory never disagrees with what SQLite committed."""
        try:
            yield
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._stop_writer()
                if self._db is not None:
                    self._checkpoint = await self._read_checkpoint()
                self._forget()
                self._wake(self._checkpoint)
            raise

    async def _admission(self) -> ReadModelAdmission:
        """Admission over the current model; the GPUs' nodes seeded from the GPU rows."""
        admission = self._admitting
        if admission is None:
            admission = ReadModelAdmission(self._model)
            if not self._cache_complete:
                sql = "SELECT uuid, node FROM gpus WHERE node IS NOT NULL"
                for uuid, node in await self.db.execute_fetchall(sql):
                    admission.seed_gpu(uuid, node)
            else:
                for row in self._model.gpus.values():
                    if row.node is not None:
                        admission.seed_gpu(row.uuid, row.node)
            self._admitting = admission
        admission.model = self._model  # the model is replaced when memory is evicted
        return admission

    async def _load(self, batch: Sequence[StoredEvent]) -> None:
        """Bring the rows a batch touches into memory (unless memory already has all).

        A row a batch in flight writes is in memory (eviction waits for every commit),
        so what is read here is committed and no batch in flight changes it."""
        if self._cache_complete:
            return
        keys = keys_of(batch)
        model = self._model
        tasks = [k for k in keys.tasks if k not in model.tasks]
        gpus = [k for k in keys.gpus if k not in model.gpus]
        nodes = [k for k in keys.nodes if k not in model.nodes]
        for values in await self._select_in("SELECT * FROM tasks WHERE id IN ({})", tasks):
            model.tasks[values[0]] = task_row(values)
        for values in await self._select_in("SELECT * FROM attempts WHERE task IN ({})", tasks):
            model.attempts.setdefault((values[0], values[1]), attempt_row(values))
        for values in await self._select_in("SELECT * FROM gpus WHERE uuid IN ({})", gpus):
            model.gpus[values[0]] = gpu_row(values)
        for values in await self._select_in("SELECT * FROM nodes WHERE name IN ({})", nodes):
            model.nodes[values[0]] = node_row(values)

    async def _select_in(self, sql: str, keys: list[str]) -> list[Any]:
        rows: list[Any] = []
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            rows += await self.db.execute_fetchall(sql.format(",".join("?" * len(chunk))), chunk)
        return rows

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
        async with self._writes():
            await self._fold_log(log, end, batch_size, progress, raw=False)
        return self._checkpoint

    async def _fold_log(
        self,
        log: ReadableLog,
        end: int | None,
        batch_size: int,
        progress: Progress | None,
        *,
        raw: bool,
    ) -> None:
        """Read the log after the checkpoint up to `end`, fold each batch and hand its
        rows to the writer process, a few batches ahead of its commits."""
        send, receive = anyio.create_memory_object_stream[list[StoredEvent]](2)
        with _first_error():
            async with anyio.create_task_group() as tg:
                tg.start_soon(_read_batches, log, self._checkpoint + 1, end, batch_size, send)
                async with receive:
                    async for batch in receive:
                        folded = await self._fold(batch, raw=raw)
                        if folded is None:
                            continue
                        await self._send(folded)
                        await self._settle(WRITER_IN_FLIGHT, progress, end)
                        if self._large():  # rows evicted from memory reload from SQLite
                            await self._settle(0, progress, end)
                            self._evict_if_large()
                    await self._settle(0, progress, end)

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

        The writer process of a rebuild has pragmas of its own, and builds the events
        index from the stored events' bytes itself (`_fold` with `raw`), which takes a
        third of the fold off this core. Batches commit as they go, each with its
        checkpoint, so a rebuild that is killed resumes with `catch_up`. The indexes are
        kept up as rows go in: that costs the writer time it has spare, while building
        them at the end cost the whole rebuild that time.
        """
        await self._stop_writer()
        async with self._writes():
            self._writer = writer = await WriterProcess.start()
            await self.reset()
            for key, value in (meta or {}).items():
                await self.set_meta(key, value)
            writer.open(self.path, REBUILD_PRAGMAS)
            end = await _end_of(log)
            if progress is not None:
                progress(self._checkpoint, end)
            with _frozen_heap():
                await self._fold_log(log, end, batch_size, progress, raw=True)
            await writer.finish(SCHEMA, WRITER_DEADLINE)
            await self._stop_writer()
        return self._checkpoint


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
