"""Ports: what the engine needs from the outside world, as typing.Protocols.

Adapters (JetStream, Docker, NVML, the simulated runtime, clocks) implement them;
the core never imports an adapter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Protocol

import msgspec
from gpuwarden.engine.core.commands import Command
from gpuwarden.engine.core.errors import GpuwardenError
from gpuwarden.engine.core.events import Event

# --- errors a port may raise: its callers catch these, whatever the adapter ----------


class ConcurrencyError(GpuwardenError):
    """An append's expected last subject sequence was stale: someone else wrote first."""

    def __init__(self, subject: str, expected: int | None, actual: int | None) -> None:
        super().__init__(
            f"concurrent write on {subject}: expected last sequence {expected}, "
            f"server has {actual if actual is not None else 'unknown'}"
        )
        self.subject = subject
        self.expected = expected
        self.actual = actual


class StreamConfigError(GpuwardenError):
    """An existing stream's configuration is incompatible with what gpuwarden needs."""


class EventLogError(GpuwardenError):
    """The event log could not do what was asked (server error, timeout, refused batch)."""


class ContainerStartError(GpuwardenError):
    """The container engine refused to create or start a container.

    The message carries the daemon's own text (missing image, missing executable,
    device request refused, engine unreachable), so the fault can be classified from it.
    """


class ContainerRuntimeError(GpuwardenError):
    """The container engine failed outside a start: unreachable, or its event stream broke."""


class GpuProbeError(GpuwardenError):
    """NVML could not be initialised or read (no driver, no library, GPU lost)."""


class StoredEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One message of the event log with its position.

    `event` is None when the payload did not decode; `error` then says why, and
    `data` keeps the raw bytes for the dead-letter subject.
    """

    seq: int
    subject: str
    event: Event | None
    data: bytes = b""
    error: str | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)


class EventLog(Protocol):
    async def ensure_streams(self) -> None:
        """Create GW_EVENTS and GW_CMDS if missing; refuse an incompatible existing one."""

    async def append(
        self,
        subject: str,
        events: Sequence[Event],
        expected_last_subject_seq: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> list[int]:
        """Append events to one subject; returns their stream sequences.

        Raises ConcurrencyError when `expected_last_subject_seq` is stale.
        """

    async def append_batch(
        self,
        events: Sequence[Event],
        expected: Mapping[str, int],
        headers: Mapping[str, str] | None = None,
    ) -> list[int]:
        """Append events across subjects atomically (all or nothing).

        `expected` maps each subject to its expected last sequence (0 = empty).
        """

    async def last_seq(self, subject: str | None = None) -> int:
        """Last stream sequence of a subject (0 if none), or of the whole stream."""

    def read(
        self, from_seq: int = 1, until_seq: int | None = None, subject: str | None = None
    ) -> AsyncIterator[StoredEvent]:
        """Events in [from_seq, until_seq] in order (until the current end if None)."""

    def subscribe(
        self, from_seq: int = 1, subject: str | None = None
    ) -> AsyncIterator[StoredEvent]:
        """Events from `from_seq` on, in order, following the live log forever."""


class ReceivedCommand(Protocol):
    command: Command

    async def ack(self) -> None: ...

    async def nak(self, delay_s: float | None = None) -> None: ...


class CommandBus(Protocol):
    async def send(self, command: Command) -> None:
        """Publish to gw.cmd.<node> with Nats-Msg-Id = command.id."""

    def receive(self, node: str) -> AsyncIterator[ReceivedCommand]:
        """Commands for one node, with explicit acks; unacked ones are redelivered."""


class Clock(Protocol):
    def now(self) -> datetime:
        """Current UTC time (virtual in scenarios)."""

    async def sleep_until(self, deadline: datetime) -> None:
        """Return once now() >= deadline."""
