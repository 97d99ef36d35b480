"""The node agent's way to the event log: the outbox, and the courier that empties it.

A node's facts must reach the log even when the log cannot take them now (NATS
restarting, JetStream without a leader, GW_EVENTS at its limits). The agent appends
straight to the log while it takes writes; from the first refused append until the
outbox is empty again, every observation queues in the `Outbox` behind the older ones,
and one `Courier` appends them in order (pipelined per aggregate, with a capped
backoff while refused), so the events of a container reach the log in the order they
happened. It says once per outage, at warning level, what it waits for, and again
when the log took everything.

With a state directory the outbox is a journal, `outbox.jsonl`: one line per record,
each with the CRC-32 of its payload. `+<crc> <event as JSON>` adds an event; `-<crc>
<event id>` says the log stored it. An add is written and fsynced before `put`
returns, so what the agent said it kept survives a kill -9 (and a command whose
outcome is kept here may be acked). A removal is not fsynced: lost in a crash, the
event is sent again after the restart and the log drops it (`Nats-Msg-Id`: ids are
stable, and keyed by the node's credentials alone; only a re-send later than the
stream's duplicate window, minutes, is stored again, and the fold takes an attempt's
second start or exit as no news). A torn last line (a crash mid-write)
or a corrupt one is skipped when the journal is read, said at warning level, and the
journal is rewritten without it; the rewrite is atomic (temporary file, fsync, rename,
fsync of the directory). The journal is emptied whenever the outbox empties, and
rewritten whenever it grows past a few times the capacity. An exclusive lock on
`<state-dir>/lock` keeps a second agent out of the same directory.

Bounded: at most `capacity` events. A full outbox drops nothing: `put` waits for room
(the oldest are kept and go first), and the agent takes no new commands meanwhile.
Without a state directory (the drills, in-process tests) the outbox lives in memory.
"""

from __future__ import annotations

import fcntl
import logging
import os
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Final

import anyio
import anyio.to_thread
import nats.errors
from gpuwarden.engine.core.errors import EventDecodeError, GpuwardenError
from gpuwarden.engine.core.events import Event, aggregate_of_subject, decode, encode, subject_of
from gpuwarden.engine.ports import EventLog, EventLogError

log = logging.getLogger("gpuwarden.agent")

DEFAULT_CAPACITY: Final = 10_000  # observations; an exit with its output tail is < 4 KiB
JOURNAL: Final = "outbox.jsonl"
LOCK: Final = "lock"
ADD: Final = b"+"
TAKEN: Final = b"-"
REWRITE_FACTOR: Final = 4  # rewrite the journal when it holds this many times capacity
DELIVERY_BATCH: Final = 256  # waiting events of one aggregate appended at once
MAX_REMEMBERED: Final = 4096  # ids stored by this process, not sent again
BACKOFF_MIN_S: Final = 0.1  # the first pause after a failure; doubled on each one ...
BACKOFF_MAX_S: Final = 2.0  # ... up to this (the engine's `next_backoff` rule)
# What the log answers with when it cannot take a write now: kept, and sent again.
LOG_TROUBLE: Final = (EventLogError, nats.errors.Error, OSError, TimeoutError)


class OutboxError(GpuwardenError):
    """The agent's state directory cannot hold its outbox (unwritable, or in use)."""


class Outbox:
    """A bounded FIFO of events not yet in the log; persisted when it has a directory.

    Use `Outbox.open(state_dir)` for a persisted one, `Outbox()` for one in memory.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"an outbox holds at least one event, not {capacity}")
        self.capacity = capacity
        self.directory: Path | None = None
        self._events: deque[Event] = deque()
        self._ids: set[str] = set()
        self._lock = anyio.Lock()  # journal lines in the order of the queue
        self._changed = anyio.Event()
        self._journal: IO[bytes] | None = None
        self._lines = 0  # records in the journal file
        self._lockfile: int | None = None

    @classmethod
    def open(cls, directory: Path, capacity: int = DEFAULT_CAPACITY) -> Outbox:
        """The outbox kept in `directory` (made if missing), with what an earlier run
        left there; OutboxError if it cannot be written or another agent holds it."""
        outbox = cls(capacity)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lockfile = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise OutboxError(
                f"agent state directory {directory}: cannot be written: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lockfile)
            raise OutboxError(
                f"agent state directory {directory} is in use by another agent; "
                "give each agent its own --state-dir"
            ) from None
        outbox._lockfile = lockfile
        outbox.directory = directory
        try:
            events, damaged = _read_journal(directory / JOURNAL)
            for event in events:
                outbox._events.append(event)
                outbox._ids.add(event.id)
            outbox._rewrite_blocking()
        except OSError as exc:
            outbox.close()
            raise OutboxError(
                f"agent state directory {directory}: cannot keep the outbox: {exc.strerror}"
            ) from None
        if damaged:
            log.warning(
                "outbox %s: %d damaged record(s) skipped (a torn write or a corrupt line)",
                directory / JOURNAL,
                damaged,
            )
        if events:
            log.warning(
                "outbox %s: %d observation(s) of an earlier run not yet in the log; they go first",
                directory / JOURNAL,
                len(events),
            )
        return outbox

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lockfile is not None:
            os.close(self._lockfile)  # releases the lock
            self._lockfile = None

    # --- what it holds ------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._events)

    def __bool__(self) -> bool:
        return bool(self._events)

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    @property
    def full(self) -> bool:
        return len(self._events) >= self.capacity

    @property
    def where(self) -> str:
        """Where it is kept, for messages."""
        if self.directory is None:
            return "in memory (no state directory: lost if the agent stops)"
        return f"in {self.directory / JOURNAL}"

    def pending(self) -> list[Event]:
        """Everything waiting, oldest first."""
        return list(self._events)

    def head(self, limit: int) -> list[Event]:
        """The oldest events, up to `limit`, as long as they share the oldest one's
        aggregate: one append can take them (pipelined, still in order)."""
        batch: list[Event] = []
        aggregate = None
        for event in self._events:
            mine = aggregate_of_subject(subject_of(event))
            if len(batch) >= limit or (aggregate is not None and mine != aggregate):
                break
            aggregate = mine
            batch.append(event)
        return batch

    async def wait(self, predicate: Callable[[], bool]) -> None:
        """Until `predicate()` holds; checked after every change."""
        while not predicate():
            changed = self._changed
            await changed.wait()

    # --- changes ------------------------------------------------------------------------

    async def put(self, event: Event) -> None:
        """Keep `event` behind the others (written and fsynced first, if persisted);
        waits while the outbox is full. An event already waiting is kept once."""
        while True:
            await self.wait(lambda: not self.full or event.id in self._ids)
            async with self._lock:
                if event.id in self._ids:
                    return
                if self.full:
                    continue
                if self._journal is not None:
                    line = _line(ADD, encode(event))
                    await anyio.to_thread.run_sync(self._append_blocking, line, True)
                self._events.append(event)
                self._ids.add(event.id)
                self._notify()
                return

    async def taken(self, events: Sequence[Event]) -> None:
        """The oldest events, now stored in the log, leave the outbox."""
        async with self._lock:
            gone = []
            for event in events:
                if not self._events or self._events[0].id != event.id:
                    raise ValueError(f"{event.id} is not the oldest event in the outbox")
                self._events.popleft()
                self._ids.discard(event.id)
                gone.append(event.id)
            if self._journal is not None:
                if not self._events or self._lines > REWRITE_FACTOR * self.capacity:
                    await anyio.to_thread.run_sync(self._rewrite_blocking)
                else:
                    lines = b"".join(_line(TAKEN, i.encode()) for i in gone)
                    await anyio.to_thread.run_sync(self._append_blocking, lines, False)
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # --- the journal (worker threads) ---------------------------------------------------

    def _append_blocking(self, lines: bytes, sync: bool) -> None:
        assert self._journal is not None
        self._journal.write(lines)
        self._journal.flush()
        if sync:
            os.fsync(self._journal.fileno())
        self._lines += lines.count(b"\n")

    def _rewrite_blocking(self) -> None:
        """The journal replaced, atomically, by one holding just what waits."""
        assert self.directory is not None
        path = self.directory / JOURNAL
        temporary = path.with_suffix(".tmp")
        with open(temporary, "wb") as out:
            out.write(b"".join(_line(ADD, encode(event)) for event in self._events))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        _fsync_directory(self.directory)
        if self._journal is not None:
            self._journal.close()
        self._journal = open(path, "ab")
        self._lines = len(self._events)


def _line(kind: bytes, payload: bytes) -> bytes:
    return b"%s%08x %s\n" % (kind, zlib.crc32(payload), payload)


def _read_journal(path: Path) -> tuple[list[Event], int]:
    """What waits in a journal, in order, and how many records were damaged."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    waiting: dict[str, Event] = {}  # insertion-ordered: the queue
    damaged = 0
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for raw in lines:
        record = _parse(raw)
        if record is None:
            damaged += 1
            continue
        kind, payload = record
        if kind == TAKEN:
            waiting.pop(payload.decode(), None)
            continue
        try:
            event = decode(payload)
        except EventDecodeError:
            damaged += 1
            continue
        waiting.setdefault(event.id, event)
    return list(waiting.values()), damaged


def _parse(raw: bytes) -> tuple[bytes, bytes] | None:
    """(kind, payload) of one journal line, or None if it is torn or corrupt."""
    kind, crc, payload = raw[:1], raw[1:9], raw[10:]
    if kind not in (ADD, TAKEN) or raw[9:10] != b" ":
        return None
    try:
        if int(crc, 16) != zlib.crc32(payload):
            return None
    except ValueError:
        return None
    return kind, payload


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the courier ----------------------------------------------------------------------


class Courier:
    """One node's appends: straight to the log while nothing waits, else via the outbox."""

    def __init__(self, node: str, log: EventLog, outbox: Outbox) -> None:
        self.node = node
        self.log = log
        self.outbox = outbox
        self._stored: dict[str, None] = {}  # ids this process stored, oldest first
        self._outage: float | None = None  # since when the log refuses, until drained
        self._full_said = False

    async def send(self, event: Event) -> None:
        """Store `event` in the log, or keep it in the outbox behind the older ones
        (while anything waits there, or the log refuses it): either way it is kept
        when this returns. An event stored or kept already is not sent again."""
        if event.id in self._stored or event.id in self.outbox:
            return
        if not self.outbox:  # nothing waits before it: straight to the log
            try:
                await self.log.append(subject_of(event), [event])
            except LOG_TROUBLE as exc:
                self._refused(exc, also=1)  # said first: the courier may empty it at once
                await self._keep(event)
                return
            self._remember(event.id)
            return
        await self._keep(event)

    async def run(self) -> None:
        """Empty the outbox into the log, oldest first, for as long as the agent runs."""
        backoff = 0.0
        while True:
            await self.outbox.wait(lambda: bool(self.outbox))
            batch = self.outbox.head(DELIVERY_BATCH)
            try:
                await self.log.append(subject_of(batch[0]), batch)
            except Exception as exc:
                if not isinstance(exc, LOG_TROUBLE):  # not the log's usual trouble: loudly
                    log.exception("node %s: appending %s failed", self.node, batch[0].id)
                self._refused(exc)
                backoff = next_backoff(backoff)
                await anyio.sleep(backoff)
                continue
            backoff = 0.0
            await self.outbox.taken(batch)
            for event in batch:
                self._remember(event.id)
            if not self.outbox and self._outage is not None:
                log.warning(
                    "node %s: event log takes writes again: every buffered observation "
                    "stored (%.0f s after the first refusal)",
                    self.node,
                    anyio.current_time() - self._outage,
                )
                self._outage = None
                self._full_said = False

    def say_kept(self) -> None:
        """At a stop: what has not reached the log, and where it stays."""
        if self.outbox:
            log.warning(
                "node %s: stopping with %d observation(s) not yet in the log, kept %s",
                self.node,
                len(self.outbox),
                self.outbox.where,
            )

    async def _keep(self, event: Event) -> None:
        if self.outbox.full and not self._full_said:
            self._full_said = True
            log.warning(
                "node %s: outbox full (%d observations buffered %s): keeping the oldest; "
                "no new commands are taken and new observations wait until the log "
                "takes writes again",
                self.node,
                len(self.outbox),
                self.outbox.where,
            )
        await self.outbox.put(event)

    def _remember(self, event_id: str) -> None:
        self._stored[event_id] = None
        while len(self._stored) > MAX_REMEMBERED:
            del self._stored[next(iter(self._stored))]

    def _refused(self, exc: BaseException, also: int = 0) -> None:
        """Say once per outage what the agent waits for (`also`: events about to wait)."""
        if self._outage is not None:
            return
        self._outage = anyio.current_time()
        log.warning(
            "node %s: event log unreachable: %s; %d observation(s) buffered %s, sent in "
            "order once it takes writes again",
            self.node,
            why(exc),
            len(self.outbox) + also,
            self.outbox.where,
        )


def next_backoff(backoff_s: float) -> float:
    """The pause after another failure in a row: doubled, within the bounds."""
    return min(max(backoff_s * 2, BACKOFF_MIN_S), BACKOFF_MAX_S)


def why(exc: BaseException) -> str:
    """One line for what went wrong; a task group's ExceptionGroup by its first cause."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__
