"""A simulated cluster that talks to the engine exactly as Docker agents would.

Fault drills and benchmarks need nodes, GPUs and containers that fail on cue, hours
apart, in milliseconds of wall time. `SimRuntime` keeps them in memory but reaches
the engine only through the real JetStream log and command bus: each node registers
with `node.registered`, consumes `gw.cmd.<node>` with its own durable consumer, acks
every command once its outcome is in the log, and appends only events about itself.
So a drill exercises the same engine, log and command path as production; only the
containers are imaginary.

Heartbeats are the one shortcut. Production agents beat on core NATS every second or
so; a drill that lets a virtual day pass would need tens of thousands of beats. Here
the scenario runner calls `beat(at)` just before it moves the virtual clock to `at`,
and every node that is up beats straight into the engine's `Liveness`, stamped with
that virtual time. The engine sees an up node as having beaten continuously, and a
down node's silence from the moment it went down, which is all liveness needs.

A down node neither beats nor processes commands: its commands wait in the work
queue (or in the node's hands, unacked) and are carried out when it comes back, where
a stale run or stop still behaves sensibly (a stop of a container that is gone is a
no-op; a run for an attempt already started is not started twice). As the real agent
does, a stop that finds an attempt never run says so with a start failure, and a run
that comes after that answer starts nothing.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
import anyio.abc
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.commands import Command, RunCommand, StopCommand
from gpuwarden.engine.core.errors import GpuwardenError
from gpuwarden.engine.core.liveness import Liveness
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.ports import Clock, CommandBus, EventLog, ReceivedCommand

log = logging.getLogger("gpuwarden.sim")

DEFAULT_MODEL = "sim"
DEFAULT_MEMORY_MB = 81920
SIGTERM_EXIT = 128 + 15
SIGKILL_EXIT = 128 + 9
RUNTIME_ERROR_EXIT = 128  # Docker's code when the runtime, not the process, failed


class SimulationError(GpuwardenError):
    """The simulated cluster could not do what it was asked (a bug or a stuck bus)."""


@dataclass(frozen=True)
class SimNodeSpec:
    name: str
    gpus: int
    model: str | None = None
    memory_mb: int | None = None


@dataclass
class SimNode:
    name: str
    gpus: tuple[ev.GpuInfo, ...]
    up: bool = True
    wake: anyio.Event = field(default_factory=anyio.Event)

    @property
    def actor(self) -> str:
        return f"agent:{self.name}"


@dataclass
class SimContainer:
    task_id: str
    attempt: int
    node: str
    gpu_uuids: tuple[str, ...]
    container_id: str
    running: bool = True


class CountingCommandBus:
    """The engine's command bus, counting what it sent to each node.

    The runner's quiescence check compares these counts with what the nodes have
    handled, so it never needs to ask the server about the work queue.
    """

    def __init__(self, bus: CommandBus) -> None:
        self.inner = bus
        self.sent: Counter[str] = Counter()

    async def send(self, command: Command) -> None:
        await self.inner.send(command)
        self.sent[command.node] += 1

    def receive(self, node: str) -> AsyncIterator[ReceivedCommand]:
        return self.inner.receive(node)


class SimRuntime:
    """Simulated nodes and containers; see the module docstring for the contract."""

    def __init__(
        self,
        log: EventLog,
        bus: CommandBus,
        clock: Clock,
        liveness: Liveness | None,
        nodes: Iterable[SimNodeSpec],
        *,
        counting: CountingCommandBus | None = None,
    ) -> None:
        self.log = log
        self.bus = bus
        self.clock = clock
        self.liveness = liveness
        self.counting = counting
        self.nodes: dict[str, SimNode] = {}
        for spec in nodes:
            infos = tuple(
                ev.GpuInfo(
                    uuid=f"{spec.name}/{i}",
                    index=i,
                    model=spec.model or DEFAULT_MODEL,
                    memory_mb=DEFAULT_MEMORY_MB if spec.memory_mb is None else spec.memory_mb,
                )
                for i in range(spec.gpus)
            )
            node = SimNode(spec.name, infos)
            node.wake.set()
            self.nodes[spec.name] = node
        self.gpu_node = {g.uuid: n.name for n in self.nodes.values() for g in n.gpus}
        self.containers: dict[tuple[str, int], SimContainer] = {}
        self.never_ran: set[tuple[str, int]] = set()  # answered with a start failure
        self.latest: dict[str, int] = {}  # task -> its latest attempt this cluster ran
        self.start_errors: dict[str, str] = {}
        self.handled: Counter[str] = Counter()
        self.seen_commands: set[str] = set()
        self.progress = anyio.Event()
        self.errors: list[BaseException] = []

    # --- lifecycle -------------------------------------------------------------------

    async def register(self) -> None:
        """Every node announces itself and beats once (as an agent does on start)."""
        now = self.clock.now()
        for node in self.nodes.values():
            event = ev.NodeRegistered(
                id=new_id(now),
                at=now,
                actor=node.actor,
                node=node.name,
                runtime="sim",
                gpus=node.gpus,
            )
            await self.emit([event])
        self.beat(now)

    async def serve(
        self,
        only: Iterable[str] | None = None,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consume every node's commands (or only those named) until cancelled."""
        names = set(self.nodes) if only is None else set(only)
        async with anyio.create_task_group() as tg:
            for node in self.nodes.values():
                if node.name in names:
                    tg.start_soon(self._serve_node, node)
            task_status.started()

    async def _serve_node(self, node: SimNode) -> None:
        try:
            async for received in self.bus.receive(node.name):
                while not node.up:
                    await node.wake.wait()
                await self._handle(node, received)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:  # surfaced by the runner's quiescence check
            log.error("node %s stopped serving: %s", node.name, exc)
            self.errors.append(exc)
            self._signal()

    # --- heartbeats and node state ---------------------------------------------------

    def beat(self, at: datetime) -> None:
        """Every up node beats at virtual time `at` (just before the clock gets there)."""
        if self.liveness is None:
            return
        for node in self.nodes.values():
            if node.up:
                self.liveness.beat(node.name, at)

    def node_down(self, name: str) -> None:
        node = self.nodes[name]
        node.up = False
        node.wake = anyio.Event()

    def node_up(self, name: str) -> None:
        node = self.nodes[name]
        node.up = True
        node.wake.set()
        if self.liveness is not None:
            self.liveness.beat(name, self.clock.now())

    def down_nodes(self) -> list[str]:
        return [n.name for n in self.nodes.values() if not n.up]

    # --- commands --------------------------------------------------------------------

    async def _handle(self, node: SimNode, received: ReceivedCommand) -> None:
        command = received.command
        if command.id not in self.seen_commands:  # a redelivery is acked, not redone
            self.seen_commands.add(command.id)
            if isinstance(command, RunCommand):
                started = self._run(node, command)
                await self.emit([] if started is None else [started])
            elif isinstance(command, StopCommand):
                await self.emit(self._stop(node, command))
        await received.ack()
        self.handled[node.name] += 1
        self._signal()

    def _run(self, node: SimNode, command: RunCommand) -> ev.Event | None:
        now = self.clock.now()
        task, attempt = command.task_id, command.attempt
        common: dict[str, Any] = {
            "id": new_id(now),
            "at": now,
            "actor": node.actor,
            "causation_id": command.causation_id,
            "correlation_id": task,
            "task_id": task,
            "attempt": attempt,
            "node": node.name,
        }
        existing = self.containers.get((task, attempt))
        if existing is not None:  # a stale resend: report what is already so
            return ev.ContainerStarted(container_id=existing.container_id, **common)
        if (task, attempt) in self.never_ran:
            return None  # answered already (a stop before it ran, or a failed start)
        message = self.start_errors.pop(task, None)
        self.latest[task] = max(attempt, self.latest.get(task, 0))
        if message is not None:
            self.never_ran.add((task, attempt))
            return ev.ContainerStartFailed(error=message, **common)
        container = SimContainer(
            task, attempt, node.name, command.gpu_uuids, f"sim-{task}-{attempt}"
        )
        self.containers[(task, attempt)] = container
        return ev.ContainerStarted(container_id=container.container_id, **common)

    def _stop(self, node: SimNode, command: StopCommand) -> list[ev.Event]:
        key = (command.task_id, command.attempt)
        container = self.containers.get(key)
        if container is None and key not in self.never_ran:
            self.never_ran.add(key)  # never ran here: the engine waits to hear it
            now = self.clock.now()
            return [
                ev.ContainerStartFailed(
                    id=new_id(now),
                    at=now,
                    actor=node.actor,
                    causation_id=command.causation_id,
                    correlation_id=command.task_id,
                    task_id=command.task_id,
                    attempt=command.attempt,
                    node=node.name,
                    error="not started: stopped before its container started",
                )
            ]
        if container is None or not container.running or container.node != node.name:
            return []  # already gone: nothing to report
        # Docker's stop: SIGTERM, or SIGKILL at once with no grace period (exit 128 + 9).
        code = SIGKILL_EXIT if command.grace_s == 0 else SIGTERM_EXIT
        return [self.exited(container, exit_code=code, causation_id=command.causation_id)]

    # --- faults on cue ---------------------------------------------------------------

    def running(self, task: str) -> SimContainer | None:
        """The task's current running container (its latest attempt, if still running)."""
        attempt = self.latest.get(task)
        container = None if attempt is None else self.containers.get((task, attempt))
        return container if container is not None and container.running else None

    def latest_container(self, task: str) -> SimContainer | None:
        attempt = self.latest.get(task)
        return None if attempt is None else self.containers.get((task, attempt))

    def arm_start_error(self, task: str, message: str) -> None:
        """The next start of `task`'s container fails with `message`."""
        self.start_errors[task] = message

    def exited(
        self,
        container: SimContainer,
        *,
        exit_code: int,
        oom_killed: bool = False,
        error: str = "",
        causation_id: str | None = None,
    ) -> ev.ContainerExited:
        """The container ends now; the event says how (signal = code - 128, as Docker)."""
        now = self.clock.now()
        container.running = False
        return ev.ContainerExited(
            id=new_id(now),
            at=now,
            actor=f"agent:{container.node}",
            causation_id=causation_id,
            correlation_id=container.task_id,
            task_id=container.task_id,
            attempt=container.attempt,
            node=container.node,
            container_id=container.container_id,
            exit_code=exit_code,
            oom_killed=oom_killed,
            signal=exit_code - 128 if 128 < exit_code <= 128 + 64 else None,
            error=error,
            finished_at=now,
        )

    def xid(self, gpu_uuid: str, code: int) -> ev.GpuFault:
        now = self.clock.now()
        node = self.gpu_node[gpu_uuid]
        return ev.GpuFault(
            id=new_id(now),
            at=now,
            actor=f"agent:{node}",
            gpu_uuid=gpu_uuid,
            node=node,
            kind="xid",
            xid=code,
            detail=f"Xid {code} (simulated)",
        )

    # --- the log ---------------------------------------------------------------------

    def check_own(self, event: ev.Event) -> None:
        """A node speaks only about itself: its registration, containers and GPUs."""
        node = getattr(event, "node", None)
        assert node in self.nodes, f"sim event {ev.type_of(event)} about foreign node {node}"
        assert event.actor == f"agent:{node}", f"{event.actor} wrote about {node}"
        gpu = getattr(event, "gpu_uuid", None)
        assert gpu is None or self.gpu_node.get(gpu) == node, f"{gpu} is not on {node}"

    async def emit(self, events: Sequence[ev.Event]) -> None:
        """Append this cluster's own events, each to its aggregate's subject."""
        for event in events:
            self.check_own(event)
            await self.log.append(ev.subject_of(event), [event])

    # --- waiting ---------------------------------------------------------------------

    def _signal(self) -> None:
        self.progress.set()
        self.progress = anyio.Event()

    def backlog(self) -> int:
        """Commands sent to up nodes and not yet handled (needs a CountingCommandBus)."""
        if self.counting is None:
            return 0
        return sum(
            max(0, self.counting.sent[name] - self.handled[name])
            for name, node in self.nodes.items()
            if node.up
        )

    async def wait_handled(self, timeout_s: float = 10.0) -> None:
        """Until every command sent to an up node so far has been carried out."""
        with anyio.fail_after(timeout_s):
            while True:
                if self.errors:
                    raise SimulationError(f"a simulated node failed: {self.errors[0]}")
                if self.backlog() == 0:
                    return
                await self.progress.wait()
