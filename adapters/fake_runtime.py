"""FakeRuntime: an in-memory container engine behind the `ContainerRuntime` port.

The drills and the agent's own tests run the real `Agent` over it, so every rule of
when to run, stop or answer lives in the agent alone; this module only keeps
containers and reports their starts and deaths, as Docker would:

- `run` creates and starts an attempt's container once; a rerun of the attempt gets
  the container it has. A start armed to fail (`arm_start_error`) raises
  `ContainerStartError` with the armed message, and leaves no container behind.
- `stop` ends running containers: SIGTERM (exit 143), or SIGKILL at once (137) when
  the grace period is 0, as `docker stop -t 0` does.
- `watch` reports each start and death to every watcher subscribed at the time, and
  replays recent ones from `since` to a watcher that reconnects, as Docker does. An
  agent that starts afresh finds the rest when it reconciles (`list_managed`).

Faults on cue (`exit`) end a container the way its process would. Times come from the
clock the runtime is given (virtual in drills), so ids derived from them are stable.

`pending` counts observations handed to a watcher and not yet taken back (the
watcher asks for the next one only once it has recorded the last): the drill harness
waits for it to reach 0 before it calls the cluster quiet.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from gpuwarden.engine.core.commands import RunCommand
from gpuwarden.engine.core.events import GpuFault
from gpuwarden.engine.ports import (
    Clock,
    ContainerInfo,
    ContainerObservation,
    ContainerRuntimeError,
    ContainerStartError,
    ExitInfo,
)

SIGTERM_EXIT: Final = 128 + 15
SIGKILL_EXIT: Final = 128 + 9
RUNTIME_ERROR_EXIT: Final = 128  # Docker's code when the runtime, not the process, failed
WATCH_BUFFER: Final = 1024
HISTORY: Final = 1024  # observations a reconnecting watcher may ask for again


@dataclass(frozen=True)
class FakeExit:
    """How a fake container's program ends, as soon as it starts."""

    exit_code: int
    oom_killed: bool = False


@dataclass
class FakeContainer:
    container_id: str
    task_id: str
    attempt: int
    node: str
    command_id: str | None
    gpu_uuids: tuple[str, ...]
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    error: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.started_at is not None and self.finished_at is None

    def exit_info(self) -> ExitInfo:
        code = self.exit_code
        return ExitInfo(
            container_id=self.container_id,
            running=self.running,
            exit_code=code,
            oom_killed=self.oom_killed,
            signal=code - 128 if code is not None and 128 < code <= 128 + 64 else None,
            error=self.error,
            started_at=self.started_at,
            finished_at=self.finished_at,
            task_id=self.task_id,
            attempt=self.attempt,
            node=self.node,
        )


class FakeRuntime:
    """One node's containers, in memory; see the module docstring."""

    name = "sim"

    def __init__(
        self,
        node: str,
        clock: Clock,
        *,
        start_errors: dict[str, str] | None = None,
        on_taken: Callable[[], None] | None = None,
        on_start: Callable[[RunCommand], FakeExit | None] | None = None,
    ) -> None:
        self.node = node
        self.clock = clock
        # Armed start failures by task id; a cluster's nodes may share one table.
        self.start_errors: dict[str, str] = {} if start_errors is None else start_errors
        self.containers: dict[str, FakeContainer] = {}
        self.runs = 0  # containers created: a test can tell a rerun from a new start
        self.pending = 0
        self._watchers: list[MemoryObjectSendStream[ContainerObservation]] = []
        self._history: deque[ContainerObservation] = deque(maxlen=HISTORY)
        self.on_taken = on_taken  # told whenever `pending` drops
        # What the "program" does (a test's stand-in for a process): None runs until
        # stopped or ended on cue, a FakeExit ends it as soon as it starts, and a
        # ContainerStartError is the daemon refusing to start it.
        self.on_start = on_start
        self._released = anyio.Event()  # cleared while the node is cut off (`hold`)
        self._released.set()

    # --- the port ----------------------------------------------------------------------

    async def run(self, command: RunCommand) -> str:
        mine = self._of(command.task_id, command.attempt)
        if mine:
            container = mine[-1]
            if container.started_at is None:
                self._start(container)
            return container.container_id
        message = self.start_errors.pop(command.task_id, None)
        if message is not None:
            raise ContainerStartError(message)
        outcome = None if self.on_start is None else self.on_start(command)
        self.runs += 1
        container = FakeContainer(
            container_id=f"sim-{command.task_id}-{command.attempt}",
            task_id=command.task_id,
            attempt=command.attempt,
            node=self.node,
            command_id=command.id,
            gpu_uuids=command.gpu_uuids,
            labels={"gpuwarden.task": command.task_id, "gpuwarden.node": self.node},
        )
        self.containers[container.container_id] = container
        self._start(container)
        if outcome is not None:
            self.end(container, exit_code=outcome.exit_code, oom_killed=outcome.oom_killed)
        return container.container_id

    async def stop(self, task_id: str, attempt: int, timeout_s: float) -> list[str]:
        found = self._of(task_id, attempt)
        for container in found:
            if container.running:
                code = SIGKILL_EXIT if timeout_s <= 0 else SIGTERM_EXIT
                self.end(container, exit_code=code)
        return [c.container_id for c in found]

    async def remove(self, task_id: str, attempt: int) -> list[str]:
        found = self._of(task_id, attempt)
        for container in found:
            del self.containers[container.container_id]
        return [c.container_id for c in found]

    async def discard(self, container_id: str) -> None:
        container = self.containers.get(container_id)
        if container is None:
            return
        if container.started_at is not None:
            raise ContainerRuntimeError(f"container {container_id} has run; not discarded")
        del self.containers[container_id]

    async def inspect(self, container_id: str) -> ExitInfo:
        container = self.containers.get(container_id)
        if container is None:
            raise ContainerRuntimeError(f"no such container: {container_id}")
        return container.exit_info()

    async def list_managed(self) -> list[ContainerInfo]:
        return [
            ContainerInfo(
                container_id=c.container_id,
                name=c.container_id,
                task_id=c.task_id,
                attempt=c.attempt,
                node=c.node,
                command_id=c.command_id,
                state="running" if c.running else "exited" if c.finished_at else "created",
                exit_code=c.exit_code,
                labels=dict(c.labels),
            )
            for c in self.containers.values()
        ]

    async def watch(
        self, since: datetime | None, *, ready: anyio.Event
    ) -> AsyncIterator[ContainerObservation]:
        send, receive = anyio.create_memory_object_stream[ContainerObservation](WATCH_BUFFER)
        self._watchers.append(send)
        if since is not None:  # as Docker does: what happened since then comes first
            for observation in self._history:
                if observation.at >= since:
                    send.send_nowait(observation)
                    self.pending += 1
        ready.set()
        try:
            async for observation in receive:
                try:
                    await self._released.wait()
                    yield observation
                finally:
                    self._taken()
        finally:
            self._watchers.remove(send)
            self.pending -= send.statistics().current_buffer_used  # never handed over
            send.close()
            receive.close()

    # --- faults on cue -------------------------------------------------------------------

    def end(
        self,
        container: FakeContainer,
        *,
        exit_code: int,
        oom_killed: bool = False,
        error: str = "",
    ) -> None:
        """The container's process ends now, the way the arguments say."""
        if not container.running:
            return
        container.finished_at = self.clock.now()
        container.exit_code = exit_code
        container.oom_killed = oom_killed
        container.error = error
        self._observe("exited", container, container.finished_at)

    def hold(self) -> None:
        """Cut the node off: starts and deaths still happen, their reports wait."""
        if self._released.is_set():
            self._released = anyio.Event()

    def release(self) -> None:
        """Reconnect the node: the reports that waited are handed over, in order."""
        self._released.set()

    def arm_start_error(self, task_id: str, message: str) -> None:
        """The next start of `task_id`'s container fails with `message`."""
        self.start_errors[task_id] = message

    def container_of(self, task_id: str, attempt: int) -> FakeContainer | None:
        """The attempt's container here, if any."""
        mine = self._of(task_id, attempt)
        return mine[-1] if mine else None

    def latest(self, task_id: str) -> FakeContainer | None:
        """The task's container of its highest attempt on this node, if any."""
        mine = [c for c in self.containers.values() if c.task_id == task_id]
        return max(mine, key=lambda c: c.attempt) if mine else None

    # --- inside --------------------------------------------------------------------------

    def _of(self, task_id: str, attempt: int) -> list[FakeContainer]:
        return [
            c for c in self.containers.values() if c.task_id == task_id and c.attempt == attempt
        ]

    def _start(self, container: FakeContainer) -> None:
        container.started_at = self.clock.now()
        self._observe("started", container, container.started_at)

    def _observe(self, kind: str, container: FakeContainer, at: datetime) -> None:
        observation = ContainerObservation(
            kind="started" if kind == "started" else "exited",
            container_id=container.container_id,
            task_id=container.task_id,
            attempt=container.attempt,
            node=container.node,
            command_id=container.command_id,
            at=at,
            exit=None if kind == "started" else container.exit_info(),
        )
        self._history.append(observation)
        for watcher in list(self._watchers):
            try:
                watcher.send_nowait(observation)
            except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                continue  # a watcher that cannot keep up reconciles, as after a reconnect
            self.pending += 1

    def _taken(self) -> None:
        self.pending -= 1
        if self.on_taken is not None:
            self.on_taken()


class FakeGpuHealth:
    """GPU faults on cue, behind the `GpuHealth` port: what `NvmlProbe.watch` yields on a
    real node. A fault is held like a container report while the node is cut off."""

    def __init__(self, runtime: FakeRuntime) -> None:
        self.runtime = runtime  # shares its `pending` count and its link to the agent
        self._send, self._receive = anyio.create_memory_object_stream[GpuFault](WATCH_BUFFER)

    def report(self, fault: GpuFault) -> None:
        self._send.send_nowait(fault)
        self.runtime.pending += 1

    async def watch(self) -> AsyncIterator[GpuFault]:
        async for fault in self._receive:
            try:
                await self.runtime._released.wait()
                yield fault
            finally:
                self.runtime._taken()
