"""The event log on NATS JetStream (the GW_EVENTS stream).

The stream sequence is an event's position; `Nats-Msg-Id` = the event id makes a
retried append harmless; `Nats-Expected-Last-Subject-Sequence` turns each aggregate's
subject into a compare-and-set, and atomic batches commit one decision across several
aggregates all or nothing. This module maps the server's answers onto gpuwarden's
errors so the engine never sees a nats-py exception.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import anyio
import nats.errors
import nats.js.errors
from gpuwarden.adapters.nats_connection import unsubscribe
from gpuwarden.adapters.publish_acks import MSG_ID, PubAcks
from gpuwarden.adapters.stream_config import (
    commands_stream_config,
    ensure_stream,
    events_stream_config,
)
from gpuwarden.adapters.stream_guard import StreamIdentity, read_identity
from gpuwarden.engine.core.errors import EventDecodeError
from gpuwarden.engine.core.events import (
    Event,
    aggregate_filter,
    aggregate_of_subject,
    decode,
    encode,
    subject_of,
)
from gpuwarden.engine.core.wire import EVENT_SUBJECTS, EVENTS_STREAM
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.ports import ConcurrencyError, EventLogError, StoredEvent
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api

EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
# The subject (a wildcard here: the aggregate's `<aggregate>.>`) that the expectation is
# checked against, instead of the subject the message is published on (server >= 2.11).
EXPECTED_LAST_SUBJECT_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
BATCH_ID = "Nats-Batch-Id"
BATCH_SEQ = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"

WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
BATCH_DUPLICATE = 10201
NO_MESSAGE_FOUND = 10037
MAX_BATCH = 1000  # the server's limit on messages in one atomic batch
_WRONG_SEQ_TEXT = re.compile(r"wrong last sequence:\s*(\d+)")


# --- raw messages --------------------------------------------------------------------


def _stream_seq(reply: str) -> int:
    """The stream sequence from a JetStream delivery's ack subject."""
    tokens = reply.split(".")
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or the form
    # with <domain>.<account hash> after ACK (and an optional random token at the end).
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


def stored_event(
    seq: int, subject: str, data: bytes, headers: dict[str, str] | None
) -> StoredEvent:
    """A log entry; a payload that does not decode is kept with its error, never dropped."""
    try:
        event: Event | None = decode(data)
        error = None
    except EventDecodeError as exc:
        event, error = None, str(exc)
    except Exception as exc:  # a decoder bug must not stop a replay either
        event, error = None, f"{type(exc).__name__}: {exc}"
    return StoredEvent(
        seq=seq, subject=subject, event=event, data=data, error=error, headers=headers or {}
    )


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.decode(errors="replace").split("\r\n")[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip()] = value.strip()
    return headers


class _RawMsg:
    __slots__ = ("data", "headers", "seq", "subject")

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.seq = int(body["seq"])
        self.subject = str(body["subject"])
        self.data = base64.b64decode(body.get("data") or b"")
        hdrs = body.get("hdrs")
        self.headers = _parse_headers(base64.b64decode(hdrs)) if hdrs else {}


class _Feed:
    """Messages handed from a subscription callback to an async iterator, with backpressure.

    The callback blocks when the buffer is full, which stops flow-control replies, so
    the server stops sending until the reader catches up.
    """

    def __init__(self, high_water: int = 8192) -> None:
        self.buffer: deque[Msg] = deque()
        self.high_water = high_water
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    async def put(self, msg: Msg) -> None:
        self.buffer.append(msg)
        self._wake.set()
        if len(self.buffer) >= self.high_water:
            self._room.clear()
            await self._room.wait()

    def release(self) -> None:
        if not self._room.is_set() and len(self.buffer) <= self.high_water // 2:
            self._room.set()

    async def wait(self, stall_s: float | None) -> None:
        while not self.buffer:
            self._wake.clear()
            if stall_s is None:
                await self._wake.wait()
                continue
            with anyio.move_on_after(stall_s) as scope:
                await self._wake.wait()
            if scope.cancelled_caught:
                raise EventLogError(f"event log read stalled: no message for {stall_s}s")


# --- the event log -------------------------------------------------------------------


class JetStreamEventLog:
    """`EventLog` on the GW_EVENTS stream."""

    def __init__(
        self,
        nc: NatsClient,
        *,
        replicas: int = 1,
        duplicate_window_s: float = 300.0,
        timeout_s: float = 5.0,
        heartbeat_s: float = 2.0,
        msg_id_key: bytes | None = None,
    ) -> None:
        """`msg_id_key`: a secret of this process that keys each append's Nats-Msg-Id.

        Msg-id de-duplication is stream-wide, and a decision's id derives from the event
        it is about, so anyone who may append at all could store junk under the msg id
        of a decision it can foresee: the engine's batch would then be refused as a
        duplicate, for the whole duplicate window, and every decision behind it would
        wait. Keyed, the engine's msg ids cannot be foreseen; a retry in this process
        still de-duplicates, and a restarted engine's re-derived batch meets the
        compare-and-set instead (the subjects moved when the first one was stored).
        """
        self.nc = nc
        self.js = nc.jetstream(timeout=timeout_s)
        self.msg_id_key = msg_id_key
        self.replicas = replicas
        self.duplicate_window_s = duplicate_window_s
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self._acks = PubAcks(nc)

    def msg_id(self, event_id: str) -> str:
        """The Nats-Msg-Id an event is appended under: its id, keyed where a key is set."""
        key = self.msg_id_key
        if key is None:
            return event_id
        tag = hashlib.blake2b(event_id.encode(), key=key, digest_size=8).hexdigest()
        return f"{event_id}-{tag}"

    async def ensure_streams(self) -> None:
        for config in (
            events_stream_config(self.replicas, self.duplicate_window_s),
            commands_stream_config(self.replicas, self.duplicate_window_s),
        ):
            await ensure_stream(self.js, config, self.timeout_s)

    # --- appends ---------------------------------------------------------------------

    async def append(
        self,
        subject: str,
        events: Sequence[Event],
        expected_last_subject_seq: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> list[int]:
        """Append events of one aggregate, each on its own subject (`subject_of`): one
        event is a publish; several with an expectation are an atomic batch, so a stale
        expectation stores none of them; several without one are pipelined.

        `subject` names the aggregate (a scheme-2 subject under it works too), and the
        expectation is its last sequence over `<aggregate>.>`."""
        if not events:
            return []
        subject = aggregate_of_subject(subject)
        if expected_last_subject_seq is not None and len(events) > 1:
            return await self._append_guarded(subject, events, expected_last_subject_seq, headers)
        return await self._append_pipelined(subject, events, expected_last_subject_seq, headers)

    async def _append_guarded(
        self,
        subject: str,
        events: Sequence[Event],
        expected: int,
        headers: Mapping[str, str] | None,
    ) -> list[int]:
        seqs: list[int] = []
        for start in range(0, len(events), MAX_BATCH):
            chunk = events[start : start + MAX_BATCH]
            seqs += await self._commit_batch(
                [subject_of(event) for event in chunk], chunk, {subject: expected}, headers
            )
            expected = seqs[-1]
        return seqs

    async def _append_pipelined(
        self,
        subject: str,
        events: Sequence[Event],
        expected: int | None,
        headers: Mapping[str, str] | None,
    ) -> list[int]:
        base = dict(headers or {})
        futures: list[asyncio.Future[dict[str, Any]]] = []
        try:
            with anyio.fail_after(self.timeout_s + len(events) / 1000):
                for index, event in enumerate(events):
                    hdr = {**base, MSG_ID: self.msg_id(event.id)}
                    if index == 0 and expected is not None:
                        hdr[EXPECTED_LAST_SUBJECT_SEQ] = str(expected)
                        hdr[EXPECTED_LAST_SUBJECT_SEQ_SUBJECT] = aggregate_filter(subject)
                    futures.append(await self._acks.publish(subject_of(event), encode(event), hdr))
                answers = [await future for future in futures]
        except TimeoutError:
            raise EventLogError(
                f"append to {subject} timed out; retrying it is safe (ids de-duplicate)"
            ) from None
        except nats.errors.Error as exc:
            raise EventLogError(f"append to {subject} failed: {exc}") from exc
        finally:
            self._acks.forget(futures)
        seqs = []
        for answer in answers:
            error = answer.get("error")
            if error is None:
                seqs.append(int(answer["seq"]))
                continue
            if error.get("err_code") in WRONG_LAST_SEQUENCE and expected is not None:
                # The server checks the expectation before de-duplicating, so a retry of
                # an append that was stored looks stale: recognise it by its ids.
                stored = await self._stored_after(subject, expected, events)
                if stored is not None:
                    return stored
            raise await self._append_error(
                subject, expected, error.get("err_code"), error.get("description")
            )
        return seqs

    async def _stored_after(
        self, subject: str, after: int, events: Sequence[Event]
    ) -> list[int] | None:
        """The sequences of `events` if they are the aggregate's next messages after `after`."""
        seqs: list[int] = []
        for event in events:
            found = await self._get_msg(
                {"seq": after + 1, "next_by_subj": aggregate_filter(subject)}
            )
            if found is None or found.headers.get(MSG_ID) != self.msg_id(event.id):
                return None
            after = found.seq
            seqs.append(after)
        return seqs

    async def _append_error(
        self, subject: str, expected: int | None, err_code: int | None, description: str | None
    ) -> Exception:
        if err_code in WRONG_LAST_SEQUENCE:
            match = _WRONG_SEQ_TEXT.search(description or "")
            actual = int(match.group(1)) if match else await self._cas_seq(subject)
            return ConcurrencyError(subject, expected, actual)
        return EventLogError(f"append to {subject} refused: {description} (error {err_code})")

    async def append_batch(
        self,
        events: Sequence[Event],
        expected: Mapping[str, int],
        headers: Mapping[str, str] | None = None,
    ) -> list[int]:
        if not events:
            return []
        if len(events) > MAX_BATCH:
            raise EventLogError(f"an atomic batch holds at most {MAX_BATCH} events")
        subjects = [subject_of(event) for event in events]
        expected = {aggregate_of_subject(key): seq for key, seq in expected.items()}
        return await self._commit_batch(subjects, events, expected, headers)

    async def _commit_batch(
        self,
        subjects: Sequence[str],
        events: Sequence[Event],
        expected: Mapping[str, int],
        headers: Mapping[str, str] | None,
    ) -> list[int]:
        """One JetStream atomic batch: stored whole at the commit, or not at all.

        `expected` is keyed by aggregate; the first message of each aggregate carries its
        expectation over `<aggregate>.>`."""
        batch_id = new_id()
        base = dict(headers or {})
        guarded: set[str] = set()
        last = len(events)
        try:
            for number, (subject, event) in enumerate(zip(subjects, events, strict=True), 1):
                hdr = {
                    **base,
                    MSG_ID: self.msg_id(event.id),
                    BATCH_ID: batch_id,
                    BATCH_SEQ: str(number),
                }
                aggregate = aggregate_of_subject(subject)
                if aggregate in expected and aggregate not in guarded:
                    hdr[EXPECTED_LAST_SUBJECT_SEQ] = str(expected[aggregate])
                    hdr[EXPECTED_LAST_SUBJECT_SEQ_SUBJECT] = aggregate_filter(aggregate)
                    guarded.add(aggregate)
                if number < last:
                    await self.nc.publish(subject, encode(event), headers=hdr)
                    continue
                hdr[BATCH_COMMIT] = "1"
                reply = await self.nc.request(
                    subject, encode(event), headers=hdr, timeout=self.timeout_s
                )
        except nats.errors.TimeoutError:
            raise EventLogError(
                "atomic batch commit timed out; retrying it is safe (ids de-duplicate)"
            ) from None
        except nats.errors.Error as exc:
            raise EventLogError(f"atomic batch failed: {exc}") from exc
        answer = json.loads(reply.data or b"{}")
        error = answer.get("error")
        if error is None:
            seq = int(answer["seq"])
            return list(range(seq - last + 1, seq + 1))
        if error.get("err_code") == BATCH_DUPLICATE:
            return await self._stored_batch(subjects, events, expected)
        if error.get("err_code") in WRONG_LAST_SEQUENCE:
            raise await self._stale_batch(expected)
        raise EventLogError(
            f"atomic batch refused: {error.get('description')} (error {error.get('err_code')})"
        )

    async def _stale_batch(self, expected: Mapping[str, int]) -> ConcurrencyError:
        """Name the subject whose expectation was stale (the server's error does not)."""
        for subject, want in expected.items():
            actual = await self._cas_seq(subject)
            if actual != want:
                return ConcurrencyError(subject, want, actual)
        subject, want = next(iter(expected.items()))
        return ConcurrencyError(subject, want, None)

    async def _stored_batch(
        self, subjects: Sequence[str], events: Sequence[Event], expected: Mapping[str, int]
    ) -> list[int]:
        """The sequences of a batch the server says it already holds (a retried commit).

        A stored batch occupies consecutive sequences; find one of its messages, then
        check every id. Anything else means only some ids were stored before: refuse.
        """
        anchor = next(
            (i for i, s in enumerate(subjects) if aggregate_of_subject(s) in expected), None
        )
        if anchor is not None:
            aggregate = aggregate_of_subject(subjects[anchor])
            found = await self._get_msg(
                {"seq": expected[aggregate] + 1, "next_by_subj": aggregate_filter(aggregate)}
            )
        else:
            anchor = len(events) - 1
            found = await self._get_msg({"last_by_subj": subjects[anchor]})
        if found is not None and found.headers.get(MSG_ID) == self.msg_id(events[anchor].id):
            start = found.seq - anchor
            seqs = list(range(start, start + len(events)))
            if await self._ids_at(seqs, events):
                return seqs
        # Another writer stored some of these (derived) ids in its own decision: the
        # subjects moved on, so it is a lost compare-and-set, not a broken log.
        stale = await self._stale_batch(expected)
        if stale.actual is not None:
            raise stale
        raise EventLogError(
            "atomic batch refused as a duplicate, but it is not stored whole: "
            "some of its event ids were appended before in another write"
        )

    async def _ids_at(self, seqs: Sequence[int], events: Sequence[Event]) -> bool:
        for seq, event in zip(seqs, events, strict=True):
            found = await self._get_msg({"seq": seq})
            if found is None or found.headers.get(MSG_ID) != self.msg_id(event.id):
                return False
        return True

    # --- positions -------------------------------------------------------------------

    async def stream_identity(self) -> StreamIdentity:
        """GW_EVENTS's creation time, positions and limits, to check with
        `stream_guard.stream_problem`; StreamMissingError when the stream is gone."""
        return await read_identity(self.js)

    async def last_seq(self, subject: str | None = None) -> int:
        """The stream's last sequence, or an aggregate's (either subject scheme)."""
        if subject is None:
            try:
                info = await self.js.stream_info(EVENTS_STREAM)
            except (nats.errors.Error, TimeoutError) as exc:
                raise EventLogError(f"cannot read {EVENTS_STREAM} info: {exc}") from exc
            return int(info.state.last_seq)
        aggregate = aggregate_of_subject(subject)
        legacy = await self._get_msg({"last_by_subj": aggregate})
        return max(await self._cas_seq(aggregate), legacy.seq if legacy is not None else 0)

    async def _cas_seq(self, aggregate: str) -> int:
        """An aggregate's last sequence as its compare-and-set sees it (scheme 2 only)."""
        found = await self._get_msg({"last_by_subj": aggregate_filter(aggregate)})
        return found.seq if found is not None else 0

    async def _get_msg(self, request: Mapping[str, Any]) -> _RawMsg | None:
        """A stored message from the stream leader (consistent, unlike a direct get)."""
        try:
            reply = await self.nc.request(
                f"$JS.API.STREAM.MSG.GET.{EVENTS_STREAM}",
                json.dumps(request).encode(),
                timeout=self.timeout_s,
            )
        except nats.errors.Error as exc:
            raise EventLogError(f"cannot read from {EVENTS_STREAM}: {exc}") from exc
        answer = json.loads(reply.data or b"{}")
        error = answer.get("error")
        if error is not None:
            if error.get("err_code") == NO_MESSAGE_FOUND or error.get("code") == 404:
                return None
            raise EventLogError(f"cannot read from {EVENTS_STREAM}: {error.get('description')}")
        return _RawMsg(answer["message"])

    # --- reads -----------------------------------------------------------------------

    async def read(
        self, from_seq: int = 1, until_seq: int | None = None, subject: str | None = None
    ) -> AsyncIterator[StoredEvent]:
        end = await self.last_seq(subject)
        if until_seq is not None:
            end = min(end, until_seq)
        if end < max(from_seq, 1):
            return
        async for stored in self._ordered(from_seq, subject, self.timeout_s + self.heartbeat_s):
            if stored.seq > end:
                return
            yield stored
            if stored.seq >= end:
                return

    def subscribe(
        self, from_seq: int = 1, subject: str | None = None
    ) -> AsyncIterator[StoredEvent]:
        return self._ordered(from_seq, subject, None)

    async def _ordered(
        self, from_seq: int, subject: str | None, stall_s: float | None
    ) -> AsyncIterator[StoredEvent]:
        """An ordered push consumer: the fastest replay, and it resets itself from the last
        delivered sequence after a gap or a server restart (missed heartbeats)."""
        feed = _Feed()
        sub = await self._ordered_consumer(feed, from_seq, subject)
        buffer = feed.buffer
        try:
            while True:
                await feed.wait(stall_s)
                while buffer:
                    msg = buffer.popleft()
                    feed.release()
                    yield stored_event(_stream_seq(msg.reply), msg.subject, msg.data, msg.headers)
        finally:
            with anyio.CancelScope(shield=True):
                await unsubscribe(sub)

    async def _ordered_consumer(self, feed: _Feed, from_seq: int, subject: str | None) -> Any:
        """Create the consumer, retrying while a cluster is electing a stream leader."""
        last: Exception | None = None
        with anyio.move_on_after(self.timeout_s * 3):
            while True:
                try:
                    return await self.js.subscribe(
                        EVENT_SUBJECTS,
                        stream=EVENTS_STREAM,
                        cb=feed.put,
                        ordered_consumer=True,
                        idle_heartbeat=self.heartbeat_s,
                        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                        config=_read_config(from_seq, subject),
                    )
                except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
                    last = exc
                except (nats.errors.Error, TimeoutError) as exc:
                    raise EventLogError(f"cannot read {EVENTS_STREAM}: {exc}") from exc
                await anyio.sleep(0.1)
        raise EventLogError(f"cannot read {EVENTS_STREAM}: {last or 'timed out'}")


def _read_config(from_seq: int, subject: str | None) -> api.ConsumerConfig:
    """From `from_seq` on; with `subject`, only that aggregate's messages, both schemes."""
    config = api.ConsumerConfig(opt_start_seq=max(from_seq, 1))
    if subject is not None:
        aggregate = aggregate_of_subject(subject)
        config.filter_subjects = [aggregate, aggregate_filter(aggregate)]
    return config
