"""The node agent against a real nats-server, in two worlds from the same tests.

Every test that exercises the agent runs against the in-memory FakeRuntime always
(`[fake]`), and against a real Docker Engine where one answers (`[docker]`, marked
`docker`: skipped without an engine, a failure in CI where GPUWARDEN_REQUIRE_DOCKER=1).
What a test does past the agent it asks of its world (tests/fixtures/agent_world.py).

Commands go in on the command bus exactly as the engine sends them; what comes out is
read back from the event log. Every wait has a deadline and waits on the log itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest
from gpuwarden.adapters.agent import ForeignNodeError
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.heartbeats import NatsHeartbeats, feed_liveness, heartbeat_subject
from gpuwarden.engine.clock import SystemClock
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.commands import RunCommand, StopCommand
from gpuwarden.engine.core.liveness import Liveness
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.ports import ContainerRuntimeError

from tests.fixtures.agent_world import (
    DEADLINE_S,
    WORLDS,
    Node,
    World,
    about,
    running_node,
    task_events,
    wait_event,
    world_for,
)


@pytest.fixture(params=WORLDS)
def world(request: pytest.FixtureRequest) -> World:
    return world_for(request)


@pytest.fixture
async def node(
    event_log: JetStreamEventLog, command_bus: JetStreamCommandBus, world: World
) -> AsyncIterator[Node]:
    async with running_node(event_log, command_bus, world) as n:
        yield n


# --- containers run and end as the log says -------------------------------------------


@pytest.mark.parametrize("code", [0, 3])
async def test_exit_code_becomes_container_exited(node: Node, world: World, code: int) -> None:
    await node.start()
    command = await node.send_run(world.image, ["sh", "-c", f"exit {code}"])
    exited = await wait_event(node.log, about(command.task_id, ev.ContainerExited))
    assert isinstance(exited.event, ev.ContainerExited)
    assert (exited.event.exit_code, exited.event.signal, exited.event.oom_killed) == (
        code,
        None,
        False,
    )
    assert exited.event.actor == f"agent:{node.name}" and exited.event.node == node.name
    types = [ev.type_of(e) for e in await task_events(node.log, command.task_id)]
    assert types[2:] == ["container.started", "container.exited"], "start first, each once"


async def test_kill_is_signal_9_without_oom(node: Node, world: World) -> None:
    await node.start()
    command = await node.send_run(world.image, ["sleep", "30"])
    started = await wait_event(node.log, about(command.task_id, ev.ContainerStarted))
    assert isinstance(started.event, ev.ContainerStarted)
    assert started.event.causation_id == command.causation_id
    await world.kill(started.event.container_id)
    exited = await wait_event(node.log, about(command.task_id, ev.ContainerExited))
    assert isinstance(exited.event, ev.ContainerExited)
    assert (exited.event.exit_code, exited.event.signal, exited.event.oom_killed) == (
        137,
        9,
        False,
    )


async def test_a_stop_with_no_grace_kills_a_process_that_ignores_sigterm(
    node: Node, world: World
) -> None:
    """The engine's stop for a process on a failed GPU carries grace_s=0: SIGKILL at once,
    where the agent's own default (set to 60 s here) would wait out an ignored SIGTERM.
    (In the fake world the kill comes from FakeRuntime.stop: 137 when the grace is 0.)"""
    agent = node.make_agent()
    agent.stop_timeout_s = 60
    node.agent = agent
    node.task = asyncio.create_task(agent.run())
    with anyio.fail_after(DEADLINE_S):
        await agent.ready.wait()
    command = await node.send_run(world.image, ["sh", "-c", "trap '' TERM; sleep 300 & wait"])
    started = await wait_event(node.log, about(command.task_id, ev.ContainerStarted))
    assert isinstance(started.event, ev.ContainerStarted)
    stop = StopCommand(
        id=new_id(),
        node=node.name,
        task_id=command.task_id,
        attempt=1,
        causation_id="classified-1",
        reason="gpu_hardware (xid_hardware) under a running process",
        container_id=started.event.container_id,
        grace_s=0.0,
    )
    await node.bus.send(stop)
    exited = await wait_event(node.log, about(command.task_id, ev.ContainerExited), 20)
    assert isinstance(exited.event, ev.ContainerExited)
    assert (exited.event.exit_code, exited.event.signal) == (137, 9)
    assert exited.event.at - started.event.at < timedelta(seconds=30)


async def log_cancel(node: Node, task_id: str) -> ev.TaskCancelled:
    cancelled = ev.TaskCancelled(id=new_id(), at=datetime.now(UTC), actor="api",
                                 task_id=task_id, reason="owner")  # fmt: skip
    await node.log.append(ev.task_subject(task_id), [cancelled])
    return cancelled


def stop_for(node: Node, run: RunCommand, cause: str) -> StopCommand:
    return StopCommand(id=new_id(), node=node.name, task_id=run.task_id, attempt=run.attempt,
                       causation_id=cause, reason="cancelled: owner")  # fmt: skip


async def test_an_attempt_cancelled_before_its_run_arrived_is_never_started(
    node: Node, world: World
) -> None:
    """The stop reaches the agent before the run (a run redelivered after an agent died
    mid-run): the stop finds nothing and says the attempt never started, so the engine
    can give its GPUs back; the run that follows starts nothing and says nothing more."""
    agent = await node.start()
    run = await node.log_attempt(world.image, ["sh", "-c", "sleep 60"])
    cancelled = await log_cancel(node, run.task_id)
    assert await agent.handle(stop_for(node, run, cancelled.id))
    assert await agent.handle(run)
    events = await task_events(node.log, run.task_id)
    [never] = [e for e in events if isinstance(e, ev.ContainerStartFailed)]
    assert never.error == "not started: stopped before its container started"
    assert never.causation_id == cancelled.id
    assert not any(isinstance(e, ev.ContainerStarted) for e in events)
    assert await world.containers_of(run.task_id) == []


async def test_a_run_for_a_cancelled_attempt_is_refused_before_any_container(
    node: Node, world: World
) -> None:
    """The cancel is logged and the run comes before the stop: it is refused with a
    start failure that says why, and the stop then finds nothing more to answer."""
    agent = await node.start()
    run = await node.log_attempt(world.image, ["sh", "-c", "sleep 60"])
    cancelled = await log_cancel(node, run.task_id)
    assert await agent.handle(run)
    assert await agent.handle(stop_for(node, run, cancelled.id))
    events = await task_events(node.log, run.task_id)
    [refused] = [e for e in events if isinstance(e, ev.ContainerStartFailed)]
    assert (
        refused.error
        == f"not started: task {run.task_id} was cancelled before its container started"
    )
    assert await world.containers_of(run.task_id) == []


async def test_a_container_removed_while_its_agent_was_down_is_answered_at_its_stop(
    node: Node, world: World
) -> None:
    """Review finding: its start is logged, then it is removed by hand while the agent
    is down, so no exit is ever seen. The stop that finds nothing answers with an exit
    of unknown code (the engine gives the GPUs back on it), and a redelivered run does
    not start a new, unsupervised container."""
    await node.start()
    run = await node.log_attempt(world.image, ["sh", "-c", "sleep 60"])
    await node.bus.send(run)
    started = await wait_event(node.log, about(run.task_id, ev.ContainerStarted))
    assert isinstance(started.event, ev.ContainerStarted)
    await node.stop()
    await world.remove_by_hand(started.event.container_id)
    agent = await node.start()
    cancelled = await log_cancel(node, run.task_id)
    assert await agent.handle(stop_for(node, run, cancelled.id))
    assert await agent.handle(run)  # as if redelivered
    events = await task_events(node.log, run.task_id)
    [gone] = [e for e in events if isinstance(e, ev.ContainerExited)]
    assert gone.exit_code is None and gone.error.startswith("container gone")
    assert gone.container_id == started.event.container_id
    assert [type(e) for e in events].count(ev.ContainerStarted) == 1
    assert await world.containers_of(run.task_id) == []


async def test_a_container_created_but_never_started_counts_as_never_started(
    node: Node, world: World
) -> None:
    """Review finding: an agent killed between creating a container and starting it
    leaves it in Docker's "created" state. A stop then 'stops' it without a word, and
    the cancelled attempt's GPUs waited for the run's redelivery. Now the created
    container is removed and the attempt answered as never started."""
    agent = await node.start()
    run = await node.log_attempt(world.image, ["sh", "-c", "sleep 60"])
    await world.create_unstarted(run.task_id, 1, ["sh", "-c", "sleep 60"])
    cancelled = await log_cancel(node, run.task_id)
    assert await agent.handle(stop_for(node, run, cancelled.id))
    events = await task_events(node.log, run.task_id)
    [never] = [e for e in events if isinstance(e, ev.ContainerStartFailed)]
    assert never.error == "not started: stopped before its container started"
    assert await world.containers_of(run.task_id) == []
    assert await agent.handle(run)  # redelivered: answered already, nothing starts
    assert await world.containers_of(run.task_id) == []


async def test_a_stop_never_removes_a_container_it_cannot_prove_never_ran(
    node: Node, world: World
) -> None:
    """Review finding: a daemon error while inspecting what a stop stopped counted as
    'gone', and a container that ran was force-removed; a created container that
    someone started between the inspect and the removal was removed too. Both now
    count as having run: kept, and no 'not started' or 'container gone' is said."""
    agent = await node.start()
    ran = await node.send_run(world.image, ["sh", "-c", "sleep 60"])
    await wait_event(node.log, about(ran.task_id, ev.ContainerStarted))
    real_inspect = node.runtime.inspect

    async def hiccup(container_id: str) -> Any:
        raise ContainerRuntimeError("read timed out")

    node.runtime.inspect = hiccup  # type: ignore[method-assign]
    try:
        assert await agent.handle(stop_for(node, ran, "c1"))
    finally:
        node.runtime.inspect = real_inspect  # type: ignore[method-assign]
    assert len(await world.containers_of(ran.task_id)) == 1

    created = await node.log_attempt(world.image, ["sh", "-c", "sleep 60"])
    container_id = await world.create_unstarted(created.task_id, 1, ["sleep", "60"])

    async def started_meanwhile(container_id: str) -> Any:
        info = await real_inspect(container_id)
        await world.start_by_hand(container_id)  # between the inspect and the removal
        return info

    node.runtime.inspect = started_meanwhile  # type: ignore[method-assign]
    try:
        assert await agent.handle(stop_for(node, created, "c2"))
    finally:
        node.runtime.inspect = real_inspect  # type: ignore[method-assign]
    assert await world.is_running(container_id)
    for task_id in (ran.task_id, created.task_id):
        events = await task_events(node.log, task_id)
        assert not any(isinstance(e, ev.ContainerStartFailed) for e in events)
        assert not any(isinstance(e, ev.ContainerExited) and e.error for e in events)


async def test_memory_limit_breach_is_oom_killed(node: Node, world: World) -> None:
    await node.start()
    hog = ["sh", "-c", "x=a; while true; do x=$x$x; done"]
    command = await node.send_run(world.image, hog, memory_mb=16)
    exited = await wait_event(node.log, about(command.task_id, ev.ContainerExited))
    assert isinstance(exited.event, ev.ContainerExited)
    assert exited.event.oom_killed is True
    assert exited.event.exit_code == 137


@pytest.mark.parametrize(
    ("image", "argv", "daemon_says"),
    [
        (f"gpuwarden-missing-{uuid.uuid4().hex[:8]}:latest", ["true"], "No such image"),
        (None, ["no-such-program"], "executable file not found"),
    ],
    ids=["missing-image", "missing-executable"],
)
async def test_start_failure_carries_the_daemons_message(
    node: Node, world: World, image: str | None, argv: list[str], daemon_says: str
) -> None:
    await node.start()
    command = await node.send_run(image or world.image, argv)
    failed = await wait_event(node.log, about(command.task_id, ev.ContainerStartFailed))
    assert isinstance(failed.event, ev.ContainerStartFailed)
    assert daemon_says in failed.event.error
    assert failed.event.causation_id == command.causation_id
    assert "container.started" not in [
        ev.type_of(e) for e in await task_events(node.log, command.task_id)
    ]
    assert await world.containers_of(command.task_id) == []


# --- registration, restarts, reconciliation -------------------------------------------


async def test_registers_a_declared_inventory_and_says_so(
    node: Node, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gpuwarden.agent"):
        await node.start()
    assert "declared inventory: 2 GPUs (H100), GPU health not watched" in caplog.text
    registered = await wait_event(node.log, lambda e: isinstance(e, ev.NodeRegistered))
    assert isinstance(registered.event, ev.NodeRegistered)
    assert registered.event.declared
    assert registered.event.runtime == {"fake": "sim", "docker": "docker"}[world.mode]
    assert [g.uuid for g in registered.event.gpus] == [
        f"GPU-declared-{node.name}-0",
        f"GPU-declared-{node.name}-1",
    ]


async def test_exit_while_the_agent_was_away_is_logged_exactly_once(
    node: Node, world: World
) -> None:
    await node.start()
    command = await node.send_run(world.image, ["sleep", "30"])
    started = await wait_event(node.log, about(command.task_id, ev.ContainerStarted))
    assert isinstance(started.event, ev.ContainerStarted)
    container_id = started.event.container_id
    await node.stop()  # the agent dies; its container lives on
    await world.kill(container_id)
    await world.wait_exited(container_id)
    await node.start()
    exited = await wait_event(node.log, about(command.task_id, ev.ContainerExited))
    assert isinstance(exited.event, ev.ContainerExited)
    assert (exited.event.container_id, exited.event.exit_code) == (container_id, 137)
    await node.stop()
    await node.start()  # a second restart must not log it again either
    types = [ev.type_of(e) for e in await task_events(node.log, command.task_id)]
    assert types.count("container.exited") == 1
    assert types.count("container.started") == 1
    node_events = [r.event async for r in node.log.read(subject=ev.node_subject(node.name))]
    assert len(node_events) == 1, "an unchanged inventory is registered once"


async def test_unknown_labelled_container_is_reported_not_killed(
    node: Node, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    ghost = await world.run_unknown("ghost-task")
    with caplog.at_level(logging.WARNING, logger="gpuwarden.agent"):
        agent = await node.start()
    assert [c.container_id for c in agent.unknown] == [ghost]
    assert "ghost-task" in caplog.text
    assert await world.is_running(ghost)


async def test_a_redelivered_run_starts_one_container_and_logs_one_start(
    node: Node, world: World
) -> None:
    agent = await node.start()
    command = await node.send_run(world.image, ["sleep", "30"])
    await wait_event(node.log, about(command.task_id, ev.ContainerStarted))
    assert await agent.handle(command) is True  # as after a lost ack
    containers = [c for c in await node.runtime.list_managed() if c.task_id == command.task_id]
    assert len(containers) == 1
    types = [ev.type_of(e) for e in await task_events(node.log, command.task_id)]
    assert types.count("container.started") == 1


async def test_a_run_it_cannot_carry_out_is_answered_not_dropped(node: Node) -> None:
    agent = node.make_agent()
    command = RunCommand(
        id=new_id(),
        node="some-other-node",
        task_id="t-misrouted",
        attempt=1,
        image="img",
        command=("true",),
    )
    assert await agent.handle(command) is True
    failed = await wait_event(node.log, about("t-misrouted", ev.ContainerStartFailed))
    assert isinstance(failed.event, ev.ContainerStartFailed)
    assert failed.event.node == node.name and "some-other-node" in failed.event.error


# --- the guard and heartbeats ---------------------------------------------------------


async def test_the_guard_refuses_events_about_another_node(node: Node) -> None:
    agent = node.make_agent()
    foreign = ev.ContainerExited(
        id=new_id(),
        at=datetime.now(UTC),
        actor=f"agent:{node.name}",
        task_id="t1",
        attempt=1,
        node="some-other-node",
        container_id="c1",
        exit_code=0,
    )
    before = await node.log.last_seq()
    with pytest.raises(ForeignNodeError, match="some-other-node"):
        await agent.record(foreign)
    assert await node.log.last_seq() == before
    await agent.record(msgspec.structs.replace(foreign, node=node.name))
    assert await node.log.last_seq() == before + 1


async def test_heartbeats_feed_liveness_and_stay_out_of_the_log(
    event_log: JetStreamEventLog,
) -> None:
    """No agent and no runtime here: one mode."""
    heartbeats = NatsHeartbeats(event_log.nc)
    liveness = Liveness(node_lost_after_s=1.0)
    feeder = asyncio.create_task(feed_liveness(heartbeats, liveness, SystemClock()))
    try:
        with anyio.fail_after(5):
            while "node.a b" not in liveness.last_seen:  # a name that needs escaping
                await heartbeats.beat("node.a b")
                await anyio.sleep(0.05)  # paces the beats; the deadline bounds the wait
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder
    assert heartbeat_subject("node.a b").count(".") == 2
    assert await event_log.last_seq() == 0, "heartbeats are not events"


# --- the command line -----------------------------------------------------------------


async def said_by(process: anyio.abc.Process) -> str:
    """All the process wrote to stderr, once it has ended."""
    assert process.stderr is not None
    chunks = []
    with anyio.fail_after(DEADLINE_S):
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                chunks.append(await process.stderr.receive())
    return b"".join(chunks).decode()


async def registration_of(
    log: JetStreamEventLog, process: anyio.abc.Process, node: str
) -> ev.NodeRegistered:
    """The node's registration, or a failure with what the process said if it ended first."""
    found: list[ev.NodeRegistered] = []
    async with anyio.create_task_group() as tg:

        async def registered() -> None:
            stored = await wait_event(
                log, lambda e: isinstance(e, ev.NodeRegistered) and e.node == node
            )
            assert isinstance(stored.event, ev.NodeRegistered)
            found.append(stored.event)
            tg.cancel_scope.cancel()

        tg.start_soon(registered)
        await process.wait()  # returns only if the agent ended before it registered
        tg.cancel_scope.cancel()
    if not found:
        pytest.fail(f"agent exited {process.returncode} unregistered:\n{await said_by(process)}")
    return found[0]


@pytest.mark.parametrize(
    "runtime",
    [
        # `--runtime docker` is the real process on a real engine: Docker only.
        pytest.param("docker", marks=pytest.mark.docker),
        "sim",
    ],
)
async def test_agent_command_registers_and_stops_on_sigterm(
    event_log: JetStreamEventLog,
    nats_server: Any,
    request: pytest.FixtureRequest,
    runtime: str,
) -> None:
    if runtime == "docker":
        node = request.getfixturevalue("docker_janitor").node
    else:
        node = f"test-{uuid.uuid4().hex[:12]}"
    argv = [sys.executable, "-m", "gpuwarden.engine.cli", "--nats", nats_server.url]
    argv += ["agent", "--node", node, "--runtime", runtime, "--gpus", "2"]
    argv += ["--gpu-model", "H100", "--heartbeat-s", "0.2"]
    process = await anyio.open_process(argv, stderr=subprocess.PIPE)
    try:
        registered = await registration_of(event_log, process, node)
        assert registered.runtime == runtime and len(registered.gpus) == 2
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(DEADLINE_S):
            status = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    said = await said_by(process)
    assert status == 0, said
    assert "GPU health not watched" in said
