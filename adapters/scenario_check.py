"""What a drill's event log shows, and whether the drill's expectations hold.

Pure functions over catalog events, independent of the engine that wrote them: the
verdict on a drill must come from the log alone, the same log `--export` writes and an
auditor replays, never from the engine's private state.

Task state, in the vocabulary the supervisor and the read model share
(`events.TaskStatus`), as folded from the log in order (SCENARIOS.md `state`; a drill
never sees `scheduled`, which only the read model tells apart from `running`):

- `pending` from `task.submitted` until its first `task.scheduled`, and again whenever
  `task.pending` is the latest lifecycle event (a rebuilt attempt that cannot be placed);
- `running` from a `task.scheduled` on. A task whose rebuild is decided and waiting out
  its backoff is still `running`: it has been placed and is not finished, and only a
  `task.pending` (no room for the new attempt) makes it pending again;
- `completed`, `failed`, `cancelled` from `task.completed`, `task.failed`,
  `task.cancelled`; terminal, later events (a stale container's exit) leave it as is.

`attempts` counts the distinct attempts that were placed (`task.scheduled`), `faults`
lists `fault.classified` faults in log order without `completed`, `rebuilds` and
`counted_rebuilds` count `rebuild.decided` events (all, and those with `counted`).
A GPU is quarantined after `gpu.quarantined` until a later `gpu.restored`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from gpuwarden.adapters.scenario_file import (
    GpuExpectation,
    Scenario,
    TaskExpectation,
)
from gpuwarden.engine.core import events as ev

TERMINAL_STATES: Final = ev.TERMINAL_STATUSES


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    attempt: int
    node: str
    gpu_uuids: tuple[str, ...]


class TaskObservation(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    state: ev.TaskStatus
    attempts: int
    faults: tuple[ev.Fault, ...]
    reason: ev.FailureReason | None
    rebuilds: int
    counted_rebuilds: int
    placements: tuple[Placement, ...]  # one per placed attempt, by attempt number

    def placement(self, attempt: int) -> Placement | None:
        for placement in self.placements:
            if placement.attempt == attempt:
                return placement
        return None

    @property
    def last_placement(self) -> Placement | None:
        return self.placements[-1] if self.placements else None


class GpuObservation(msgspec.Struct, frozen=True, kw_only=True):
    uuid: str
    node: str | None
    quarantined: bool
    task_id: str | None  # the task holding it now, if any


class NodeObservation(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    lost: bool


class Observed(msgspec.Struct, frozen=True, kw_only=True):
    """The final state of every task, GPU and node seen in the log (JSON-able)."""

    tasks: dict[str, TaskObservation]
    gpus: dict[str, GpuObservation]
    nodes: dict[str, NodeObservation]


class ExpectationResult(msgspec.Struct, frozen=True, kw_only=True):
    index: int  # the expectation's place in the file: expect[index]
    subject: str  # "task t1" or "gpu node-a/0"
    key: str
    passed: bool
    expected: Any
    seen: Any
    message: str


# --- observe -------------------------------------------------------------------------


@dataclass
class _Task:
    task_id: str
    state: ev.TaskStatus = "pending"
    faults: list[ev.Fault] = field(default_factory=list)
    reason: ev.FailureReason | None = None
    rebuilds: int = 0
    counted_rebuilds: int = 0
    placements: dict[int, Placement] = field(default_factory=dict)

    def move(self, state: ev.TaskStatus) -> None:
        if self.state not in TERMINAL_STATES:
            self.state = state

    def freeze(self) -> TaskObservation:
        return TaskObservation(
            task_id=self.task_id,
            state=self.state,
            attempts=len(self.placements),
            faults=tuple(self.faults),
            reason=self.reason,
            rebuilds=self.rebuilds,
            counted_rebuilds=self.counted_rebuilds,
            placements=tuple(self.placements[a] for a in sorted(self.placements)),
        )


@dataclass
class _Gpu:
    uuid: str
    node: str | None = None
    quarantined: bool = False
    task_id: str | None = None


@dataclass
class _Fold:
    tasks: dict[str, _Task] = field(default_factory=dict)
    gpus: dict[str, _Gpu] = field(default_factory=dict)
    nodes: dict[str, bool] = field(default_factory=dict)

    def task(self, task_id: str) -> _Task:
        return self.tasks.setdefault(task_id, _Task(task_id))

    def gpu(self, uuid: str, node: str | None) -> _Gpu:
        gpu = self.gpus.setdefault(uuid, _Gpu(uuid))
        gpu.node = gpu.node or node
        return gpu

    def apply(self, event: ev.Event) -> None:
        handler = _APPLY.get(type(event))
        if handler is not None:
            handler(self, event)

    # -- nodes and GPUs --

    def node_registered(self, event: ev.NodeRegistered) -> None:
        self.nodes.setdefault(event.node, False)
        for info in event.gpus:
            self.gpu(info.uuid, event.node)

    def node_lost(self, event: ev.NodeLost) -> None:
        self.nodes[event.node] = True

    def node_recovered(self, event: ev.NodeRecovered) -> None:
        self.nodes[event.node] = False

    def gpu_fault(self, event: ev.GpuFault) -> None:
        self.gpu(event.gpu_uuid, event.node)

    def gpu_quarantined(self, event: ev.GpuQuarantined) -> None:
        self.gpu(event.gpu_uuid, event.node).quarantined = True

    def gpu_restored(self, event: ev.GpuRestored) -> None:
        self.gpu(event.gpu_uuid, event.node).quarantined = False

    def gpu_allocated(self, event: ev.GpuAllocated) -> None:
        self.gpu(event.gpu_uuid, event.node).task_id = event.task_id

    def gpu_released(self, event: ev.GpuReleased) -> None:
        gpu = self.gpu(event.gpu_uuid, event.node)
        if gpu.task_id == event.task_id:
            gpu.task_id = None

    # -- tasks --

    def task_submitted(self, event: ev.TaskSubmitted) -> None:
        self.task(event.task_id)

    def task_pending(self, event: ev.TaskPending) -> None:
        self.task(event.task_id).move("pending")

    def task_scheduled(self, event: ev.TaskScheduled) -> None:
        task = self.task(event.task_id)
        task.move("running")
        task.placements[event.attempt] = Placement(
            attempt=event.attempt, node=event.node, gpu_uuids=event.gpu_uuids
        )

    def fault_classified(self, event: ev.FaultClassified) -> None:
        if event.fault != "completed":
            self.task(event.task_id).faults.append(event.fault)

    def rebuild_decided(self, event: ev.RebuildDecided) -> None:
        task = self.task(event.task_id)
        task.rebuilds += 1
        task.counted_rebuilds += int(event.counted)

    def task_completed(self, event: ev.TaskCompleted) -> None:
        self.task(event.task_id).move("completed")

    def task_failed(self, event: ev.TaskFailed) -> None:
        task = self.task(event.task_id)
        if task.state not in TERMINAL_STATES:
            task.reason = event.reason
        task.move("failed")

    def task_cancelled(self, event: ev.TaskCancelled) -> None:
        self.task(event.task_id).move("cancelled")


_APPLY: Final = dict(
    [
        ev.on(ev.NodeRegistered, _Fold.node_registered),
        ev.on(ev.NodeLost, _Fold.node_lost),
        ev.on(ev.NodeRecovered, _Fold.node_recovered),
        ev.on(ev.GpuFault, _Fold.gpu_fault),
        ev.on(ev.GpuQuarantined, _Fold.gpu_quarantined),
        ev.on(ev.GpuRestored, _Fold.gpu_restored),
        ev.on(ev.GpuAllocated, _Fold.gpu_allocated),
        ev.on(ev.GpuReleased, _Fold.gpu_released),
        ev.on(ev.TaskSubmitted, _Fold.task_submitted),
        ev.on(ev.TaskPending, _Fold.task_pending),
        ev.on(ev.TaskScheduled, _Fold.task_scheduled),
        ev.on(ev.FaultClassified, _Fold.fault_classified),
        ev.on(ev.RebuildDecided, _Fold.rebuild_decided),
        ev.on(ev.TaskCompleted, _Fold.task_completed),
        ev.on(ev.TaskFailed, _Fold.task_failed),
        ev.on(ev.TaskCancelled, _Fold.task_cancelled),
    ]
)
# container.* events are evidence, not state: what they mean reaches the log as the
# engine's decisions (fault.classified and what follows it).
IGNORED: Final[frozenset[type[ev.Event]]] = frozenset(
    {ev.ContainerStarted, ev.ContainerStartFailed, ev.ContainerExited}
)


def observe(events: Iterable[ev.Event]) -> Observed:
    """Fold a drill's event log (in log order) into what its expectations talk about."""
    fold = _Fold()
    for event in events:
        fold.apply(event)
    return Observed(
        tasks={task_id: task.freeze() for task_id, task in fold.tasks.items()},
        gpus={
            uuid: GpuObservation(
                uuid=uuid, node=gpu.node, quarantined=gpu.quarantined, task_id=gpu.task_id
            )
            for uuid, gpu in fold.gpus.items()
        },
        nodes={name: NodeObservation(name=name, lost=lost) for name, lost in fold.nodes.items()},
    )


# --- check ---------------------------------------------------------------------------


def check(
    scenario: Scenario,
    observed: Observed,
    gpu_name_to_uuid: Mapping[str, str] | None = None,
) -> list[ExpectationResult]:
    """One result per expectation key, in file order.

    `gpu_name_to_uuid` maps scenario GPU names (`node-a/0`) to the uuids in the log;
    a name it does not map is its own uuid (as in the simulated cluster).
    """
    names = _Names(gpu_name_to_uuid or {})
    results: list[ExpectationResult] = []
    for expectation in scenario.expectations:
        if isinstance(expectation, TaskExpectation):
            task = observed.tasks.get(expectation.task)
            results.extend(_check_task(expectation, task, names))
        else:
            results.append(_check_gpu(expectation, observed, names))
    return results


def all_passed(results: Iterable[ExpectationResult]) -> bool:
    return all(result.passed for result in results)


class _Names:
    def __init__(self, name_to_uuid: Mapping[str, str]) -> None:
        self.to_uuid = dict(name_to_uuid)
        self.to_name = {uuid: name for name, uuid in name_to_uuid.items()}

    def uuid(self, name: str) -> str:
        return self.to_uuid.get(name, name)

    def names(self, uuids: Iterable[str]) -> list[str]:
        return [self.to_name.get(uuid, uuid) for uuid in uuids]


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(str(item) for item in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _result(
    expectation: TaskExpectation | GpuExpectation,
    subject: str,
    key: str,
    expected: Any,
    seen: Any,
    passed: bool,
    detail: str | None = None,
) -> ExpectationResult:
    shown = detail if detail is not None else f"{key} {_show(expected)}"
    message = (
        f"{subject}: {shown}" if passed else f"{subject}: expected {shown}, saw {_seen_text(seen)}"
    )
    return ExpectationResult(
        index=expectation.index,
        subject=subject,
        key=key,
        passed=passed,
        expected=expected,
        seen=seen,
        message=message,
    )


def _seen_text(seen: Any) -> str:
    if isinstance(seen, dict) and "summary" in seen:
        return str(seen["summary"])
    return _show(seen)


_SIMPLE_TASK_KEYS = ("state", "attempts", "faults", "reason", "rebuilds", "counted_rebuilds")


def _check_task(
    expectation: TaskExpectation, task: TaskObservation | None, names: _Names
) -> list[ExpectationResult]:
    subject = f"task {expectation.task}"
    results: list[ExpectationResult] = []
    for key in _SIMPLE_TASK_KEYS:
        expected = getattr(expectation, key)
        if expected is None:
            continue
        if key == "faults":
            expected = list(expected)
        if task is None:
            results.append(_result(expectation, subject, key, expected, None, False))
            continue
        seen = getattr(task, key)
        seen = list(seen) if isinstance(seen, tuple) else seen
        results.append(_result(expectation, subject, key, expected, seen, seen == expected))
    if expectation.not_on_gpus_of_attempt is not None:
        results.append(_not_on(expectation, task, names, "gpus"))
    if expectation.not_on_node_of_attempt is not None:
        results.append(_not_on(expectation, task, names, "node"))
    return results


def _not_on(
    expectation: TaskExpectation, task: TaskObservation | None, names: _Names, what: str
) -> ExpectationResult:
    """The last placed attempt shares no GPU (or not the node) with attempt k.

    `seen` holds the last attempt's number and place, and attempt k's place.
    """
    key = f"not_on_{what}_of_attempt"
    k: int = getattr(expectation, key)
    subject = f"task {expectation.task}"
    earlier = task.placement(k) if task else None
    last = task.last_placement if task else None
    if earlier is None or last is None:
        missing = {"summary": f"attempt {k} was never placed"}
        return _result(expectation, subject, key, k, missing, False, _not_on_text(what, k, None))
    place_last: str | list[str]
    place_k: str | list[str]
    if what == "gpus":
        passed = last.attempt != k and not set(last.gpu_uuids) & set(earlier.gpu_uuids)
        place_last, place_k = names.names(last.gpu_uuids), names.names(earlier.gpu_uuids)
    else:
        passed = last.attempt != k and last.node != earlier.node
        place_last, place_k = last.node, earlier.node
    seen: dict[str, Any] = {
        "summary": f"attempt {last.attempt} on {_show(place_last)}",
        "last_attempt": last.attempt,
        what: place_last,
        f"attempt_{k}_{what}": place_k,
    }
    return _result(expectation, subject, key, k, seen, passed, _not_on_text(what, k, place_k))


def _not_on_text(what: str, k: int, place_k: str | list[str] | None) -> str:
    place = "any GPU" if what == "gpus" else "the node"
    suffix = f" ({_show(place_k)})" if place_k else ""
    return f"last attempt not on {place} of attempt {k}{suffix}"


def _check_gpu(expectation: GpuExpectation, observed: Observed, names: _Names) -> ExpectationResult:
    gpu = observed.gpus.get(names.uuid(expectation.gpu))
    seen = gpu.quarantined if gpu is not None else False  # never seen: never quarantined
    return _result(
        expectation,
        f"gpu {expectation.gpu}",
        "quarantined",
        expectation.quarantined,
        seen,
        seen == expectation.quarantined,
    )
