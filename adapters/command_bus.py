"""The command bus on NATS JetStream: the GW_CMDS work queue, one durable pull consumer
per node. Each command carries `Nats-Msg-Id` = its id, so a re-sent one is dropped by
the server; a node agent acks a command once done, and an unacked one is redelivered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import nats.errors
import nats.js.errors
from gpuwarden.adapters.nats_connection import unsubscribe
from gpuwarden.adapters.publish_acks import MSG_ID, PubAcks
from gpuwarden.engine.core.commands import Command, decode_command, encode_command
from gpuwarden.engine.core.errors import EventDecodeError
from gpuwarden.engine.core.events import command_subject, subject_token
from gpuwarden.engine.core.wire import COMMANDS_STREAM
from gpuwarden.engine.ports import EventLogError
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api

log = logging.getLogger(__name__)


class JetStreamReceivedCommand:
    """A command with its delivery, to be acked once done (or nak'ed to retry)."""

    def __init__(self, command: Command, msg: Msg) -> None:
        self.command = command
        self.msg = msg

    @property
    def deliveries(self) -> int:
        return int(self.msg.metadata.num_delivered or 1)

    async def ack(self) -> None:
        """Acknowledge and wait for the server to confirm, so a done command is never rerun."""
        try:
            await self.msg.ack_sync(timeout=5)
        except (nats.errors.Error, TimeoutError) as exc:
            raise EventLogError(f"ack of command {self.command.id} not confirmed: {exc}") from exc

    async def nak(self, delay_s: float | None = None) -> None:
        await self.msg.nak(delay=delay_s)


class JetStreamCommandBus:
    """`CommandBus` on the GW_CMDS work queue: one durable pull consumer per node."""

    def __init__(
        self,
        nc: NatsClient,
        *,
        ack_wait_s: float = 30.0,
        timeout_s: float = 5.0,
        poll_s: float = 1.0,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=timeout_s)
        self._acks = PubAcks(nc)
        self.ack_wait_s = ack_wait_s
        self.timeout_s = timeout_s
        self.poll_s = poll_s

    async def send_many(self, commands: Sequence[Command]) -> None:
        """Publish several commands pipelined (in order), then wait for every ack."""
        if len(commands) == 1:
            await self.send(commands[0])
            return
        futures: list[asyncio.Future[dict[str, Any]]] = []
        try:
            with anyio.fail_after(self.timeout_s + len(commands) / 1000):
                for command in commands:
                    futures.append(
                        await self._acks.publish(
                            command_subject(command.node),
                            encode_command(command),
                            {MSG_ID: command.id},
                        )
                    )
                answers = [await future for future in futures]
        except TimeoutError:
            raise EventLogError(
                f"sending {len(commands)} commands timed out; resending is safe (msg ids)"
            ) from None
        except nats.errors.Error as exc:
            raise EventLogError(f"sending {len(commands)} commands failed: {exc}") from exc
        finally:
            self._acks.forget(futures)
        for command, answer in zip(commands, answers, strict=True):
            if answer.get("error") is not None:
                raise EventLogError(
                    f"command {command.id} to {command.node} refused: {answer['error']}"
                )

    async def send(self, command: Command) -> None:
        subject = command_subject(command.node)
        try:
            await self.js.publish(
                subject,
                encode_command(command),
                headers={MSG_ID: command.id},
                timeout=self.timeout_s,
            )
        except (nats.errors.Error, TimeoutError) as exc:
            raise EventLogError(f"cannot send command {command.id} to {subject}: {exc}") from exc

    async def receive(self, node: str) -> AsyncIterator[JetStreamReceivedCommand]:
        subject = command_subject(node)
        durable = f"gw-agent-{subject_token(node)}"
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_deliver=-1,
            filter_subject=subject,
        )
        try:
            psub = await self.js.pull_subscribe(
                subject, durable=durable, stream=COMMANDS_STREAM, config=config
            )
        except (nats.errors.Error, TimeoutError) as exc:
            raise EventLogError(f"cannot consume {subject}: {exc}") from exc
        try:
            while True:
                for msg in await self._fetch(psub):
                    received = await self._decode(msg)
                    if received is not None:
                        yield received
        finally:
            with anyio.CancelScope(shield=True):
                await unsubscribe(psub)

    async def _fetch(self, psub: Any) -> list[Msg]:
        try:
            msgs: list[Msg] = await psub.fetch(batch=16, timeout=self.poll_s)
            return msgs
        except (nats.errors.TimeoutError, TimeoutError):
            return []
        except (nats.errors.ConnectionReconnectingError, nats.js.errors.ServiceUnavailableError):
            await anyio.sleep(self.poll_s)  # the server is restarting: ride it out
            return []
        except nats.js.errors.APIError as exc:
            log.warning("fetching commands failed, retrying: %s", exc)
            await anyio.sleep(self.poll_s)
            return []

    async def _decode(self, msg: Msg) -> JetStreamReceivedCommand | None:
        try:
            return JetStreamReceivedCommand(decode_command(msg.data), msg)
        except EventDecodeError as exc:
            log.error("dropping malformed command on %s: %s", msg.subject, exc)
            await msg.term()
            return None
