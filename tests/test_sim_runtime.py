"""SimRuntime on a real nats-server: it behaves as a Docker agent would, through the log."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import anyio
import pytest
from gpuwarden.adapters.jetstream import JetStreamCommandBus, JetStreamEventLog
from gpuwarden.adapters.sim_runtime import CountingCommandBus, SimNodeSpec, SimRuntime
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
        self.sim = SimRuntime(log, bus, self.clock, self.liveness, nodes, counting=self.bus)

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
            StopCommand(id=f"stop-{task}-{attempt}", node=node, task_id=task, attempt=attempt)
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
    registered = [e for e in await cluster.events() if isinstance(e, ev.NodeRegistered)]
    assert [(e.node, e.actor, e.runtime) for e in registered] == [
        ("n1", "agent:n1", "sim"),
        ("n2", "agent:n2", "sim"),
    ]
    assert registered[0].gpus[1] == ev.GpuInfo(uuid="n1/1", index=1, model="H100", memory_mb=40960)
    assert registered[1].gpus[0].model == "sim" and registered[1].gpus[0].memory_mb == 81920
    assert cluster.liveness.last_seen == {"n1": T0, "n2": T0}


async def test_run_start_error_and_stop_become_container_events(cluster: Cluster) -> None:
    cluster.sim.arm_start_error("t2", "No such image: x")
    await cluster.run("t1", 1)
    await cluster.run("t2", 1)
    await cluster.stop("t1", 1)
    await cluster.stop("t9", 1)  # never ran there: it says so, and will not run it
    await cluster.run("t9", 1)  # answered already: nothing starts, nothing more is said
    await cluster.sim.wait_handled(5)
    events = [e for e in await cluster.events() if not isinstance(e, ev.NodeRegistered)]
    started, failed, exited, never = events
    assert isinstance(never, ev.ContainerStartFailed) and never.task_id == "t9"
    assert never.error == "not started: stopped before its container started"
    assert ("t9", 1) not in cluster.sim.containers
    assert isinstance(started, ev.ContainerStarted) and started.container_id == "sim-t1-1"
    assert isinstance(failed, ev.ContainerStartFailed) and failed.error == "No such image: x"
    assert isinstance(exited, ev.ContainerExited)
    assert (exited.exit_code, exited.signal, exited.attempt) == (143, 15, 1)
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
    await cluster.run("t1", 1)
    await cluster.sim.wait_handled(5)
    cluster.sim.seen_commands.clear()  # as after a redelivery with a new id
    await cluster.bus.send(
        RunCommand(id="again", node="n1", task_id="t1", attempt=1, image="i", command=("x",))
    )
    await cluster.sim.wait_handled(5)
    assert len(cluster.sim.containers) == 1
    started = [e for e in await cluster.events() if isinstance(e, ev.ContainerStarted)]
    assert {e.container_id for e in started} == {"sim-t1-1"}


def test_the_sim_refuses_to_speak_for_another_node(
    event_log: JetStreamEventLog, command_bus: JetStreamCommandBus
) -> None:
    c = Cluster(event_log, command_bus)
    foreign = ev.NodeLost(id="x", at=T0, actor="agent:n1", node="elsewhere")
    with pytest.raises(AssertionError, match="foreign node"):
        c.sim.check_own(foreign)
    wrong_gpu = ev.GpuFault(id="y", at=T0, actor="agent:n2", gpu_uuid="n1/0", node="n2", kind="xid")
    with pytest.raises(AssertionError, match="not on n2"):
        c.sim.check_own(wrong_gpu)
