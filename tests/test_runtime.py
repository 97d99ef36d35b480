"""The engine service on a real nats-server: decisions reach the log and the bus."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

import anyio
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.dead_letters import JetStreamDeadLetters
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.engine.clock import VirtualClock
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.commands import RunCommand
from gpuwarden.engine.core.wire import BASIS_HEADER, TRIGGER_HEADER
from gpuwarden.engine.ports import StoredEvent
from gpuwarden.engine.runtime import BACKOFF_MAX_S, BACKOFF_MIN_S, Engine, next_backoff

T0 = datetime(2026, 3, 1, tzinfo=UTC)


class World:
    """An engine in a task group plus helpers to append observations as an agent would."""

    def __init__(self, log: JetStreamEventLog, bus: JetStreamCommandBus) -> None:
        self.log = log
        self.bus = bus
        self.clock = VirtualClock(T0)
        self.dead_letters = JetStreamDeadLetters(log.nc)
        self.engine = Engine(log, bus, self.clock, dead_letters=self.dead_letters)
        self.n = 0

    async def emit(self, cls: type[Any], **fields: Any) -> ev.Event:
        self.n += 1
        fields.setdefault("actor", "test")
        event = cls(id=f"obs{self.n:04d}", at=self.clock.now(), **fields)
        await self.log.append(ev.subject_of(event), [event])
        return event

    async def settle(self) -> None:
        await self.engine.wait_idle(timeout_s=10)

    async def records(self) -> list[StoredEvent]:
        return [r async for r in self.log.read()]

    async def types(self, task: str) -> list[str]:
        return [
            ev.type_of(r.event)
            for r in await self.records()
            if r.event is not None and getattr(r.event, "task_id", None) == task
        ]


async def start_engine(engine: Engine) -> asyncio.Task[None]:
    """The engine as a background task (fixtures cannot hold a task group open)."""
    task = asyncio.create_task(engine.run())
    with anyio.fail_after(10):
        await engine.caught_up.wait()
    return task


async def stop_engine(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def register(w: World, node: str, gpus: int) -> None:
    infos = tuple(ev.GpuInfo(uuid=f"{node}/{i}", index=i, model="H100") for i in range(gpus))
    await w.emit(ev.NodeRegistered, node=node, runtime="sim", gpus=infos)


async def test_submitted_task_is_scheduled_and_its_run_command_sent(world: World) -> None:
    await register(world, "n1", 2)
    await world.emit(
        ev.TaskSubmitted, task_id="t1", name="t1", image="img", command=("run",), gpus=1
    )
    await world.settle()
    assert await world.types("t1") == ["task.submitted", "gpu.allocated", "task.scheduled"]
    with anyio.fail_after(5):
        async for received in world.bus.receive("n1"):
            command = received.command
            await received.ack()
            break
    assert isinstance(command, RunCommand)
    assert (command.task_id, command.attempt, command.gpu_uuids) == ("t1", 1, ("n1/0",))


async def test_decisions_carry_basis_and_trigger_headers(world: World) -> None:
    await register(world, "n1", 1)
    submitted = await world.emit(
        ev.TaskSubmitted, task_id="t1", name="t1", image="img", command=("run",)
    )
    await world.settle()
    decisions = [r for r in await world.records() if r.event and r.event.actor == "engine"]
    assert decisions, "the engine decided nothing"
    assert all(BASIS_HEADER in r.headers for r in decisions)
    submitted_seq = next(r.seq for r in await world.records() if r.event == submitted)
    first, last = map(int, decisions[0].headers[TRIGGER_HEADER].split("-"))
    assert first <= submitted_seq <= last
    assert int(decisions[0].headers[BASIS_HEADER]) < decisions[0].seq


async def test_exit_1_fails_after_the_evidence_window_and_frees_gpus(world: World) -> None:
    await register(world, "n1", 1)
    await world.emit(ev.TaskSubmitted, task_id="t1", name="t1", image="i", command=("x",))
    await world.settle()
    await world.emit(
        ev.ContainerExited, task_id="t1", attempt=1, node="n1", container_id="c1", exit_code=1
    )
    await world.settle()
    assert "fault.classified" not in await world.types("t1"), "decided before the window closed"
    world.clock.advance(1.5)
    await world.settle()
    types = await world.types("t1")
    assert types[-3:] == ["fault.classified", "task.failed", "gpu.released"]
    assert world.engine.state.gpus["n1/0"].holder is None


async def test_preempted_task_is_rebuilt_after_backoff(world: World) -> None:
    await register(world, "n1", 2)
    await world.emit(ev.TaskSubmitted, task_id="t1", name="t1", image="i", command=("x",))
    await world.settle()
    await world.emit(
        ev.ContainerExited,
        task_id="t1",
        attempt=1,
        node="n1",
        container_id="c1",
        exit_code=137,
        signal=9,
    )
    world.clock.advance(1.5)
    await world.settle()
    waiting = world.engine.state.tasks["t1"]
    assert waiting.status == "pending" and waiting.rebuild is not None  # out its backoff
    world.clock.advance(10)
    await world.settle()
    task = world.engine.state.tasks["t1"]
    assert task.status == "running" and task.current is not None and task.current.n == 2


async def test_undecodable_message_is_dead_lettered_and_the_engine_goes_on(
    world: World,
) -> None:
    await world.log.nc.publish("gw.evt.task.junk", b"{not json")
    await register(world, "n1", 1)
    await world.emit(ev.TaskSubmitted, task_id="t1", name="t1", image="i", command=("x",))
    await world.settle()
    assert world.engine.metrics.dead_letters["undecodable"] == 1
    assert world.engine.state.tasks["t1"].status == "running"
    [(headers, payload)] = await world.dead_letters.read_all()
    assert payload == b"{not json" and headers["Gw-Subject"] == "gw.evt.task.junk"
    assert "malformed JSON" in headers["Gw-Reason"]


async def test_oversized_and_unknown_type_events_are_dead_lettered(world: World) -> None:
    await world.log.nc.publish(
        "gw.evt.task.x", b'{"type":"task.exploded","id":"q","at":"2026-01-01T00:00:00Z"}'
    )
    world.engine.max_event_bytes = 400
    await register(world, "n1", 1)
    await world.emit(
        ev.TaskSubmitted,
        task_id="big",
        name="big",
        image="i",
        command=("x",),
        env={"PAD": "x" * 500},
    )
    await world.settle()
    reasons = [h["Gw-Reason"] for h, _ in await world.dead_letters.read_all()]
    assert any("task.exploded" in r for r in reasons)
    assert any("exceeds 400" in r for r in reasons)
    assert "big" not in world.engine.state.tasks
    assert world.engine.state.nodes["n1"].alive
    assert world.engine.metrics.dead_letters["too_large"] == 1
    assert world.engine.metrics.dead_letters["undecodable"] == 1


async def test_a_dead_letters_kind_is_why_it_was_refused_not_what_its_text_says(
    world: World,
) -> None:
    # An unknown type whose name is "exceeds": undecodable, whatever the decoder says of it.
    await world.log.nc.publish("gw.evt.task.x", b'{"type":"exceeds","id":"q"}')
    await register(world, "n1", 1)
    await world.settle()
    assert dict(world.engine.metrics.dead_letters) == {"undecodable": 1}
    [(headers, _)] = await world.dead_letters.read_all()
    assert "exceeds" in headers["Gw-Reason"]


async def test_a_restarted_engine_neither_repeats_nor_loses_decisions(
    event_log: JetStreamEventLog, command_bus: JetStreamCommandBus
) -> None:
    w = World(event_log, command_bus)
    task = await start_engine(w.engine)
    await register(w, "n1", 2)
    await w.emit(ev.TaskSubmitted, task_id="t1", name="t1", image="i", command=("x",))
    await w.settle()
    await stop_engine(task)
    # while no engine runs: a submission and an exit arrive
    await w.emit(ev.TaskSubmitted, task_id="t2", name="t2", image="i", command=("x",))
    await w.emit(
        ev.ContainerExited, task_id="t1", attempt=1, node="n1", container_id="c", exit_code=0
    )
    second = Engine(event_log, command_bus, w.clock)
    w.engine = second
    task = await start_engine(second)
    await w.settle()
    await stop_engine(task)
    types1 = await w.types("t1")
    assert types1.count("task.scheduled") == 1 and types1.count("task.completed") == 1
    assert (await w.types("t2")).count("task.scheduled") == 1


async def test_metrics_endpoint_reports_what_the_engine_did(world: World) -> None:
    from gpuwarden.engine.metrics import serve_metrics

    await register(world, "n1", 1)
    await world.emit(ev.TaskSubmitted, task_id="t1", name="t1", image="i", command=("x",))
    await world.settle()
    await world.emit(
        ev.ContainerExited, task_id="t1", attempt=1, node="n1", container_id="c", exit_code=1
    )
    world.clock.advance(1.5)
    await world.settle()
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_metrics, world.engine.metrics, 0)
        with anyio.fail_after(5):
            stream = await anyio.connect_tcp("127.0.0.1", port)
            async with stream:
                await stream.send(b"GET /metrics HTTP/1.0\r\n\r\n")
                body = b""
                try:
                    while True:
                        body += await stream.receive()
                except anyio.EndOfStream:
                    pass
        tg.cancel_scope.cancel()
    text = body.decode()
    assert text.startswith("HTTP/1.0 200 OK")
    assert 'gpuwarden_faults_total{fault="user_error"} 1' in text
    assert 'gpuwarden_decisions_total{action="task.failed"} 1' in text
    assert "gpuwarden_events_consumed_total " in text
    assert "gpuwarden_decision_latency_seconds_count" in text
    assert "gpuwarden_consumer_lag" in text


async def test_a_restart_does_not_resend_the_run_of_a_cancelled_task(
    event_log: JetStreamEventLog, command_bus: JetStreamCommandBus
) -> None:
    """An engine died between a cancel and its dispatch: no container may start again.

    Its run may or may not have reached the agent, so the restart sends the stop and the
    GPU waits for the agent's answer (a start failure when nothing ever ran)."""
    w = World(event_log, command_bus)
    await register(w, "n1", 1)
    scheduled = ev.TaskScheduled(
        id="s1", at=T0, actor="engine", task_id="t1", attempt=1, node="n1", gpu_uuids=("n1/0",)
    )
    await w.emit(ev.TaskSubmitted, task_id="t1", name="t1", image="i", command=("x",))
    await w.log.append(
        ev.gpu_subject("n1/0"),
        [
            ev.GpuAllocated(
                id="a1", at=T0, actor="engine", gpu_uuid="n1/0", node="n1", task_id="t1", attempt=1
            )
        ],
    )
    await w.log.append(ev.task_subject("t1"), [scheduled])
    await w.emit(ev.TaskCancelled, task_id="t1", reason="owner")
    task = await start_engine(w.engine)
    try:
        await w.settle()
        kinds = []
        with anyio.move_on_after(1.5):  # collect whatever the restart sends
            async for received in w.bus.receive("n1"):
                kinds.append(type(received.command).__name__)
                await received.ack()
        assert "RunCommand" not in kinds and "StopCommand" in kinds
        assert w.engine.state.gpus["n1/0"].holder == ("t1", 1)
        answer = await w.emit(
            ev.ContainerStartFailed, task_id="t1", attempt=1, node="n1", error="not started"
        )
        with anyio.fail_after(10):
            while w.engine.state.gpus["n1/0"].holder is not None:
                await w.engine.progress.wait()
    finally:
        await stop_engine(task)
    released = [r.event for r in await w.records() if isinstance(r.event, ev.GpuReleased)]
    assert [e.causation_id for e in released] == [answer.id]


def test_a_task_group_failure_is_reported_as_its_first_gpuwarden_error() -> None:
    from gpuwarden.engine.cli import _first_error
    from gpuwarden.engine.core.errors import PolicyError

    inner = PolicyError("p.toml: policy.window_s: must be > 0")
    group = BaseExceptionGroup("tg", [ValueError("noise"), ExceptionGroup("inner", [inner])])
    assert _first_error(group) is inner
    assert _first_error(BaseExceptionGroup("tg", [ValueError("x")])) is None


def test_the_append_backoff_doubles_from_its_floor_up_to_its_ceiling() -> None:
    assert next_backoff(0.0) == BACKOFF_MIN_S
    assert next_backoff(BACKOFF_MIN_S) == 2 * BACKOFF_MIN_S
    pauses = [0.0]
    for _ in range(12):
        pauses.append(next_backoff(pauses[-1]))
    assert pauses[1:] == sorted(pauses[1:]) and pauses[-1] == BACKOFF_MAX_S
    assert next_backoff(BACKOFF_MAX_S) == BACKOFF_MAX_S
