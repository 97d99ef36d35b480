"""`evolve(state, event)`: the supervisor's fold of the catalog (EP4224317A1's
state-machine projector, first half).

Folds one event into the state (in place, and returns it: the fold owns its state).
Total: an event about something unknown changes nothing. Pure.
"""

from __future__ import annotations

import bisect
import heapq
from bisect import bisect_left, insort
from datetime import timedelta
from typing import Final

from gpuwarden.engine.core.events import (
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
    TaskStatus,
    TaskSubmitted,
    on,
)
from gpuwarden.engine.core.state import (
    GPU_FAULT_MEMORY,
    TERMINAL,
    AttemptState,
    GpuState,
    NodeState,
    State,
    TaskState,
    Timer,
    attempt_of,
    attempts_on,
    current_open,
    ended_holders,
    is_free,
    is_hardware,
    timer_valid,
)


def evolve(state: State, event: Event) -> State:
    """Fold one event. Total: an event about something unknown changes nothing."""
    handler = _EVOLVE.get(type(event))
    state.events += 1
    if handler is not None:
        handler(state, event)
        if state.timers and type(event) in _SETTLES_TIMERS:
            _drop_stale_timers(state)
    return state


def _drop_stale_timers(state: State) -> None:
    while state.timers and not timer_valid(state, state.timers[0]):
        heapq.heappop(state.timers)


def _refree(state: State, gpu: GpuState, was_free: bool) -> None:
    """Keep the node's free count and the free-node index in step with one GPU."""
    now_free = is_free(gpu)
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
    _set_free(state, node, sum(1 for u in uuids if is_free(state.gpus[u])))


def _on_node_lost(state: State, e: NodeLost) -> None:
    node = state.nodes.get(e.node)
    if node is None:
        return
    node.alive = False
    node.lost = e
    for _, attempt in attempts_on(state, node, prune=True):
        attempt.node_lost = e
    # An ended attempt still waiting for its exit (awaits_kill) waits no more: its
    # container went with the node, and a recovery folded before this loss is decided
    # must not make it wait again.
    for _, held in ended_holders(state, node):
        if held.node_lost is None:
            held.node_lost = e


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
        hardware = [is_hardware(f, state.table) for f in gpu.faults]
        del gpu.faults[hardware.index(False) if False in hardware else 0]


def _on_gpu_quarantined(state: State, e: GpuQuarantined) -> None:
    gpu = state.gpus.get(e.gpu_uuid)
    if gpu is None:
        return
    was = is_free(gpu)
    gpu.quarantined = True
    _refree(state, gpu, was)
    holder = gpu.holder
    if holder is not None and current_open(state, *holder) is not None:
        # A process hung on a broken GPU may never exit: if it has not when the evidence
        # window closes, the attempt is concluded without an exit. The window runs from
        # the engine's own quarantine, not from the agent's clock.
        due = e.at + timedelta(seconds=state.table.window_s)
        heapq.heappush(state.timers, Timer(due, "fault", *holder))


def _on_gpu_restored(state: State, e: GpuRestored) -> None:
    gpu = state.gpus.get(e.gpu_uuid)
    if gpu is not None:
        was = is_free(gpu)
        gpu.quarantined = False
        gpu.faults.clear()  # faults before a restore are settled
        _refree(state, gpu, was)


def _on_gpu_allocated(state: State, e: GpuAllocated) -> None:
    gpu = state.gpus.get(e.gpu_uuid)
    if gpu is not None:
        was = is_free(gpu)
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


def _on_container_started(state: State, e: ContainerStarted) -> None:
    attempt = attempt_of(state, e.task_id, e.attempt)
    if attempt is not None:
        attempt.started = True
        attempt.container_id = e.container_id


def _on_container_start_failed(state: State, e: ContainerStartFailed) -> None:
    attempt = attempt_of(state, e.task_id, e.attempt)
    if attempt is not None and attempt.start_failed is None:
        attempt.start_failed = e


def _on_container_exited(state: State, e: ContainerExited) -> None:
    attempt = attempt_of(state, e.task_id, e.attempt)
    if attempt is None or attempt.exited is not None:
        return
    attempt.exited = e
    attempt.container_id = attempt.container_id or e.container_id
    if attempt.classified is None and not attempt.stop_requested and e.exit_code != 0:
        due = e.at + timedelta(seconds=state.table.window_s)
        heapq.heappush(state.timers, Timer(due, "evidence", e.task_id, e.attempt))


def _on_fault_classified(state: State, e: FaultClassified) -> None:
    attempt = attempt_of(state, e.task_id, e.attempt)
    if attempt is not None:
        attempt.classified = e


def _on_rebuild_decided(state: State, e: RebuildDecided) -> None:
    task = state.tasks.get(e.task_id)
    if task is None:
        return
    task.status = "pending"  # until the new attempt is placed (`rebuild` says why)
    task.rebuild = e
    task.next_attempt = e.attempt
    task.rebuilds += 1
    if e.counted:
        task.counted_rebuilds.append(e.at)
    _wait(state, task)
    heapq.heappush(state.timers, Timer(e.not_before, "backoff", e.task_id, e.attempt))


def _end_task(state: State, task_id: str, status: TaskStatus) -> TaskState | None:
    task = state.tasks.get(task_id)
    if task is None:
        return None
    task.status = status
    task.rebuild = None
    _unwait(state, task)
    return task


def _supersede(state: State, task_id: str, ended_by: int | None) -> None:
    """A task ended by an earlier attempt's late evidence (its real exit, arriving after
    its node was declared lost): the replacement still running is to be stopped, and
    keeps its GPUs until its container is gone (`awaits_kill`)."""
    task = state.tasks.get(task_id)
    current = None if task is None else task.current
    if ended_by is not None and current is not None and current.n != ended_by and current.live:
        current.stop_requested = True


def _on_task_completed(state: State, e: TaskCompleted) -> None:
    _supersede(state, e.task_id, e.attempt)
    _end_task(state, e.task_id, "completed")


def _on_task_failed(state: State, e: TaskFailed) -> None:
    _supersede(state, e.task_id, e.attempt)
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


# Every type of the catalog folds (tests/test_folds.py holds this table to the catalog).
_EVOLVE: Final = dict(
    [
        on(NodeRegistered, _on_node_registered),
        on(NodeLost, _on_node_lost),
        on(NodeRecovered, _on_node_recovered),
        on(GpuFault, _on_gpu_fault),
        on(GpuQuarantined, _on_gpu_quarantined),
        on(GpuRestored, _on_gpu_restored),
        on(GpuAllocated, _on_gpu_allocated),
        on(GpuReleased, _on_gpu_released),
        on(TaskSubmitted, _on_task_submitted),
        on(TaskPending, _on_task_pending),
        on(TaskScheduled, _on_task_scheduled),
        on(ContainerStarted, _on_container_started),
        on(ContainerStartFailed, _on_container_start_failed),
        on(ContainerExited, _on_container_exited),
        on(FaultClassified, _on_fault_classified),
        on(RebuildDecided, _on_rebuild_decided),
        on(TaskCompleted, _on_task_completed),
        on(TaskFailed, _on_task_failed),
        on(TaskCancelled, _on_task_cancelled),
    ]
)
_EVOLVE_IGNORES: Final[frozenset[type[Event]]] = frozenset()

# Events after which the earliest timer may be stale: it is dropped at once, so that a
# due timer always calls for a decision (the engine and replay never spin on it). Every
# event that can end a timer's validity must be here: an exit, a start failure, a
# release, a restore or a newer fault (it may push an older one out) end a "fault" timer.
_SETTLES_TIMERS: Final[frozenset[type[Event]]] = frozenset(
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
# ...and those that leave every timer as valid as it was: `timer_valid` reads nothing
# they fold (a rebuild's own backoff timer aside: the classification before it settled).
_KEEPS_TIMERS: Final[frozenset[type[Event]]] = frozenset(
    {
        NodeRegistered,
        NodeLost,
        NodeRecovered,
        GpuAllocated,
        TaskSubmitted,
        ContainerStarted,
        RebuildDecided,
    }
)
