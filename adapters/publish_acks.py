"""Pipelined JetStream publishes whose acks (errors included) come back as futures.

Shared by the event log and the command bus.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

MSG_ID = "Nats-Msg-Id"


class PubAcks:
    """Pipelined publishes with their acks on one wildcard inbox.

    nats-py's `publish_async` leaves a future pending forever when the server answers
    with an error (its reply handler raises instead of failing the future), so a stale
    expectation would look like a timeout; this resolves every answer, errors included.
    """

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.prefix = ""
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.counter = 0

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[dict[str, Any]]:
        if not self.prefix:
            inbox = self.nc.new_inbox()
            await self.nc.subscribe(f"{inbox}.*", cb=self._on_reply)
            self.prefix = inbox + "."
        self.counter += 1
        token = str(self.counter)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[token] = future
        try:
            await self.nc.publish(subject, payload, reply=self.prefix + token, headers=headers)
        except BaseException:
            self.pending.pop(token, None)
            raise
        return future

    def forget(self, futures: Sequence[asyncio.Future[dict[str, Any]]]) -> None:
        for future in futures:
            if not future.done():
                future.cancel()
        for token in [t for t, f in self.pending.items() if f.cancelled()]:
            del self.pending[token]

    async def _on_reply(self, msg: Msg) -> None:
        future = self.pending.pop(msg.subject[len(self.prefix) :], None)
        if future is None or future.done():
            return
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            answer: dict[str, Any] = {"error": {"code": 503, "description": "no responders"}}
        else:
            try:
                answer = json.loads(msg.data)
            except ValueError:
                answer = {"error": {"code": 500, "description": f"bad ack {msg.data[:80]!r}"}}
        future.set_result(answer)
