"""The node agent: the engine's hands and eyes on one node.

The engine decides; the agent carries out its commands for this node (`gw.cmd.<node>`)
on its container runtime (the `ContainerRuntime` port: Docker on a GPU host, the
in-memory fake in drills and tests) and reports what really happened as catalog
events: starts, start failures with the runtime's own words, exits with code, signal
and OOM flag. It sends heartbeats so the engine can tell a dead node from a quiet one.

Every rule of when to run, stop or answer lives here, and every catalog event the
node writes is built here; the runtime only keeps containers and reports on them.

Everything it appends is an observation of its own node (a guard refuses any other),
with ids derived from the container and the moment of the state change, so the same
exit seen twice -- by the watcher after a reconnect, by a reconcile after a restart --
is stored once (`Nats-Msg-Id`). A command is acked only once its event is stored: an
agent killed midway gets it again, and the container's labels make the rerun find the
container it already started.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import aclosing
from datetime import datetime
from typing import Any, Literal

import anyio
import anyio.abc
import nats.errors
from gpuwarden.adapters.agent_events import bounded, exit_event, observation_event, started_event
from gpuwarden.engine.core.commands import Command, RemoveCommand, RunCommand, StopCommand
from gpuwarden.engine.core.errors import GpuwardenError
from gpuwarden.engine.core.events import (
    ContainerExited,
    ContainerStartFailed,
    Event,
    GpuInfo,
    NodeRegistered,
    derive_id,
    node_subject,
    subject_of,
    task_subject,
    type_of,
)
from gpuwarden.engine.core.fold import evolve
from gpuwarden.engine.core.state import TERMINAL, AttemptState, State, initial_state
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.ports import (
    Clock,
    CommandBus,
    ContainerInfo,
    ContainerObservation,
    ContainerRuntime,
    ContainerRuntimeError,
    ContainerStartError,
    EventLog,
    EventLogError,
    ExitInfo,
    GpuHealth,
    Heartbeats,
    ReceivedCommand,
)

log = logging.getLogger("gpuwarden.agent")

InventorySource = Literal["nvml", "declared", "simulated"]
RUNNING_STATES = frozenset({"running", "restarting", "paused"})
ENDED_STATES = frozenset({"exited", "dead"})
COMMAND_CONCURRENCY = 16
RETRY_DELAY_S = 1.0
WATCH_RETRY_S = 0.5
MAX_REMEMBERED = 4096
ANSWERED = ""  # a run already answered in the log: ack it, start nothing


class ForeignNodeError(GpuwardenError):
    """An agent was about to append an event about a node other than its own."""


class Agent:
    """One node's agent; `run()` until cancelled."""

    def __init__(
        self,
        node: str,
        log: EventLog,
        bus: CommandBus,
        runtime: ContainerRuntime,
        inventory: Sequence[GpuInfo],
        *,
        heartbeats: Heartbeats | None,
        clock: Clock,
        heartbeat_s: float = 1.0,
        inventory_source: InventorySource = "nvml",
        stop_timeout_s: float = 10.0,
        gpu_health: GpuHealth | None = None,
    ) -> None:
        if inventory_source not in ("nvml", "declared", "simulated"):
            raise ValueError(
                f"inventory_source must be 'nvml', 'declared' or 'simulated': {inventory_source!r}"
            )
        self.node = node
        self.actor = f"agent:{node}"
        self.log = log
        self.bus = bus
        self.runtime = runtime
        self.inventory = tuple(inventory)
        self.heartbeats = heartbeats
        self.clock = clock
        self.heartbeat_s = heartbeat_s
        self.inventory_source = inventory_source
        self.stop_timeout_s = stop_timeout_s
        self.gpu_health = gpu_health
        self.ready = anyio.Event()  # registered, reconciled, consuming commands
        self.unknown: list[ContainerInfo] = []  # labelled containers the log does not know
        self._locks = tuple(anyio.Lock() for _ in range(64))
        self._watch_since: datetime | None = None
        self._causes: OrderedDict[str, str] = OrderedDict()  # run command id -> its cause
        # (task, attempt) -> the cause of the stop sent for it: its exit cites that cause
        self._stops: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._recorded: OrderedDict[str, None] = OrderedDict()  # ids this agent stored

    # --- the guard -------------------------------------------------------------------

    async def record(self, event: Event) -> None:
        """Append one observation; only ever about this agent's own node."""
        node = getattr(event, "node", None)
        if node != self.node:
            raise ForeignNodeError(
                f"agent of node {self.node!r} refused to append {type_of(event)} "
                f"{event.id} about node {node!r}"
            )
        if event.id in self._recorded:
            return  # stored already (the log would drop it too; this saves the round trip)
        event = bounded(event)
        await self.log.append(subject_of(event), [event])
        self._recorded[event.id] = None
        while len(self._recorded) > MAX_REMEMBERED:
            self._recorded.popitem(last=False)

    # --- the service -----------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self._announce_inventory()
        async with anyio.create_task_group() as tg:
            if self.heartbeats is not None:  # None: the drills beat on the virtual clock
                tg.start_soon(self._beat_loop, self.heartbeats)
            watching = anyio.Event()
            tg.start_soon(self._watch_loop, watching)
            with anyio.fail_after(30):
                await watching.wait()  # subscribed first: no exit falls between list and stream
            await self.register()
            await self.reconcile()
            tg.start_soon(self._command_loop)
            if self.gpu_health is not None:
                tg.start_soon(self._health_loop, self.gpu_health)
            self.ready.set()
            task_status.started()

    def _announce_inventory(self) -> None:
        if self.inventory_source == "declared":
            models = ", ".join(sorted({gpu.model for gpu in self.inventory})) or "no model"
            log.warning(
                "node %s: declared inventory: %d GPUs (%s), GPU health not watched",
                self.node,
                len(self.inventory),
                models,
            )
        else:
            found = "found by NVML" if self.inventory_source == "nvml" else "simulated"
            log.info("node %s: %d GPUs %s", self.node, len(self.inventory), found)

    async def _beat_loop(self, heartbeats: Heartbeats) -> None:
        while True:
            try:
                await heartbeats.beat(self.node)
            except Exception as exc:  # NATS away: keep trying, the engine will notice
                log.warning("heartbeat of %s failed: %s", self.node, exc)
            await anyio.sleep(self.heartbeat_s)

    # --- registration ----------------------------------------------------------------

    def registration(self) -> NodeRegistered:
        now = self.clock.now()
        return NodeRegistered(
            id=new_id(now),
            at=now,
            actor=self.actor,
            node=self.node,
            runtime=self.runtime.name,
            gpus=self.inventory,
            declared=self.inventory_source == "declared",
        )

    async def register(self) -> bool:
        """Append node.registered, unless the log already has this very registration.

        Re-registering unchanged would revive a node the engine declared lost without
        a `node.recovered`, and that event is what stops its stale containers.
        """
        wanted = self.registration()
        last = await self._last_registration()
        if last is not None and _same_registration(last, wanted):
            log.info("node %s already registered with this inventory", self.node)
            return False
        await self.record(wanted)
        return True

    async def _last_registration(self) -> NodeRegistered | None:
        last = None
        async for stored in self.log.read(subject=node_subject(self.node)):
            if isinstance(stored.event, NodeRegistered) and stored.event.node == self.node:
                last = stored.event
        return last

    # --- reconciliation --------------------------------------------------------------

    async def reconcile(self) -> None:
        """The runtime's containers for this node against what the log says about them."""
        containers = await self.runtime.list_managed()
        state = await self._log_view({info.task_id for info in containers})
        self.unknown = []
        for info in containers:
            await self._reconcile_one(state, info)

    async def _log_view(self, task_ids: set[str]) -> State:
        """The supervisor's fold of just the subjects these containers belong to."""
        records = []
        for subject in sorted({task_subject(t) for t in task_ids if t}):
            records += [r async for r in self.log.read(subject=subject)]
        state = initial_state()
        for record in sorted(records, key=lambda r: r.seq):
            if record.event is not None:
                evolve(state, record.event)
        return state

    async def _reconcile_one(self, state: State, info: ContainerInfo) -> None:
        task = state.tasks.get(info.task_id)
        attempt = task.attempts.get(info.attempt) if task is not None else None
        if attempt is None or attempt.node != self.node:
            self.unknown.append(info)
            log.warning(
                "container %s (%s) is labelled for node %s but the log has no such "
                "attempt; left alone. labels=%s",
                info.container_id[:12],
                info.name,
                self.node,
                info.labels,
            )
            return
        if info.state in RUNNING_STATES:
            await self._adopt(info, attempt, stale=task is None or task.status in TERMINAL)
        elif info.state in ENDED_STATES and attempt.exited is None:
            exit_info = await self.runtime.inspect(info.container_id)
            await self._record_exit(exit_info, info.task_id, info.attempt, attempt.started)

    async def _adopt(self, info: ContainerInfo, attempt: AttemptState, *, stale: bool) -> None:
        """A running container: the watcher follows it; make sure its start is logged."""
        if not attempt.started:
            exit_info = await self.runtime.inspect(info.container_id)
            await self._record_started(exit_info, info.task_id, info.attempt, None)
        if stale or not attempt.live:
            log.warning(
                "container %s of %s attempt %d still runs, but the log says the attempt "
                "ended; waiting for the engine's stop",
                info.container_id[:12],
                info.task_id,
                info.attempt,
            )

    async def _record_started(
        self, info: ExitInfo, task_id: str, attempt: int, causation_id: str | None
    ) -> None:
        if info.started_at is None:
            return
        await self.record(
            started_event(
                info.container_id,
                info.started_at,
                task_id=task_id,
                attempt=attempt,
                node=self.node,
                causation_id=causation_id,
            )
        )

    async def _record_exit(
        self, info: ExitInfo, task_id: str, attempt: int, started_logged: bool
    ) -> None:
        """The start first (so the log reads in order), then the exit; both replay-stable."""
        if info.finished_at is None:
            return
        if not started_logged:
            await self._record_started(info, task_id, attempt, None)
        await self.record(exit_event(info, task_id=task_id, attempt=attempt, node=self.node))

    # --- watching Docker -------------------------------------------------------------

    async def _watch_loop(self, watching: anyio.Event) -> None:
        """Follow Docker's events; after a broken stream, resume from the last moment seen."""
        while True:
            ready = anyio.Event()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_relay, ready, watching)
                    stream = self.runtime.watch(self._watch_since, ready=ready)
                    async with aclosing(stream) as observations:  # type: ignore[type-var]
                        if self._watch_since is None:
                            self._watch_since = self.clock.now()
                        async for observation in observations:
                            await self._on_observation(observation)
                            self._watch_since = max(self._watch_since, observation.at)
                    tg.cancel_scope.cancel()
            except ContainerRuntimeError as exc:
                log.warning(
                    "watching %s on %s: %s; reconnecting", self.runtime.name, self.node, exc
                )
            except EventLogError as exc:
                log.warning("recording an observation on %s failed: %s; retrying", self.node, exc)
            await anyio.sleep(WATCH_RETRY_S)

    async def _on_observation(self, observation: ContainerObservation) -> None:
        if observation.node != self.node:
            return
        cause = self._causes.get(observation.command_id or "")
        if observation.kind == "exited":  # ended by a stop: the stop's cause ended it
            cause = self._stops.get((observation.task_id, observation.attempt), cause)
        if observation.kind == "exited" and observation.exit is not None:
            info = observation.exit
            if info.started_at is not None:
                await self._record_started(info, observation.task_id, observation.attempt, cause)
        await self.record(observation_event(observation, causation_id=cause))

    # --- commands --------------------------------------------------------------------

    async def _command_loop(self) -> None:
        limiter = anyio.CapacityLimiter(COMMAND_CONCURRENCY)
        async with anyio.create_task_group() as tg:
            while True:  # a consumer the server dropped (restart, failover) is made again
                try:
                    async for received in self.bus.receive(self.node):
                        await limiter.acquire_on_behalf_of(received)
                        tg.start_soon(self._serve, received, limiter)
                except (EventLogError, nats.errors.Error) as exc:
                    log.warning("command queue of %s failed, consuming again: %s", self.node, exc)
                    await anyio.sleep(RETRY_DELAY_S)

    async def _serve(self, received: ReceivedCommand, limiter: anyio.CapacityLimiter) -> None:
        command = received.command
        try:
            async with self._lock_for(command):
                done = await self.handle(command)
            if done:
                await received.ack()
            else:
                await received.nak(RETRY_DELAY_S)
        except (EventLogError, nats.errors.Error) as exc:
            log.warning("command %s not acked (%s); it will be redelivered", command.id, exc)
        finally:
            limiter.release_on_behalf_of(received)

    def _lock_for(self, command: Command) -> anyio.Lock:
        """One attempt's commands in order: a stop never overtakes the run it stops."""
        return self._locks[hash((command.task_id, command.attempt)) % len(self._locks)]

    async def handle(self, command: Command) -> bool:
        """Carry out one command; True once its outcome is stored (ack), False to retry."""
        try:
            match command:
                case RunCommand():
                    await self._run(command)
                case StopCommand():
                    self._remember_stop(command)
                    grace = self.stop_timeout_s if command.grace_s is None else command.grace_s
                    stopped = await self.runtime.stop(
                        command.task_id, command.attempt, max(0.0, grace)
                    )
                    if not await self._any_ever_started(stopped):
                        await self._stopped_nothing(command)
                case RemoveCommand():
                    await self.runtime.remove(command.task_id, command.attempt)
        except ContainerRuntimeError as exc:
            log.error(
                "%s of %s on %s failed: %s; retrying",
                _kind(command),
                command.task_id,
                self.node,
                exc,
            )
            return False
        return True

    async def _run(self, command: RunCommand) -> None:
        if command.node != self.node:
            await self._start_failed(
                command, f"run command for node {command.node!r} reached the agent of {self.node!r}"
            )
            return
        refusal = await self._refusal(command.task_id, command.attempt)
        if refusal == ANSWERED:
            return  # a redelivered run: the log already says how this attempt went
        if refusal is not None:
            await self._start_failed(command, f"not started: {refusal}")
            return
        self._remember_cause(command)
        try:
            container_id = await self.runtime.run(command)
        except ContainerStartError as exc:
            await self._start_failed(command, str(exc))
            return
        except EventLogError:
            raise
        except Exception as exc:  # never drop a run silently: the engine must hear of it
            log.exception("run %s failed unexpectedly", command.id)
            await self._start_failed(command, f"{type(exc).__name__}: {exc}")
            return
        try:
            info = await self.runtime.inspect(container_id)
        except ContainerRuntimeError:  # removed already; its run still happened
            now = self.clock.now()
            info = ExitInfo(
                container_id=container_id,
                running=False,
                exit_code=None,
                oom_killed=False,
                signal=None,
                error="",
                started_at=now,
                finished_at=None,
            )
        await self._record_started(info, command.task_id, command.attempt, command.causation_id)

    async def _refusal(self, task_id: str, attempt: int) -> str | None:
        """Why the log says this run must not start a container (None: run it).

        A run can reach the agent after the stop that cancels it (redelivered after an
        agent died mid-run, while the stop found nothing to stop): started then, its
        container would run on GPUs given to another task, and nothing would stop it.
        The cancel (or conclusion) is in the log before any stop for it is sent, so a
        run read after the stop sees it. A run for an attempt whose start, exit or start
        failure is logged already is a redelivery: ANSWERED, and nothing is started
        (its container may be gone, and a new one would run unsupervised).
        """
        state = await self._log_view({task_id})
        task = state.tasks.get(task_id)
        found = None if task is None else task.attempts.get(attempt)
        if task is None or found is None:
            return None
        if not _never_started(found):
            return ANSWERED
        if found.stop_requested or task.status == "cancelled":
            return f"task {task_id} was cancelled before its container started"
        if found.classified is not None:
            return f"attempt {attempt} was already concluded ({found.classified.fault})"
        if task.status in TERMINAL:
            return f"task {task_id} already {task.status}"
        return None

    async def _any_ever_started(self, stopped: list[str]) -> bool:
        """Whether any of the attempt's stopped containers ever ran. Ones that never did
        (created by an agent killed before it started them) are removed, one by one and
        without force: the attempt then counts as never started here, and is answered
        as such. Whatever cannot be told or removed counts as having run (no answer;
        its exit, if any, comes through the watcher)."""
        never = []
        for container_id in stopped:
            try:
                info = await self.runtime.inspect(container_id)
            except ContainerRuntimeError:
                return True  # a daemon hiccup is no proof it never ran
            if info.running or info.started_at is not None:
                return True
            never.append(container_id)
        for container_id in never:
            try:
                await self.runtime.discard(container_id)
            except ContainerRuntimeError:
                return True  # started meanwhile, by someone else: it runs
        return False

    async def _stopped_nothing(self, command: StopCommand) -> None:
        """A stop that found no container: say what became of the attempt, if the log
        does not know yet.

        The engine holds an ended attempt's GPUs until its container's end is logged.
        An attempt that never started here (its run lost with an engine that died
        before sending it) is answered with a start failure; one that started but whose
        container is gone without a logged exit (removed while this agent was down) is
        answered with an exit of unknown code. Without either, the GPUs would wait for
        the node's loss.
        """
        state = await self._log_view({command.task_id})
        task = state.tasks.get(command.task_id)
        found = None if task is None else task.attempts.get(command.attempt)
        if found is None or found.node != self.node:
            return
        if found.exited is not None or found.start_failed is not None:
            return
        common: dict[str, Any] = {
            "at": self.clock.now(),
            "actor": self.actor,
            "causation_id": command.causation_id,
            "correlation_id": command.task_id,
            "task_id": command.task_id,
            "attempt": command.attempt,
            "node": self.node,
        }
        if not found.started:
            error = "not started: stopped before its container started"
            never = ContainerStartFailed(
                id=derive_id(command.id, "never_started"), error=error, **common
            )
            await self.record(never)
            return
        gone = ContainerExited(
            id=derive_id(command.id, "gone"),
            container_id=found.container_id or command.container_id or "",
            error="container gone: none found when asked to stop it",
            **common,
        )
        await self.record(gone)

    def _remember_cause(self, command: RunCommand) -> None:
        """The watcher may see the start first: it cites the same cause as the command."""
        if command.causation_id is not None:
            self._causes[command.id] = command.causation_id
            while len(self._causes) > MAX_REMEMBERED:
                self._causes.popitem(last=False)

    def _remember_stop(self, command: StopCommand) -> None:
        """The exit a stop brings about is reported by the watcher: it cites the stop's
        cause (the decision that asked for it), not the run's."""
        if command.causation_id is not None:
            self._stops[(command.task_id, command.attempt)] = command.causation_id
            while len(self._stops) > MAX_REMEMBERED:
                self._stops.popitem(last=False)

    async def _start_failed(self, command: RunCommand, error: str) -> None:
        now = self.clock.now()
        await self.record(
            ContainerStartFailed(
                id=derive_id(command.id, "start_failed"),
                at=now,
                actor=self.actor,
                causation_id=command.causation_id,
                correlation_id=command.task_id,
                task_id=command.task_id,
                attempt=command.attempt,
                node=self.node,
                error=error,
            )
        )

    # --- GPU health ------------------------------------------------------------------

    async def _health_loop(self, health: GpuHealth) -> None:
        faults = health.watch()
        try:
            async for fault in faults:
                while True:  # a fault the log cannot take now is kept until it can
                    try:
                        await self.record(fault)
                        break
                    except EventLogError as exc:
                        log.warning("gpu.fault of %s not stored yet: %s", fault.gpu_uuid, exc)
                        await anyio.sleep(RETRY_DELAY_S)
        finally:
            close = getattr(faults, "aclose", None)  # stops the probe's reader thread
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()


async def _relay(source: anyio.Event, target: anyio.Event) -> None:
    await source.wait()
    target.set()


def _never_started(attempt: AttemptState) -> bool:
    return not attempt.started and attempt.exited is None and attempt.start_failed is None


def _kind(command: Command) -> str:
    return type(command).__name__.removesuffix("Command").lower()


def _same_registration(a: NodeRegistered, b: NodeRegistered) -> bool:
    return (a.runtime, a.gpus, a.declared) == (b.runtime, b.gpus, b.declared)
