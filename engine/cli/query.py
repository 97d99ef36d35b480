"""The read side's commands: audit queries, explain, export, timeline, rebuild.

Each query command first brings the data directory's projection store up to the end
of the log (cheap when it is current), so an answer never misses recent events. Before
that it checks that GW_EVENTS is still the stream the store was folded from, whole and
kept whole (adapters/stream_guard.py), and refuses to answer from one that is not. The
`run_*` functions take the log and the store path as arguments, so tests and other
front ends can call them without the argparse/NATS plumbing.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TextIO

import anyio
import msgspec
from gpuwarden.engine.cli.common import open_event_log
from gpuwarden.engine.ports import ReadableLog, StoredEvent
from gpuwarden.projections import queries as q
from gpuwarden.projections.explain import explain, render_text, task_events, to_json
from gpuwarden.projections.export import write_jsonl
from gpuwarden.projections.model import EventRow
from gpuwarden.projections.store import DB_NAME, STREAM_META, ProjectionStore
from gpuwarden.projections.timeline import render_timeline

if TYPE_CHECKING:
    from gpuwarden.adapters.stream_guard import StreamIdentity

Runner = Callable[[argparse.Namespace, ReadableLog, Path], Awaitable[int]]


def store_path(args: argparse.Namespace) -> Path:
    return Path(args.data_dir) / DB_NAME


def _handler(run: Runner) -> Callable[[argparse.Namespace], Awaitable[int]]:
    """Adapt `run(args, log, store_path)` to the CLI's `handler(args)`."""

    async def handler(args: argparse.Namespace) -> int:

        async with open_event_log(args) as log:
            return await run(args, log, store_path(args))

    return handler


# --- registration --------------------------------------------------------------------


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("events", help="query the events index (read model)")
    p.add_argument("--task", help="only this task's events")
    p.add_argument("--attempt", type=int, help="only this attempt (with --task)")
    p.add_argument("--gpu", metavar="UUID", help="only events naming this GPU")
    p.add_argument("--node", help="only events naming this node")
    p.add_argument("--type", help="event type, or a glob like 'gpu.*'")
    p.add_argument("--since", help="from this time: 30m, 2h, 1d ago, or ISO-8601")
    p.add_argument("--until", help="up to this time: 30m, 2h, 1d ago, or ISO-8601")
    p.add_argument("--limit", type=int, metavar="N", help="only the newest N")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(handler=_handler(run_events))
    for name, run, text in (
        ("tasks", run_tasks, "list tasks and their state"),
        ("gpus", run_gpus, "list GPUs: allocation, quarantine, faults"),
        ("nodes", run_nodes, "list nodes and their liveness"),
    ):
        p = subparsers.add_parser(name, help=text)
        p.add_argument("--json", action="store_true", help="JSON output")
        p.set_defaults(handler=_handler(run))
    p = subparsers.add_parser("explain", help="why a task ended the way it did")
    p.add_argument("task_id", metavar="TASK")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(handler=_handler(run_explain))
    p = subparsers.add_parser("export", help="write the log as JSON lines")
    p.add_argument("--task", help="only this task's subject")
    p.add_argument("--since", help="from this time: 30m, 2h, 1d ago, or ISO-8601")
    p.add_argument("-o", "--output", metavar="FILE", help="file to write (default stdout)")
    p.set_defaults(handler=_handler(run_export))
    p = subparsers.add_parser("timeline", help="HTML timeline of a task or a GPU")
    p.add_argument("task_id", metavar="TASK", nargs="?")
    p.add_argument("--gpu", metavar="UUID", help="a GPU's tenants and faults instead")
    p.add_argument("-o", "--output", metavar="FILE", help="HTML file (default stdout)")
    p.set_defaults(handler=_handler(run_timeline))
    p = subparsers.add_parser("projections", help="manage the read models")
    sub = p.add_subparsers(dest="projections_command", metavar="ACTION", required=True)
    rebuild = sub.add_parser("rebuild", help="drop the read models and fold the log again")
    rebuild.set_defaults(handler=_handler(run_rebuild))


# --- helpers -------------------------------------------------------------------------


async def _fresh_store(path: Path, log: ReadableLog) -> ProjectionStore:
    """The read model, caught up. Two commands run at once in one data directory catch
    up one after the other (a lock file beside the database): each reads the checkpoint
    and folds from there, so together they would write the same rows twice."""
    lock = await anyio.to_thread.run_sync(_lock, path.with_name(path.name + ".lock"))
    try:
        store = await ProjectionStore(path).open()
        try:
            await _catch_up_checked(store, log)
        except BaseException:
            await store.close()
            raise
    finally:
        lock.close()  # releases the lock
    return store


def _lock(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path, "a")
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    return lock


StreamReader = Callable[[], Awaitable["StreamIdentity"]]


def _stream_reader(log: ReadableLog) -> StreamReader | None:
    """How to read the log's stream identity; None for a log that is no stream (a list)."""
    reader: StreamReader | None = getattr(log, "stream_identity", None)
    return reader


async def _catch_up_checked(store: ProjectionStore, log: ReadableLog) -> None:
    """Catch the store up, but only from the stream it was folded from, whole.

    A store with no recorded stream (new, or older than the record) records the stream
    it is about to fold; the stream is read again after the fold, so one replaced
    meanwhile is noticed too.
    """
    read = _stream_reader(log)
    if read is None:
        await store.catch_up(log)
        return
    from gpuwarden.adapters.stream_guard import decode_identity, encode_identity

    recorded = await store.meta(STREAM_META)
    seen = decode_identity(recorded) if recorded is not None else None
    before = await read()
    _refuse_changed(store, before, seen=seen, folded=await store.checkpoint())
    if seen is None:
        await store.set_meta(STREAM_META, encode_identity(before))
    await store.catch_up(log)
    _refuse_changed(store, await read(), seen=before, folded=await store.checkpoint())


def _refuse_changed(
    store: ProjectionStore, now: StreamIdentity, *, seen: StreamIdentity | None, folded: int
) -> None:
    from gpuwarden.adapters.stream_guard import (
        StreamChangedError,
        stream_is_sound,
        stream_problem,
    )

    problem = stream_problem(now, seen=seen, folded=folded, by="the read model")
    if problem is None:
        return
    if stream_is_sound(now):
        remedy = (
            "Restore the stream that was folded; or, if you accept this stream as the log "
            "from now on, rebuild the read model with `gpuwarden projections rebuild` "
            "(and restart the engine)."
        )
    else:
        remedy = (
            "Put the stream's settings back (deny_delete, deny_purge, no max_* limits, "
            "retention limits, subjects gw.evt.>) and restore from a backup the events it "
            "lost; a rebuild cannot bring back events the stream no longer holds."
        )
    raise StreamChangedError(
        f"GW_EVENTS changed under the read model {store.path}: {problem}. "
        f"gpuwarden refuses to decide or answer on such a stream. {remedy}"
    )


def _time_arg(text: str | None) -> datetime | None:
    return None if text is None else q.parse_time(text, datetime.now(UTC))


def _print_table(rows: Sequence[Sequence[Any]], header: Sequence[str], out: TextIO) -> None:
    cells = [[str(h) for h in header]] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


def _json_rows(rows: Sequence[msgspec.Struct], out: TextIO) -> None:
    out.write(msgspec.json.encode(list(rows)).decode() + "\n")


def event_json(row: EventRow) -> str:
    """One events-index row as JSON, the payload as an object (or text if it is not)."""
    data: dict[str, Any] = msgspec.to_builtins(row)
    try:
        data["payload"] = json.loads(row.payload)
    except (ValueError, RecursionError):  # kept as text: a stored message cannot stop this
        pass
    return json.dumps(data, separators=(",", ":"))


def event_text(row: EventRow) -> str:
    at = (row.at or "-")[:19].replace("T", " ")
    where = " ".join(
        f"{k}={v}"
        for k, v in (
            ("task", row.task),
            ("attempt", row.attempt),
            ("gpu", row.gpu),
            ("node", row.node),
        )
        if v is not None
    )
    extra = f"  {row.error}" if row.error else ""
    return f"{row.seq:>7}  {at:<19}  {row.type:<22} {where}{extra}"


# --- commands ------------------------------------------------------------------------


async def run_events(
    args: argparse.Namespace, log: ReadableLog, path: Path, out: TextIO | None = None
) -> int:
    out = out or sys.stdout
    store = await _fresh_store(path, log)
    try:
        rows = await q.events(
            store,
            task=args.task,
            attempt=args.attempt,
            gpu=args.gpu,
            node=args.node,
            type=args.type,
            since=_time_arg(args.since),
            until=_time_arg(args.until),
            limit=args.limit,
        )
    finally:
        await store.close()
    for row in rows:
        out.write((event_json(row) if args.json else event_text(row)) + "\n")
    return 0


async def run_tasks(
    args: argparse.Namespace, log: ReadableLog, path: Path, out: TextIO | None = None
) -> int:
    out = out or sys.stdout
    store = await _fresh_store(path, log)
    try:
        rows = await q.tasks(store)
    finally:
        await store.close()
    if args.json:
        _json_rows(rows, out)
        return 0
    header = ("TASK", "NAME", "OWNER", "STATE", "ATTEMPT", "NODE", "GPUS", "FAULT", "REASON")
    table = [
        (
            t.id,
            t.name,
            t.owner,
            t.state,
            t.current_attempt,
            t.node,
            ",".join(t.gpus) or None,
            t.last_fault,
            t.failure_reason,
        )
        for t in rows
    ]
    _print_table(table, header, out)
    return 0


async def run_gpus(
    args: argparse.Namespace, log: ReadableLog, path: Path, out: TextIO | None = None
) -> int:
    out = out or sys.stdout
    store = await _fresh_store(path, log)
    try:
        rows = await q.gpus(store)
    finally:
        await store.close()
    if args.json:
        _json_rows(rows, out)
        return 0
    header = ("GPU", "NODE", "INDEX", "MODEL", "MEMORY_MB", "STATE", "TASK", "FAULTS")
    table = [
        (
            g.uuid,
            g.node,
            g.index,
            g.model,
            g.memory_mb,
            "quarantined" if g.quarantined else "ok",
            f"{g.allocated_task}#{g.allocated_attempt}" if g.allocated_task else None,
            g.fault_count,
        )
        for g in rows
    ]
    _print_table(table, header, out)
    return 0


async def run_nodes(
    args: argparse.Namespace, log: ReadableLog, path: Path, out: TextIO | None = None
) -> int:
    out = out or sys.stdout
    store = await _fresh_store(path, log)
    try:
        rows = await q.nodes(store)
    finally:
        await store.close()
    if args.json:
        _json_rows(rows, out)
        return 0
    table = [(n.name, n.runtime, n.state, len(n.gpus), n.last_heartbeat) for n in rows]
    _print_table(table, ("NODE", "RUNTIME", "STATE", "GPUS", "LAST_HEARTBEAT"), out)
    return 0


async def run_explain(
    args: argparse.Namespace, log: ReadableLog, path: Path, out: TextIO | None = None
) -> int:
    out = out or sys.stdout
    store = await _fresh_store(path, log)
    try:
        explanation = await explain(store, args.task_id)
    finally:
        await store.close()
    out.write(to_json(explanation) + "\n" if args.json else render_text(explanation))
    return 0


async def run_export(
    args: argparse.Namespace, log: ReadableLog, path: Path, out: TextIO | None = None
) -> int:
    out = out or sys.stdout
    since = _time_arg(args.since)
    if args.output:
        # Buffered writes from a one-shot command: nothing else waits on this loop.
        with open(args.output, "w", encoding="utf-8") as handle:  # noqa: ASYNC230
            count = await write_jsonl(log, handle, task=args.task, since=since)
        print(f"gpuwarden: wrote {count} events to {args.output}", file=sys.stderr)
    else:
        await write_jsonl(log, out, task=args.task, since=since)
    return 0


async def timeline_events(
    store: ProjectionStore, task_id: str | None, gpu: str | None
) -> list[StoredEvent]:
    """The events a timeline draws: the subject's own, plus faults and losses near it."""
    found: dict[int, StoredEvent] = {}
    if task_id is not None:
        for stored in await task_events(store, task_id):
            found[stored.seq] = stored
        attempts = await q.attempts(store, task_id)
        for uuid in {g for a in attempts for g in a.gpus}:
            for row in await q.events(store, gpu=uuid, type="gpu.fault"):
                found.setdefault(row.seq, q.stored_event(row))
        for node in {a.node for a in attempts if a.node}:
            for row in await q.events(store, node=node, type="node.lost"):
                found.setdefault(row.seq, q.stored_event(row))
    if gpu is not None:
        rows = await q.events(store, gpu=gpu)
        tenants = {r.task for r in rows if r.task}
        for row in rows:
            found[row.seq] = q.stored_event(row)
        for tenant in tenants:  # their outcomes colour the bars
            for row in await q.events(store, task=tenant, type="task.*"):
                found.setdefault(row.seq, q.stored_event(row))
            for row in await q.events(store, task=tenant, type="rebuild.decided"):
                found.setdefault(row.seq, q.stored_event(row))
    return [found[seq] for seq in sorted(found)]


async def run_timeline(
    args: argparse.Namespace, log: ReadableLog, path: Path, out: TextIO | None = None
) -> int:
    out = out or sys.stdout
    store = await _fresh_store(path, log)
    try:
        events = await timeline_events(store, args.task_id, args.gpu)
    finally:
        await store.close()
    page = render_timeline(events, task_id=args.task_id, gpu=args.gpu)
    if args.output:
        await anyio.Path(args.output).write_text(page, encoding="utf-8")
        print(f"gpuwarden: wrote {args.output}", file=sys.stderr)
    else:
        out.write(page)
    return 0


class ProgressBar:
    """`[#####-----] 45%  450000/1000000 events` on stderr, redrawn at most 10x/s."""

    def __init__(self, out: TextIO | None = None, width: int = 30) -> None:
        self.out, self.width = out or sys.stderr, width
        self.started = time.monotonic()
        self.drawn = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        final = total is not None and done >= total
        if now - self.drawn < 0.1 and not final:
            return
        self.drawn = now
        rate = done / max(now - self.started, 1e-6)
        if total:
            filled = int(self.width * min(done / total, 1.0))
            bar = "#" * filled + "-" * (self.width - filled)
            text = f"[{bar}] {100 * done // total:>3}%  {done}/{total} events"
        else:
            text = f"{done} events"
        self.out.write(f"\r{text}  {rate:,.0f}/s")
        if final:
            self.out.write("\n")
        self.out.flush()


async def run_rebuild(
    args: argparse.Namespace, log: ReadableLog, path: Path, out: TextIO | None = None
) -> int:
    out = out or sys.stdout
    read = _stream_reader(log)
    async with ProjectionStore(path) as store:
        if read is None:
            last = await store.rebuild(log, progress=ProgressBar())
        else:
            last = await _rebuild_checked(store, log, read)
    out.write(f"rebuilt {path} up to sequence {last}\n")
    return 0


async def _rebuild_checked(store: ProjectionStore, log: ReadableLog, read: StreamReader) -> int:
    """Fold the stream there is now (the operator accepts it), if it is whole; the store
    records it as the stream it was folded from."""
    from gpuwarden.adapters.stream_guard import encode_identity

    before = await read()
    _refuse_changed(store, before, seen=None, folded=0)
    last = await store.rebuild(
        log, progress=ProgressBar(), meta={STREAM_META: encode_identity(before)}
    )
    _refuse_changed(store, await read(), seen=before, folded=last)
    return last
