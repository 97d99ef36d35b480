"""Notice when GW_EVENTS is no longer the log that was folded.

deny_delete/deny_purge stop message deletes and purges, but not a stream delete: with
nothing but nats-py, `$JS.API.STREAM.DELETE.GW_EVENTS` succeeds, and the next command
that ensures the streams creates an empty one from sequence 1. `STREAM.UPDATE` cannot
turn the deny flags off, but it can set max_msgs/max_bytes/max_msgs_per_subject (the
server trims the history at once), switch retention to interest (which drops what no
consumer holds) or seal the stream. Server permissions stop non-admins; this module lets
the engine and the read models notice on their own, from the stream's info: its
creation time names one stream (a recreated one gets a new one; an update or a server
restart keeps it), and its positions and limits say whether history is missing or may go.

`stream_problem` is pure; `read_identity` is the one read.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final, Protocol

import msgspec
import nats.errors
import nats.js.errors
from gpuwarden.engine.core.wire import EVENT_SUBJECTS, EVENTS_STREAM
from gpuwarden.engine.ports import EventLogError
from nats.js import JetStreamContext, api

LIMITS_RETENTION: Final = "limits"
LIMIT_FIELDS: Final = ("max_msgs", "max_bytes", "max_age", "max_msgs_per_subject")
_LIMIT_EFFECT: Final = {
    "max_msgs": "the oldest events are discarded beyond {value} messages",
    "max_bytes": "the oldest events are discarded beyond {value} bytes",
    "max_age": "events older than {value}s are discarded",
    "max_msgs_per_subject": "an aggregate keeps only its last {value} events",
}


class StreamChangedError(EventLogError):
    """GW_EVENTS is not the log that was folded, or it lost (or may lose) history.

    Nothing may be decided on such a stream: state folded from it would be wrong.
    """


class StreamMissingError(StreamChangedError):
    """GW_EVENTS does not exist (deleted, and not yet created again)."""


class StreamIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """What says which GW_EVENTS this is and whether its history is whole.

    `created` alone names the stream; the rest is its state and the settings that can
    lose events. Only `created` is needed from a recorded identity, so every other field
    has a default and an identity recorded by an older version still decodes.
    """

    created: datetime
    first_seq: int = 0
    last_seq: int = 0
    messages: int = 0
    lost_msgs: int = 0
    deny_delete: bool = True
    deny_purge: bool = True
    max_msgs: int = -1
    max_bytes: int = -1
    max_age: float = 0.0
    max_msgs_per_subject: int = -1
    subjects: tuple[str, ...] = (EVENT_SUBJECTS,)
    retention: str = LIMITS_RETENTION
    sealed: bool = False
    allow_atomic: bool = True


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(StreamIdentity)


def encode_identity(identity: StreamIdentity) -> str:
    return _encoder.encode(identity).decode()


def decode_identity(text: str | bytes) -> StreamIdentity:
    """An identity recorded by `encode_identity`; EventLogError if it is not one."""
    try:
        return _decoder.decode(text)
    except msgspec.DecodeError as exc:
        raise EventLogError(f"recorded {EVENTS_STREAM} identity is unreadable: {exc}") from exc


def identity_of(info: api.StreamInfo) -> StreamIdentity:
    """The identity in a stream info answer (nats-py's parsed form)."""
    if info.created is None:
        raise EventLogError(f"{EVENTS_STREAM} info carries no creation time")
    config, state = info.config, info.state
    retention = config.retention
    return StreamIdentity(
        created=info.created.astimezone(UTC),
        first_seq=int(state.first_seq or 0),
        last_seq=int(state.last_seq or 0),
        messages=int(state.messages or 0),
        lost_msgs=len(state.lost.msgs or []) if state.lost is not None else 0,
        deny_delete=bool(config.deny_delete),
        deny_purge=bool(config.deny_purge),
        max_msgs=_limit(config.max_msgs),
        max_bytes=_limit(config.max_bytes),
        max_age=float(config.max_age or 0.0),
        max_msgs_per_subject=_limit(config.max_msgs_per_subject),
        subjects=tuple(config.subjects or ()),
        retention=str(getattr(retention, "value", retention) or LIMITS_RETENTION),
        sealed=bool(config.sealed),
        allow_atomic=bool(config.allow_atomic),
    )


def _limit(value: int | None) -> int:
    """The server's "no limit" is -1; an unset field (None) or 0 means the same."""
    return int(value) if value is not None and value > 0 else -1


class _HasJetStream(Protocol):
    js: JetStreamContext


async def read_identity(js_or_log: JetStreamContext | _HasJetStream) -> StreamIdentity:
    """GW_EVENTS's identity now; StreamMissingError if it does not exist.

    Takes a JetStream context or anything holding one as `.js` (a JetStreamEventLog).
    """
    js: Any = getattr(js_or_log, "js", js_or_log)
    try:
        info = await js.stream_info(EVENTS_STREAM)
    except nats.js.errors.NotFoundError:
        raise StreamMissingError(
            f"{EVENTS_STREAM} does not exist: the stream was deleted "
            "(and not yet created again); nothing folded from it is in the log any more"
        ) from None
    except (nats.errors.Error, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        raise EventLogError(f"cannot read {EVENTS_STREAM} info: {reason}") from exc
    return identity_of(info)


def stream_problem(
    now: StreamIdentity,
    *,
    seen: StreamIdentity | None,
    folded: int,
    by: str = "this engine",
) -> str | None:
    """What is wrong with GW_EVENTS as it is `now`, in one line naming the field; None
    when nothing is.

    `seen` is the identity of the stream that was folded (None: nothing recorded yet),
    `folded` the last sequence folded from it, `by` who folded it (for the message).
    The first problem found is said: a different stream, then a log behind the fold,
    then history already missing, then settings that would lose events.
    """
    name = EVENTS_STREAM
    if seen is not None and now.created != seen.created:
        return (
            f"{name} was deleted and recreated at {_when(now.created)}; {by} folded the "
            f"stream created at {_when(seen.created)} (created)"
        )
    if now.last_seq < folded:
        return (
            f"{name} ends at sequence {now.last_seq} but {by} folded up to sequence "
            f"{folded}: events it folded are gone from the log (last_seq)"
        )
    return _lost_history(now) or _risky_config(now)


def _lost_history(now: StreamIdentity) -> str | None:
    name = EVENTS_STREAM
    if now.lost_msgs:
        return f"{name} lost {now.lost_msgs} stored messages (state.lost)"
    if now.last_seq <= 0:
        return None  # a stream that never held an event
    if now.first_seq > 1:
        return (
            f"{name} history is trimmed: it starts at sequence {now.first_seq}, "
            f"events 1..{now.first_seq - 1} are gone (first_seq)"
        )
    span = now.last_seq - now.first_seq + 1
    if now.messages != span:
        return (
            f"{name} history has holes: {now.messages} messages between sequences "
            f"{now.first_seq} and {now.last_seq}, {span - now.messages} deleted (messages)"
        )
    return None


def _risky_config(now: StreamIdentity) -> str | None:
    name = EVENTS_STREAM
    for flag, what in (("deny_delete", "message deletes"), ("deny_purge", "purges")):
        if not getattr(now, flag):
            return f"{name} allows {what}: {flag} is off"
    for field in LIMIT_FIELDS:
        value = getattr(now, field)
        if value > 0:
            effect = _LIMIT_EFFECT[field].format(value=_number(value))
            return f"{name} has a limit {field}={_number(value)}: {effect}"
    if now.retention != LIMITS_RETENTION:
        return (
            f"{name} has retention={now.retention}: events are removed once consumed "
            f"(gpuwarden needs {LIMITS_RETENTION})"
        )
    if EVENT_SUBJECTS not in now.subjects:
        return (
            f"{name} has subjects={list(now.subjects)}: events on {EVENT_SUBJECTS} "
            "are not stored (subjects)"
        )
    if now.sealed:
        return f"{name} is sealed: no event can be appended (sealed)"
    if not now.allow_atomic:
        return f"{name} has allow_atomic off: a decision cannot commit all or nothing"
    return None


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


async def check_stream(
    js_or_log: JetStreamContext | _HasJetStream,
    *,
    seen: StreamIdentity | None,
    folded: int,
    by: str = "this engine",
) -> StreamIdentity:
    """The identity now, or StreamChangedError (StreamMissingError) saying the problem."""
    now = await read_identity(js_or_log)
    problem = stream_problem(now, seen=seen, folded=folded, by=by)
    if problem is not None:
        raise StreamChangedError(problem)
    return now


def stream_is_sound(now: StreamIdentity) -> bool:
    """Whether GW_EVENTS is sound in itself: its history whole, its settings keeping it.

    When it is, a problem lies only in its relation to what was folded (another stream,
    or a shorter one), and accepting it means folding it anew; when it is not, folding
    it anew cannot bring back what it lost.
    """
    return stream_problem(now, seen=None, folded=0) is None


class EngineStreamCheck:
    """The engine's `stream_check`: the identity of the stream first seen is kept for
    good (a recreated stream can grow past what was folded; only `created` tells it is
    another one), and every check compares the stream as it is now against it."""

    def __init__(self, js_or_log: JetStreamContext | _HasJetStream) -> None:
        self.source = js_or_log
        self.seen: StreamIdentity | None = None

    async def __call__(self, folded: int) -> str | None:
        try:
            now = await read_identity(self.source)
        except StreamMissingError as exc:
            return str(exc)
        problem = stream_problem(now, seen=self.seen, folded=folded)
        if self.seen is None:
            self.seen = now  # the first look: what this engine folds from here on
        return problem
