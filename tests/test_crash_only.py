"""No stored message stops the engine: admission dead-letters what makes no sense, and a
handler that raises anyway costs its one event, not the cluster (real nats-server).

The log denies purge, so a poison that stopped the engine would stop it on every restart,
for good: these tests write the poisons of issue #13 and a handler made to raise, then
check the engine goes on deciding, now and after a restart.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import anyio
import pytest
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.engine.core import decide as supervisor
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core import fold
from gpuwarden.engine.runtime import Engine

from tests.test_runtime import World, register, start_engine, stop_engine

EXIT_SUBJECT = "gw.evt.task.t1.node.n1"


def raw_exit(**changes: object) -> bytes:
    body: dict[str, object] = {
        "type": "container.exited",
        "id": "poison",
        "at": "2026-03-01T00:00:01Z",
        "actor": "agent:n1",
        "task_id": "t1",
        "attempt": 1,
        "node": "n1",
        "container_id": "c1",
        "exit_code": 1,
    }
    body.update(changes)
    return json.dumps(body).encode()


async def running_task(world: World, task: str = "t1") -> None:
    await world.emit(ev.TaskSubmitted, task_id=task, name=task, image="i", command=("x",))
    await world.settle()
    assert world.engine.state.tasks[task].status == "running"


async def dead_letters(world: World) -> dict[int, str]:
    return {
        int(headers["Gw-Seq"]): headers["Gw-Reason"]
        for headers, _ in await world.dead_letters.read_all()
    }


async def publish_raw(log: JetStreamEventLog, subject: str, data: bytes, msg_id: str) -> int:
    ack = await log.js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})
    return int(ack.seq)


POISONS = {
    "naive time": ({"at": "2026-12-04T13:50:00"}, "at"),
    "year 9999": ({"at": "9999-12-31T23:59:59.999Z"}, "at"),
    "huge attempt": ({"attempt": 10**30}, "attempt"),
    "unknown attempt": ({"attempt": 99}, "attempt 99"),
    "unknown task": ({"task_id": "nope"}, "no task nope"),
}


@pytest.mark.parametrize("name", list(POISONS))
async def test_poison_exit_is_dead_lettered_and_the_engine_decides_on(
    world: World, name: str
) -> None:
    changes, says = POISONS[name]
    await register(world, "n1", 2)
    await running_task(world)
    subject = EXIT_SUBJECT if name != "unknown task" else "gw.evt.task.nope.node.n1"
    seq = await publish_raw(world.log, subject, raw_exit(id=f"p-{len(name)}", **changes), name)
    await world.settle()
    reasons = await dead_letters(world)
    assert seq in reasons and reasons[seq].startswith("refused: ") and says in reasons[seq]
    assert world.engine.metrics.dead_letters["refused"] == 1
    assert world.engine.state.tasks["t1"].status == "running"  # the poison changed nothing
    await running_task(world, "t2")  # and the engine still places work
    await world.emit(
        ev.ContainerExited, task_id="t1", attempt=1, node="n1", container_id="c1", exit_code=1
    )
    world.clock.advance(1.5)
    await world.settle()
    assert world.engine.state.tasks["t1"].status == "failed"


async def test_a_restarted_engine_folds_past_the_poison(world: World) -> None:
    await register(world, "n1", 1)
    await running_task(world)
    for name in ("naive time", "year 9999", "huge attempt"):
        changes, _ = POISONS[name]
        await publish_raw(world.log, EXIT_SUBJECT, raw_exit(id=f"p-{len(name)}", **changes), name)
    await world.settle()
    again = Engine(world.log, world.bus, world.clock, dead_letters=world.dead_letters)
    task = await start_engine(again)
    try:
        await again.wait_idle(timeout_s=10)
        assert again.state.tasks["t1"].status == "running"
        assert again.metrics.dead_letters["refused"] == 3
    finally:
        await stop_engine(task)


@pytest.fixture
def exits_raise(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A bug no test caught: deciding on any container.exited raises."""

    def broken(r: object, e: object) -> None:
        raise KeyError("injected")

    monkeypatch.setitem(supervisor._DECIDE, ev.ContainerExited, broken)
    yield


async def test_a_handler_that_raises_costs_one_event(world: World, exits_raise: None) -> None:
    await register(world, "n1", 2)
    await running_task(world)
    exited = await world.emit(
        ev.ContainerExited, task_id="t1", attempt=1, node="n1", container_id="c1", exit_code=0
    )
    await running_task(world, "t2")  # decided on right after it, in the same or next round
    await world.settle()
    seq = next(r.seq for r in await world.records() if r.event == exited)
    reasons = await dead_letters(world)
    assert reasons[seq].startswith("handler error: KeyError: 'injected' at ")
    assert "in broken" in reasons[seq]
    assert world.engine.metrics.dead_letters["handler_error"] == 1

    again = Engine(world.log, world.bus, world.clock, dead_letters=world.dead_letters)
    task = await start_engine(again)  # the fault is still there: no crash, no loop
    try:
        await running_task(world, "t3")
        with anyio.fail_after(10):
            while again.state.tasks.get("t3") is None or again.state.tasks["t3"].status != (
                "running"
            ):
                await again.progress.wait()
        assert again.metrics.dead_letters["handler_error"] == 0  # folding it raises nothing
    finally:
        await stop_engine(task)


async def test_a_fold_that_raises_is_dead_lettered(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    await register(world, "n1", 2)

    def broken(state: object, e: object) -> None:
        raise RuntimeError("fold bug")

    monkeypatch.setitem(fold._EVOLVE, ev.TaskCancelled, broken)
    await running_task(world)
    cancel = await world.emit(ev.TaskCancelled, task_id="t1", reason="x")
    await running_task(world, "t2")
    seq = next(r.seq for r in await world.records() if r.event == cancel)
    assert (await dead_letters(world))[seq].startswith("handler error: RuntimeError: fold bug")


async def test_a_log_of_the_old_subject_scheme_still_folds(world: World) -> None:
    """Scheme 1 stored each event on its aggregate's own subject: such a log is still
    admitted and folded, and the engine decides on it (writing scheme 2 from then on)."""
    t0 = world.clock.now()
    node = ev.NodeRegistered(id="old1", at=t0, actor="agent:n1", node="n1", runtime="sim",
                             gpus=(ev.GpuInfo(uuid="n1/0", index=0),))  # fmt: skip
    task = ev.TaskSubmitted(id="old2", at=t0, actor="api", task_id="t1", name="t1",
                            image="i", command=("x",))  # fmt: skip
    for event in (node, task):
        await publish_raw(world.log, ev.legacy_subject_of(event), ev.encode(event), event.id)
    await world.settle()
    assert world.engine.state.tasks["t1"].status == "running"
    scheduled = [r for r in await world.records() if isinstance(r.event, ev.TaskScheduled)]
    assert [r.subject for r in scheduled] == ["gw.evt.task.t1.engine"]
    assert world.engine.metrics.dead_letters == {}


async def test_copying_dead_letters_never_holds_up_the_fold(
    event_log: JetStreamEventLog, command_bus: JetStreamCommandBus
) -> None:
    """Any writer may flood its own subjects with junk: the engine dead-letters it in the
    background, so a slow (here: stuck) GW_DLQ does not stop it deciding."""

    class StuckDeadLetters:
        def __init__(self) -> None:
            self.waiting = 0

        async def dead_letter(self, record: object, reason: str) -> None:
            self.waiting += 1
            await anyio.sleep_forever()

    stuck = StuckDeadLetters()
    world = World(event_log, command_bus)
    world.engine = Engine(event_log, command_bus, world.clock, dead_letters=stuck)
    task = await start_engine(world.engine)
    try:
        await register(world, "n1", 1)
        for n in range(50):
            await publish_raw(event_log, "gw.evt.task.junk.node.n1", b"junk", f"junk-{n}")
        await world.emit(ev.TaskSubmitted, task_id="t1", name="t1", image="i", command=("x",))
        with anyio.fail_after(10):
            while world.engine.state.tasks.get("t1") is None or (
                world.engine.state.tasks["t1"].status != "running"
            ):
                await world.engine.progress.wait()
        assert world.engine.metrics.dead_letters["undecodable"] == 50
    finally:
        await stop_engine(task)
