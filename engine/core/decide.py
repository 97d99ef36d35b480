"""`decide(state, event, now)`: the supervisor's decisions (EP4224317A1's
state-machine projector, second half).

Returns the decisions that `event` (already folded) leads to, plus every timer that
is due at `now` (evidence windows, backoff). `event=None` means only a timer is due.

Decisions are grouped: each group is one atomic append (the task, the GPUs it leaves
and the GPUs it takes), and its ids derive from the event the decision is about, so a
retry or a replay re-derives them bit for bit.

Nothing here reads a clock, draws a random number or does I/O.

Size: one module, past 600 lines, on purpose. Every reaction shares the round's
bookkeeping (`_Round`: GPUs taken or released, attempts concluded this round) and
ends in the placement round; split apart, each part would reach into the others'
private state.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Final

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
    TaskSubmitted,
    derive_id,
    on,
)
from gpuwarden.engine.core.faults import (
    AttemptEvidence,
    Classification,
    classify,
    gpu_fault_class,
)
from gpuwarden.engine.core.placement import (
    NoFit,
    Placement,
    PlacementRequest,
    first_fit,
    why_not,
)
from gpuwarden.engine.core.policy import Verdict, judge
from gpuwarden.engine.core.state import (
    ENGINE,
    TERMINAL,
    AttemptState,
    State,
    TaskState,
    attempts_on,
    awaits_kill,
    current_open,
    ended_holders,
    has_ended,
    is_free,
    timer_valid,
)


class _Round:
    """The decisions of one decide call, and what they already promised."""

    __slots__ = (
        "concluded",
        "ended",
        "events",
        "late",
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
        self.late: set[tuple[str, int]] = set()  # attempts settled by a late exit
        self.ended: set[str] = set()  # tasks a late exit ended in this round
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
        for earlier in task.attempts.values():  # a late exit logged while no engine ran
            _late_exit(r, task, earlier)
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
        if not timer_valid(r.state, timer):
            continue
        if timer.kind == "backoff":
            r.place = True
        elif timer.kind == "fault":
            found = current_open(r.state, timer.task_id, timer.attempt)
            assert found is not None  # what timer_valid checked
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
    if (task_id, attempt.n) in r.concluded or task_id in r.ended:
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


def _react_exited(r: _Round, e: ContainerExited) -> None:
    task = r.state.tasks.get(e.task_id)
    attempt = None if task is None else task.attempts.get(e.attempt)
    if task is not None and attempt is not None and has_ended(attempt):
        _late_exit(r, task, attempt)
        _release(r, e.task_id, attempt, e.id)  # ended before it died: its GPUs now
        return
    if e.exit_code != 0:
        return  # classified when its evidence window closes (a timer)
    found = current_open(r.state, e.task_id, e.attempt)
    if found is not None:
        _conclude(r, *found)


def _late_exit(r: _Round, task: TaskState, attempt: AttemptState) -> None:
    """Late evidence wins: an attempt concluded `node_lost` whose real exit arrived
    later (its agent was cut off, not its node) is settled by that exit.

    The exit is classified as if the node had never been lost. A success completes the
    task, as a Kubernetes Job counts a pod that succeeded; a fault the policy would not
    rebuild fails the task as that fault. Either way the replacement, if it runs, is
    stopped (`_supersede` in the fold, `_stop_superseded` in the commands) and keeps
    its GPUs until its container is gone. A fault the policy would rebuild leaves the
    replacement standing: the node_lost conclusion already did what it calls for.
    """
    classified, exited = attempt.classified, attempt.exited
    if classified is None or classified.fault != "node_lost" or exited is None:
        return
    task_id = task.spec.task_id
    if task.status in TERMINAL or (task_id, attempt.n) in r.late:
        return
    r.late.add((task_id, attempt.n))
    evidence = replace(_evidence(r.state, attempt, task_id), node_lost=None)
    cls = classify(evidence, r.state.table)
    verdict = (
        Verdict(action="complete")
        if cls.fault == "completed"
        else judge(r.state.policy, cls.fault, cls.exit_code, task.counted_rebuilds, r.now)
    )
    if verdict.action == "rebuild":
        return
    late = FaultClassified(
        id=derive_id(exited.id, "late/classified"),
        at=r.now,
        actor=ENGINE,
        causation_id=exited.id,
        correlation_id=task_id,
        task_id=task_id,
        attempt=attempt.n,
        fault=cls.fault,
        rule=cls.rule,
        evidence=cls.evidence,
    )
    r.events.append(late)
    r.events.append(_verdict_event(r, task, attempt, cls, verdict, late.id))
    r.ended.add(task_id)


def _react_start_failed(r: _Round, e: ContainerStartFailed) -> None:
    task = r.state.tasks.get(e.task_id)
    attempt = None if task is None else task.attempts.get(e.attempt)
    if attempt is not None and has_ended(attempt):
        _release(r, e.task_id, attempt, e.id)  # as for an exit: the container is gone
        return
    found = current_open(r.state, e.task_id, e.attempt)
    if found is not None:
        _conclude(r, *found)


def _react_node_lost(r: _Round, e: NodeLost) -> None:
    node = r.state.nodes.get(e.node)
    if node is None:
        return
    for task_id, held in ended_holders(r.state, node):  # what the node took with it
        _release(r, task_id, held, e.id)  # no kill to wait for any more
    for task, attempt in attempts_on(r.state, node):
        if attempt.node_lost != e:
            continue  # by value: a replay decodes the trigger apart from the folded copy
        if attempt.exited is not None:
            continue  # its evidence window is open: the timer concludes it
        found = current_open(r.state, task.spec.task_id, attempt.n)
        if found is not None:
            _conclude(r, *found)


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


_DECIDE: Final = dict(
    [
        on(ContainerExited, _react_exited),
        on(ContainerStartFailed, _react_start_failed),
        on(NodeLost, _react_node_lost),
        on(GpuFault, _react_gpu_fault),
        on(TaskCancelled, _react_cancelled),
        on(TaskSubmitted, _react_capacity),
        on(GpuReleased, _react_capacity),
        on(GpuRestored, _react_capacity),
        on(NodeRegistered, _react_capacity),
        on(NodeRecovered, _react_capacity),
    ]
)
# Events that call for no decision: the engine's own decisions (what they ask of the
# nodes is `commands_for`'s), and a container's start, which no decision waits on.
_DECIDE_IGNORES: Final[frozenset[type[Event]]] = frozenset(
    {
        GpuQuarantined,
        GpuAllocated,
        TaskPending,
        TaskScheduled,
        ContainerStarted,
        FaultClassified,
        RebuildDecided,
        TaskCompleted,
        TaskFailed,
    }
)


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
        if task.spec.task_id in r.ended:
            continue  # settled in this round by an earlier attempt's late exit
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
    if gpu is not None and is_free(gpu):
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
