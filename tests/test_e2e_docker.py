"""gpuwarden end to end: the real engine, real agents, real Docker, a real nats-server.

A task is submitted the way the API does it (a `task.submitted` in the log); from
there on only the engine (SystemClock, a fast policy) and the agents act, through the
log, the command bus and the heartbeats. The tests then break things the way
production does -- `docker kill`, a crashing process, a memory limit, an agent that
goes silent -- and read the verdicts back from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import anyio
import docker
import pytest
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.heartbeats import NatsHeartbeats, feed_liveness
from gpuwarden.engine.clock import SystemClock
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.liveness import Liveness
from gpuwarden.engine.core.policy import Policy
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.runtime import Engine

from tests.fixtures.agent_world import DockerWorld
from tests.fixtures.docker import DockerJanitor
from tests.test_agent import Node, task_events, wait_event

pytestmark = pytest.mark.docker

POLICY = Policy(evidence_window_s=0.3, backoff_initial_s=0.2, node_lost_after_s=1.0)
SLEEPER = ["sh", "-c", "sleep 60"]


class Cluster:
    """One engine, its liveness fed by heartbeats, and the nodes' agents."""

    def __init__(
        self,
        log: JetStreamEventLog,
        bus: JetStreamCommandBus,
        client: docker.DockerClient,
        janitor: DockerJanitor,
        image: str,
    ) -> None:
        self.log = log
        self.bus = bus
        self.client = client
        self.janitor = janitor
        self.image = image
        self.liveness = Liveness(POLICY.node_lost_after_s)
        self.engine = Engine(log, bus, SystemClock(), POLICY, liveness=self.liveness)
        self.nodes: dict[str, Node] = {}
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, node_names: list[str]) -> None:
        heartbeats = NatsHeartbeats(self.log.nc)
        self.tasks.append(
            asyncio.create_task(feed_liveness(heartbeats, self.liveness, SystemClock()))
        )
        self.tasks.append(asyncio.create_task(self.engine.run()))
        with anyio.fail_after(10):
            await self.engine.caught_up.wait()
        for name in node_names:
            world = DockerWorld(self.client, self.janitor, self.image, node=name)
            node = Node(self.log, self.bus, world, gpus=1)
            self.nodes[name] = node
            await node.start()

    async def stop(self) -> None:
        for node in self.nodes.values():
            await node.stop()
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def submit(self, argv: list[str], *, memory_mb: int | None = None) -> str:
        task_id = f"e2e-{uuid.uuid4().hex[:10]}"
        submitted = ev.TaskSubmitted(
            id=new_id(),
            at=datetime.now(UTC),
            actor="api",
            correlation_id=task_id,
            task_id=task_id,
            name=task_id,
            image=self.image,
            command=tuple(argv),
            gpus=1,
            memory_mb=memory_mb,
        )
        await self.log.append(ev.task_subject(task_id), [submitted], 0)
        return task_id

    async def started(self, task_id: str, attempt: int) -> ev.ContainerStarted:
        record = await wait_event(self.log, attempt_is(task_id, attempt, ev.ContainerStarted))
        assert isinstance(record.event, ev.ContainerStarted)
        return record.event

    async def verdict(self, task_id: str, attempt: int) -> str:
        record = await wait_event(self.log, attempt_is(task_id, attempt, ev.FaultClassified))
        assert isinstance(record.event, ev.FaultClassified)
        return record.event.fault

    def running(self, container_id: str) -> bool:
        return bool(self.client.api.inspect_container(container_id)["State"]["Running"])


def attempt_is(task_id: str, attempt: int, kind: type[ev.Event]) -> Callable[[ev.Event], bool]:
    return lambda e: (
        isinstance(e, kind)
        and getattr(e, "task_id", None) == task_id
        and getattr(e, "attempt", None) == attempt
    )


@pytest.fixture
async def cluster(
    event_log: JetStreamEventLog,
    command_bus: JetStreamCommandBus,
    docker_client: docker.DockerClient,
    docker_janitor: DockerJanitor,
    test_image: str,
) -> AsyncIterator[Cluster]:
    c = Cluster(event_log, command_bus, docker_client, docker_janitor, test_image)
    try:
        yield c
    finally:
        await c.stop()


async def test_killed_container_is_preempted_and_rebuilt(cluster: Cluster) -> None:
    await cluster.start([cluster.janitor.node])
    task_id = await cluster.submit(SLEEPER)
    first = await cluster.started(task_id, 1)
    await anyio.to_thread.run_sync(cluster.client.api.kill, first.container_id)
    assert await cluster.verdict(task_id, 1) == "preempted"
    second = await cluster.started(task_id, 2)
    assert second.container_id != first.container_id
    assert cluster.running(second.container_id)


async def test_exit_1_is_a_user_error_that_fails_the_task_and_frees_its_gpu(
    cluster: Cluster,
) -> None:
    await cluster.start([cluster.janitor.node])
    task_id = await cluster.submit(["sh", "-c", "exit 1"])
    assert await cluster.verdict(task_id, 1) == "user_error"
    await wait_event(cluster.log, attempt_is(task_id, 1, ev.GpuReleased))
    types = [ev.type_of(e) for e in await task_events(cluster.log, task_id)]
    assert "task.failed" in types and "rebuild.decided" not in types
    await cluster.engine.wait_idle()
    assert cluster.engine.state.tasks[task_id].status == "failed"
    assert all(gpu.holder is None for gpu in cluster.engine.state.gpus.values())


async def test_oom_kill_is_container_oom_and_not_rebuilt(cluster: Cluster) -> None:
    await cluster.start([cluster.janitor.node])
    hog = ["sh", "-c", "x=a; while true; do x=$x$x; done"]
    task_id = await cluster.submit(hog, memory_mb=16)
    assert await cluster.verdict(task_id, 1) == "container_oom"
    await wait_event(cluster.log, attempt_is(task_id, 1, ev.GpuReleased))
    types = [ev.type_of(e) for e in await task_events(cluster.log, task_id)]
    assert "task.failed" in types and "rebuild.decided" not in types


async def test_lost_node_is_rebuilt_elsewhere_and_its_stale_container_stopped(
    cluster: Cluster,
) -> None:
    names = [cluster.janitor.node, f"{cluster.janitor.node}-b"]
    await cluster.start(names)
    task_id = await cluster.submit(SLEEPER)
    first = await cluster.started(task_id, 1)
    lost_node = cluster.nodes[first.node]
    silenced = time.monotonic()
    await lost_node.stop()  # the agent dies with its heartbeats; the container lives on

    lost = await wait_event(
        cluster.log, lambda e: isinstance(e, ev.NodeLost) and e.node == first.node
    )
    assert time.monotonic() - silenced <= POLICY.node_lost_after_s + 1
    assert lost.event is not None
    assert await cluster.verdict(task_id, 1) == "node_lost"
    second = await cluster.started(task_id, 2)
    assert second.node != first.node
    assert cluster.running(first.container_id), "a lost node's container is not killed blind"

    await lost_node.start()  # heartbeats are back
    await wait_event(
        cluster.log, lambda e: isinstance(e, ev.NodeRecovered) and e.node == first.node
    )
    stale = await wait_event(cluster.log, attempt_is(task_id, 1, ev.ContainerExited))
    assert isinstance(stale.event, ev.ContainerExited)
    assert stale.event.container_id == first.container_id
    assert not cluster.running(first.container_id)
    assert cluster.running(second.container_id)


async def test_a_process_hung_on_a_failed_gpu_is_killed_and_rebuilt_elsewhere(
    cluster: Cluster,
) -> None:
    """Xid 48 on the GPU under a process that ignores SIGTERM and never exits by itself:
    the engine concludes gpu_hardware when the window closes, the agent kills it with no
    grace period, its GPU comes back only with that exit, and the task runs on."""
    names = [cluster.janitor.node, f"{cluster.janitor.node}-b"]
    await cluster.start(names)
    task_id = await cluster.submit(["sh", "-c", "trap '' TERM; sleep 300 & wait"])
    first = await cluster.started(task_id, 1)
    scheduled = await wait_event(cluster.log, attempt_is(task_id, 1, ev.TaskScheduled))
    assert isinstance(scheduled.event, ev.TaskScheduled)
    [gpu] = scheduled.event.gpu_uuids
    xid = ev.GpuFault(id=new_id(), at=datetime.now(UTC), actor=f"agent:{first.node}",
                      gpu_uuid=gpu, node=first.node, kind="xid", xid=48)  # fmt: skip
    await cluster.log.append(ev.subject_of(xid), [xid])

    assert await cluster.verdict(task_id, 1) == "gpu_hardware"
    killed = await wait_event(cluster.log, attempt_is(task_id, 1, ev.ContainerExited))
    assert isinstance(killed.event, ev.ContainerExited)
    assert (killed.event.exit_code, killed.event.signal) == (137, 9)
    released = await wait_event(cluster.log, attempt_is(task_id, 1, ev.GpuReleased))
    assert released.seq > killed.seq, "the hung attempt's GPU comes back with its exit"
    second = await cluster.started(task_id, 2)
    assert second.node != first.node  # its node's only GPU is quarantined
    assert not cluster.running(first.container_id) and cluster.running(second.container_id)


async def test_a_cancelled_task_keeps_its_gpu_until_its_container_has_exited(
    cluster: Cluster,
) -> None:
    """The owner cancels t1, whose process takes a moment to die after SIGTERM. Its
    GPU memory is in use until then, so pending t2 gets that GPU only after t1's exit."""
    await cluster.start([cluster.janitor.node])
    first = await cluster.submit(["sh", "-c", "trap 'sleep 1; exit 3' TERM; sleep 300 & wait"])
    started = await cluster.started(first, 1)
    second = await cluster.submit(SLEEPER)
    cancel = ev.TaskCancelled(id=new_id(), at=datetime.now(UTC), actor="api",
                              correlation_id=first, task_id=first, reason="owner")  # fmt: skip
    await cluster.log.append(ev.task_subject(first), [cancel])

    exited = await wait_event(cluster.log, attempt_is(first, 1, ev.ContainerExited))
    released = await wait_event(cluster.log, attempt_is(first, 1, ev.GpuReleased))
    scheduled = await wait_event(cluster.log, attempt_is(second, 1, ev.TaskScheduled))
    assert released.seq > exited.seq, "the GPU comes back with the container's exit"
    assert scheduled.seq > exited.seq, "the next task waits for the cancelled process"
    assert not cluster.running(started.container_id)
    assert cluster.running((await cluster.started(second, 1)).container_id)
    kinds = [ev.type_of(e) for e in await task_events(cluster.log, first)]
    assert "fault.classified" not in kinds and kinds[-1] != "rebuild.decided"
