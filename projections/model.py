"""The read models as a pure fold of the log.

The SQLite store, the tests and `explain` all need the same answer to "what do the
tasks, attempts, GPUs and nodes look like after these events"; keeping that answer in
one pure module (no I/O) lets a test fold a hand-written log and compare it with what
the store persisted. `project` mutates rows held in a `Model` and marks them dirty; the
store writes the dirty rows and the event index rows in one transaction per batch.

Size: one module, past 600 lines, on purpose: the rows, the fold that fills them and
the admission kept in them change together whenever the catalog grows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.admission import Admission, check_event, check_size, check_subject
from gpuwarden.engine.core.wire import MAX_EVENT_BYTES
from gpuwarden.engine.ports import StoredEvent

INVALID_TYPE: Final = "!invalid"
# The shared vocabulary (events.TaskStatus), every word of it: the read model alone
# tells a placed task (`scheduled`) from one whose container started (`running`).
TASK_STATES: Final = ev.TASK_STATUSES


class TaskRow(msgspec.Struct, kw_only=True):
    id: str
    name: str = ""
    owner: str = ""
    image: str = ""
    state: ev.TaskStatus = "pending"
    attempts: int = 0
    current_attempt: int | None = None
    node: str | None = None
    gpus: tuple[str, ...] = ()
    last_fault: str | None = None
    failure_reason: str | None = None
    submitted_at: str | None = None
    updated_at: str | None = None


class AttemptRow(msgspec.Struct, kw_only=True):
    task: str
    attempt: int
    node: str | None = None
    gpus: tuple[str, ...] = ()
    container_id: str | None = None
    scheduled_at: str | None = None
    started_at: str | None = None
    exited_at: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    oom: bool = False
    error: str | None = None
    fault: str | None = None
    rule: str | None = None
    outcome: str | None = None


class GpuRow(msgspec.Struct, kw_only=True):
    uuid: str
    node: str | None = None
    index: int | None = None
    model: str | None = None
    memory_mb: int | None = None
    quarantined: bool = False
    allocated_task: str | None = None
    allocated_attempt: int | None = None
    fault_count: int = 0


class NodeRow(msgspec.Struct, kw_only=True):
    name: str
    runtime: str | None = None
    state: str = "alive"
    gpus: tuple[str, ...] = ()
    last_heartbeat: str | None = None


class EventRow(msgspec.Struct, kw_only=True):
    """One row of the events index: the columns the audit queries filter on."""

    seq: int
    subject: str
    type: str
    task: str | None = None
    attempt: int | None = None
    gpu: str | None = None
    node: str | None = None
    container: str | None = None
    at: str | None = None
    actor: str | None = None
    id: str | None = None
    causation: str | None = None
    correlation: str | None = None
    error: str | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    payload: str = ""


AttemptKey = tuple[str, int]


class Model:
    """Rows of the read models, plus which ones changed since the last `take_dirty`."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskRow] = {}
        self.attempts: dict[AttemptKey, AttemptRow] = {}
        self.gpus: dict[str, GpuRow] = {}
        self.nodes: dict[str, NodeRow] = {}
        self.dirty_tasks: set[str] = set()
        self.dirty_attempts: set[AttemptKey] = set()
        self.dirty_gpus: set[str] = set()
        self.dirty_nodes: set[str] = set()
        self.errors = 0  # events a handler raised on (crash-only: logged, then skipped)

    def task(self, task_id: str) -> TaskRow:
        row = self.tasks.get(task_id)
        if row is None:
            row = self.tasks[task_id] = TaskRow(id=task_id)
        self.dirty_tasks.add(task_id)
        return row

    def attempt(self, task_id: str, attempt: int) -> AttemptRow:
        key = (task_id, attempt)
        row = self.attempts.get(key)
        if row is None:
            row = self.attempts[key] = AttemptRow(task=task_id, attempt=attempt)
        self.dirty_attempts.add(key)
        return row

    def gpu(self, uuid: str) -> GpuRow:
        row = self.gpus.get(uuid)
        if row is None:
            row = self.gpus[uuid] = GpuRow(uuid=uuid)
        self.dirty_gpus.add(uuid)
        return row

    def node(self, name: str) -> NodeRow:
        row = self.nodes.get(name)
        if row is None:
            row = self.nodes[name] = NodeRow(name=name)
        self.dirty_nodes.add(name)
        return row

    def clear_dirty(self) -> None:
        self.dirty_tasks.clear()
        self.dirty_attempts.clear()
        self.dirty_gpus.clear()
        self.dirty_nodes.clear()


# --- time ----------------------------------------------------------------------------


_rfc3339: Final = msgspec.json.Encoder().encode
_RFC3339_WITH_MICROS: Final = len(b'"2025-01-01T00:00:00.000000Z"')


def format_time(value: datetime | None) -> str | None:
    """UTC ISO-8601 with microseconds: fixed width, so text order is time order."""
    if value is None:
        return None
    if value.tzinfo is UTC:
        # What the decoder gives, once per event in a rebuild. msgspec's C encoder writes
        # the same digits as isoformat in a quarter of the time ('Z' for the offset, and
        # no fraction when it is zero): patch those two up.
        text = _rfc3339(value)
        if len(text) == _RFC3339_WITH_MICROS:
            return text[1:-2].decode() + "+00:00"
        return text[1:-2].decode() + ".000000+00:00"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    elif value.utcoffset():
        value = value.astimezone(UTC)
    return value.isoformat(timespec="microseconds")


# --- the fold ------------------------------------------------------------------------


def _task_event(model: Model, task_id: str, at: str | None) -> TaskRow:
    row = model.task(task_id)
    row.updated_at = at
    return row


def _on_node_registered(model: Model, e: ev.NodeRegistered, at: str | None) -> None:
    node = model.node(e.node)
    node.runtime = e.runtime
    node.state = "alive"
    node.gpus = tuple(g.uuid for g in e.gpus)
    node.last_heartbeat = at
    for info in e.gpus:
        gpu = model.gpu(info.uuid)
        gpu.node = e.node
        gpu.index = info.index
        gpu.model = info.model
        gpu.memory_mb = info.memory_mb


def _on_node_lost(model: Model, e: ev.NodeLost, at: str | None) -> None:
    node = model.node(e.node)
    node.state = "lost"
    if e.last_heartbeat_at is not None:
        node.last_heartbeat = format_time(e.last_heartbeat_at)


def _on_node_recovered(model: Model, e: ev.NodeRecovered, at: str | None) -> None:
    node = model.node(e.node)
    node.state = "alive"
    node.last_heartbeat = format_time(e.last_heartbeat_at) if e.last_heartbeat_at else at


def _gpu_on(model: Model, uuid: str, node: str) -> GpuRow:
    gpu = model.gpu(uuid)
    if gpu.node is None:
        gpu.node = node
    return gpu


def _on_gpu_fault(model: Model, e: ev.GpuFault, at: str | None) -> None:
    _gpu_on(model, e.gpu_uuid, e.node).fault_count += 1


def _on_gpu_quarantined(model: Model, e: ev.GpuQuarantined, at: str | None) -> None:
    _gpu_on(model, e.gpu_uuid, e.node).quarantined = True


def _on_gpu_restored(model: Model, e: ev.GpuRestored, at: str | None) -> None:
    _gpu_on(model, e.gpu_uuid, e.node).quarantined = False


def _on_gpu_allocated(model: Model, e: ev.GpuAllocated, at: str | None) -> None:
    gpu = _gpu_on(model, e.gpu_uuid, e.node)
    gpu.allocated_task = e.task_id
    gpu.allocated_attempt = e.attempt


def _on_gpu_released(model: Model, e: ev.GpuReleased, at: str | None) -> None:
    gpu = _gpu_on(model, e.gpu_uuid, e.node)
    # A late release of an older allocation must not free the GPU's current holder.
    if gpu.allocated_task == e.task_id and gpu.allocated_attempt == e.attempt:
        gpu.allocated_task = None
        gpu.allocated_attempt = None


def _on_task_submitted(model: Model, e: ev.TaskSubmitted, at: str | None) -> None:
    task = _task_event(model, e.task_id, at)
    task.name = e.name
    task.owner = e.owner
    task.image = e.image
    task.submitted_at = at


def _on_task_pending(model: Model, e: ev.TaskPending, at: str | None) -> None:
    _task_event(model, e.task_id, at).state = "pending"


def _on_task_scheduled(model: Model, e: ev.TaskScheduled, at: str | None) -> None:
    task = _task_event(model, e.task_id, at)
    task.state = "scheduled"
    task.current_attempt = e.attempt
    task.attempts = max(task.attempts, e.attempt)
    task.node = e.node
    task.gpus = tuple(e.gpu_uuids)
    attempt = model.attempt(e.task_id, e.attempt)
    attempt.node = e.node
    attempt.gpus = tuple(e.gpu_uuids)
    attempt.scheduled_at = at


_ENDED: Final = ev.TERMINAL_STATUSES


def _on_container_started(model: Model, e: ev.ContainerStarted, at: str | None) -> None:
    task = _task_event(model, e.task_id, at)
    # A start can land after the task ended (a cancel that raced the run) or after a
    # rebuild moved on: only the current attempt of a live task makes it running.
    if task.state not in _ENDED and task.current_attempt in (None, e.attempt):
        task.state = "running"
    attempt = model.attempt(e.task_id, e.attempt)
    attempt.node = attempt.node or e.node
    attempt.container_id = e.container_id
    attempt.started_at = at


def _on_container_start_failed(model: Model, e: ev.ContainerStartFailed, at: str | None) -> None:
    _task_event(model, e.task_id, at)
    attempt = model.attempt(e.task_id, e.attempt)
    attempt.node = attempt.node or e.node
    attempt.error = e.error
    attempt.exited_at = at


def _on_container_exited(model: Model, e: ev.ContainerExited, at: str | None) -> None:
    _task_event(model, e.task_id, at)
    attempt = model.attempt(e.task_id, e.attempt)
    attempt.node = attempt.node or e.node
    attempt.container_id = e.container_id
    attempt.exited_at = format_time(e.finished_at) if e.finished_at else at
    attempt.exit_code = e.exit_code
    attempt.signal = e.signal
    attempt.oom = e.oom_killed
    attempt.error = e.error or None


def _on_fault_classified(model: Model, e: ev.FaultClassified, at: str | None) -> None:
    task = _task_event(model, e.task_id, at)
    if e.fault != "completed":  # a clean exit is a classification, not a fault
        task.last_fault = e.fault
    attempt = model.attempt(e.task_id, e.attempt)
    attempt.fault = e.fault
    attempt.rule = e.rule


def _on_rebuild_decided(model: Model, e: ev.RebuildDecided, at: str | None) -> None:
    task = _task_event(model, e.task_id, at)
    task.state = "pending"
    task.last_fault = e.fault
    task.attempts = max(task.attempts, e.attempt)
    task.current_attempt = e.attempt
    task.node = None
    task.gpus = ()
    previous = model.attempt(e.task_id, e.previous_attempt)
    previous.outcome = "rebuilt"
    previous.fault = previous.fault or e.fault


def _on_task_completed(model: Model, e: ev.TaskCompleted, at: str | None) -> None:
    task = _task_event(model, e.task_id, at)
    task.state = "completed"
    model.attempt(e.task_id, e.attempt).outcome = "completed"


def _on_task_failed(model: Model, e: ev.TaskFailed, at: str | None) -> None:
    task = _task_event(model, e.task_id, at)
    task.state = "failed"
    task.failure_reason = e.reason
    task.last_fault = e.fault or task.last_fault
    if e.attempt is not None:
        model.attempt(e.task_id, e.attempt).outcome = "failed"


def _on_task_cancelled(model: Model, e: ev.TaskCancelled, at: str | None) -> None:
    task = _task_event(model, e.task_id, at)
    task.state = "cancelled"
    number = e.attempt if e.attempt is not None else task.current_attempt
    if number is not None and (e.task_id, number) in model.attempts:
        attempt = model.attempt(e.task_id, number)
        attempt.outcome = attempt.outcome or "cancelled"


HANDLERS: Final = dict(
    [
        ev.on(ev.NodeRegistered, _on_node_registered),
        ev.on(ev.NodeLost, _on_node_lost),
        ev.on(ev.NodeRecovered, _on_node_recovered),
        ev.on(ev.GpuFault, _on_gpu_fault),
        ev.on(ev.GpuQuarantined, _on_gpu_quarantined),
        ev.on(ev.GpuRestored, _on_gpu_restored),
        ev.on(ev.GpuAllocated, _on_gpu_allocated),
        ev.on(ev.GpuReleased, _on_gpu_released),
        ev.on(ev.TaskSubmitted, _on_task_submitted),
        ev.on(ev.TaskPending, _on_task_pending),
        ev.on(ev.TaskScheduled, _on_task_scheduled),
        ev.on(ev.ContainerStarted, _on_container_started),
        ev.on(ev.ContainerStartFailed, _on_container_start_failed),
        ev.on(ev.ContainerExited, _on_container_exited),
        ev.on(ev.FaultClassified, _on_fault_classified),
        ev.on(ev.RebuildDecided, _on_rebuild_decided),
        ev.on(ev.TaskCompleted, _on_task_completed),
        ev.on(ev.TaskFailed, _on_task_failed),
        ev.on(ev.TaskCancelled, _on_task_cancelled),
    ]
)
IGNORED: Final[frozenset[type[ev.Event]]] = frozenset()  # every event shows in some row


# --- which rows an event touches (so the store can load them first) ------------------


class Keys(msgspec.Struct):
    """Rows a batch touches; a task key stands for the task and all its attempts."""

    tasks: set[str] = msgspec.field(default_factory=set)
    gpus: set[str] = msgspec.field(default_factory=set)
    nodes: set[str] = msgspec.field(default_factory=set)


def keys_of(batch: Iterable[StoredEvent]) -> Keys:
    """The rows a batch reads or writes: the store loads these before folding."""
    keys = Keys()
    for stored in batch:
        e: Any = stored.event
        if e is None:
            continue
        uuid = getattr(e, "gpu_uuid", None)
        if uuid is not None:
            keys.gpus.add(uuid)  # GPU events touch only the GPU row
        elif isinstance(e, ev.NodeRegistered | ev.NodeLost | ev.NodeRecovered):
            keys.nodes.add(e.node)
            if isinstance(e, ev.NodeRegistered):
                keys.gpus.update(g.uuid for g in e.gpus)
        else:
            keys.tasks.add(e.task_id)
    return keys


# --- the events index ----------------------------------------------------------------

_log = logging.getLogger("gpuwarden.projections")
_encoder: Final = msgspec.json.Encoder()
_TASK_SUBJECT_PREFIX: Final = "gw.evt.task."


def payload_text(stored: StoredEvent) -> str:
    """The event's JSON as recorded (the raw bytes where the log kept them)."""
    if stored.data:
        return stored.data.decode("utf-8", errors="replace")
    if stored.event is not None:
        return ev.encode(stored.event).decode()
    return ""


def index_row(stored: StoredEvent, at: str | None = None) -> EventRow:
    """The events-index row of one stored event; undecodable ones get type '!invalid'."""
    e: Any = stored.event
    if e is None:
        task = None
        if stored.subject.startswith(_TASK_SUBJECT_PREFIX):
            token = ev.aggregate_of_subject(stored.subject)[len(_TASK_SUBJECT_PREFIX) :]
            task = token if "~" not in token else None
        return EventRow(
            seq=stored.seq,
            subject=stored.subject,
            type=INVALID_TYPE,
            task=task,
            error=stored.error or "undecodable event",
            headers=dict(stored.headers),
            payload=payload_text(stored),
        )
    attempt = getattr(e, "attempt", None)
    return EventRow(
        seq=stored.seq,
        subject=stored.subject,
        type=ev.type_of(e),
        task=getattr(e, "task_id", None),
        attempt=attempt,
        gpu=getattr(e, "gpu_uuid", None),
        node=getattr(e, "node", None),
        container=getattr(e, "container_id", None),
        at=at or format_time(e.at),
        actor=e.actor,
        id=e.id,
        causation=e.causation_id,
        correlation=e.correlation_id,
        headers=dict(stored.headers),
        payload=payload_text(stored),
    )


def index_values(stored: StoredEvent, at: str | None = None) -> tuple[Any, ...]:
    """`index_row` as the flat tuple of column values the store inserts (EventRow's field
    order, headers as JSON text or None); the rebuild's hot path builds no EventRow."""
    e: Any = stored.event
    if e is None:
        return row_values(index_row(stored, at))
    data = stored.data
    headers = stored.headers
    return (
        stored.seq,
        stored.subject,
        ev.type_of(e),
        getattr(e, "task_id", None),
        getattr(e, "attempt", None),
        getattr(e, "gpu_uuid", None),
        getattr(e, "node", None),
        getattr(e, "container_id", None),
        at or format_time(e.at),
        e.actor,
        e.id,
        e.causation_id,
        e.correlation_id,
        None,
        _encoder.encode(headers).decode() if headers else None,
        data.decode("utf-8", errors="replace") if data else ev.encode(e).decode(),
    )


def row_values(row: EventRow) -> tuple[Any, ...]:
    """An EventRow as the column values of the events table."""
    return (
        row.seq,
        row.subject,
        row.type,
        row.task,
        row.attempt,
        row.gpu,
        row.node,
        row.container,
        row.at,
        row.actor,
        row.id,
        row.causation,
        row.correlation,
        row.error,
        _encoder.encode(row.headers).decode() if row.headers else None,
        row.payload,
    )


def screen(stored: StoredEvent) -> StoredEvent:
    """The record as the read models fold it: an event that admission refuses (its
    values or its subject; see engine/core/admission.py) is kept as an invalid one, with the
    reason, exactly as an undecodable message is. The read models resume from their own
    checkpoint, so they apply the stateless rules; the engine dead-letters the rest."""
    e = stored.event
    if e is None:
        return stored
    reason = check_size(len(stored.data)) or check_subject(stored.subject, e) or check_event(e)
    if reason is None:
        return stored
    return msgspec.structs.replace(stored, event=None, error=f"refused: {reason}")


class _ModelAttempts(Mapping[int, str]):
    """A task's scheduled attempts, read from the read model's attempt rows."""

    __slots__ = ("model", "task")

    def __init__(self, model: Model, task: str) -> None:
        self.model = model
        self.task = task

    def __getitem__(self, attempt: int) -> str:
        row = self.model.attempts.get((self.task, attempt))
        if row is None or row.node is None or row.scheduled_at is None:
            raise KeyError(attempt)
        return row.node

    def __iter__(self) -> Iterator[int]:
        return (n for (task, n) in list(self.model.attempts) if task == self.task and n in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class ReadModelAdmission(Admission):
    """The engine's admission, over the read model's own rows.

    The read models resume from their checkpoint, so admission's state cannot be a fold
    of the whole log here: which tasks exist and where each attempt was scheduled are
    the task and attempt rows (the store loads a batch's rows before folding it, and
    rows only ever come from admitted events); which node each GPU is bound to is
    seeded from the GPU rows when the store opens and folded as the engine folds it.
    So `tasks`, `events` and `explain` refuse exactly what the engine dead-lettered.
    """

    __slots__ = ("model",)

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model

    def has_task(self, task_id: str) -> bool:
        return task_id in self.model.tasks

    def attempts_of(self, task_id: str) -> Mapping[int, str] | None:
        if task_id not in self.model.tasks:
            return None
        return _ModelAttempts(self.model, task_id)

    def _fold_submitted(self, e: ev.TaskSubmitted) -> None:
        pass  # the task's row is the record

    def _fold_scheduled(self, e: ev.TaskScheduled) -> None:
        pass  # the attempt's row is the record

    def admitted(self, stored: StoredEvent) -> StoredEvent:
        """The record as the read model folds it (a refused event kept as invalid)."""
        e = stored.event
        if e is None:
            return stored
        size = len(stored.data)
        reason = check_size(size) if size > MAX_EVENT_BYTES else self.admit(stored.subject, e)
        if reason is None:
            return stored
        return msgspec.structs.replace(stored, event=None, error=f"refused: {reason}")


def _apply(model: Model, e: ev.Event, at: str | None) -> None:
    """Crash-only: a handler bug costs the one event's rows, never the projector."""
    try:
        HANDLERS[type(e)](model, e, at)
    except Exception as exc:
        model.errors += 1
        _log.error("read model: %s %s not folded: %s: %s", ev.type_of(e), e.id,
                   type(exc).__name__, exc)  # fmt: skip


def project_values(model: Model, stored: StoredEvent) -> tuple[Any, ...]:
    """`project`, returning the events-index row as `index_values` does."""
    e = stored.event
    if e is None:
        return index_values(stored)
    at = format_time(e.at)
    _apply(model, e, at)
    return index_values(stored, at)


def project_rows(model: Model, e: Any) -> str | None:
    """`project` of a decoded event without its events-index row (a rebuild's writer
    process builds those); returns the event's time as the rows hold it."""
    at = format_time(e.at)
    _apply(model, e, at)
    return at


def project(model: Model, stored: StoredEvent) -> EventRow:
    """Fold one stored event into the model; returns its events-index row."""
    stored = screen(stored)
    e = stored.event
    if e is None:
        return index_row(stored)
    at = format_time(e.at)
    _apply(model, e, at)
    return index_row(stored, at)


def fold(events: Iterable[StoredEvent], model: Model | None = None) -> Model:
    """The read model of a whole log, in memory."""
    model = model or Model()
    admission = ReadModelAdmission(model)
    for stored in events:
        project(model, admission.admitted(stored))
    return model
