"""A simulated cluster: the real node `Agent` on every node, over in-memory containers.

Fault drills and benchmarks need nodes, GPUs and containers that fail on cue, hours
apart, in milliseconds of wall time. `SimCluster` runs one real `Agent` per node, each
over its own `FakeRuntime` (containers in memory) and `FakeGpuHealth` (faults on cue),
through the real JetStream log and command bus: each node registers, consumes
`gw.cmd.<node>` with its own durable consumer, acks every command once its outcome is
in the log, and appends only events about itself. So a drill exercises the code that
runs on a GPU host; only the containers are imaginary. This module holds no rule of
when to run or stop: those are the agent's alone.

Heartbeats are the one shortcut. Production agents beat on core NATS every second or
so; a drill that lets a virtual day pass would need tens of thousands of beats. Here
the scenario runner calls `beat(at)` just before it moves the virtual clock to `at`,
and every node that is up beats straight into the engine's `Liveness`, stamped with
that virtual time. The engine sees an up node as having beaten continuously, and a
down node's silence from the moment it went down, which is all liveness needs.

A down node is cut off, not dead: it neither beats nor takes commands, and what its
containers and GPUs do meanwhile is reported when it comes back (its commands wait in
the work queue, or unacked in its hands).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import anyio
import anyio.abc
from gpuwarden.adapters.agent import Agent
from gpuwarden.adapters.fake_runtime import FakeContainer, FakeGpuHealth, FakeRuntime
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.commands import Command
from gpuwarden.engine.core.errors import GpuwardenError
from gpuwarden.engine.core.liveness import Liveness
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.ports import Clock, CommandBus, EventLog, ReceivedCommand

log = logging.getLogger("gpuwarden.sim")

DEFAULT_MODEL: Final = "sim"
DEFAULT_MEMORY_MB: Final = 81920
AGENT_START_S: Final = 60.0


class SimulationError(GpuwardenError):
    """The simulated cluster could not do what it was asked (a bug or a stuck bus)."""


@dataclass(frozen=True)
class SimNodeSpec:
    name: str
    gpus: int
    model: str | None = None
    memory_mb: int | None = None


def simulated_gpus(spec: SimNodeSpec) -> tuple[ev.GpuInfo, ...]:
    """A simulated node's GPUs: uuids `<node>/<index>`, model "sim" and 80 GiB unless
    the spec says otherwise."""
    return tuple(
        ev.GpuInfo(
            uuid=f"{spec.name}/{i}",
            index=i,
            model=spec.model or DEFAULT_MODEL,
            memory_mb=DEFAULT_MEMORY_MB if spec.memory_mb is None else spec.memory_mb,
        )
        for i in range(spec.gpus)
    )


@dataclass
class SimNode:
    name: str
    gpus: tuple[ev.GpuInfo, ...]
    runtime: FakeRuntime
    health: FakeGpuHealth
    up: bool = True
    wake: anyio.Event = field(default_factory=anyio.Event)
    agent: Agent | None = None


class CountingCommandBus:
    """The engine's command bus, counting what it sent to each node.

    The cluster's quiescence check compares these counts with what the nodes have
    acked, so it never needs to ask the server about the work queue.
    """

    def __init__(self, bus: CommandBus) -> None:
        self.inner = bus
        self.sent: Counter[str] = Counter()

    async def send(self, command: Command) -> None:
        await self.inner.send(command)
        self.sent[command.node] += 1

    async def send_many(self, commands: Sequence[Command]) -> None:
        await self.inner.send_many(commands)
        self.sent.update(command.node for command in commands)

    def receive(self, node: str) -> AsyncIterator[ReceivedCommand]:
        return self.inner.receive(node)


class _Counted:
    """A received command whose ack the cluster counts."""

    def __init__(self, inner: ReceivedCommand, on_ack: CountingAck) -> None:
        self.inner = inner
        self.command = inner.command
        self.on_ack = on_ack

    async def ack(self) -> None:
        await self.inner.ack()
        self.on_ack(self.command.node)

    async def nak(self, delay_s: float | None = None) -> None:
        await self.inner.nak(delay_s)


class CountingAck:
    def __init__(self, cluster: SimCluster) -> None:
        self.cluster = cluster

    def __call__(self, node: str) -> None:
        self.cluster.handled[node] += 1
        self.cluster._signal()


class _NodeBus:
    """What one node's agent consumes: its commands, held while the node is cut off."""

    def __init__(self, cluster: SimCluster, node: SimNode) -> None:
        self.cluster = cluster
        self.node = node

    async def send(self, command: Command) -> None:
        await self.cluster.bus.send(command)

    async def send_many(self, commands: Sequence[Command]) -> None:
        await self.cluster.bus.send_many(commands)

    async def receive(self, node: str) -> AsyncIterator[ReceivedCommand]:
        async for received in self.cluster.bus.receive(node):
            while not self.node.up:
                await self.node.wake.wait()
            yield _Counted(received, self.cluster.counting_ack)


class SimCluster:
    """Simulated nodes, each served by a real `Agent`; see the module docstring."""

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
        self.counting_ack = CountingAck(self)
        self.start_errors: dict[str, str] = {}  # shared: a task fails wherever it starts
        self.nodes: dict[str, SimNode] = {}
        for spec in nodes:
            infos = simulated_gpus(spec)
            runtime = FakeRuntime(
                spec.name, clock, start_errors=self.start_errors, on_taken=self._signal
            )
            node = SimNode(spec.name, infos, runtime, FakeGpuHealth(runtime))
            node.wake.set()
            self.nodes[spec.name] = node
        self.gpu_node = {g.uuid: n.name for n in self.nodes.values() for g in n.gpus}
        self.handled: Counter[str] = Counter()
        self.progress = anyio.Event()
        self.errors: list[BaseException] = []
        self.serving = anyio.Event()  # set once `serve`'s agents are all ready

    # --- lifecycle -------------------------------------------------------------------

    async def serve(
        self,
        only: Iterable[str] | None = None,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run every node's agent (or only those named) until cancelled; started once
        each has registered, reconciled and begun to consume its commands."""
        names = set(self.nodes) if only is None else set(only)
        async with anyio.create_task_group() as tg:
            for node in self.nodes.values():
                if node.name in names:
                    node.agent = self._agent(node)
                    tg.start_soon(self._run_agent, node, node.agent)
            with anyio.fail_after(AGENT_START_S):
                for node in self.nodes.values():
                    if node.agent is not None and node.name in names:
                        await node.agent.ready.wait()
            self.serving.set()
            task_status.started()

    def _agent(self, node: SimNode) -> Agent:
        return Agent(
            node.name,
            self.log,
            _NodeBus(self, node),
            node.runtime,
            node.gpus,
            heartbeats=None,  # beaten into Liveness on the virtual clock (`beat`)
            clock=self.clock,
            inventory_source="simulated",
            gpu_health=node.health,
        )

    async def _run_agent(self, node: SimNode, agent: Agent) -> None:
        try:
            await agent.run()
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:  # surfaced by the quiescence check
            log.error("agent of %s stopped: %s", node.name, exc)
            self.errors.append(exc)
            self._signal()

    async def register(self) -> None:
        """Once `serve`'s agents have registered their nodes, every node beats once, as
        an agent does on start."""
        with anyio.fail_after(AGENT_START_S):
            await self.serving.wait()
        self.beat(self.clock.now())

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
        node.runtime.hold()

    def node_up(self, name: str) -> None:
        node = self.nodes[name]
        node.up = True
        node.wake.set()
        node.runtime.release()
        if self.liveness is not None:
            self.liveness.beat(name, self.clock.now())

    def down_nodes(self) -> list[str]:
        return [n.name for n in self.nodes.values() if not n.up]

    # --- faults on cue ---------------------------------------------------------------

    def latest_container(self, task: str) -> FakeContainer | None:
        """The task's container of its highest attempt, on whichever node ran it."""
        found = [c for n in self.nodes.values() if (c := n.runtime.latest(task)) is not None]
        return max(found, key=lambda c: c.attempt) if found else None

    def running(self, task: str, attempt: int | None = None) -> FakeContainer | None:
        """The task's running container: its latest attempt's, or the given attempt's
        (an earlier one may still run on a node that was cut off)."""
        if attempt is None:
            container = self.latest_container(task)
        else:
            found = [n.runtime.container_of(task, attempt) for n in self.nodes.values()]
            container = next((c for c in found if c is not None), None)
        return container if container is not None and container.running else None

    def arm_start_error(self, task: str, message: str) -> None:
        """The next start of `task`'s container, on any node, fails with `message`."""
        self.start_errors[task] = message

    def exit(
        self, container: FakeContainer, *, exit_code: int, oom_killed: bool = False, error: str = ""
    ) -> None:
        """The container's process ends now; its node's agent reports it."""
        self.nodes[container.node].runtime.end(
            container, exit_code=exit_code, oom_killed=oom_killed, error=error
        )
        self._signal()

    def xid(self, gpu_uuid: str, code: int) -> None:
        """An Xid on a GPU now; its node's agent reports it, as from NVML."""
        now = self.clock.now()
        node = self.nodes[self.gpu_node[gpu_uuid]]
        node.health.report(
            ev.GpuFault(
                id=new_id(now),
                at=now,
                actor=f"agent:{node.name}",
                gpu_uuid=gpu_uuid,
                node=node.name,
                kind="xid",
                xid=code,
                detail=f"Xid {code} (simulated)",
            )
        )
        self._signal()

    # --- waiting ---------------------------------------------------------------------

    def _signal(self) -> None:
        self.progress.set()
        self.progress = anyio.Event()

    def backlog(self) -> int:
        """Commands sent to up nodes and not yet acked (needs a CountingCommandBus), plus
        reports of up nodes' containers and GPUs their agents have not yet recorded."""
        up = [node for node in self.nodes.values() if node.up]
        reports = sum(node.runtime.pending for node in up)
        if self.counting is None:
            return reports
        return reports + sum(
            max(0, self.counting.sent[node.name] - self.handled[node.name]) for node in up
        )

    async def wait_handled(self, timeout_s: float = 10.0) -> None:
        """Until every command sent to an up node so far has been carried out and every
        report of an up node recorded."""
        with anyio.fail_after(timeout_s):
            while True:
                if self.errors:
                    raise SimulationError(f"a simulated node failed: {self.errors[0]}")
                if self.backlog() == 0:
                    return
                await self.progress.wait()
