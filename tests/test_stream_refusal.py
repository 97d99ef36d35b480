"""The engine refuses to decide on a stream that changed under it (real nats-server):
deleted and recreated, or trimmed. It says so, in a metric and in its log, and stays up."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.stream_guard import EngineStreamCheck
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core import wire
from gpuwarden.engine.runtime import Engine
from nats.js import api

from tests.test_runtime import World, register, start_engine, stop_engine


async def refusal(engine: Engine, says: str = "", deadline_s: float = 10.0) -> str:
    with anyio.fail_after(deadline_s):
        while engine.stream_problem is None or says not in engine.stream_problem:
            await engine.progress.wait()  # signalled when the verdict changes
    return engine.stream_problem


@pytest.fixture
async def world(
    event_log: JetStreamEventLog, command_bus: JetStreamCommandBus
) -> AsyncIterator[World]:
    """An engine that checks its stream (as `gpuwarden engine` runs it)."""
    w = World(event_log, command_bus)
    w.engine = Engine(event_log, command_bus, w.clock, stream_check=EngineStreamCheck(event_log))
    task = await start_engine(w.engine)
    yield w
    await stop_engine(task)


async def test_a_recreated_stream_stops_decisions(
    world: World, event_log: JetStreamEventLog
) -> None:
    await register(world, "n1", 2)
    await world.emit(ev.TaskSubmitted, task_id="t1", name="t1", image="i", command=("x",))
    await world.settle()
    assert world.engine.stream_problem is None
    await event_log.js.delete_stream(wire.EVENTS_STREAM)  # what an admin (only) can do
    await event_log.ensure_streams()  # and what the next careless client does
    await world.emit(ev.TaskSubmitted, task_id="t2", name="t2", image="i", command=("x",))
    problem = await refusal(world.engine, "deleted and recreated")
    assert "GW_EVENTS" in problem
    assert world.engine.metrics.stream_refused
    assert "gpuwarden_stream_refused 1" in world.engine.metrics.render()
    assert "t2" not in world.engine.state.tasks or not any(
        isinstance(r.event, ev.TaskScheduled) async for r in event_log.read()
    ), "decided on a stream it never folded from the start"


async def test_a_trimmed_stream_stops_decisions(world: World, event_log: JetStreamEventLog) -> None:
    await register(world, "n1", 2)
    await world.settle()
    info = await event_log.js.stream_info(wire.EVENTS_STREAM)
    config: api.StreamConfig = info.config
    config.max_msgs = 3
    await event_log.js.update_stream(config)
    problem = await refusal(world.engine)
    assert "max_msgs" in problem or "trimmed" in problem
