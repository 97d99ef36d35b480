"""The log as JSON lines, for audits and offline replay.

One object per line: {"seq", "subject", "headers", "event"}. `event` embeds the
recorded payload byte for byte where it is one line of JSON, so reading the file back
yields the very StoredEvents that were exported; a payload that did not decode is kept
as `data` (text, or `data_b64` when it is not UTF-8) with its `error`, never dropped.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Final

import msgspec
from gpuwarden.engine.core.errors import EventDecodeError
from gpuwarden.engine.core.events import Event, decode, encode, task_subject
from gpuwarden.engine.ports import ReadableLog, StoredEvent
from gpuwarden.projections.errors import ExportFormatError

_encoder: Final = msgspec.json.Encoder()
_NULL: Final = msgspec.Raw(b"null")


class _Line(msgspec.Struct, omit_defaults=True):
    seq: int
    subject: str
    headers: dict[str, str]
    event: msgspec.Raw  # the recorded payload; `null` for one that did not decode
    data: str | None = None
    data_b64: str | None = None
    error: str | None = None
    # True when the recorded payload was empty (an event built in memory): the reader
    # then leaves `data` empty instead of taking the embedded event's bytes.
    no_data: bool = False


class _InLine(msgspec.Struct):
    seq: int
    subject: str
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    event: msgspec.Raw = msgspec.field(default_factory=lambda: _NULL)
    data: str | None = None
    data_b64: str | None = None
    error: str | None = None
    no_data: bool = False


_line_decoder: Final = msgspec.json.Decoder(_InLine)


def _single_line(data: bytes) -> bool:
    """Embeddable as is: msgspec.Raw gives back exactly these bytes on reading."""
    return bool(data) and b"\n" not in data and b"\r" not in data and data == data.strip()


def _raw_fields(data: bytes) -> dict[str, Any]:
    try:
        return {"data": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"data_b64": base64.b64encode(data).decode()}


def to_line(stored: StoredEvent) -> str:
    """One exported line (without the newline)."""
    base: dict[str, Any] = {
        "seq": stored.seq,
        "subject": stored.subject,
        "headers": dict(stored.headers),
    }
    if stored.event is None:
        line = _Line(event=_NULL, error=stored.error or "", **base, **_raw_fields(stored.data))
    elif _single_line(stored.data):
        line = _Line(event=msgspec.Raw(stored.data), **base)
    else:
        extra = _raw_fields(stored.data) if stored.data else {"no_data": True}
        line = _Line(event=msgspec.Raw(encode(stored.event)), **base, **extra)
    return _encoder.encode(line).decode()


def _matches_since(stored: StoredEvent, since: datetime | None) -> bool | None:
    """True/False for a dated event; None for one without a time (undecodable)."""
    if since is None:
        return True
    if stored.event is None:
        return None
    at = stored.event.at
    if at.tzinfo is None and since.tzinfo is not None:
        at = at.replace(tzinfo=since.tzinfo)
    return at >= since


async def export(
    log: ReadableLog, task: str | None = None, since: datetime | None = None
) -> AsyncIterator[str]:
    """Lines of the whole log, or of one task's subject, from `since` on.

    An undecodable event has no time; with `since` it is exported once a dated event
    at or after `since` has been, since the log is in time order.
    """
    subject = task_subject(task) if task is not None else None
    started = since is None
    async for stored in log.read(1, None, subject):
        verdict = _matches_since(stored, since)
        if verdict is None:
            verdict = started
        started = started or verdict
        if verdict:
            yield to_line(stored)


async def write_jsonl(
    log: ReadableLog, out: IO[str], task: str | None = None, since: datetime | None = None
) -> int:
    """Export to an open text file; returns the number of lines."""
    count = 0
    async for line in export(log, task=task, since=since):
        out.write(line + "\n")
        count += 1
    return count


def from_line(text: str | bytes, where: str = "line") -> StoredEvent:
    """A StoredEvent from one exported line; ExportFormatError names `where`."""
    try:
        line = _line_decoder.decode(text)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ExportFormatError(f"{where}: not an exported event: {exc}") from None
    data = _data_of(line, where)
    raw = bytes(line.event).strip()
    if raw == b"null":
        return StoredEvent(seq=line.seq, subject=line.subject, event=None, data=data,
                           error=line.error, headers=line.headers)  # fmt: skip
    if not line.no_data and line.data is None and line.data_b64 is None:
        data = raw
    event: Event | None
    try:
        event, error = decode(raw), None
    except EventDecodeError as exc:
        event, error = None, str(exc)
    return StoredEvent(seq=line.seq, subject=line.subject, event=event, data=data,
                       error=error, headers=line.headers)  # fmt: skip


def _data_of(line: _InLine, where: str) -> bytes:
    if line.data is not None:
        return line.data.encode("utf-8")
    if line.data_b64 is not None:
        try:
            return base64.b64decode(line.data_b64, validate=True)
        except ValueError as exc:
            raise ExportFormatError(f"{where}: data_b64 is not base64: {exc}") from None
    return b""


def read_jsonl(path: str | Path) -> Iterator[StoredEvent]:
    """StoredEvents from an exported file; a bad line raises naming its number."""
    with open(path, "rb") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            yield from_line(text, where=f"{path}:{number}")
