"""Review findings in the engine service, liveness and heartbeats, each proven on a real
nats-server: a restarted engine must not revive dead nodes, must survive a server that
is away when a node falls silent, must resend the stop a cancel called for, and a
heartbeat may only speak for the node whose subject it came on."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import msgspec
import pytest
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.heartbeats import Heartbeat, NatsHeartbeats, heartbeat_subject
from gpuwarden.engine.clock import VirtualClock
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.commands import Command, StopCommand
from gpuwarden.engine.core.liveness import Liveness
from gpuwarden.engine.ports import EventLogError
from gpuwarden.engine.runtime import Engine
from nats.aio.client import Client as NatsClient

T0 = datetime(2026, 3, 1, tzinfo=UTC)
GPU = ev.GpuInfo(uuid="n1/0", index=0, model="H100")


async def emit(log: JetStreamEventLog, cls: type[Any], id: str, at: datetime, **kw: Any) -> None:
    event = cls(id=id, at=at, actor=kw.pop("actor", "test"), **kw)
    await log.append(ev.subject_of(event), [event])


async def start(engine: Engine) -> asyncio.Task[None]:
    task = asyncio.create_task(engine.run())
    with anyio.fail_after(10):
        await engine.caught_up.wait()
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def running_task(log: JetStreamEventLog) -> None:
    """Task t1's attempt 1 placed on n1/0 and started in container "k", at T0."""
    await emit(log, ev.NodeRegistered, "r1", T0, node="n1", runtime="sim", gpus=(GPU,))
    await emit(log, ev.TaskSubmitted, "s1", T0, task_id="t1", name="t1", image="i", command=("x",))
    await emit(log, ev.GpuAllocated, "a1", T0, gpu_uuid="n1/0", node="n1", task_id="t1",
               attempt=1, actor="engine")  # fmt: skip
    await emit(log, ev.TaskScheduled, "d1", T0, task_id="t1", attempt=1, node="n1",
               gpu_uuids=("n1/0",), actor="engine")  # fmt: skip
    await emit(log, ev.ContainerStarted, "c1", T0, task_id="t1", attempt=1, node="n1",
               container_id="k")  # fmt: skip


async def first_command(engine: Engine, bus: JetStreamCommandBus, node: str) -> Command:
    """Start the engine, let it settle, and take the first command it sent to `node`."""
    task = await start(engine)
    try:
        await engine.wait_idle(timeout_s=5)
        with anyio.fail_after(3):
            async for received in bus.receive(node):
                await received.ack()
                return received.command
    finally:
        await stop(task)
    raise AssertionError(f"no command for {node}")


async def types_on(log: JetStreamEventLog, subject: str) -> list[str]:
    return [ev.type_of(r.event) async for r in log.read(subject=subject) if r.event is not None]


async def test_a_restarted_engine_does_not_revive_a_node_the_log_says_is_lost(
    event_log: JetStreamEventLog, command_bus: JetStreamCommandBus
) -> None:
    await emit(event_log, ev.NodeRegistered, "r1", T0, node="n1", runtime="sim", gpus=(GPU,))
    lost_at = T0 + timedelta(seconds=5)
    await emit(event_log, ev.NodeLost, "l1", lost_at, node="n1", actor="engine")
    clock = VirtualClock(T0 + timedelta(seconds=60))
    engine = Engine(event_log, command_bus, clock, liveness=Liveness(3))
    task = await start(engine)
    try:
        await engine.wait_idle(timeout_s=5)
        clock.advance(10)  # no heartbeat from n1 at all
        engine.wake()
        await engine.wait_idle(timeout_s=5)
    finally:
        await stop(task)
    assert await types_on(event_log, ev.node_subject("n1")) == ["node.registered", "node.lost"]
    assert not engine.state.nodes["n1"].alive


async def test_engine_survives_a_server_away_when_a_node_falls_silent(
    nats_server: EmbeddedNats, nats_client: NatsClient
) -> None:
    log = JetStreamEventLog(nats_client, heartbeat_s=0.5, timeout_s=0.5)
    await log.ensure_streams()
    bus = JetStreamCommandBus(nats_client, timeout_s=0.5)
    await emit(log, ev.NodeRegistered, "r1", T0, node="n1", runtime="sim", gpus=(GPU,))
    clock = VirtualClock(T0)
    engine = Engine(log, bus, clock, liveness=Liveness(1))
    task = await start(engine)
    try:
        await engine.wait_idle(timeout_s=5)
        await nats_server.stop()
        clock.advance(2)  # n1 silent past its timeout while the server is away
        engine.wake()
        with anyio.fail_after(5):
            while engine.metrics.append_failures == 0 and not task.done():
                progress = asyncio.ensure_future(engine.progress.wait())
                await asyncio.wait([task, progress], return_when=asyncio.FIRST_COMPLETED)
                progress.cancel()
        assert not task.done(), f"the engine died: {task.exception()!r}"
        await nats_server.start()
        with anyio.fail_after(10):
            while engine.state.nodes["n1"].alive:
                assert not task.done(), f"the engine died: {task.exception()!r}"
                await engine.progress.wait()
    finally:
        await stop(task)
    assert (await types_on(log, ev.node_subject("n1"))).count("node.lost") == 1


async def test_a_restarted_engine_sends_the_stop_of_a_cancel_it_never_sent(
    event_log: JetStreamEventLog, command_bus: JetStreamCommandBus
) -> None:
    await running_task(event_log)
    # the engine that folded this cancel died before its dispatcher sent the stop
    await emit(event_log, ev.TaskCancelled, "x1", T0, task_id="t1", reason="bye", attempt=1)
    engine = Engine(event_log, command_bus, VirtualClock(T0))
    command = await first_command(engine, command_bus, "n1")
    assert isinstance(command, StopCommand)
    assert (command.task_id, command.attempt, command.container_id) == ("t1", 1, "k")
    # its process has not exited yet: the GPU stays with it until the stop takes effect
    assert engine.state.gpus["n1/0"].holder == ("t1", 1)
    await emit(event_log, ev.ContainerExited, "e1", T0, task_id="t1", attempt=1, node="n1",
               container_id="k", exit_code=143)  # fmt: skip
    engine = Engine(event_log, command_bus, VirtualClock(T0))
    task = await start(engine)
    try:
        await engine.wait_idle(timeout_s=5)
    finally:
        await stop(task)
    assert engine.state.gpus["n1/0"].holder is None
    assert (await types_on(event_log, ev.gpu_subject("n1/0")))[-1] == "gpu.released"


async def test_a_heartbeat_only_counts_for_the_node_of_its_subject(
    nats_client: NatsClient,
) -> None:
    heard: list[str] = []
    beats = NatsHeartbeats(nats_client)
    listening = beats.listen()
    first = asyncio.ensure_future(anext(listening))
    with anyio.fail_after(3):
        while not first.done():
            # an agent allowed only gw.hb.a claims to be node b
            spoof = Heartbeat(node="b", at=datetime.now(UTC), agent="x")
            await nats_client.publish(heartbeat_subject("a"), msgspec.json.encode(spoof))
            await beats.beat("a")
            await nats_client.flush()
            await asyncio.wait([first], timeout=0.05)
        heard.append(first.result())
    await listening.aclose()
    assert heard == ["a"]


async def test_a_restarted_engine_kills_a_hung_process_it_concluded_but_never_stopped(
    event_log: JetStreamEventLog, command_bus: JetStreamCommandBus
) -> None:
    """An engine classified an attempt gpu_hardware without an exit (its process hung on
    a GPU with Xid 48) and died before its dispatcher sent the stop: the next engine
    sends it at start-up, with no grace period."""
    await running_task(event_log)
    later = T0 + timedelta(seconds=5)
    await emit(event_log, ev.GpuFault, "g1", later, gpu_uuid="n1/0", node="n1", kind="xid",
               xid=48)  # fmt: skip
    await emit(event_log, ev.FaultClassified, "f1", later + timedelta(seconds=1), task_id="t1",
               attempt=1, fault="gpu_hardware", rule="xid_hardware", evidence=("g1",),
               actor="engine")  # fmt: skip
    engine = Engine(event_log, command_bus, VirtualClock(later + timedelta(seconds=2)))
    command = await first_command(engine, command_bus, "n1")
    assert isinstance(command, StopCommand)
    assert (command.task_id, command.attempt, command.container_id) == ("t1", 1, "k")
    assert (command.grace_s, command.causation_id) == (0.0, "f1")


async def test_a_restarted_engine_settles_after_a_cancel_and_an_xid_it_did_not_see(
    event_log: JetStreamEventLog, command_bus: JetStreamCommandBus
) -> None:
    """Review finding: while no engine ran, the owner cancelled t1 and its GPU reported
    Xid 48. The restarted engine quarantines; no timer may be left due that decides
    nothing, or the engine spins (it did, at ~6,400 rounds/s). The cancelled process
    keeps the GPU until its exit is logged."""
    await running_task(event_log)
    await emit(event_log, ev.TaskCancelled, "x1", T0, task_id="t1", reason="bye")
    await emit(event_log, ev.GpuFault, "g1", T0, gpu_uuid="n1/0", node="n1", kind="xid", xid=48)
    engine = Engine(event_log, command_bus, VirtualClock(T0 + timedelta(seconds=5)))
    task = await start(engine)
    try:
        await engine.wait_idle(timeout_s=5)
        due = engine.due()
        assert due is None or due > engine.clock.now(), f"a timer is due and idle: {due}"
        assert engine.state.gpus["n1/0"].quarantined
        assert engine.state.gpus["n1/0"].holder == ("t1", 1)
    finally:
        await stop(task)


async def test_an_engine_whose_log_subscription_ends_says_so(
    event_log: JetStreamEventLog, command_bus: JetStreamCommandBus
) -> None:
    """The live subscription ending is an error that names itself, not a bare
    anyio.EndOfStream out of the engine's loop (seen at shutdown in bench_intake)."""

    class EndingLog(JetStreamEventLog):
        async def subscribe(  # type: ignore[override]
            self, from_seq: int = 1, subject: str | None = None
        ) -> Any:
            return
            yield  # an async generator that ends at once

    await running_task(event_log)
    engine = Engine(EndingLog(event_log.nc), command_bus, VirtualClock(T0))
    with anyio.fail_after(10):
        with pytest.raises(BaseExceptionGroup) as caught:
            await engine.run()
    assert caught.group_contains(EventLogError, match="subscription ended")
