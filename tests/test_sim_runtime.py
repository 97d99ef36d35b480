"""SimCluster on a real nats-server: it behaves as a Docker agent would, through the log."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import anyio
import pytest
from gpuwarden.adapters.agent import ForeignNodeError
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.sim_runtime import CountingCommandBus, SimCluster, SimNodeSpec
from gpuwarden.engine.clock import VirtualClock
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.commands import RunCommand, StopCommand
from gpuwarden.engine.core.liveness import Liveness

T0 = datetime(2026, 3, 1, tzinfo=UTC)


class Cluster:
    def __init__(self, log: JetStreamEventLog, bus: JetStreamCommandBus) -> None:
        self.log = log
        self.bus = CountingCommandBus(bus)
        self.clock = VirtualClock(T0)
        self.liveness = Liveness(5)
        nodes = [SimNodeSpec("n1", 2, "H100", 40960), SimNodeSpec("n2", 1)]
        self.sim = SimCluster(log, bus, self.clock, self.liveness, nodes, counting=self.bus)

    async def log_attempt(self, task: str, attempt: int, node: str = "n1") -> None:
        """The task and its attempt in the log, as the engine would have put them."""
        submitted = ev.TaskSubmitted(id=f"sub-{task}", at=T0, actor="api", task_id=task,
                                     name=task, image="i", command=("x",))  # fmt: skip
        scheduled = ev.TaskScheduled(id=f"sch-{task}-{attempt}", at=T0, actor="engine",
                                     task_id=task, attempt=attempt, node=node,
                                     gpu_uuids=(f"{node}/0",))  # fmt: skip
        await self.log.append(ev.task_subject(task), [submitted, scheduled])

    async def run(self, task: str, attempt: int, node: str = "n1") -> None:
        await self.bus.send(
            RunCommand(
                id=f"run-{task}-{attempt}",
                node=node,
                task_id=task,
                attempt=attempt,
                image="i",
                command=("x",),
                gpu_uuids=(f"{node}/0",),
            )
        )

    async def stop(self, task: str, attempt: int, node: str = "n1") -> None:
        await self.bus.send(
            StopCommand(
                id=f"stop-{task}-{attempt}",
                node=node,
                task_id=task,
                attempt=attempt,
                causation_id=f"c-stop-{task}-{attempt}",
            )
        )

    async def events(self) -> list[ev.Event]:
        return [r.event async for r in self.log.read() if r.event is not None]


@pytest.fixture
async def cluster(
    event_log: JetStreamEventLog, command_bus: JetStreamCommandBus
) -> AsyncIterator[Cluster]:
    c = Cluster(event_log, command_bus)
    serving = asyncio.create_task(c.sim.serve())  # fixtures cannot hold a task group open
    await c.sim.register()
    yield c
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving


async def test_nodes_register_their_gpus_as_their_agents(cluster: Cluster) -> None:
    events = await cluster.events()
    registered = sorted(
        (e for e in events if isinstance(e, ev.NodeRegistered)), key=lambda e: e.node
    )
    assert [(e.node, e.actor, e.runtime) for e in registered] == [
        ("n1", "agent:n1", "sim"),
        ("n2", "agent:n2", "sim"),
    ]
    assert registered[0].gpus[1] == ev.GpuInfo(uuid="n1/1", index=1, model="H100", memory_mb=40960)
    assert registered[1].gpus[0].model == "sim" and registered[1].gpus[0].memory_mb == 81920
    assert cluster.liveness.last_seen == {"n1": T0, "n2": T0}


async def test_run_start_error_and_stop_become_container_events(cluster: Cluster) -> None:
    for task in ("t1", "t2", "t9"):
        await cluster.log_attempt(task, 1)
    cluster.sim.arm_start_error("t2", "No such image: x")
    await cluster.run("t1", 1)
    await cluster.run("t2", 1)
    await cluster.stop("t1", 1)
    await cluster.stop("t9", 1)  # never ran there: it says so, and will not run it
    await cluster.run("t9", 1)  # answered already: nothing starts, nothing more is said
    await cluster.sim.wait_handled(5)
    events = [e for e in await cluster.events() if e.actor.startswith("agent:")]
    by_task = {(e.task_id, ev.type_of(e)): e for e in events if hasattr(e, "task_id")}
    assert len(by_task) == len(events) - 2, "each once (and two registrations)"
    started, exited = by_task["t1", "container.started"], by_task["t1", "container.exited"]
    failed, never = by_task["t2", "container.start_failed"], by_task["t9", "container.start_failed"]
    assert isinstance(never, ev.ContainerStartFailed)
    assert never.error == "not started: stopped before its container started"
    assert cluster.sim.latest_container("t9") is None
    assert isinstance(started, ev.ContainerStarted) and started.container_id == "sim-t1-1"
    assert isinstance(failed, ev.ContainerStartFailed) and failed.error == "No such image: x"
    assert isinstance(exited, ev.ContainerExited)
    assert (exited.exit_code, exited.signal, exited.attempt) == (143, 15, 1)
    assert exited.causation_id == "c-stop-t1-1", "the exit cites the stop's cause"
    assert cluster.sim.backlog() == 0 and cluster.sim.handled["n1"] == 5


async def test_a_down_node_neither_beats_nor_handles_until_it_is_back(cluster: Cluster) -> None:
    cluster.sim.node_down("n2")
    cluster.sim.beat(T0.replace(minute=1))
    assert cluster.liveness.last_seen["n2"] == T0
    await cluster.run("t1", 1, node="n2")
    assert cluster.sim.backlog() == 0, "a down node's commands are not owed yet"
    with anyio.move_on_after(0.3):
        await cluster.sim.progress.wait()
    assert cluster.sim.handled["n2"] == 0
    cluster.clock.advance(60)
    cluster.sim.node_up("n2")
    assert cluster.liveness.last_seen["n2"] == cluster.clock.now()
    await cluster.sim.wait_handled(5)
    started = [e for e in await cluster.events() if isinstance(e, ev.ContainerStarted)]
    assert [(e.node, e.task_id) for e in started] == [("n2", "t1")]


async def test_a_resent_run_starts_no_second_container(cluster: Cluster) -> None:
    await cluster.log_attempt("t1", 1)
    await cluster.run("t1", 1)
    await cluster.sim.wait_handled(5)
    await cluster.bus.send(  # the same attempt's run again, under a new id
        RunCommand(id="again", node="n1", task_id="t1", attempt=1, image="i", command=("x",))
    )
    await cluster.sim.wait_handled(5)
    assert cluster.sim.nodes["n1"].runtime.runs == 1
    started = [e for e in await cluster.events() if isinstance(e, ev.ContainerStarted)]
    assert [e.container_id for e in started] == ["sim-t1-1"]


async def test_a_node_speaks_only_for_itself(cluster: Cluster) -> None:
    """The guard is the real agent's: the simulation has no copy of it."""
    agent = cluster.sim.nodes["n1"].agent
    assert agent is not None
    foreign = ev.NodeLost(id="x", at=T0, actor="agent:n1", node="elsewhere")
    before = await cluster.log.last_seq()
    with pytest.raises(ForeignNodeError, match="elsewhere"):
        await agent.record(foreign)
    assert await cluster.log.last_seq() == before
