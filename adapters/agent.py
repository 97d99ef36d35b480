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

The agent outlives every fault of what it stands on. An observation the log does not
take now (NATS away, no stream leader, a full stream, a timeout) waits in the outbox
(adapters/agent_outbox.py: bounded, persisted in the agent's state directory) and is
appended, in order, once the log takes writes again; it says so once at warning level
("event log unreachable: ...; N observations buffered ..."), and again when the log
takes them ("event log takes writes again: ..."). A command counts as done once its
outcome is kept, in the log or in the persisted outbox: the outbox is fsynced before
the ack, replayed first after a restart, and its ids are stable, so the outcome reaches
the log exactly once either way (a command held unacked instead would be redelivered
into the same full log, over and over, while blocking nothing it protects). A full
outbox keeps the oldest and stops taking commands until there is room. A broken Docker
event stream is followed again, with a reconcile once it answers (a restarted daemon
replays nothing); a failing GPU probe is watched again; every retry backs off, capped.
On a graceful stop (SIGTERM) it tells the engine, with a last heartbeat, when it will
be back (`restart_window_s`), so an upgrade does not fail its node over.

Size: over 600 lines because every run/stop rule and every outage rule of the node
lives here, on purpose (see above); the events it writes are built in agent_events.py
and the outbox is agent_outbox.py.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from datetime import datetime
from functools import partial
from typing import Any, Final, Literal

import anyio
import anyio.abc
from gpuwarden.adapters.agent_events import (
    bounded,
    exit_event,
    observation_event,
    started_event,
    superseded_by,
)
from gpuwarden.adapters.agent_outbox import LOG_TROUBLE, Courier, Outbox, next_backoff, why
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
INSPECT_RETRIES_S: Final = (0.1, 0.3)  # pauses before asking a daemon again
GOODBYE_S: Final = 2.0  # how long the last heartbeat of a graceful stop may take


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
        outbox: Outbox | None = None,
        restart_window_s: float | None = None,
    ) -> None:
        """`outbox`: where observations wait while the log takes no writes (None: one
        in memory). `restart_window_s`: announced in the last heartbeat of a graceful
        stop, "back within this long" (None or 0: no announcement)."""
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
        self.courier = Courier(node, log, outbox if outbox is not None else Outbox())
        self.restart_window_s = restart_window_s
        self.ready = anyio.Event()  # registered, reconciled, consuming commands
        self.unknown: list[ContainerInfo] = []  # labelled containers the log does not know
        self._locks = tuple(anyio.Lock() for _ in range(64))
        self._watch_since: datetime | None = None
        self._watch_broken: str | None = None  # why the runtime's stream broke, until back
        self._reconcile_wanted = anyio.Event()
        self._causes: OrderedDict[str, str] = OrderedDict()  # run command id -> its cause
        # (task, attempt) -> the cause of the stop sent for it: its exit cites that cause
        self._stops: OrderedDict[tuple[str, int], str] = OrderedDict()

    # --- the guard -------------------------------------------------------------------

    @property
    def outbox(self) -> Outbox:
        return self.courier.outbox

    async def record(self, event: Event) -> None:
        """Keep one observation, only ever about this agent's own node: stored in the
        log, or, while the log takes no writes, in the outbox behind the older ones."""
        node = getattr(event, "node", None)
        if node != self.node:
            raise ForeignNodeError(
                f"agent of node {self.node!r} refused to append {type_of(event)} "
                f"{event.id} about node {node!r}"
            )
        await self.courier.send(bounded(event))

    # --- the service -----------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self._announce_inventory()
        try:
            async with anyio.create_task_group() as tg:
                if self.heartbeats is not None:  # None: the drills beat on the virtual clock
                    tg.start_soon(self._beat_loop, self.heartbeats)
                tg.start_soon(self.courier.run)
                watching = anyio.Event()
                tg.start_soon(self._watch_loop, watching)
                await watching.wait()  # subscribed first: no exit falls between list and stream
                await self._until_done("registration", self.register)
                await self._until_done("reconciliation", self.reconcile)
                tg.start_soon(self._reconcile_loop)
                tg.start_soon(self._command_loop)
                if self.gpu_health is not None:
                    tg.start_soon(self._health_loop, self.gpu_health)
                self.ready.set()
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                await self._leave()

    async def _until_done(self, what: str, step: Callable[[], Awaitable[Any]]) -> None:
        """Run `step` until it succeeds: the log or the runtime may be away for a while."""
        backoff = 0.0
        failed = False
        while True:
            try:
                await step()
            except Exception as exc:
                if not failed:
                    log.warning("node %s: %s failed: %s; retrying", self.node, what, why(exc))
                failed = True
                backoff = next_backoff(backoff)
                await anyio.sleep(backoff)
                continue
            if failed:
                log.warning("node %s: %s done", self.node, what)
            return

    async def _leave(self) -> None:
        """A graceful stop's last words: what stays unsent, and when the node is back."""
        self.courier.say_kept()
        if self.heartbeats is None or not self.restart_window_s:
            return
        try:
            with anyio.fail_after(GOODBYE_S):
                await self.heartbeats.beat(self.node, away_s=self.restart_window_s)
        except Exception as exc:
            log.warning("node %s: could not announce its restart window: %s", self.node, exc)
            return
        log.info(
            "node %s: told the engine it is back within %g s", self.node, self.restart_window_s
        )

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
        failing = False
        while True:
            try:
                await heartbeats.beat(self.node)
                failing = False
            except Exception as exc:  # NATS away: keep trying, the engine will notice
                if not failing:
                    log.warning("heartbeat of %s failed: %s; still beating", self.node, exc)
                failing = True
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
        events = await self._log_events({info.task_id for info in containers})
        state = _fold(events)
        unknown: list[ContainerInfo] = []
        for info in containers:
            await self._reconcile_one(state, events, info, unknown)
        self.unknown = unknown

    async def _reconcile_loop(self) -> None:
        """Reconcile again whenever the runtime's event stream comes back after a break:
        what happened meanwhile may never be replayed (a restarted daemon forgets)."""
        while True:
            await self._reconcile_wanted.wait()
            self._reconcile_wanted = anyio.Event()
            await self._until_done("reconciliation", self.reconcile)

    async def _log_events(self, task_ids: set[str]) -> list[Event]:
        """The log's events of these tasks, then this agent's own about them that wait in
        the outbox: what the log will say once it has them."""
        subjects = {task_subject(t) for t in task_ids if t}
        records = []
        for subject in sorted(subjects):
            records += [r async for r in self.log.read(subject=subject)]
        stored = [r.event for r in sorted(records, key=lambda r: r.seq) if r.event is not None]
        waiting = [e for e in self.outbox.pending() if _task_subject_of(e) in subjects]
        return stored + waiting

    async def _log_view(self, task_ids: set[str]) -> State:
        """The supervisor's fold of just the subjects these tasks belong to."""
        return _fold(await self._log_events(task_ids))

    async def _reconcile_one(
        self, state: State, events: list[Event], info: ContainerInfo, unknown: list[ContainerInfo]
    ) -> None:
        task = state.tasks.get(info.task_id)
        attempt = task.attempts.get(info.attempt) if task is not None else None
        if attempt is None or attempt.node != self.node:
            unknown.append(info)
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
            await self._adopt(info, attempt, superseded_by(events, info.task_id, info.attempt))
        elif info.state in ENDED_STATES and attempt.exited is None:
            exit_info = await self.runtime.inspect(info.container_id)
            await self._record_exit(exit_info, info.task_id, info.attempt, attempt.started)

    async def _adopt(self, info: ContainerInfo, attempt: AttemptState, ended: Event | None) -> None:
        """A running container: the watcher follows it; make sure its start is logged.

        One whose attempt the log has concluded or superseded (classified, rebuilt, the
        task ended) runs on GPUs the engine may have given to another: it is killed at
        once, and its exit cites the event that ended its attempt."""
        if not attempt.started:
            exit_info = await self.runtime.inspect(info.container_id)
            await self._record_started(exit_info, info.task_id, info.attempt, None)
        if ended is None:
            if not attempt.live:
                log.warning(
                    "container %s of %s attempt %d still runs, but the log says the "
                    "attempt ended; waiting for the engine's stop",
                    info.container_id[:12],
                    info.task_id,
                    info.attempt,
                )
            return
        log.warning(
            "container %s of %s attempt %d still runs after %s %s; stopping it at once",
            info.container_id[:12],
            info.task_id,
            info.attempt,
            type_of(ended),
            ended.id,
        )
        self._stops[(info.task_id, info.attempt)] = ended.id  # the watcher cites it too
        await self.runtime.stop(info.task_id, info.attempt, 0.0)
        stopped = await self.runtime.inspect(info.container_id)
        if stopped.finished_at is not None and attempt.exited is None:
            await self.record(
                exit_event(
                    stopped,
                    task_id=info.task_id,
                    attempt=info.attempt,
                    node=self.node,
                    causation_id=ended.id,
                )
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

    # --- watching the runtime ----------------------------------------------------------

    async def _watch_loop(self, watching: anyio.Event) -> None:
        """Follow the runtime's events; after a broken stream, resume from the last moment
        seen, with a capped backoff while the runtime does not answer."""
        backoff = 0.0
        while True:
            ready = anyio.Event()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._subscribed, ready, watching)
                    stream = self.runtime.watch(self._watch_since, ready=ready)
                    async with aclosing(stream) as observations:  # type: ignore[type-var]
                        if self._watch_since is None:
                            self._watch_since = self.clock.now()
                        async for observation in observations:
                            await self._on_observation(observation)
                            self._watch_since = max(self._watch_since, observation.at)
                            backoff = 0.0
                    tg.cancel_scope.cancel()
            except Exception as exc:  # the task group's ExceptionGroup included
                if ready.is_set():
                    backoff = 0.0  # it did answer: a fresh streak
                broken = why(exc)
                if self._watch_broken is None:
                    log.warning(
                        "node %s: watching %s failed: %s; following it again once it answers",
                        self.node,
                        self.runtime.name,
                        broken,
                    )
                self._watch_broken = broken
            backoff = next_backoff(backoff) if self._watch_broken else WATCH_RETRY_S
            await anyio.sleep(backoff)

    async def _subscribed(self, ready: anyio.Event, watching: anyio.Event) -> None:
        """Once the runtime has the subscription: the agent may start, and after a break,
        what happened meanwhile is reconciled."""
        await ready.wait()
        watching.set()
        if self._watch_broken is not None:
            log.warning(
                "node %s: %s answers again (it failed: %s); reconciling",
                self.node,
                self.runtime.name,
                self._watch_broken,
            )
            self._watch_broken = None
            self._reconcile_wanted.set()

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
        backoff = 0.0
        async with anyio.create_task_group() as tg:
            while True:  # a consumer the server dropped (restart, failover) is made again
                try:
                    async for received in self.bus.receive(self.node):
                        backoff = 0.0
                        await limiter.acquire_on_behalf_of(received)
                        tg.start_soon(self._serve, received, limiter)
                        # A full outbox could not keep another outcome: take no more.
                        await self.outbox.wait(lambda: not self.outbox.full)
                except Exception as exc:
                    log.warning("command queue of %s failed, consuming again: %s", self.node, exc)
                backoff = next_backoff(backoff)
                await anyio.sleep(max(backoff, RETRY_DELAY_S))

    async def _serve(self, received: ReceivedCommand, limiter: anyio.CapacityLimiter) -> None:
        command = received.command
        try:
            if self.outbox.full:  # taken before it filled: give it back, untouched
                await received.nak(RETRY_DELAY_S)
                return
            async with self._lock_for(command):
                done = await self.handle(command)
            if done:
                await received.ack()
            else:
                await received.nak(RETRY_DELAY_S)
        except LOG_TROUBLE as exc:
            log.warning("command %s not acked (%s); it will be redelivered", command.id, exc)
        except Exception:  # never the end of the agent: the command comes again
            log.exception("command %s failed; it will be redelivered", command.id)
        finally:
            limiter.release_on_behalf_of(received)

    def _lock_for(self, command: Command) -> anyio.Lock:
        """One attempt's commands in order: a stop never overtakes the run it stops."""
        return self._locks[hash((command.task_id, command.attempt)) % len(self._locks)]

    async def handle(self, command: Command) -> bool:
        """Carry out one command; True once its outcome is kept (ack), False to retry.

        Kept means stored in the log, or in the outbox while the log takes no writes:
        fsynced in the state directory, sent first after a restart, with a stable id."""
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
        info = await self._inspect_started(container_id)
        await self._record_started(info, command.task_id, command.attempt, command.causation_id)

    async def _inspect_started(self, container_id: str) -> ExitInfo:
        """How a container it just ran stands. A daemon hiccup is asked again a few
        times: the start's id derives from its start time, and a stand-in time would
        log the same start twice (the watcher reports the real one)."""
        for delay in INSPECT_RETRIES_S:
            try:
                return await self.runtime.inspect(container_id)
            except ContainerRuntimeError:
                await anyio.sleep(delay)
        try:
            return await self.runtime.inspect(container_id)
        except ContainerRuntimeError:  # removed already; its run still happened
            return ExitInfo(
                container_id=container_id,
                running=False,
                exit_code=None,
                oom_killed=False,
                signal=None,
                error="",
                started_at=self.clock.now(),
                finished_at=None,
            )

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
        """Record every GPU fault the probe reports; a probe that fails is watched again."""
        backoff = 0.0
        while True:
            faults = health.watch()
            try:
                async for fault in faults:  # kept, in the log or the outbox, come what may
                    await self._until_done(f"keeping {fault.id}", partial(self.record, fault))
                    backoff = 0.0
            except Exception as exc:
                log.warning(
                    "node %s: watching GPU health failed: %s; watching again", self.node, exc
                )
            finally:
                close = getattr(faults, "aclose", None)  # stops the probe's reader thread
                if close is not None:
                    with anyio.CancelScope(shield=True):
                        await close()
            backoff = next_backoff(backoff)
            await anyio.sleep(backoff)


def _fold(events: Sequence[Event]) -> State:
    state = initial_state()
    for event in events:
        evolve(state, event)
    return state


def _task_subject_of(event: Event) -> str | None:
    task_id = getattr(event, "task_id", None)
    return task_subject(task_id) if isinstance(task_id, str) else None


def _never_started(attempt: AttemptState) -> bool:
    return not attempt.started and attempt.exited is None and attempt.start_failed is None


def _kind(command: Command) -> str:
    return type(command).__name__.removesuffix("Command").lower()


def _same_registration(a: NodeRegistered, b: NodeRegistered) -> bool:
    return (a.runtime, a.gpus, a.declared) == (b.runtime, b.gpus, b.declared)
