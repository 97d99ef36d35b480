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
from gpuwarden.adapters.jetstream import JetStreamCommandBus, JetStreamEventLog
from gpuwarden.engine import events as ev
from gpuwarden.engine.clock import VirtualClock
from gpuwarden.engine.liveness import Liveness
from gpuwarden.engine.runtime import Engine

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
