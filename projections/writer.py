"""The projection store's writer, in a process of its own.

Every batch the store applies (apply, catch_up, follow, rebuild) is committed here.
Reading the log and folding it hold the GIL, so a writer thread would only take turns
with them. Run as `python -m gpuwarden.projections.writer` this module writes on the
second core while the parent reads and folds (projections/writer_process.py is the
parent's side). It starts with only the standard library and msgspec, so it is ready
before the first batch arrives.

The events index of a rebuild is built here too: the parent sends each stored event as
it came from the log (sequence, subject, headers, bytes; and its time as the parent
formatted it for the rows) under the table name
RAW_EVENTS, and this process decodes it and makes its row with the very function the
parent's other paths use (`model.index_values`). That moves a third of the parent's
fold onto this core; the model is imported on the first such batch.

Protocol on stdin/stdout: length-prefixed msgpack (msgspec encodes a batch's rows three
times faster than pickle, and the encoding is the parent's cost). The parent sends
`("open", path, pragmas)`, then `("batch", last, [(insert_head, rows), ...])` any number
of times, and a rebuild then `("finish", script)`. Each batch commits in ONE transaction
with its checkpoint and is answered `("ok", last)`; `finish` runs the script (the
schema) and is answered `("done", last)`. Any error is answered `("error", text)` and
ends the process. End of input (the parent closed the pipe or died) ends it too: a
batch that did not arrive whole is never written, so a re-run resumes from the last
committed checkpoint.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sqlite3
import struct
import sys
import traceback
from collections.abc import Sequence
from typing import Any, BinaryIO, Final

import msgspec

HEADER: Final = struct.Struct("<Q")
# Rows per multi-row INSERT. A batch's row count is split into these fixed sizes, so
# every statement text repeats and stays compiled in the connection's statement cache
# (compiling a few hundred rows' VALUES costs as much as running it).
ROWS_PER_INSERT: Final = (256, 64, 16, 4, 1)
# SQLite stores a bound NaN as NULL, and binding a float is a fast path, while CPython
# 3.11's sqlite3 binds None through its adapter lookup (a failed attribute lookup with a
# formatted error per value, about a quarter of the write). No row holds a float, so a
# NaN can only mean NULL.
NULL: Final = math.nan

Statement = tuple[str, list[Any]]
EVENTS_INSERT: Final = "INSERT INTO events VALUES "
# A batch's table of stored events whose index rows this process builds itself.
RAW_EVENTS: Final = "raw events"


@functools.lru_cache(maxsize=64)
def _values_sql(head: str, width: int, rows: int) -> str:
    row = "(" + ",".join("?" * width) + ")"
    return head + ",".join([row] * rows)


def inserts(head: str, rows: Sequence[Sequence[Any]], limit: int) -> list[Statement]:
    """Multi-row INSERTs of `rows`, each within SQLite's host-parameter limit."""
    if not rows:
        return []
    width = len(rows[0])
    out = []
    start = 0
    for size in ROWS_PER_INSERT:
        if size * width > limit and size > 1:
            continue
        while len(rows) - start >= size:
            chunk = rows[start : start + size]
            params = [NULL if v is None else v for v in itertools.chain.from_iterable(chunk)]
            out.append((_values_sql(head, width, size), params))
            start += size
    return out


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder()


def frame(message: Any) -> bytearray:
    """One message as it goes down the pipe: its length, then its msgpack."""
    data = bytearray(HEADER.size)
    _encoder.encode_into(message, data, HEADER.size)
    HEADER.pack_into(data, 0, len(data) - HEADER.size)
    return data


def unframe(data: bytes) -> Any:
    return _decoder.decode(data)


def _receive(stream: BinaryIO) -> Any | None:
    """The next whole message, or None at end of input (a torn message included)."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return _decoder.decode(data)


def _reply(stream: BinaryIO, message: Any) -> None:
    stream.write(frame(message))
    stream.flush()


def index_rows(stored_rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """Events-index rows of (seq, subject, headers or None, bytes, time as text)."""
    from gpuwarden.engine.core.events import decode
    from gpuwarden.engine.ports import StoredEvent
    from gpuwarden.projections.model import index_values

    rows = []
    for seq, subject, headers, data, at in stored_rows:
        stored = StoredEvent(
            seq=seq, subject=subject, event=decode(data), data=data, headers=headers or {}
        )
        rows.append(index_values(stored, at))
    return rows


def _statements(tables: Sequence[Sequence[Any]], limit: int) -> list[Statement]:
    out: list[Statement] = []
    for head, rows in tables:
        if head == RAW_EVENTS:
            head, rows = EVENTS_INSERT, index_rows(rows)
        out += inserts(head, rows, limit)
    return out


def _commit(conn: sqlite3.Connection, statements: list[Statement], last: int) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, params in statements:
            conn.execute(sql, params)
        conn.execute("UPDATE checkpoint SET last_seq = ? WHERE id = 1", (last,))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _serve(conn: sqlite3.Connection, inp: BinaryIO, out: BinaryIO) -> None:
    limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    last = 0
    while (message := _receive(inp)) is not None:
        if message[0] == "batch":
            _, last, tables = message
            last = int(last)
            statements = _statements(tables, limit)
            _commit(conn, statements, last)
            _reply(out, ("ok", last))
        elif message[0] == "finish":
            conn.executescript(message[1])
            _reply(out, ("done", last))
        else:
            raise ValueError(f"unknown message {message[0]!r}")


def main(inp: BinaryIO, out: BinaryIO) -> int:
    try:
        opening = _receive(inp)
        if opening is None:
            return 0
        _, path, pragmas = opening
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            for pragma in pragmas:
                conn.execute(pragma)
            _serve(conn, inp, out)
        finally:
            conn.close()
    except Exception:
        try:
            _reply(out, ("error", traceback.format_exc()))
        except OSError:  # the parent is gone: nobody to tell
            pass
        return 1
    return 0


if __name__ == "__main__":
    code = main(sys.stdin.buffer, sys.stdout.buffer)
    sys.stdout.flush()
    os._exit(code)  # nothing left to clean up: skip the interpreter's teardown
