"""The supervisor: the state-machine projector of EP4224317A1 as two pure functions.

`evolve(state, event)` folds one event into the state (in place, and returns it:
the fold owns its state). `decide(state, event, now)` returns the decisions that
`event` — already folded — leads to, plus every timer that is due at `now`
(evidence windows, backoff). `event=None` means only a timer is due.

Decisions are grouped: each group is one atomic append (the task, the GPUs it
leaves and the GPUs it takes), and its ids derive from the event the decision is
about, so a retry or a replay re-derives them bit for bit.

Nothing here reads a clock, draws a random number or does I/O.
"""

from __future__ import annotations

import bisect
import heapq
from bisect import bisect_left, insort
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from gpuwarden.engine.commands import Command, RunCommand, StopCommand
from gpuwarden.engine.events import (
    ContainerExited,
    ContainerStarted,
    ContainerStartFailed,
    Event,
    FaultClassified,
    GpuAllocated,
    GpuFault,
    GpuQuarantined,
    GpuReleased,
    GpuRestored,
    NodeLost,
    NodeRecovered,
    NodeRegistered,
    RebuildDecided,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskPending,
    TaskScheduled,
    TaskSubmitted,
    derive_id,
)
from gpuwarden.engine.faults import (
    DEFAULT_TABLE,
    AttemptEvidence,
    Classification,
    FaultTable,
    classify,
    gpu_fault_class,
)
from gpuwarden.engine.placement import (
    NoFit,
    Placement,
    PlacementRequest,
    first_fit,
    why_not,
)
from gpuwarden.engine.policy import DEFAULT_POLICY, Policy, Verdict, judge

ENGINE = "engine"
GPU_FAULT_MEMORY = 16  # recent faults kept per GPU: evidence windows are seconds long

TERMINAL = frozenset({"completed", "failed", "cancelled"})


# --- state -------------------------------------------------------------------------


@dataclass(slots=True)
class GpuState:
    uuid: str
    node: str
    index: int
    model: str
    memory_mb: int
    quarantined: bool = False
    holder: tuple[str, int] | None = None  # (task_id, attempt)
    faults: list[GpuFault] = field(default_factory=list)


@dataclass(slots=True)
class NodeState:
    name: str
    runtime: str
    gpus: list[str] = field(default_factory=list)
    alive: bool = True
    lost: NodeLost | None = None
    free: int = 0  # GPUs neither held nor quarantined (an index for placement)
    recovered_at: datetime | None = None  # its last node.recovered
    attempts: dict[tuple[str, int], None] = field(default_factory=dict)  # scheduled here


@dataclass(slots=True)
class AttemptState:
    n: int
    node: str
    gpu_uuids: tuple[str, ...]
    scheduled: TaskScheduled
    container_id: str | None = None
    started: bool = False
    exited: ContainerExited | None = None
    start_failed: ContainerStartFailed | None = None
    node_lost: NodeLost | None = None
    stop_requested: bool = False
    classified: FaultClassified | None = None
    released: bool = False  # its GPUs were given back

    @property
    def live(self) -> bool:
        """Scheduled and not yet known to have ended."""
        return (
            self.exited is None
            and self.start_failed is None
            and self.classified is None
            and not self.released
        )


@dataclass(slots=True)
class TaskState:
    spec: TaskSubmitted
    order: int  # submission order, for placing pending tasks fairly
    status: str = "pending"  # pending | waiting | running | completed | failed | cancelled
    attempts: dict[int, AttemptState] = field(default_factory=dict)
    next_attempt: int = 1  # the attempt that placement will create next
    rebuild: RebuildDecided | None = None  # the decided rebuild awaiting placement
    pending_reason: str | None = None
    pendings: int = 0  # task.pending events so far: a reason that comes back needs a new id
    counted_rebuilds: list[datetime] = field(default_factory=list)
    rebuilds: int = 0
    failure: TaskFailed | None = None

    @property
    def current(self) -> AttemptState | None:
        return self.attempts.get(self.next_attempt - 1)


@dataclass(order=True, frozen=True, slots=True)
class Timer:
    due: datetime
    kind: str  # "evidence" (after an exit) | "fault" (a hardware fault, no exit) | "backoff"
    task_id: str
    attempt: int


@dataclass(slots=True)
class State:
    policy: Policy = DEFAULT_POLICY
    table: FaultTable = DEFAULT_TABLE
    nodes: dict[str, NodeState] = field(default_factory=dict)
    gpus: dict[str, GpuState] = field(default_factory=dict)
    tasks: dict[str, TaskState] = field(default_factory=dict)
    waiting: dict[str, None] = field(default_factory=dict)  # set: awaiting placement
    waiting_orders: list[int] = field(default_factory=list)  # their submission orders, sorted
    by_order: list[str] = field(default_factory=list)  # task id by submission order
    timers: list[Timer] = field(default_factory=list)  # heap; stale entries are skipped
    submitted: int = 0
    events: int = 0
    # Nodes with a free GPU as (free GPUs, name), sorted: placement's order of preference,
    # kept up by the fold so a placement is a bisect, not a sort of every node.
    free_ranked: list[tuple[int, str]] = field(default_factory=list)


def initial_state(policy: Policy = DEFAULT_POLICY, table: FaultTable | None = None) -> State:
    """An empty cluster under a policy; the evidence window comes from the policy."""
    if table is None:
        table = FaultTable(window_s=policy.evidence_window_s)
    return State(policy=policy, table=table)


# --- evolve ------------------------------------------------------------------------


def evolve(state: State, event: Event) -> State:
    """Fold one event. Total: an event about something unknown changes nothing."""
    handler = _EVOLVE.get(type(event))
    state.events += 1
    if handler is not None:
        handler(state, event)
        if state.timers and type(event) in _SETTLES_TIMERS:
            _drop_stale_timers(state)
    return state


def _timer_valid(state: State, timer: Timer) -> bool:
    task = state.tasks.get(timer.task_id)
    if task is None or task.status in TERMINAL:
        return False
    if timer.kind == "evidence":
        attempt = task.attempts.get(timer.attempt)
        return attempt is not None and attempt.classified is None and not attempt.stop_requested
    if timer.kind == "fault":  # still running on a GPU that failed under it
        found = _current_open(state, timer.task_id, timer.attempt)
        return found is not None and found[1].live and _hung_on(state, found[1]) is not None
    rebuild = task.rebuild
    return (
        task.status == "waiting"
        and rebuild is not None
        and rebuild.attempt == timer.attempt
        and task.pending_reason is None
    )


def _hung_on(state: State, attempt: AttemptState) -> GpuFault | None:
    """A hardware-class fault still on record for one of the attempt's GPUs (a restore
    clears a GPU's faults: the attempt then runs on)."""
    for uuid in attempt.gpu_uuids:
        gpu = state.gpus.get(uuid)
        if gpu is not None:
            for fault in gpu.faults:
                if _is_hardware(fault, state.table):
                    return fault
    return None


def awaits_kill(state: State, attempt: AttemptState) -> bool:
    """Ended by gpuwarden while its process may still run: concluded on a GPU fault under
    it (a hung process) or cancelled by its owner. Its GPUs are given back when its exit
    or a start failure is recorded, or its node is lost; until then its memory may still
    be on them, and the next task placed there would find them full.

    A cancelled attempt waits even if its start is not logged yet: its run command may
    be on its way to the agent, which answers a run or a stop of an attempt that never
    started with a start failure (a hung process has, by definition, started).
    """
    classified = attempt.classified
    hung = classified is not None and classified.fault == "gpu_hardware" and attempt.started
    node = state.nodes.get(attempt.node)
    return (
        (attempt.stop_requested or hung)
        and attempt.exited is None
        and attempt.start_failed is None
        and attempt.node_lost is None
        and node is not None
        and node.alive
    )


def _drop_stale_timers(state: State) -> None:
    while state.timers and not _timer_valid(state, state.timers[0]):
        heapq.heappop(state.timers)


def next_due(state: State) -> datetime | None:
    """When decide must next be called with no event (a timer), if ever."""
    return state.timers[0].due if state.timers else None


def _is_free(gpu: GpuState) -> bool:
    return gpu.holder is None and not gpu.quarantined


def _refree(state: State, gpu: GpuState, was_free: bool) -> None:
    """Keep the node's free count and the free-node index in step with one GPU."""
    now_free = _is_free(gpu)
    if now_free == was_free:
        return
    node = state.nodes.get(gpu.node)
    if node is None or gpu.uuid not in node.gpus:
        return  # a GPU its node no longer lists (re-registered without it) counts nowhere
    _set_free(state, node, node.free + (1 if now_free else -1))


def _set_free(state: State, node: NodeState, free: int) -> None:
    """Change a node's free count and move it within the ranked free-node index."""
    ranked = state.free_ranked
    if node.free > 0:
        key = (node.free, node.name)
        i = bisect_left(ranked, key)
        if i < len(ranked) and ranked[i] == key:
            del ranked[i]
    node.free = free
    if free > 0:
        insort(ranked, (free, node.name))


def _on_node_registered(state: State, e: NodeRegistered) -> None:
    node = state.nodes.get(e.node)
    if node is None:
        node = state.nodes[e.node] = NodeState(name=e.node, runtime=e.runtime)
    node.runtime = e.runtime
    # A lost node that registers again stays lost until its heartbeats bring a
    # node.recovered: that event is what stops the containers rebuilt elsewhere.
    uuids = []
    for info in e.gpus:
        gpu = state.gpus.get(info.uuid)
        if gpu is None:
            state.gpus[info.uuid] = GpuState(
                uuid=info.uuid,
                node=e.node,
                index=info.index,
                model=info.model,
                memory_mb=info.memory_mb,
            )
        else:
            gpu.node, gpu.index, gpu.model, gpu.memory_mb = (
                e.node,
                info.index,
                info.model,
                info.memory_mb,
            )
        uuids.append(info.uuid)
    node.gpus = uuids
    _set_free(state, node, sum(1 for u in uuids if _is_free(state.gpus[u])))


def _on_node_lost(state: State, e: NodeLost) -> None:
    node = state.nodes.get(e.node)
    if node is None:
        return
    node.alive = False
    node.lost = e
    for _, attempt in _attempts_on(state, node, prune=True):
        attempt.node_lost = e
    # An ended attempt still waiting for its exit (awaits_kill) waits no more: its
    # container went with the node, and a recovery folded before this loss is decided
    # must not make it wait again.
    for _, held in _ended_holders(state, node):
        if held.node_lost is None:
            held.node_lost = e


def _holds_gpus(state: State, key: tuple[str, int]) -> bool:
    attempt = _attempt(state, *key)
    if attempt is None:
        return False
    for uuid in attempt.gpu_uuids:
        gpu = state.gpus.get(uuid)
        if gpu is not None and gpu.holder == key:
            return True
    return False


def _ended_holders(state: State, node: NodeState) -> list[tuple[str, AttemptState]]:
    """Attempts scheduled on the node, concluded or cancelled, that still hold GPUs
    (wherever those GPUs are listed now: a node may re-register without one)."""
    found = []
    for key in node.attempts:
        attempt = _attempt(state, *key)
        if attempt is not None and _ended(attempt) and _holds_gpus(state, key):
            found.append((key[0], attempt))
    return found


def _attempts_on(
    state: State, node: NodeState, *, prune: bool = False
) -> list[tuple[TaskState, AttemptState]]:
    """Current, unclassified attempts on a node (evolve may prune finished entries, but
    not one that still holds GPUs: `_ended_holders` finds those here)."""
    found = []
    for key in list(node.attempts):
        task = state.tasks.get(key[0])
        attempt = task.current if task is not None else None
        if attempt is None or attempt.n != key[1] or attempt.classified is not None:
            if prune and not _holds_gpus(state, key):
                del node.attempts[key]
        elif task is not None and task.status not in TERMINAL:
            found.append((task, attempt))
    return found


def _on_node_recovered(state: State, e: NodeRecovered) -> None:
    node = state.nodes.get(e.node)
    if node is not None:
        node.alive = True
        node.lost = None
        node.recovered_at = e.at


def _on_gpu_fault(state: State, e: GpuFault) -> None:
    gpu = state.gpus.get(e.gpu_uuid)
    if gpu is None:
        return
    gpu.faults.append(e)
    if len(gpu.faults) > GPU_FAULT_MEMORY:
        # Forget the oldest fault, but a hardware-class one only when nothing else is
        # left: a storm of Xid 45s must not erase the Xid 48 it follows.
        hardware = [_is_hardware(f, state.table) for f in gpu.faults]
        del gpu.faults[hardware.index(False) if False in hardware else 0]


def _is_hardware(fault: GpuFault, table: FaultTable) -> bool:
    return gpu_fault_class(fault, table) in ("gpu_hardware", "gpu_node")


def _on_gpu_quarantined(state: State, e: GpuQuarantined) -> None:
    gpu = state.gpus.get(e.gpu_uuid)
    if gpu is None:
        return
    was = _is_free(gpu)
    gpu.quarantined = True
    _refree(state, gpu, was)
    holder = gpu.holder
    if holder is not None and _current_open(state, *holder) is not None:
        # A process hung on a broken GPU may never exit: if it has not when the evidence
        # window closes, the attempt is concluded without an exit. The window runs from
        # the engine's own quarantine, not from the agent's clock.
        due = e.at + timedelta(seconds=state.table.window_s)
        heapq.heappush(state.timers, Timer(due, "fault", *holder))


def _on_gpu_restored(state: State, e: GpuRestored) -> None:
    gpu = state.gpus.get(e.gpu_uuid)
    if gpu is not None:
        was = _is_free(gpu)
        gpu.quarantined = False
        gpu.faults.clear()  # faults before a restore are settled
        _refree(state, gpu, was)


def _on_gpu_allocated(state: State, e: GpuAllocated) -> None:
    gpu = state.gpus.get(e.gpu_uuid)
    if gpu is not None:
        was = _is_free(gpu)
        gpu.holder = (e.task_id, e.attempt)
        _refree(state, gpu, was)


def _on_gpu_released(state: State, e: GpuReleased) -> None:
    gpu = state.gpus.get(e.gpu_uuid)
    if gpu is not None and gpu.holder == (e.task_id, e.attempt):
        gpu.holder = None
        _refree(state, gpu, False)
    task = state.tasks.get(e.task_id)
    if task is not None and e.attempt in task.attempts:
        task.attempts[e.attempt].released = True


def _on_task_submitted(state: State, e: TaskSubmitted) -> None:
    if e.task_id in state.tasks:
        return  # a duplicate submission never replaces a task
    task = state.tasks[e.task_id] = TaskState(spec=e, order=state.submitted)
    state.submitted += 1
    state.by_order.append(e.task_id)
    _wait(state, task)


def _wait(state: State, task: TaskState) -> None:
    """Put a task among those awaiting placement, keeping submission order."""
    if task.spec.task_id not in state.waiting:
        state.waiting[task.spec.task_id] = None
        bisect.insort(state.waiting_orders, task.order)


def _unwait(state: State, task: TaskState) -> None:
    if state.waiting.pop(task.spec.task_id, 0) is None:
        index = bisect.bisect_left(state.waiting_orders, task.order)
        del state.waiting_orders[index]


def _on_task_pending(state: State, e: TaskPending) -> None:
    task = state.tasks.get(e.task_id)
    if task is not None:
        task.pending_reason = e.reason
        task.pendings += 1


def _on_task_scheduled(state: State, e: TaskScheduled) -> None:
    task = state.tasks.get(e.task_id)
    if task is None:
        return
    task.attempts[e.attempt] = AttemptState(
        n=e.attempt, node=e.node, gpu_uuids=e.gpu_uuids, scheduled=e
    )
    task.next_attempt = e.attempt + 1
    task.status = "running"
    task.pending_reason = None
    task.rebuild = None
    _unwait(state, task)
    node = state.nodes.get(e.node)
    if node is not None:
        node.attempts[(e.task_id, e.attempt)] = None
        if not node.alive:
            task.attempts[e.attempt].node_lost = node.lost


def _attempt(state: State, task_id: str, n: int) -> AttemptState | None:
    task = state.tasks.get(task_id)
    return None if task is None else task.attempts.get(n)


def _on_container_started(state: State, e: ContainerStarted) -> None:
    attempt = _attempt(state, e.task_id, e.attempt)
    if attempt is not None:
        attempt.started = True
        attempt.container_id = e.container_id


def _on_container_start_failed(state: State, e: ContainerStartFailed) -> None:
    attempt = _attempt(state, e.task_id, e.attempt)
    if attempt is not None and attempt.start_failed is None:
        attempt.start_failed = e


def _on_container_exited(state: State, e: ContainerExited) -> None:
    attempt = _attempt(state, e.task_id, e.attempt)
    if attempt is None or attempt.exited is not None:
        return
    attempt.exited = e
    attempt.container_id = attempt.container_id or e.container_id
    if attempt.classified is None and not attempt.stop_requested and e.exit_code != 0:
        due = e.at + timedelta(seconds=state.table.window_s)
        heapq.heappush(state.timers, Timer(due, "evidence", e.task_id, e.attempt))


def _on_fault_classified(state: State, e: FaultClassified) -> None:
    attempt = _attempt(state, e.task_id, e.attempt)
    if attempt is not None:
        attempt.classified = e


def _on_rebuild_decided(state: State, e: RebuildDecided) -> None:
    task = state.tasks.get(e.task_id)
    if task is None:
        return
    task.status = "waiting"
    task.rebuild = e
    task.next_attempt = e.attempt
    task.rebuilds += 1
    if e.counted:
        task.counted_rebuilds.append(e.at)
    _wait(state, task)
    heapq.heappush(state.timers, Timer(e.not_before, "backoff", e.task_id, e.attempt))


def _end_task(state: State, task_id: str, status: str) -> TaskState | None:
    task = state.tasks.get(task_id)
    if task is None:
        return None
    task.status = status
    task.rebuild = None
    _unwait(state, task)
    return task


def _on_task_completed(state: State, e: TaskCompleted) -> None:
    _end_task(state, e.task_id, "completed")


def _on_task_failed(state: State, e: TaskFailed) -> None:
    task = _end_task(state, e.task_id, "failed")
    if task is not None:
        task.failure = e


def _on_task_cancelled(state: State, e: TaskCancelled) -> None:
    task = state.tasks.get(e.task_id)
    if task is None or task.status in TERMINAL:
        return
    attempt = task.current
    if attempt is not None and attempt.live:
        attempt.stop_requested = True
    _end_task(state, e.task_id, "cancelled")


_EVOLVE: dict[type[Any], Callable[[State, Any], None]] = {
    NodeRegistered: _on_node_registered,
    NodeLost: _on_node_lost,
    NodeRecovered: _on_node_recovered,
    GpuFault: _on_gpu_fault,
    GpuQuarantined: _on_gpu_quarantined,
    GpuRestored: _on_gpu_restored,
    GpuAllocated: _on_gpu_allocated,
    GpuReleased: _on_gpu_released,
    TaskSubmitted: _on_task_submitted,
    TaskPending: _on_task_pending,
    TaskScheduled: _on_task_scheduled,
    ContainerStarted: _on_container_started,
    ContainerStartFailed: _on_container_start_failed,
    ContainerExited: _on_container_exited,
    FaultClassified: _on_fault_classified,
    RebuildDecided: _on_rebuild_decided,
    TaskCompleted: _on_task_completed,
    TaskFailed: _on_task_failed,
    TaskCancelled: _on_task_cancelled,
}

# Events after which the earliest timer may be stale: it is dropped at once, so that a
# due timer always calls for a decision (the engine and replay never spin on it). Every
# event that can end a timer's validity must be here: an exit, a start failure, a
# release, a restore or a newer fault (it may push an older one out) end a "fault" timer.
_SETTLES_TIMERS = frozenset(
    {
        FaultClassified,
        TaskScheduled,
        TaskPending,
        TaskCompleted,
        TaskFailed,
        TaskCancelled,
        ContainerExited,
        ContainerStartFailed,
        GpuFault,
        GpuQuarantined,
        GpuReleased,
        GpuRestored,
    }
)


# --- decide ------------------------------------------------------------------------


class _Round:
    """The decisions of one decide call, and what they already promised."""

    __slots__ = (
        "concluded",
        "events",
        "now",
        "place",
        "released",
        "state",
        "taken",
        "taken_on",
    )

    def __init__(self, state: State, now: datetime) -> None:
        self.state = state
        self.now = now
        self.events: list[Event] = []
        self.taken: set[str] = set()  # GPUs allocated (or quarantined) in this round
        self.taken_on: dict[str, int] = {}  # of those, free ones per node
        self.released: set[str] = set()  # GPUs released in this round
        self.concluded: set[tuple[str, int]] = set()  # attempts classified in this round
        self.place = False  # run a placement round at the end


def decide(state: State, event: Event | None, now: datetime) -> list[Event]:
    """Decisions that follow from `event` (already folded into `state`) and due timers.

    The result is one atomic group for the log. Deterministic in (state, event, now).
    """
    return decide_many(state, () if event is None else (event,), now)


def decide_many(state: State, triggers: Sequence[Event], now: datetime) -> list[Event]:
    """One decision round for several folded events at once (and due timers).

    The engine decides on everything it folded since its last round in one go, so a
    burst of events costs one atomic append; the round's own bookkeeping (GPUs taken
    or released, attempts concluded) keeps its decisions from colliding.
    """
    due = bool(state.timers) and state.timers[0].due <= now
    reactions = [(_DECIDE[type(e)], e) for e in triggers if type(e) in _DECIDE]
    if not reactions and not due:
        return []  # the common case: an event that calls for nothing, no timer due
    r = _Round(state, now)
    for reaction, event in reactions:
        reaction(r, event)
    if due:
        _due_timers(r)
    if r.place and state.waiting:
        _placement_round(r)
    return r.events


def decide_guarded(
    state: State, triggers: Sequence[Event], now: datetime
) -> tuple[list[Event], list[tuple[int, Exception]]]:
    """`decide_many`, crash-only: a trigger that makes deciding raise is left out.

    No stored message may stop the engine (the log denies purge, so a poison that
    stopped it would stop it for good). When the round raises, each trigger is decided
    alone to find the ones that raise; the round is then decided without them, and they
    come back as (index, exception) for the caller to dead-letter. The same inputs raise
    the same way, so replay, which decides through here too, re-derives the round.
    """
    try:
        return decide_many(state, triggers, now), []
    except Exception:
        pass
    failed: list[tuple[int, Exception]] = []
    kept: list[Event] = []
    for index, trigger in enumerate(triggers):
        try:
            decide_many(state, [trigger], now)
        except Exception as exc:
            failed.append((index, exc))
        else:
            kept.append(trigger)
    try:
        return decide_many(state, kept, now), failed
    except Exception:
        return [], failed  # only the triggers together raise: decide nothing this round


def reconcile_guarded(state: State, now: datetime) -> list[Event]:
    """`reconcile`, crash-only: a sweep that raises decides nothing (the engine logs it)."""
    try:
        return reconcile(state, now)
    except Exception:
        return []


def reconcile(state: State, now: datetime) -> list[Event]:
    """Everything undecided in `state`, whatever triggered it: the startup sweep.

    An engine that was down while events arrived decides on them here, as a level-
    triggered controller would; anything already decided is left alone.
    """
    r = _Round(state, now)
    for task in state.tasks.values():
        if task.status in TERMINAL:
            continue
        attempt = task.current
        if attempt is None or attempt.classified is not None or attempt.stop_requested:
            continue
        ended_now = attempt.start_failed is not None or (
            attempt.exited is not None and attempt.exited.exit_code == 0
        )
        lost_before_exit = attempt.exited is None and attempt.node_lost is not None
        if ended_now or lost_before_exit:
            _conclude(r, task, attempt)
    for gpu in state.gpus.values():
        if not gpu.quarantined and gpu.faults:
            for fault in gpu.faults:
                if gpu_fault_class(fault, state.table) in ("gpu_hardware", "gpu_node"):
                    _react_gpu_fault(r, fault)
                    break
    for task in state.tasks.values():
        for attempt in task.attempts.values():
            # Ended tasks give everything back; a concluded attempt whose kill's exit (or
            # its node's loss) was logged while no engine ran gives its GPUs back too.
            if task.status in TERMINAL or attempt.classified is not None:
                cause = _cause(attempt) or attempt.scheduled.id  # a logged event, to cite
                _release(r, task.spec.task_id, attempt, cause)
    if state.timers and state.timers[0].due <= now:
        _due_timers(r)
    if state.waiting:
        _placement_round(r)
    return r.events


def _due_timers(r: _Round) -> None:
    due = sorted(t for t in r.state.timers if t.due <= r.now)
    for timer in due:
        if not _timer_valid(r.state, timer):
            continue
        if timer.kind == "backoff":
            r.place = True
        elif timer.kind == "fault":
            found = _current_open(r.state, timer.task_id, timer.attempt)
            assert found is not None  # what _timer_valid checked
            _conclude(r, *found)
        else:
            task = r.state.tasks[timer.task_id]
            _conclude(r, task, task.attempts[timer.attempt])


def _evidence(state: State, attempt: AttemptState, task_id: str) -> AttemptEvidence:
    faults: list[GpuFault] = []
    for uuid in attempt.gpu_uuids:
        gpu = state.gpus.get(uuid)
        if gpu is not None:
            faults.extend(gpu.faults)
    return AttemptEvidence(
        task_id=task_id,
        attempt=attempt.n,
        node=attempt.node,
        gpu_uuids=attempt.gpu_uuids,
        exited=attempt.exited,
        start_failed=attempt.start_failed,
        gpu_faults=tuple(faults),
        node_lost=attempt.node_lost,
        stop_requested=attempt.stop_requested,
    )


def _about(attempt: AttemptState) -> str:
    """Id of the event a conclusion is about: what ended the attempt."""
    if attempt.start_failed is not None:
        return attempt.start_failed.id
    if attempt.exited is not None:
        return attempt.exited.id
    if attempt.node_lost is not None:
        return derive_id(attempt.node_lost.id, f"{attempt.scheduled.id}")
    return attempt.scheduled.id


def _cause(attempt: AttemptState) -> str | None:
    """Id of the logged event that ended the attempt (`_about` may derive from it)."""
    for event in (attempt.start_failed, attempt.exited, attempt.node_lost):
        if event is not None:
            return event.id
    return None


def _conclude(r: _Round, task: TaskState, attempt: AttemptState) -> None:
    """Classify how an attempt ended and decide: complete, rebuild or fail."""
    state, now = r.state, r.now
    task_id = task.spec.task_id
    if (task_id, attempt.n) in r.concluded:
        return
    r.concluded.add((task_id, attempt.n))
    cls = classify(_evidence(state, attempt, task_id), state.table)
    parent = _about(attempt)
    classified = FaultClassified(
        id=derive_id(parent, "classified"),
        at=now,
        actor=ENGINE,
        # Without an exit, a start failure or a node loss, the GPU fault is the cause.
        causation_id=_cause(attempt) or (cls.evidence[0] if cls.evidence else None),
        correlation_id=task_id,
        task_id=task_id,
        attempt=attempt.n,
        fault=cls.fault,
        rule=cls.rule,
        evidence=cls.evidence,
    )
    r.events.append(classified)
    _quarantine(r, cls, classified.id, task_id)
    verdict = (
        Verdict(action="complete")
        if cls.fault == "completed"
        else judge(state.policy, cls.fault, cls.exit_code, task.counted_rebuilds, now)
    )
    r.events.append(_verdict_event(r, task, attempt, cls, verdict, classified.id))
    hung = (
        cls.fault == "gpu_hardware"
        and attempt.started
        and attempt.exited is None
        and attempt.start_failed is None
        and attempt.node_lost is None
    )
    if not hung:  # a hung process keeps its GPUs until its kill is seen (awaits_kill)
        _release(r, task_id, attempt, classified.id)


def _verdict_event(
    r: _Round,
    task: TaskState,
    attempt: AttemptState,
    cls: Classification,
    verdict: Verdict,
    cause: str,
) -> Event:
    common: dict[str, Any] = {
        "at": r.now,
        "actor": ENGINE,
        "causation_id": cause,
        "correlation_id": task.spec.task_id,
        "task_id": task.spec.task_id,
    }
    if verdict.action == "complete":
        return TaskCompleted(id=derive_id(cause, "completed"), attempt=attempt.n, **common)
    if verdict.action == "rebuild":
        return RebuildDecided(
            id=derive_id(cause, "rebuild"),
            attempt=attempt.n + 1,
            previous_attempt=attempt.n,
            fault=cls.fault,
            counted=verdict.counted,
            rule=verdict.rule,
            not_before=r.now + timedelta(seconds=verdict.backoff_s),
            exclude_gpus=cls.exclude_gpus,
            exclude_nodes=cls.exclude_nodes,
            **common,
        )
    return TaskFailed(
        id=derive_id(cause, "failed"),
        attempt=attempt.n,
        fault=cls.fault,
        reason=verdict.reason or "not_target_fault",
        rule=verdict.rule,
        **common,
    )


def _quarantine(r: _Round, cls: Classification, cause: str, task_id: str | None) -> None:
    for uuid in cls.quarantine:
        gpu = r.state.gpus.get(uuid)
        if gpu is None or gpu.quarantined:
            continue
        if any(isinstance(e, GpuQuarantined) and e.gpu_uuid == uuid for e in r.events):
            continue
        r.events.append(
            GpuQuarantined(
                id=derive_id(cause, f"quarantine/{uuid}"),
                at=r.now,
                actor=ENGINE,
                causation_id=cause,
                correlation_id=task_id,
                gpu_uuid=uuid,
                node=gpu.node,
                reason=f"{cls.fault}: {cls.rule}",
            )
        )


def _release(r: _Round, task_id: str, attempt: AttemptState, cause: str) -> None:
    if awaits_kill(r.state, attempt):
        return
    for uuid in attempt.gpu_uuids:
        gpu = r.state.gpus.get(uuid)
        if gpu is None or gpu.holder != (task_id, attempt.n) or uuid in r.released:
            continue
        r.released.add(uuid)
        r.events.append(
            GpuReleased(
                id=derive_id(cause, f"release/{uuid}"),
                at=r.now,
                actor=ENGINE,
                causation_id=cause,
                correlation_id=task_id,
                gpu_uuid=uuid,
                node=gpu.node,
                task_id=task_id,
                attempt=attempt.n,
            )
        )


def _current_open(state: State, task_id: str, n: int) -> tuple[TaskState, AttemptState] | None:
    """The task and attempt, if this is the task's current attempt and undecided."""
    task = state.tasks.get(task_id)
    if task is None or task.status in TERMINAL or task.next_attempt - 1 != n:
        return None
    attempt = task.attempts.get(n)
    if attempt is None or attempt.classified is not None or attempt.stop_requested:
        return None
    return task, attempt


def _react_exited(r: _Round, e: ContainerExited) -> None:
    task = r.state.tasks.get(e.task_id)
    attempt = None if task is None else task.attempts.get(e.attempt)
    if attempt is not None and _ended(attempt):
        _release(r, e.task_id, attempt, e.id)  # ended before it died: its GPUs now
        return
    if e.exit_code != 0:
        return  # classified when its evidence window closes (a timer)
    found = _current_open(r.state, e.task_id, e.attempt)
    if found is not None:
        _conclude(r, *found)


def _react_start_failed(r: _Round, e: ContainerStartFailed) -> None:
    task = r.state.tasks.get(e.task_id)
    attempt = None if task is None else task.attempts.get(e.attempt)
    if attempt is not None and _ended(attempt):
        _release(r, e.task_id, attempt, e.id)  # as for an exit: the container is gone
        return
    found = _current_open(r.state, e.task_id, e.attempt)
    if found is not None:
        _conclude(r, *found)


def _react_node_lost(r: _Round, e: NodeLost) -> None:
    node = r.state.nodes.get(e.node)
    if node is None:
        return
    for task_id, held in _ended_holders(r.state, node):  # what the node took with it
        _release(r, task_id, held, e.id)  # no kill to wait for any more
    for task, attempt in _attempts_on(r.state, node):
        if attempt.node_lost != e:
            continue  # by value: a replay decodes the trigger apart from the folded copy
        if attempt.exited is not None:
            continue  # its evidence window is open: the timer concludes it
        found = _current_open(r.state, task.spec.task_id, attempt.n)
        if found is not None:
            _conclude(r, *found)


def _ended(attempt: AttemptState) -> bool:
    """Concluded or cancelled: nothing but its container's end keeps its GPUs."""
    return attempt.classified is not None or attempt.stop_requested


def _react_gpu_fault(r: _Round, e: GpuFault) -> None:
    gpu = r.state.gpus.get(e.gpu_uuid)
    if gpu is None or gpu.quarantined:
        return
    kind = gpu_fault_class(e, r.state.table)
    if kind not in ("gpu_hardware", "gpu_node"):
        return
    holder = gpu.holder[0] if gpu.holder is not None else None
    detail = f"xid {e.xid}" if e.xid is not None else e.kind
    r.events.append(
        GpuQuarantined(
            id=derive_id(e.id, "quarantine"),
            at=r.now,
            actor=ENGINE,
            causation_id=e.id,
            correlation_id=holder,
            gpu_uuid=e.gpu_uuid,
            node=gpu.node,
            reason=f"{kind}: {detail}",
        )
    )


def _react_cancelled(r: _Round, e: TaskCancelled) -> None:
    task = r.state.tasks.get(e.task_id)
    if task is None:
        return
    for attempt in task.attempts.values():
        _release(r, e.task_id, attempt, e.id)


def _react_capacity(r: _Round, e: Event) -> None:
    r.place = True


_DECIDE: dict[type[Any], Callable[[_Round, Any], None]] = {
    ContainerExited: _react_exited,
    ContainerStartFailed: _react_start_failed,
    NodeLost: _react_node_lost,
    GpuFault: _react_gpu_fault,
    TaskCancelled: _react_cancelled,
    TaskSubmitted: _react_capacity,
    GpuReleased: _react_capacity,
    GpuRestored: _react_capacity,
    NodeRegistered: _react_capacity,
    NodeRecovered: _react_capacity,
}


# --- placement ---------------------------------------------------------------------


def _placement_round(r: _Round) -> None:
    """Place waiting tasks in submission order, each on GPUs free at this moment."""
    state = r.state
    # A GPU this round quarantines is not folded yet: keep it out of this round's picks.
    for event in r.events:
        if isinstance(event, GpuQuarantined):
            _take(r, event.gpu_uuid)
    tasks = [state.tasks[state.by_order[order]] for order in state.waiting_orders]
    why: dict[PlacementRequest, NoFit] = {}  # one diagnosis per request shape and round
    for task in tasks:
        rebuild = task.rebuild
        if rebuild is not None and rebuild.not_before > r.now:
            continue
        spec = task.spec
        request = PlacementRequest(
            gpus=spec.gpus,
            gpu_model=spec.gpu_model,
            min_gpu_memory_mb=spec.min_gpu_memory_mb,
            exclude_gpus=frozenset(rebuild.exclude_gpus) if rebuild else frozenset(),
            exclude_nodes=_still_excluded(state, rebuild) if rebuild else frozenset(),
        )
        found = first_fit(request, state.nodes, state.gpus, r.taken, _candidates(r, spec.gpus))
        parent = rebuild.id if rebuild is not None else spec.id
        if found is not None:
            _schedule(r, task, found, parent)
            continue
        nofit = why.get(request)
        if nofit is None:
            nofit = why[request] = why_not(request, state.nodes, state.gpus)
        _not_placed(r, task, nofit, parent)


def _still_excluded(state: State, rebuild: RebuildDecided) -> frozenset[str]:
    """The nodes a rebuild must avoid; a node excluded only for being lost is welcome
    again once it has recovered (a node that needs a reboot, Xid 79, stays excluded)."""
    if rebuild.fault != "node_lost":
        return frozenset(rebuild.exclude_nodes)
    return frozenset(
        name
        for name in rebuild.exclude_nodes
        if not (
            (node := state.nodes.get(name)) is not None
            and node.alive
            and node.recovered_at is not None
            and node.recovered_at >= rebuild.at
        )
    )


def _take(r: _Round, uuid: str) -> None:
    """Promise a GPU within this round (allocated or quarantined, not folded yet)."""
    if uuid in r.taken:
        return
    r.taken.add(uuid)
    gpu = r.state.gpus.get(uuid)
    if gpu is not None and _is_free(gpu):
        r.taken_on[gpu.node] = r.taken_on.get(gpu.node, 0) + 1


def _candidates(r: _Round, gpus: int) -> Iterator[str]:
    """Nodes with `gpus` free GPUs left in this round, fewest first, then by name
    (placement's order), produced lazily: the first that fits is usually the first."""
    ranked = r.state.free_ranked
    start = bisect_left(ranked, (gpus, ""))
    taken_on = r.taken_on
    if not taken_on:
        return (ranked[i][1] for i in range(start, len(ranked)))
    nodes = r.state.nodes
    # Nodes that gave GPUs to this round rank by what they have left.
    touched = sorted(
        (free, name)
        for name, taken in taken_on.items()
        if (node := nodes.get(name)) is not None and (free := node.free - taken) >= gpus
    )
    rest = (item for item in ranked[start:] if item[1] not in taken_on)
    return (name for _, name in heapq.merge(rest, touched))


def _schedule(r: _Round, task: TaskState, placement: Placement, parent: str) -> None:
    task_id, n = task.spec.task_id, task.next_attempt
    scheduled_id = derive_id(parent, f"scheduled/{n}")
    for uuid in placement.gpu_uuids:
        _take(r, uuid)
        r.events.append(
            GpuAllocated(
                id=derive_id(parent, f"allocated/{n}/{uuid}"),
                at=r.now,
                actor=ENGINE,
                causation_id=parent,
                correlation_id=task_id,
                gpu_uuid=uuid,
                node=placement.node,
                task_id=task_id,
                attempt=n,
            )
        )
    r.events.append(
        TaskScheduled(
            id=scheduled_id,
            at=r.now,
            actor=ENGINE,
            causation_id=parent,
            correlation_id=task_id,
            task_id=task_id,
            attempt=n,
            node=placement.node,
            gpu_uuids=placement.gpu_uuids,
        )
    )


def _not_placed(r: _Round, task: TaskState, nofit: NoFit, parent: str) -> None:
    task_id, n = task.spec.task_id, task.next_attempt
    common: dict[str, Any] = {
        "at": r.now,
        "actor": ENGINE,
        "causation_id": parent,
        "correlation_id": task_id,
        "task_id": task_id,
    }
    if not nofit.ever and n == 1:
        r.events.append(
            TaskFailed(
                id=derive_id(parent, "unschedulable"),
                attempt=None,
                fault=None,
                reason="unschedulable",
                detail=nofit.reason,
                **common,
            )
        )
    elif nofit.reason != task.pending_reason:
        r.events.append(
            TaskPending(
                id=derive_id(parent, f"pending/{n}/{task.pendings}/{nofit.reason}"),
                reason=nofit.reason,
                attempt=n,
                **common,
            )
        )


# --- commands ----------------------------------------------------------------------


def commands_for(state: State, event: Event) -> list[Command]:
    """Commands to node agents that a decision (already folded) calls for."""
    if isinstance(event, TaskScheduled):
        task = state.tasks.get(event.task_id)
        if task is None:
            return []
        spec = task.spec
        return [
            RunCommand(
                id=derive_id(event.id, "run"),
                node=event.node,
                task_id=event.task_id,
                attempt=event.attempt,
                causation_id=event.id,
                image=spec.image,
                command=spec.command,
                env=dict(spec.env),
                gpu_uuids=event.gpu_uuids,
                memory_mb=spec.memory_mb,
            )
        ]
    if isinstance(event, TaskCancelled):
        task = state.tasks.get(event.task_id)
        attempt = task.current if task is not None else None
        if attempt is None or not attempt.stop_requested or attempt.exited is not None:
            return []
        return [_stop(event.id, attempt, event.task_id, f"cancelled: {event.reason}")]
    if isinstance(event, FaultClassified):
        task = state.tasks.get(event.task_id)
        attempt = None if task is None else task.attempts.get(event.attempt)
        node = None if attempt is None else state.nodes.get(attempt.node)
        if attempt is None or node is None or not node.alive or not _unended(attempt):
            return []  # ended, or on a lost node: stopped when the node comes back
        return [_stop_concluded(event.id, attempt, event.task_id)]
    if isinstance(event, NodeRecovered):
        return [
            _stop_concluded(event.id, attempt, task.spec.task_id)
            for task in state.tasks.values()
            for attempt in task.attempts.values()
            if attempt.node == event.node and _unended(attempt)
        ]
    return []


def _unended(attempt: AttemptState) -> bool:
    """Concluded, but no exit or start failure says its container is gone."""
    return (
        attempt.classified is not None and attempt.exited is None and attempt.start_failed is None
    )


def _stop_concluded(cause: str, attempt: AttemptState, task_id: str) -> StopCommand:
    """Stop the container of an attempt that was concluded while it may still run.

    Either its node was lost (the container is stale once the task is rebuilt, or
    failed), or a GPU under it failed and its process hung there: that one is killed at
    once, with no grace period, and its GPUs come back with its exit (`awaits_kill`).
    Sent when the conclusion is folded on a live node, or when the node comes back;
    however the log interleaves the conclusion with the node's loss and recovery, one of
    the two sees the node alive.
    """
    assert attempt.classified is not None
    if attempt.classified.fault == "gpu_hardware":
        rule = attempt.classified.rule
        reason = f"gpu_hardware ({rule}) under a running process: killed to be rebuilt"
        return _stop(cause, attempt, task_id, reason, grace_s=0.0)
    return _stop(cause, attempt, task_id, "stale: concluded while its node was lost")


def _stop(
    cause: str,
    attempt: AttemptState,
    task_id: str,
    reason: str,
    grace_s: float | None = None,
) -> StopCommand:
    return StopCommand(
        id=derive_id(cause, f"stop/{task_id}/{attempt.n}"),
        node=attempt.node,
        task_id=task_id,
        attempt=attempt.n,
        causation_id=cause,
        reason=reason,
        container_id=attempt.container_id,
        grace_s=grace_s,
    )
