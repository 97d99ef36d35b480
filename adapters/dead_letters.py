"""The dead-letter subject: where the engine copies log messages it cannot fold.

A message that does not decode, names an unknown event type, or is larger than the
engine accepts stays in GW_EVENTS (the log is never edited) and is copied, with the
reason and its original position, to `gw.dlq` in the GW_DLQ stream, so an operator
can find and fix the writer. The copy's msg id is derived from the original sequence,
so two engines (or a restarted one) dead-letter each message once.
"""

from __future__ import annotations

import anyio
import nats.errors
import nats.js.errors
from gpuwarden.engine.core.wire import (
    DEAD_LETTER_SUBJECT,
    DLQ_REASON_HEADER,
    DLQ_SEQ_HEADER,
    DLQ_STREAM,
    DLQ_SUBJECT_HEADER,
)
from gpuwarden.engine.ports import EventLogError, StoredEvent
from nats.aio.client import Client as NatsClient
from nats.js import api


class JetStreamDeadLetters:
    def __init__(self, nc: NatsClient, *, replicas: int = 1, timeout_s: float = 5.0) -> None:
        self.js = nc.jetstream(timeout=timeout_s)
        self.replicas = replicas
        self._ready = False
        self._ensuring = anyio.Lock()

    async def ensure_stream(self) -> None:
        config = api.StreamConfig(
            name=DLQ_STREAM,
            subjects=[DEAD_LETTER_SUBJECT],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            duplicate_window=3600.0,
            num_replicas=self.replicas,
        )
        try:
            try:
                await self.js.stream_info(DLQ_STREAM)
            except nats.js.errors.NotFoundError:
                await self.js.add_stream(config)
        except nats.errors.Error as exc:
            raise EventLogError(f"cannot create {DLQ_STREAM}: {exc}") from exc
        self._ready = True

    async def dead_letter(self, record: StoredEvent, reason: str) -> None:
        if not self._ready:
            async with self._ensuring:  # the engine copies many at once
                if not self._ready:
                    await self.ensure_stream()
        headers = {
            "Nats-Msg-Id": f"dlq-{record.subject}-{record.seq}",
            DLQ_REASON_HEADER: reason.replace("\n", " ")[:1024],
            DLQ_SEQ_HEADER: str(record.seq),
            DLQ_SUBJECT_HEADER: record.subject,
        }
        try:
            await self.js.publish(DEAD_LETTER_SUBJECT, record.data, headers=headers)
        except nats.errors.Error as exc:
            raise EventLogError(f"dead-lettering seq {record.seq} failed: {exc}") from exc

    async def read_all(self) -> list[tuple[dict[str, str], bytes]]:
        """Every dead letter so far (headers, original payload), for tools and tests."""
        try:
            info = await self.js.stream_info(DLQ_STREAM)
        except nats.js.errors.NotFoundError:
            return []
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await self.js.get_msg(DLQ_STREAM, seq)
            found.append((dict(msg.headers or {}), msg.data or b""))
        return found
