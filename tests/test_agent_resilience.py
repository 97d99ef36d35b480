"""The node agent outlives what it stands on: NATS, JetStream, Docker, its own restarts.

Real nats-servers throughout; real `gpuwarden agent` processes where the test is about
the process (that it stays up, that a kill -9 loses nothing, what it says on SIGTERM),
the in-process Agent in both worlds (tests/fixtures/agent_world.py) otherwise. Every
wait is on the log, on the heartbeats or on what the process says, with a deadline.
The outages themselves last about OUTAGE_S: that length is the scenario, not a wait for
something to happen.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import anyio
import docker
import msgspec
import pytest
from gpuwarden.adapters.agent_outbox import JOURNAL, Outbox, OutboxError
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.embedded_nats import EmbeddedNats, free_port
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.heartbeats import Heartbeat, heartbeat_subject
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.engine.cli import main
from gpuwarden.engine.cli.config import AgentConfig, ConnectionConfig
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.commands import RunCommand
from gpuwarden.engine.core.wire import EVENTS_STREAM
from gpuwarden.engine.ids import new_id
from nats.aio.client import Client as NatsClient
from nats.js import api

from tests.fixtures.agent_process import CLI, DEADLINE_S, DockerProxy, agent_process, docker_socket
from tests.fixtures.agent_world import (
    WORLDS,
    Node,
    World,
    about,
    running_node,
    task_events,
    wait_event,
    world_for,
)
from tests.fixtures.docker import DockerJanitor

OUTAGE_S: Final = 10.0  # how long NATS or Docker stays away
WAITER: Final = ("sh", "-c", "while [ ! -e /gw-release ]; do sleep 0.1; done; exit 0")


@pytest.fixture(params=WORLDS)
def world(request: pytest.FixtureRequest) -> World:
    return world_for(request)


@pytest.fixture
async def node(
    event_log: JetStreamEventLog, command_bus: JetStreamCommandBus, world: World
) -> AsyncIterator[Node]:
    async with running_node(event_log, command_bus, world) as n:
        yield n


# --- helpers ------------------------------------------------------------------------------


async def log_attempt(
    log: JetStreamEventLog, node: str, image: str, argv: Sequence[str]
) -> RunCommand:
    """A task and its first attempt on `node`, logged as the engine would; its run."""
    task_id = f"t-{uuid.uuid4().hex[:10]}"
    now = datetime.now(UTC)
    submitted = ev.TaskSubmitted(id=new_id(), at=now, actor="api", task_id=task_id,
                                 name=task_id, image=image, command=tuple(argv))  # fmt: skip
    scheduled = ev.TaskScheduled(id=new_id(), at=now, actor="engine", task_id=task_id,
                                 attempt=1, node=node, gpu_uuids=())  # fmt: skip
    await log.append(ev.task_subject(task_id), [submitted, scheduled])
    return RunCommand(id=new_id(), node=node, task_id=task_id, attempt=1,
                      causation_id=scheduled.id, image=image, command=tuple(argv))  # fmt: skip


async def started(log: JetStreamEventLog, task_id: str) -> ev.ContainerStarted:
    found = await wait_event(log, about(task_id, ev.ContainerStarted), DEADLINE_S)
    assert isinstance(found.event, ev.ContainerStarted)
    return found.event


async def exited(log: JetStreamEventLog, task_id: str) -> ev.ContainerExited:
    found = await wait_event(log, about(task_id, ev.ContainerExited), DEADLINE_S)
    assert isinstance(found.event, ev.ContainerExited)
    return found.event


async def once_each(log: JetStreamEventLog, task_id: str) -> list[str]:
    """The task's container events, asserting each start and exit is there once, in order."""
    found = [
        e
        for e in await task_events(log, task_id)
        if isinstance(e, ev.ContainerStarted | ev.ContainerExited)
    ]
    kinds = [ev.type_of(e) for e in found]
    assert kinds == ["container.started", "container.exited"], found
    return kinds


async def outage(since: float) -> None:
    """Let an outage that began at `since` (time.monotonic) last OUTAGE_S in all."""
    await anyio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - since)))


async def set_stream_limit(log: JetStreamEventLog, *, full: bool) -> None:
    """GW_EVENTS at its limits, as an operator might set them (max_msgs at what it holds,
    refusing new messages), or back to none."""
    info = await log.js.stream_info(EVENTS_STREAM)
    if full:
        config = replace(info.config, max_msgs=info.state.messages, discard=api.DiscardPolicy.NEW)
    else:
        config = replace(info.config, max_msgs=-1, discard=api.DiscardPolicy.OLD)
    await log.js.update_stream(config)


# --- NATS killed and restarted under a running agent process ------------------------------


@pytest.mark.docker
async def test_agent_process_outlives_a_nats_server_killed_and_restarted(
    tmp_path: Path,
    nats_server: EmbeddedNats,
    event_log: JetStreamEventLog,
    command_bus: JetStreamCommandBus,
    docker_client: docker.DockerClient,
    docker_janitor: DockerJanitor,
    test_image: str,
) -> None:
    """kill -9 of the nats-server for about 10 s while two containers run; both end
    during the outage (one killed, one exiting 0). The agent process stays up, and once
    the server is back on the same data and port, each exit is in the log exactly once."""
    node = docker_janitor.node
    async with agent_process(
        nats_server.url, node, runtime="docker", state_dir=tmp_path / "state"
    ) as agent:
        await agent.said(f"agent of {node} running")
        killed = await log_attempt(event_log, node, test_image, ["sleep", "300"])
        finishing = await log_attempt(event_log, node, test_image, WAITER)
        await command_bus.send_many([killed, finishing])
        killed_id = (await started(event_log, killed.task_id)).container_id
        finishing_id = (await started(event_log, finishing.task_id)).container_id

        down = time.monotonic()
        await nats_server.kill()
        await anyio.to_thread.run_sync(docker_client.api.kill, killed_id)
        release = docker_client.api.exec_create(finishing_id, ["touch", "/gw-release"])
        await anyio.to_thread.run_sync(docker_client.api.exec_start, release)
        said = await agent.said("event log unreachable")
        assert "buffered" in said
        await outage(down)
        assert agent.alive, agent.output
        await nats_server.start()

        assert (await exited(event_log, killed.task_id)).exit_code == 137
        assert (await exited(event_log, finishing.task_id)).exit_code == 0
        await agent.said("event log takes writes again")
        assert agent.alive, agent.output
        await once_each(event_log, killed.task_id)
        await once_each(event_log, finishing.task_id)
        assert await agent.terminate() == 0, agent.output


# --- GW_EVENTS at its limits --------------------------------------------------------------


async def test_a_full_stream_is_waited_out_and_everything_reported_in_order(
    tmp_path: Path, node: Node, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream refuses every append (max_msgs reached, discard new). The agent stays
    up: an exit it sees and a start it carries out wait in its outbox, the run command
    is acked (its outcome is kept), and once the limits are raised both reach the log,
    each once, after the events they follow."""
    node.outbox = Outbox.open(tmp_path / "state")
    try:
        agent = await node.start()
        first = await node.send_run(world.image, ["sleep", "30"])
        first_id = (await started(node.log, first.task_id)).container_id
        second = await node.log_attempt(world.image, ["sleep", "30"])

        await set_stream_limit(node.log, full=True)
        await world.kill(first_id)
        await node.bus.send(second)
        with anyio.fail_after(DEADLINE_S):
            await agent.outbox.wait(lambda: len(agent.outbox) >= 2)
        assert [ev.type_of(e) for e in agent.outbox.pending()] == [
            "container.exited",
            "container.started",
        ]
        assert node.task is not None and not node.task.done()
        assert "event log unreachable: append to" in caplog.text
        assert "maximum messages exceeded" in caplog.text

        await set_stream_limit(node.log, full=False)
        assert (await exited(node.log, first.task_id)).exit_code == 137
        await started(node.log, second.task_id)
        with anyio.fail_after(DEADLINE_S):
            await agent.outbox.wait(lambda: not agent.outbox)
        await once_each(node.log, first.task_id)
        assert [ev.type_of(e) for e in await task_events(node.log, second.task_id)] == [
            "task.submitted",
            "task.scheduled",
            "container.started",
        ]
        assert "event log takes writes again" in caplog.text
        assert not node.task.done()
    finally:
        await node.stop()
        node.outbox.close()


# --- Docker away, and back with no memory of what happened --------------------------------


@pytest.mark.docker
async def test_agent_process_waits_for_docker_and_misses_no_exit_while_it_was_away(
    tmp_path: Path,
    nats_server: EmbeddedNats,
    event_log: JetStreamEventLog,
    command_bus: JetStreamCommandBus,
    docker_client: docker.DockerClient,
    docker_janitor: DockerJanitor,
    test_image: str,
) -> None:
    """The agent starts while Docker does not answer, and waits for it. Later Docker is
    away for about 10 s while a container is killed, and comes back as a restarted daemon
    would, replaying nothing: the agent survives, reconciles, and logs the exit once."""
    proxy = DockerProxy(docker_socket(), tmp_path / "docker.sock")
    node = docker_janitor.node
    env = {"DOCKER_HOST": f"unix://{proxy.path}"}
    try:
        async with agent_process(
            nats_server.url, node, runtime="docker", state_dir=tmp_path / "state", env=env
        ) as agent:
            await agent.said("no Docker engine answers at .*waiting for it")
            await proxy.restore()
            await agent.said(f"agent of {node} running")
            run = await log_attempt(event_log, node, test_image, ["sleep", "300"])
            await command_bus.send(run)
            container_id = (await started(event_log, run.task_id)).container_id

            down = time.monotonic()
            await proxy.cut()
            await agent.said("watching docker failed")
            await anyio.to_thread.run_sync(docker_client.api.kill, container_id)
            await outage(down)
            assert agent.alive, agent.output
            await proxy.restore(restarted=True)

            await agent.said("docker answers again")
            assert (await exited(event_log, run.task_id)).exit_code == 137
            assert agent.alive, agent.output
            await once_each(event_log, run.task_id)
            assert await agent.terminate() == 0, agent.output
    finally:
        await proxy.cut()


# --- an agent killed with observations buffered -------------------------------------------


@pytest.mark.docker
async def test_a_buffered_exit_survives_a_kill_9_of_the_agent(
    tmp_path: Path,
    nats_server: EmbeddedNats,
    event_log: JetStreamEventLog,
    command_bus: JetStreamCommandBus,
    docker_client: docker.DockerClient,
    docker_janitor: DockerJanitor,
    test_image: str,
) -> None:
    """An exit seen while NATS is down waits in the outbox; the agent is killed (-9) and
    the container removed, so nothing but the outbox knows of the exit. The next agent
    on the same state directory reports it, once."""
    node = docker_janitor.node
    state = tmp_path / "state"
    async with agent_process(nats_server.url, node, runtime="docker", state_dir=state) as first:
        await first.said(f"agent of {node} running")
        run = await log_attempt(event_log, node, test_image, ["sleep", "300"])
        await command_bus.send(run)
        container_id = (await started(event_log, run.task_id)).container_id
        await nats_server.kill()
        await anyio.to_thread.run_sync(docker_client.api.kill, container_id)
        said = await first.said("event log unreachable")
        assert f"1 observation(s) buffered in {state / JOURNAL}" in said
        await first.kill()
    await anyio.to_thread.run_sync(docker_client.api.remove_container, container_id)
    await nats_server.start()

    async with agent_process(nats_server.url, node, runtime="docker", state_dir=state) as second:
        await second.said("1 observation.* of an earlier run not yet in the log")
        found = await exited(event_log, run.task_id)
        assert (found.container_id, found.exit_code) == (container_id, 137)
        await second.said(f"agent of {node} running")
        await once_each(event_log, run.task_id)
        assert await second.terminate() == 0, second.output


async def test_the_agent_waits_for_a_nats_server_that_is_not_there_yet(
    tmp_path: Path,
) -> None:
    """Started before its server (a host booting), the agent waits instead of exiting."""
    port = free_port()
    node = f"test-{uuid.uuid4().hex[:12]}"
    url = f"nats://127.0.0.1:{port}"
    async with agent_process(url, node, runtime="sim", state_dir=tmp_path / "state") as agent:
        await agent.said("NATS unreachable: .*trying again until it answers")
        async with EmbeddedNats(tmp_path / "late", port=port) as server:
            nc = await connect(server.url)
            try:
                log = JetStreamEventLog(nc, timeout_s=3.0)
                await log.ensure_streams()
                await agent.said(f"agent of {node} running")
                registered = await wait_event(
                    log, lambda e: isinstance(e, ev.NodeRegistered) and e.node == node
                )
                assert registered.event is not None
            finally:
                await nc.close()
            assert await agent.terminate() == 0, agent.output


# --- reconcile: a container whose attempt is over is stopped at once ----------------------


def superseding(kind: str, task_id: str) -> ev.Event:
    now = datetime.now(UTC)
    common: dict[str, Any] = {"id": new_id(), "at": now, "task_id": task_id}
    if kind == "classified":
        return ev.FaultClassified(actor="engine", attempt=1, fault="node_lost",
                                  rule="node_lost", **common)  # fmt: skip
    if kind == "newer attempt":
        return ev.TaskScheduled(actor="engine", attempt=2, node="elsewhere", gpu_uuids=(),
                                **common)  # fmt: skip
    return ev.TaskCancelled(actor="api", reason="owner", **common)


@pytest.mark.parametrize("kind", ["classified", "newer attempt", "cancelled"])
async def test_a_superseded_container_found_at_start_is_stopped_at_once(
    node: Node, world: World, kind: str
) -> None:
    """The agent was away while the engine concluded the attempt (or moved the task on,
    or it was cancelled). Back, it finds the container still running: it kills it before
    it is ready (no grace: its GPUs may be another's now) and logs the exit citing the
    event that ended the attempt."""
    await node.start()
    run = await node.send_run(world.image, ["sleep", "30"])
    container_id = (await started(node.log, run.task_id)).container_id
    await node.stop()
    ended = superseding(kind, run.task_id)
    await node.log.append(ev.task_subject(run.task_id), [ended])
    await node.start()
    assert not await world.is_running(container_id), "stopped before the agent was ready"
    found = await exited(node.log, run.task_id)
    assert (found.exit_code, found.signal) == (137, 9)
    assert found.causation_id == ended.id
    await once_each(node.log, run.task_id)


# --- graceful stop ------------------------------------------------------------------------


async def away_announced(nc: NatsClient, node: str, stop: Callable[[], Any]) -> Heartbeat:
    """The first beat of `node` that announces an absence, heard after `stop()`."""
    sub = await nc.subscribe(heartbeat_subject(node))
    try:
        await stop()
        with anyio.move_on_after(DEADLINE_S):
            async for msg in sub.messages:
                beat = msgspec.json.decode(msg.data, type=Heartbeat)
                if beat.away_s is not None:
                    return beat
    finally:
        await sub.unsubscribe()
    pytest.fail(f"no heartbeat of {node} announced a restart window")


async def test_sigterm_announces_the_restart_window_before_the_agent_exits(
    tmp_path: Path, nats_server: EmbeddedNats, nats_client: NatsClient
) -> None:
    node = f"test-{uuid.uuid4().hex[:12]}"
    async with agent_process(
        nats_server.url,
        node,
        runtime="sim",
        state_dir=tmp_path / "state",
        extra=["--restart-window-s", "120"],
    ) as agent:
        await agent.said(f"agent of {node} running")
        assert agent.proc is not None
        stopping = asyncio.create_task(agent.terminate())
        beat = await away_announced(nats_client, node, lambda: asyncio.sleep(0))
        assert beat.away_s == 120
        assert await stopping == 0, agent.output


async def test_up_announces_the_default_restart_window_on_sigterm(tmp_path: Path) -> None:
    """`gpuwarden up`'s local agent says the same on its way out (default: 300 s)."""
    argv = [*CLI, "--data-dir", str(tmp_path / "data"), "up", "--runtime", "sim", "--insecure"]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        with anyio.fail_after(DEADLINE_S):
            url = (await proc.stdout.readline()).decode().strip()
        assert url.startswith("nats://"), url
        nc = await connect(url)
        try:
            with anyio.fail_after(DEADLINE_S):  # the local agent beats once it is up
                sub = await nc.subscribe(heartbeat_subject("local"))
                await sub.next_msg(timeout=DEADLINE_S)
                await sub.unsubscribe()

            async def stop() -> None:
                proc.send_signal(signal.SIGTERM)

            beat = await away_announced(nc, "local", stop)
        finally:
            await nc.close()
        assert beat.away_s == 300
        with anyio.fail_after(DEADLINE_S):
            assert await proc.wait() == 0, (await proc.stderr.read()).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- the outbox on its own ----------------------------------------------------------------


def _fault(n: int) -> ev.GpuFault:
    return ev.GpuFault(id=new_id(), at=datetime.now(UTC), actor="agent:n1", gpu_uuid="GPU-0",
                       node="n1", kind="xid", xid=n)  # fmt: skip


async def test_the_outbox_journal_survives_a_torn_last_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    faults = [_fault(n) for n in (48, 79, 94)]
    outbox = Outbox.open(tmp_path)
    for fault in faults:
        await outbox.put(fault)
    await outbox.taken(faults[:1])
    outbox.close()
    journal = tmp_path / JOURNAL  # a crash in the middle of a write:
    journal.write_bytes(journal.read_bytes() + b'+0badc0de {"type":"gpu.fa')
    reopened = Outbox.open(tmp_path)
    try:
        assert [e.id for e in reopened.pending()] == [f.id for f in faults[1:]]
        assert "1 damaged record(s) skipped" in caplog.text
        assert "2 observation(s) of an earlier run not yet in the log" in caplog.text
        with pytest.raises(OutboxError, match="in use by another agent"):
            Outbox.open(tmp_path)
    finally:
        reopened.close()
    again = Outbox.open(tmp_path)  # the torn line is gone from the file too
    try:
        assert [e.id for e in again.pending()] == [f.id for f in faults[1:]]
    finally:
        again.close()


async def test_a_full_outbox_keeps_the_oldest_and_holds_the_newest_until_there_is_room(
    tmp_path: Path,
) -> None:
    outbox = Outbox.open(tmp_path, capacity=2)
    try:
        a, b, c = (_fault(n) for n in (48, 79, 94))
        await outbox.put(a)
        await outbox.put(b)
        assert outbox.full
        held = asyncio.create_task(outbox.put(c))
        await anyio.wait_all_tasks_blocked()
        assert not held.done(), "a full outbox took one more"
        await outbox.taken([a])
        with anyio.fail_after(DEADLINE_S):
            await held
        assert [e.id for e in outbox.pending()] == [b.id, c.id]
    finally:
        outbox.close()


# --- the options ----------------------------------------------------------------------------


def test_the_state_directory_defaults_to_one_per_node_in_the_data_directory() -> None:
    data = Path("data")
    plain = AgentConfig(node="gpu-7", connection=ConnectionConfig(data_dir=data))
    assert plain.state_path == data / "agent-gpu-7"
    odd = AgentConfig(node="rack 3/gpu:7", connection=ConnectionConfig(data_dir=data))
    assert odd.state_path.parent == data and odd.state_path.name.startswith("agent-rack_3_gpu_7-")
    assert AgentConfig(node="n", state_dir=Path("/x")).state_path == Path("/x")
    assert AgentConfig(node="n").restart_window_s == 300


@pytest.mark.parametrize("window", ["-1", "3601"])
def test_a_restart_window_the_engine_would_refuse_is_a_configuration_error(
    window: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["agent", "--node", "n", "--restart-window-s", window]) == 2
    assert "--restart-window-s must be 0 to 3600" in capsys.readouterr().err
