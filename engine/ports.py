"""Ports: what the engine needs from the outside world, as typing.Protocols.

Adapters (JetStream, Docker, NVML, the simulated runtime, clocks) implement them;
the core never imports an adapter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Literal, Protocol

import anyio
import msgspec
from gpuwarden.engine.core.commands import Command, RunCommand
from gpuwarden.engine.core.errors import GpuwardenError
from gpuwarden.engine.core.events import Event, GpuFault

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


class ReadableLog(Protocol):
    """The part of the EventLog port that readers need (the projections, export)."""

    def read(
        self, from_seq: int = 1, until_seq: int | None = None, subject: str | None = None
    ) -> AsyncIterator[StoredEvent]: ...

    def subscribe(
        self, from_seq: int = 1, subject: str | None = None
    ) -> AsyncIterator[StoredEvent]: ...

    async def last_seq(self, subject: str | None = None) -> int: ...


class ReceivedCommand(Protocol):
    command: Command

    async def ack(self) -> None: ...

    async def nak(self, delay_s: float | None = None) -> None: ...


class CommandBus(Protocol):
    async def send(self, command: Command) -> None:
        """Publish to gw.cmd.<node> with Nats-Msg-Id = command.id."""

    async def send_many(self, commands: Sequence[Command]) -> None:
        """Send several commands, pipelined; all are stored when it returns."""

    def receive(self, node: str) -> AsyncIterator[ReceivedCommand]:
        """Commands for one node, with explicit acks; unacked ones are redelivered."""


class Clock(Protocol):
    def now(self) -> datetime:
        """Current UTC time (virtual in scenarios)."""

    async def sleep_until(self, deadline: datetime) -> None:
        """Return once now() >= deadline."""


# --- the node agent's ports ----------------------------------------------------------


class Heartbeats(Protocol):
    async def beat(self, node: str, *, away_s: float | None = None) -> None:
        """Tell the engine this node's agent is alive (core NATS; not an event). With
        `away_s`, the agent is stopping gracefully and will be back within that time."""


class GpuHealth(Protocol):
    """Where GPU faults come from (the NVML probe); absent with a declared inventory."""

    def watch(self) -> AsyncIterator[GpuFault]:
        """The node's GPU faults as they happen, until closed."""


class ContainerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A container the runtime manages for gpuwarden, found by its labels."""

    container_id: str
    name: str
    task_id: str
    attempt: int
    node: str
    command_id: str | None
    state: str  # a ContainerState; kept open, a runtime may know more states
    exit_code: int | None
    labels: dict[str, str]


class ExitInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A container's start and end as the runtime tells it (`docker inspect`)."""

    container_id: str
    running: bool
    exit_code: int | None
    oom_killed: bool
    signal: int | None  # exit codes above 128 mean "killed by signal (code - 128)"
    error: str
    started_at: datetime | None
    finished_at: datetime | None
    task_id: str | None = None
    attempt: int | None = None
    node: str | None = None


class ContainerObservation(msgspec.Struct, frozen=True, kw_only=True):
    """A start or a death the runtime saw happen, with the moment it happened.

    The agent turns it into a catalog event whose id derives from the container and
    that moment, so the same change seen twice (a reconnect replays) is stored once.
    """

    kind: Literal["started", "exited"]
    container_id: str
    task_id: str
    attempt: int
    node: str
    command_id: str | None
    at: datetime
    exit: ExitInfo | None = None


class ContainerRuntime(Protocol):
    """What a node agent needs from a container engine (Docker, or the drills' fake).

    The runtime knows containers, not events: the agent holds every rule of when to
    run or stop, and builds every catalog event from what the runtime reports. All
    containers it manages carry labels naming their task, attempt and node.
    """

    name: str  # what node.registered says runs containers here: "docker", "sim"

    async def run(self, command: RunCommand) -> str:
        """Create and start the attempt's container, once: a rerun of the same attempt
        gets the container it already has. Returns its id; raises ContainerStartError
        with the engine's own words when it cannot start."""

    async def stop(self, task_id: str, attempt: int, timeout_s: float) -> list[str]:
        """Stop the attempt's containers (SIGTERM, SIGKILL after `timeout_s`; at once
        when 0). Returns the ids it found, running or not; [] when there were none."""

    async def remove(self, task_id: str, attempt: int) -> list[str]:
        """Remove the attempt's containers, running or not; returns their ids."""

    async def discard(self, container_id: str) -> None:
        """Remove a container that never started (refused, without force, if it did)."""

    async def inspect(self, container_id: str) -> ExitInfo:
        """How the container stands: started when, ended when and how."""

    async def list_managed(self) -> list[ContainerInfo]:
        """Every container of this node that carries gpuwarden's labels."""

    def watch(
        self, since: datetime | None, *, ready: anyio.Event
    ) -> AsyncIterator[ContainerObservation]:
        """Starts and deaths of managed containers from `since` (None: from now) on;
        sets `ready` once subscribed, so nothing falls between a listing and the
        stream. Raises ContainerRuntimeError when the stream breaks."""


# --- the engine's companions ---------------------------------------------------------


class DeadLetters(Protocol):
    async def dead_letter(self, record: StoredEvent, reason: str) -> None:
        """Copy a message the engine cannot fold to the dead-letter subject."""


class StreamCheck(Protocol):
    async def __call__(self, folded: int) -> str | None:
        """Why the log's stream is not the one folded up to `folded` (None: it is)."""
