"""Play a fault drill through the real engine, a real JetStream log and a simulated cluster.

The verdict must be one an auditor can reproduce, so nothing here shortcuts the engine:
steps become the events a client (`api`) or a node agent would append, the engine
decides on the log as it would in production, the simulated nodes carry out its
commands from the work queue, and the expectations are checked against the log alone
(`scenario_check.observe`), never against the engine's private state.

Time is virtual. Between steps the runner moves the clock through every moment
something falls due (supervisor timers, the silence of a node that went down), and
after each move waits for quiescence: the engine idle, every command sent to an up
node carried out, and the log's end unmoved while checking. Steps at the same `at`
are applied together, as one atomic append, so nothing reacts to the first of them
before the last is in (a submit and a start_error armed at the same instant).

With the default, each drill gets a fresh embedded nats-server in a temporary
directory: the streams deny purge, so a fresh server is the only clean slate. With
`nats_url`, every task, node and GPU name carries a run-unique prefix and the run
sees only its own events, so drills can share a server without colliding.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from itertools import groupby
from pathlib import Path
from typing import Any

import anyio
import msgspec
from gpuwarden.adapters import scenario_file as sf
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.fake_runtime import RUNTIME_ERROR_EXIT, SIGTERM_EXIT
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.adapters.scenario_check import (
    ExpectationResult,
    GpuObservation,
    TaskObservation,
    all_passed,
    check,
    observe,
)
from gpuwarden.adapters.sim_runtime import (
    CountingCommandBus,
    SimCluster,
    SimNodeSpec,
    SimulationError,
)
from gpuwarden.engine.clock import VirtualClock
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.admission import Admission
from gpuwarden.engine.core.liveness import Liveness
from gpuwarden.engine.core.state import next_due
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.ports import StoredEvent
from gpuwarden.engine.runtime import Engine

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MAX_TAIL = timedelta(days=1)  # how long the clock may run on after the last step
TICK = timedelta(milliseconds=1)  # past a liveness deadline: the engine checks `>`
QUIESCE_TIMEOUT_S = 10.0
SCENARIO_TIMEOUT_S = 60.0
OOM_EXIT = 137


class ScenarioResult(msgspec.Struct, kw_only=True):
    """One drill's outcome: the verdict per expectation and the final state, as plain data."""

    name: str
    source: str
    passed: bool
    expectations: list[ExpectationResult]
    tasks: dict[str, TaskObservation]
    gpus: dict[str, GpuObservation]
    notes: list[str]
    events: int
    wall_s: float
    virtual_s: float
    records: list[StoredEvent] = msgspec.field(default_factory=list)  # the run's log

    def to_json(self) -> dict[str, Any]:
        """SCENARIOS.md's `--json` object (the log itself is left to `--export`)."""
        data: dict[str, Any] = msgspec.to_builtins(self)
        del data["records"]
        return data


class DrillClock(VirtualClock):
    """The virtual clock, plus a nudge: wake every sleeper so it re-checks its deadline.

    The engine's loop sleeps until its next timer; a heartbeat from a lost node makes
    that node's recovery due at once, which only a wake-up makes the engine notice.
    A spurious wake-up is harmless: the engine re-checks what is due and sleeps again.
    """

    def nudge(self) -> None:
        for _, _, wake in self._sleepers:
            wake.set()


# --- one run's view of the log ------------------------------------------------------------


class RunLog:
    """The event log as one run sees it: its own events only, from where it started.

    It tracks the last sequence of its own appends, so "the end of the log" means this
    run's end even when other runs write to the same server.
    """

    def __init__(self, inner: JetStreamEventLog, prefix: str, start: int) -> None:
        self.inner = inner
        self.prefix = prefix
        self.start = start
        self.end = start

    async def ensure_streams(self) -> None:
        await self.inner.ensure_streams()

    def _moved(self, seqs: Sequence[int]) -> list[int]:
        if seqs:
            self.end = max(self.end, max(seqs))
        return list(seqs)

    async def append(
        self,
        subject: str,
        events: Sequence[ev.Event],
        expected_last_subject_seq: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> list[int]:
        return self._moved(
            await self.inner.append(subject, events, expected_last_subject_seq, headers)
        )

    async def append_batch(
        self,
        events: Sequence[ev.Event],
        expected: Mapping[str, int],
        headers: Mapping[str, str] | None = None,
    ) -> list[int]:
        return self._moved(await self.inner.append_batch(events, expected, headers))

    async def last_seq(self, subject: str | None = None) -> int:
        if subject is not None:
            return await self.inner.last_seq(subject)
        return self.end

    def mine(self, record: StoredEvent) -> bool:
        if not self.prefix:
            return True
        event = record.event
        if event is None:
            return False
        key = getattr(event, "task_id", None) or getattr(event, "node", None)
        return isinstance(key, str) and key.startswith(self.prefix)

    async def read(
        self, from_seq: int = 1, until_seq: int | None = None, subject: str | None = None
    ) -> AsyncIterator[StoredEvent]:
        until = self.end if until_seq is None else min(until_seq, self.end)
        if until < max(from_seq, self.start + 1):
            return
        async for record in self.inner.read(max(from_seq, self.start + 1), until, subject):
            if self.mine(record):
                yield record

    async def subscribe(
        self, from_seq: int = 1, subject: str | None = None
    ) -> AsyncIterator[StoredEvent]:
        async for record in self.inner.subscribe(max(from_seq, self.start + 1), subject):
            if self.mine(record):
                yield record


def unprefixed(event: ev.Event, prefix: str) -> ev.Event:
    """The event with the run prefix taken off every name, as the scenario spells them."""
    if not prefix:
        return event

    def strip(value: str) -> str:
        return value[len(prefix) :] if value.startswith(prefix) else value

    changes: dict[str, Any] = {}
    for name in ("task_id", "node", "gpu_uuid", "correlation_id"):
        value = getattr(event, name, None)
        if isinstance(value, str):
            changes[name] = strip(value)
    for name in ("gpu_uuids", "exclude_gpus", "exclude_nodes"):
        values = getattr(event, name, None)
        if values:
            changes[name] = tuple(strip(v) for v in values)
    if isinstance(event, ev.NodeRegistered):
        changes["gpus"] = tuple(msgspec.structs.replace(g, uuid=strip(g.uuid)) for g in event.gpus)
    return msgspec.structs.replace(event, **changes)


# --- the drill -----------------------------------------------------------------------------


class Drill:
    """The engine, the simulated cluster and the clock of one scenario run."""

    def __init__(
        self, scenario: sf.Scenario, log: RunLog, bus: JetStreamCommandBus, prefix: str
    ) -> None:
        self.scenario = scenario
        self.log = log
        self.prefix = prefix
        self.clock = DrillClock(T0)
        policy = scenario.rebuild_policy
        self.liveness = Liveness(policy.node_lost_after_s)
        self.bus = CountingCommandBus(bus)
        self.engine = Engine(log, self.bus, self.clock, policy, liveness=self.liveness)
        self.sim = SimCluster(
            log,
            bus,
            self.clock,
            self.liveness,
            [SimNodeSpec(prefix + n.name, n.gpus, n.model, n.memory_mb) for n in scenario.nodes],
            counting=self.bus,
        )
        self.notes: list[str] = []

    def name(self, value: str) -> str:
        return self.prefix + value

    # --- running ----------------------------------------------------------------------

    async def play(self, tg: anyio.abc.TaskGroup) -> None:
        await tg.start(self.engine.run)
        await tg.start(self.sim.serve)
        await self.sim.register()
        await self.quiesce()
        steps = self.scenario.steps
        for at, group in groupby(steps, key=lambda step: step.at):
            await self.advance_until(T0 + timedelta(seconds=at))
            instant = list(group)
            await self.apply(instant)
            await self.quiesce()
            waits = [s.seconds for s in instant if isinstance(s, sf.RunForStep)]
            if waits:  # run_for: virtual time passes, whatever falls due meanwhile too
                await self.advance_until(T0 + timedelta(seconds=at + max(waits)))
        await self.advance_until(None)

    async def quiesce(self) -> None:
        """Until nothing moves: engine idle, up nodes' commands done, log end unchanged."""
        with anyio.fail_after(QUIESCE_TIMEOUT_S):
            while True:
                before = await self.log.last_seq()
                await self.engine.wait_idle(QUIESCE_TIMEOUT_S)
                await self.sim.wait_handled(QUIESCE_TIMEOUT_S)
                await self.engine.wait_idle(QUIESCE_TIMEOUT_S)
                if await self.log.last_seq() == before and self.sim.backlog() == 0:
                    return

    def next_due(self) -> datetime | None:
        """The next moment after now when something falls due, ignoring up nodes' silence
        (they beat at every moment the clock stops at)."""
        now = self.clock.now()
        dues = [d for d in (next_due(self.engine.state),) if d is not None and d > now]
        down = set(self.sim.down_nodes())
        after = self.liveness.after
        for name, node in self.engine.state.nodes.items():
            if name not in down or not node.alive or name in self.liveness.pending:
                continue
            seen = self.liveness.last_seen.get(name) or self.liveness.started_at
            if seen is not None and seen + after + TICK > now:
                dues.append(seen + after + TICK)
        return min(dues) if dues else None

    async def advance_until(self, target: datetime | None) -> None:
        """Move through every due moment up to `target` (None: until nothing is due)."""
        limit = self.clock.now() + MAX_TAIL
        while True:
            due = self.next_due()
            if target is not None and (due is None or due >= target):
                await self.move_to(target)
                return
            if target is None and (due is None or due > limit):
                return
            assert due is not None
            await self.move_to(due)

    async def move_to(self, moment: datetime) -> None:
        if moment <= self.clock.now():
            return
        self.sim.beat(moment)
        self.clock.advance_to(moment)
        await self.quiesce()

    # --- steps ------------------------------------------------------------------------

    async def apply(self, group: list[sf.Step]) -> None:
        """All steps of one instant, in order. The API's events of consecutive steps go
        in as one atomic batch; a fault on cue goes to the node's runtime or GPU probe,
        and its agent reports it, recorded before the next step is applied."""
        events: list[ev.Event] = []
        for step in group:
            produced = self.step_events(step)
            if produced is None:  # a fault: what came before it goes first
                if events:
                    await self.log.append_batch(events, {})
                    events = []
                await self.sim.wait_handled(QUIESCE_TIMEOUT_S)
            else:
                events.extend(produced)
        if events:
            await self.log.append_batch(events, {})
        if any(isinstance(step, sf.NodeUpStep) for step in group):
            self.clock.nudge()

    def note(self, step: sf.Step, problem: str) -> list[ev.Event]:
        self.notes.append(f"{step.where} {step.kind} at {step.at:g}s: {problem}")
        return []

    def step_events(self, step: sf.Step) -> list[ev.Event] | None:
        """The API's events a step makes, or None for a fault on cue (carried out)."""
        match step:
            case sf.SubmitStep():
                return [self.submitted(step)]
            case sf.CancelStep():
                return [self.cancelled(step)]
            case sf.ExitStep():
                return self.exit(step, step.task, step.attempt, step.code)
            case sf.SignalStep():
                return self.exit(step, step.task, step.attempt, step.exit_code)
            case sf.OomStep():
                return self.exit(step, step.task, step.attempt, OOM_EXIT, oom_killed=True)
            case sf.PreemptStep():
                return self.exit(step, step.task, step.attempt, SIGTERM_EXIT)
            case sf.RuntimeErrorStep():
                code = RUNTIME_ERROR_EXIT
                return self.exit(step, step.task, step.attempt, code, error=step.message)
            case sf.StartErrorStep():
                self.sim.arm_start_error(self.name(step.task), step.message)
                return []
            case sf.XidStep():
                return self.xid(step)
            case sf.NodeDownStep():
                self.sim.node_down(self.name(step.node))
                return []
            case sf.NodeUpStep():
                self.sim.node_up(self.name(step.node))
                return []
            case sf.RunForStep():
                return []  # `play` moves the clock on by its seconds after the instant
        raise AssertionError(f"unhandled step {step!r}")

    def submitted(self, step: sf.SubmitStep) -> ev.Event:
        now = self.clock.now()
        task = self.name(step.task)
        return ev.TaskSubmitted(
            id=new_id(now),
            at=now,
            actor="api",
            correlation_id=task,
            task_id=task,
            name=step.task,
            image=step.image,
            command=step.command,
            gpus=step.gpus,
            gpu_model=step.gpu_model,
            min_gpu_memory_mb=step.min_gpu_memory_mb or 0,
            owner="scenario",
        )

    def cancelled(self, step: sf.CancelStep) -> ev.Event:
        now = self.clock.now()
        task = self.name(step.task)
        return ev.TaskCancelled(
            id=new_id(now),
            at=now,
            actor="api",
            correlation_id=task,
            task_id=task,
            reason="cancelled by owner",
        )

    def exit(
        self,
        step: sf.Step,
        task: str,
        attempt: int | None,
        code: int,
        *,
        oom_killed: bool = False,
        error: str = "",
    ) -> list[ev.Event] | None:
        container = self.sim.running(self.name(task), attempt)
        if container is None:
            which = "" if attempt is None else f" for attempt {attempt}"
            return self.note(step, f"task {task} has no running container{which}; step skipped")
        self.sim.exit(container, exit_code=code, oom_killed=oom_killed, error=error)
        return None

    def xid(self, step: sf.XidStep) -> list[ev.Event] | None:
        if step.gpu is not None:
            self.sim.xid(self.name(step.gpu), step.code)
            return None
        assert step.task is not None
        container = self.sim.latest_container(self.name(step.task))
        if container is None:
            return self.note(step, f"task {step.task} never ran on a GPU; step skipped")
        for uuid in container.gpu_uuids:
            self.sim.xid(uuid, step.code)
        return None

    # --- the verdict ------------------------------------------------------------------

    async def records(self) -> list[StoredEvent]:
        return [record async for record in self.log.read()]


async def run_scenario(
    scenario: sf.Scenario,
    *,
    nats_url: str | None = None,
    export: str | Path | None = None,
    timeout_s: float = SCENARIO_TIMEOUT_S,
    connect_options: dict[str, Any] | None = None,
) -> ScenarioResult:
    """Play one drill and check its expectations (see the module docstring).

    `connect_options` (creds, tls_ca, tls_cert, tls_key) apply to a `nats_url` server.
    """
    started = time.perf_counter()
    async with AsyncExitStack() as stack:
        if nats_url is None:
            from gpuwarden.adapters.embedded_nats import EmbeddedNats

            home = stack.enter_context(tempfile.TemporaryDirectory(prefix="gw-drill-"))
            server = await stack.enter_async_context(EmbeddedNats(Path(home)))
            url, prefix = server.url, ""
        else:
            url, prefix = nats_url, f"d{new_id()[-10:].lower()}-"
        options = connect_options if nats_url is not None else None
        nc = await connect(url, name="gpuwarden-scenario", **(options or {}))
        stack.push_async_callback(nc.close)
        inner = JetStreamEventLog(nc)
        await inner.ensure_streams()
        log = RunLog(inner, prefix, await inner.last_seq())
        drill = Drill(scenario, log, JetStreamCommandBus(nc, poll_s=5.0), prefix)
        try:
            with anyio.fail_after(timeout_s):
                async with anyio.create_task_group() as tg:
                    await drill.play(tg)
                    tg.cancel_scope.cancel()
        except TimeoutError as exc:
            raise SimulationError(
                f"{scenario.source}: the drill did not settle within {timeout_s:g}s "
                f"(virtual time {(drill.clock.now() - T0).total_seconds():g}s)"
            ) from exc
        records = await drill.records()
        if export is not None:
            await _export(log, Path(export))
    admission = Admission()  # as the engine folded them: what it refused does not count
    events = [
        unprefixed(r.event, prefix)
        for r in records
        if r.event is not None and admission.admit(r.subject, r.event) is None
    ]
    observed = observe(events)
    results = check(scenario, observed)
    return ScenarioResult(
        name=scenario.name,
        source=scenario.source,
        passed=all_passed(results),
        expectations=results,
        tasks=observed.tasks,
        gpus=observed.gpus,
        notes=drill.notes,
        events=len(records),
        wall_s=time.perf_counter() - started,
        virtual_s=(drill.clock.now() - T0).total_seconds(),
        records=records,
    )


async def _export(log: RunLog, path: Path) -> None:
    from gpuwarden.projections.export import write_jsonl

    with path.open("w", encoding="utf-8") as out:
        await write_jsonl(log, out)
