"""The supervisor's state: what the fold keeps about nodes, GPUs, tasks and timers.

Plain data plus the read-only questions that both the fold and the decisions ask of
it. Nothing here reads a clock, draws a random number or does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal, TypeAlias

from gpuwarden.engine.core.events import (
    TERMINAL_STATUSES,
    ContainerExited,
    ContainerStartFailed,
    FaultClassified,
    GpuFault,
    NodeLost,
    RebuildDecided,
    TaskFailed,
    TaskScheduled,
    TaskStatus,
    TaskSubmitted,
)
from gpuwarden.engine.core.faults import (
    DEFAULT_TABLE,
    FaultTable,
    gpu_fault_class,
)
from gpuwarden.engine.core.policy import DEFAULT_POLICY, Policy

ENGINE = "engine"
GPU_FAULT_MEMORY = 16  # recent faults kept per GPU: evidence windows are seconds long

TERMINAL: Final = TERMINAL_STATUSES  # a task in one of these states is done for good

# Why decide must be called at a time: an exit's evidence window closes ("evidence"), a
# hardware fault under a process that has not exited is given up on ("fault"), or a
# rebuild's backoff is over ("backoff").
TimerKind: TypeAlias = Literal["evidence", "fault", "backoff"]


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
    # The shared vocabulary (events.TaskStatus), less `scheduled`: the supervisor does
    # not wait for a container's start. `pending` until placed, and again from a decided
    # rebuild (`rebuild` is then set) until its new attempt is placed.
    status: TaskStatus = "pending"
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
    kind: TimerKind
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


def hung_on(state: State, attempt: AttemptState) -> GpuFault | None:
    """A hardware-class fault still on record for one of the attempt's GPUs (a restore
    clears a GPU's faults: the attempt then runs on)."""
    for uuid in attempt.gpu_uuids:
        gpu = state.gpus.get(uuid)
        if gpu is not None:
            for fault in gpu.faults:
                if is_hardware(fault, state.table):
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


def next_due(state: State) -> datetime | None:
    """When decide must next be called with no event (a timer), if ever."""
    return state.timers[0].due if state.timers else None


def is_free(gpu: GpuState) -> bool:
    return gpu.holder is None and not gpu.quarantined


def is_hardware(fault: GpuFault, table: FaultTable) -> bool:
    return gpu_fault_class(fault, table) in ("gpu_hardware", "gpu_node")


def current_open(state: State, task_id: str, n: int) -> tuple[TaskState, AttemptState] | None:
    """The task and attempt, if this is the task's current attempt and undecided."""
    task = state.tasks.get(task_id)
    if task is None or task.status in TERMINAL or task.next_attempt - 1 != n:
        return None
    attempt = task.attempts.get(n)
    if attempt is None or attempt.classified is not None or attempt.stop_requested:
        return None
    return task, attempt


def has_ended(attempt: AttemptState) -> bool:
    """Concluded or cancelled: nothing but its container's end keeps its GPUs."""
    return attempt.classified is not None or attempt.stop_requested


def unended(attempt: AttemptState) -> bool:
    """Concluded, but no exit or start failure says its container is gone."""
    return (
        attempt.classified is not None and attempt.exited is None and attempt.start_failed is None
    )


def timer_valid(state: State, timer: Timer) -> bool:
    task = state.tasks.get(timer.task_id)
    if task is None or task.status in TERMINAL:
        return False
    if timer.kind == "evidence":
        attempt = task.attempts.get(timer.attempt)
        return attempt is not None and attempt.classified is None and not attempt.stop_requested
    if timer.kind == "fault":  # still running on a GPU that failed under it
        found = current_open(state, timer.task_id, timer.attempt)
        return found is not None and found[1].live and hung_on(state, found[1]) is not None
    rebuild = task.rebuild  # set only while the rebuild awaits its placement
    return rebuild is not None and rebuild.attempt == timer.attempt and task.pending_reason is None


def holds_gpus(state: State, key: tuple[str, int]) -> bool:
    attempt = attempt_of(state, *key)
    if attempt is None:
        return False
    for uuid in attempt.gpu_uuids:
        gpu = state.gpus.get(uuid)
        if gpu is not None and gpu.holder == key:
            return True
    return False


def ended_holders(state: State, node: NodeState) -> list[tuple[str, AttemptState]]:
    """Attempts scheduled on the node, concluded or cancelled, that still hold GPUs
    (wherever those GPUs are listed now: a node may re-register without one)."""
    found = []
    for key in node.attempts:
        attempt = attempt_of(state, *key)
        if attempt is not None and has_ended(attempt) and holds_gpus(state, key):
            found.append((key[0], attempt))
    return found


def attempts_on(
    state: State, node: NodeState, *, prune: bool = False
) -> list[tuple[TaskState, AttemptState]]:
    """Current, unclassified attempts on a node (evolve may prune finished entries, but
    not one that still holds GPUs: `ended_holders` finds those here)."""
    found = []
    for key in list(node.attempts):
        task = state.tasks.get(key[0])
        attempt = task.current if task is not None else None
        if attempt is None or attempt.n != key[1] or attempt.classified is not None:
            if prune and not holds_gpus(state, key):
                del node.attempts[key]
        elif task is not None and task.status not in TERMINAL:
            found.append((task, attempt))
    return found


def attempt_of(state: State, task_id: str, n: int) -> AttemptState | None:
    task = state.tasks.get(task_id)
    return None if task is None else task.attempts.get(n)
