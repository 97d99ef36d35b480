"""Node heartbeats on core NATS: proof of life that must never reach the event log.

A beat every second from every node would drown the audit log in noise, so beats go
on plain (fire-and-forget) subjects `gw.hb.<node>`; only their absence becomes an
event (`node.lost`, appended by the engine's Liveness). The engine stamps a beat with
its own clock on receipt, so the agent's `at` is informative only: a skewed agent
clock can neither kill nor revive a node.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Final, Protocol

import anyio
import msgspec
import nats.errors
from gpuwarden.engine.core.events import subject_token
from gpuwarden.engine.core.liveness import Liveness
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.ports import Clock
from nats.aio.client import Client as NatsClient

log = logging.getLogger("gpuwarden.heartbeats")

HEARTBEAT_PREFIX = "gw.hb."
HEARTBEAT_SUBJECTS = "gw.hb.*"


MAX_AWAY_S: Final = 3600.0  # the longest absence an agent may announce


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    at: datetime
    agent: str  # this agent process's instance id: a restart shows as a new one
    # A graceful stop's announcement (an upgrade, a restart): "I am going, back within
    # this many seconds; do not fail my node over before then". None on a plain beat.
    away_s: float | None = None


class HeartbeatSource(Protocol):
    def beats(self) -> AsyncIterator[Heartbeat]: ...


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Heartbeat)


def heartbeat_subject(node: str) -> str:
    return HEARTBEAT_PREFIX + subject_token(node)


class NatsHeartbeats:
    """Send and receive beats over one NATS connection."""

    def __init__(self, nc: NatsClient, *, instance: str | None = None) -> None:
        self.nc = nc
        self.instance = instance or new_id()

    async def beat(self, node: str, *, away_s: float | None = None) -> None:
        beat = Heartbeat(node=node, at=datetime.now(UTC), agent=self.instance, away_s=away_s)
        await self.nc.publish(heartbeat_subject(node), _encoder.encode(beat))
        if away_s is not None:
            await self.nc.flush()  # the last word of a stopping agent must leave first

    async def listen(self) -> AsyncIterator[str]:
        """Node names, one per beat received, until the caller stops iterating."""
        async for beat in self.beats():
            yield beat.node

    async def beats(self) -> AsyncIterator[Heartbeat]:
        """Beats received (from their own node's subject only), until the caller stops."""
        sub = await self.nc.subscribe(HEARTBEAT_SUBJECTS)
        try:
            async for msg in sub.messages:
                try:
                    beat = _decoder.decode(msg.data)
                    node = beat.node
                except msgspec.DecodeError as exc:  # a stranger on our subject: say so, go on
                    log.warning("ignoring malformed heartbeat on %s: %s", msg.subject, exc)
                    continue
                if heartbeat_subject(node) != msg.subject:
                    # Credentials grant an agent only its own subject: a beat for another
                    # node on it would let one agent keep a dead node alive.
                    log.warning("ignoring heartbeat for %r on %s", node, msg.subject)
                    continue
                yield beat
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    with anyio.fail_after(2):
                        await sub.unsubscribe()
                except (nats.errors.Error, TimeoutError) as exc:
                    log.debug("heartbeat unsubscribe failed: %s", exc)


async def feed_liveness(heartbeats: HeartbeatSource, liveness: Liveness, clock: Clock) -> None:
    """Run beside the engine: every beat received refreshes its node in Liveness, and a
    graceful stop's announcement holds off its failover for the time announced (at most
    MAX_AWAY_S; a negative or absurd one counts as none)."""
    async for beat in heartbeats.beats():
        away = beat.away_s
        if away is not None and not 0 < away <= MAX_AWAY_S:
            log.warning("node %s announced an absence of %r s; ignored", beat.node, away)
            away = None
        liveness.beat(beat.node, clock.now(), away_s=away)
