"""Admission: whether a stored message may be folded, judged on meaning as well as shape.

The log is the only authority and it denies purge, so one stored message that stops a
fold would stop the engine (and every read model) for good: an `at` without a zone
compared with an aware clock, a year-9999 `at` plus an evidence window, an attempt
number SQLite cannot store. msgspec only checks types; everything that reads the log
admits each message here first, and what is refused goes to the dead-letter subject
with the reason this module gives.

The stateful part is Kubernetes' NodeRestriction applied to the log: a node's agent
may only state facts about its own node, the attempts bound to it and its own GPUs.
Engine decisions are checked as little as possible (the task exists), so a legitimate
decision is never refused.

Pure: no I/O, clock or randomness. Nothing here raises on any event.

Size: one module, past 600 lines, on purpose: one check per event type, side by side
with the bounds they share, so a reviewer sees the whole boundary at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias

from gpuwarden.engine.core.events import (
    FAILURE_REASONS,
    FAULT_TYPES,
    WRITER_NODE,
    ContainerExited,
    ContainerStarted,
    ContainerStartFailed,
    Event,
    FaultClassified,
    GpuAllocated,
    GpuFault,
    GpuInfo,
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
    legacy_subject_of,
    subject_of,
    type_of,
    writer_of,
)
from gpuwarden.engine.core.wire import MAX_EVENT_BYTES

# --- bounds --------------------------------------------------------------------------

# Times: late enough to be real, early enough that any window or backoff added to them
# (and a decade more) stays inside what `datetime` can hold.
MIN_TIME: Final = datetime(2000, 1, 1, tzinfo=UTC)
MAX_TIME: Final = datetime(2200, 1, 1, tzinfo=UTC)  # exclusive
MIN_ATTEMPT: Final = 1
MAX_ATTEMPT: Final = 1_000_000
MIN_EXIT_CODE: Final = -(2**31)
MAX_EXIT_CODE: Final = 2**31 - 1
MIN_SIGNAL: Final = 1
MAX_SIGNAL: Final = 128
MAX_XID: Final = 1_000_000
MAX_GPUS: Final = 1024  # a task's GPUs, a node's GPUs, an attempt's GPUs
MAX_GPU_INDEX: Final = MAX_GPUS - 1
MAX_GPU_MEMORY_MB: Final = 2**40
MAX_MEMORY_MB: Final = 64 * 1024 * 1024  # container memory, as intake's MAX_MEMORY_MB
MAX_RULE: Final = 10_000  # index of a policy rule
MAX_ID_CHARS: Final = 128  # ids, task ids, node names, GPU uuids, container ids, actor
MAX_NAME_CHARS: Final = 128  # name, owner, gpu_model, request_id (intake's MAX_TEXT_CHARS)
MAX_LABEL_CHARS: Final = 512  # image, GPU model, runtime, classification rule
MAX_TEXT_CHARS: Final = 16384  # error, detail, reason
MAX_ARGS: Final = 4096
MAX_COMMAND_BYTES: Final = 64 * 1024
MAX_ENV_VARS: Final = 1024
# Env values are sealed before long ("gw-sealed:v1:" + base64 of value + 48 bytes): a
# value intake allows (64 KiB) grows to about 86 KiB, a full env to about 170 KiB.
MAX_ENV_VALUE_BYTES: Final = 96 * 1024
MAX_ENV_BYTES: Final = 192 * 1024
# A classification cites the exit, the node's loss and the faults it weighed: at most
# the supervisor's 16 remembered faults on each of an attempt's GPUs.
MAX_EVIDENCE: Final = 2 + 16 * MAX_GPUS
MAX_EXCLUDES: Final = 4096
GPU_FAULT_KINDS: Final = frozenset({"xid", "ecc_dbe", "fallen_off_bus", "recovery_action"})

_FAULTS: Final = frozenset(FAULT_TYPES)
_FAILURE_REASONS: Final = frozenset(FAILURE_REASONS)
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHOWN_CHARS: Final = 40
_NODE_WRITER: Final = WRITER_NODE + "."
_TIME_RANGE: Final = f"{MIN_TIME:%Y-%m-%dT%H:%MZ}..{MAX_TIME:%Y-%m-%dT%H:%MZ}"

Reason: TypeAlias = str | None

# --- values --------------------------------------------------------------------------


def _show(value: str) -> str:
    """A value inside a one-line reason: clipped, control characters escaped."""
    if len(value) <= _SHOWN_CHARS:
        return repr(value)
    return repr(value[:_SHOWN_CHARS]) + f"... ({len(value)} characters)"


def _plain(value: str) -> str:
    """A name as it is where it reads plainly on one line, else as _show gives it."""
    return value if _token_ok(value, 1024) else _show(value)


def _show_int(value: int) -> str:
    """An integer in a reason; str() itself refuses ones of more than 4300 digits."""
    bits = value.bit_length()
    return str(value) if bits <= 256 else f"an integer of {bits} bits"


def _utf8_len(value: str) -> int | None:
    """Bytes once encoded, or None for text that cannot be (a lone surrogate)."""
    if value.isascii():
        return len(value)
    try:
        return len(value.encode())
    except UnicodeEncodeError:
        return None


def _time(field: str, value: datetime) -> Reason:
    if 2000 < value.year < 2199 and value.utcoffset() is not None:
        return None  # a zone, and a year that no UTC offset can carry out of range
    if value.utcoffset() is None:
        return f"{field}: time has no zone"
    if MIN_TIME <= value < MAX_TIME:
        return None
    return f"{field}: {value.isoformat()} out of range {_TIME_RANGE}"


def _opt_time(field: str, value: datetime | None) -> Reason:
    return None if value is None else _time(field, value)


def _int(field: str, value: int, low: int, high: int) -> Reason:
    if low <= value <= high:
        return None
    return f"{field}: {_show_int(value)} out of range {low}..{high}"


def _opt_int(field: str, value: int | None, low: int, high: int) -> Reason:
    return None if value is None else _int(field, value, low, high)


def _token_ok(value: str, limit: int) -> bool:
    """Non-empty, short, printable and without whitespace (isprintable() refuses every
    whitespace character but the plain space)."""
    return 0 < len(value) <= limit and value.isprintable() and " " not in value


def _bad_token(field: str, value: str, limit: int) -> str:
    if not value:
        return f"{field}: empty"
    if len(value) > limit:
        return f"{field}: {len(value)} characters, over {limit}"
    return f"{field}: {_show(value)} has a control character or whitespace"


# Ids seen well formed: a task's id, its node and the ids that causation_id cites come
# back in event after event, and a dict lookup is a tenth of the check (a memo of a pure
# function: the answer for a string never changes; cleared when it grows large).
_GOOD_IDS: dict[str, None] = {}
_GOOD_IDS_MAX: Final = 1 << 17


def _id(field: str, value: str) -> Reason:
    if value in _GOOD_IDS:
        return None
    if 0 < len(value) <= MAX_ID_CHARS and value.isprintable() and " " not in value:
        if len(_GOOD_IDS) >= _GOOD_IDS_MAX:
            _GOOD_IDS.clear()
        _GOOD_IDS[value] = None
        return None  # _token_ok, inlined: this runs several times for every event
    return _bad_token(field, value, MAX_ID_CHARS)


def _opt_id(field: str, value: str | None) -> Reason:
    return None if value is None else _id(field, value)


def _container_id(value: str) -> Reason:
    """An agent answers a stop that found no container with an exit whose container
    id may be unknown (""): empty is the one exception to the id rule."""
    return None if not value else _id("container_id", value)


def _name(field: str, value: str, limit: int = MAX_NAME_CHARS) -> Reason:
    """A short label shown on one line: printable (spaces allowed), may be empty."""
    if len(value) > limit:
        return f"{field}: {len(value)} characters, over {limit}"
    if not value.isprintable():
        return f"{field}: {_show(value)} is not printable"
    return None


def _text(field: str, value: str) -> Reason:
    """Free text (a daemon's error, a reason): any line breaks, but bounded, no NUL,
    and valid UTF-8 (SQLite and NATS take bytes)."""
    if len(value) > MAX_TEXT_CHARS:
        return f"{field}: {len(value)} characters, over {MAX_TEXT_CHARS}"
    if "\0" in value:
        return f"{field}: has a NUL character"
    if _utf8_len(value) is None:
        return f"{field}: not valid UTF-8 text"
    return None


def _enum(field: str, value: str, allowed: Collection[str]) -> Reason:
    if value in allowed:
        return None
    return f"{field}: {_show(value)} is not one of {', '.join(sorted(allowed))}"


def _ids(
    field: str, values: tuple[str, ...], low: int, high: int, *, distinct: bool = False
) -> Reason:
    """A collection of `low..high` ids; distinct where a repeat makes no sense (an
    attempt's GPUs), not where the engine may cite the same fact twice (evidence)."""
    if not low <= len(values) <= high:
        return f"{field}: {len(values)} entries, not {low}..{high}"
    for i, value in enumerate(values):
        if not _token_ok(value, MAX_ID_CHARS):
            return _bad_token(f"{field}[{i}]", value, MAX_ID_CHARS)
    if distinct and len(set(values)) != len(values):
        return f"{field}: has duplicates"
    return None


# --- the task's request --------------------------------------------------------------


def _command(command: tuple[str, ...]) -> Reason:
    if not command:
        return "command: empty"
    if len(command) > MAX_ARGS:
        return f"command: {len(command)} arguments, over {MAX_ARGS}"
    size = 0
    for i, arg in enumerate(command):
        if "\0" in arg:
            return f"command[{i}]: has a NUL character"
        length = _utf8_len(arg)
        if length is None:
            return f"command[{i}]: not valid UTF-8 text"
        size += length
    if size > MAX_COMMAND_BYTES:
        return f"command: {size} bytes, over {MAX_COMMAND_BYTES}"
    return None


def _env(env: Mapping[str, str]) -> Reason:
    if len(env) > MAX_ENV_VARS:
        return f"env: {len(env)} variables, over {MAX_ENV_VARS}"
    size = 0
    for key, value in env.items():
        if _ENV_NAME.fullmatch(key) is None:
            return f"env: {_show(key)} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)"
        if "\0" in value:
            return f"env.{key}: has a NUL character"
        length = _utf8_len(value)
        if length is None:
            return f"env.{key}: not valid UTF-8 text"
        if length > MAX_ENV_VALUE_BYTES:
            return f"env.{key}: {length} bytes, over {MAX_ENV_VALUE_BYTES}"
        size += len(key) + length
    if size > MAX_ENV_BYTES:
        return f"env: {size} bytes, over {MAX_ENV_BYTES}"
    return None


def _image(image: str) -> Reason:
    if _token_ok(image, MAX_LABEL_CHARS):
        return None
    return _bad_token("image", image, MAX_LABEL_CHARS)


def _gpus(gpus: tuple[GpuInfo, ...]) -> Reason:
    """A node's inventory: bounded, each GPU sane, no uuid twice."""
    if len(gpus) > MAX_GPUS:
        return f"gpus: {len(gpus)} GPUs, over {MAX_GPUS}"
    for i, gpu in enumerate(gpus):
        reason = (
            _id(f"gpus[{i}].uuid", gpu.uuid)
            or _int(f"gpus[{i}].index", gpu.index, 0, MAX_GPU_INDEX)
            or _name(f"gpus[{i}].model", gpu.model, MAX_LABEL_CHARS)
            or _int(f"gpus[{i}].memory_mb", gpu.memory_mb, 0, MAX_GPU_MEMORY_MB)
        )
        if reason is not None:
            return reason
    if len({gpu.uuid for gpu in gpus}) != len(gpus):
        return "gpus: a GPU uuid appears twice"
    return None


# --- per event type ------------------------------------------------------------------


def _actor(actor: str) -> Reason:
    """Who wrote it: a short printable name (an operator's may hold a space)."""
    if not actor:
        return "actor: empty"
    if len(actor) > MAX_ID_CHARS:
        return f"actor: {len(actor)} characters, over {MAX_ID_CHARS}"
    return None if actor.isprintable() else f"actor: {_show(actor)} is not printable"


def _common(e: Event) -> Reason:
    causation, correlation, good = e.causation_id, e.correlation_id, _GOOD_IDS
    return (
        _id("id", e.id)
        or _time("at", e.at)
        or (None if e.actor in good else _actor(e.actor))  # an actor is an id-like name
        or (None if causation is None or causation in good else _id("causation_id", causation))
        or (
            None
            if correlation is None or correlation in good
            else _id("correlation_id", correlation)
        )
    )


def _attempt(e: Any) -> Reason:
    return _id("task_id", e.task_id) or _int("attempt", e.attempt, MIN_ATTEMPT, MAX_ATTEMPT)


def _on_node(e: Any) -> Reason:
    return _attempt(e) or _id("node", e.node)


def _node_registered(e: NodeRegistered) -> Reason:
    return _id("node", e.node) or _name("runtime", e.runtime, MAX_LABEL_CHARS) or _gpus(e.gpus)


def _node_liveness(e: NodeLost | NodeRecovered) -> Reason:
    return _id("node", e.node) or _opt_time("last_heartbeat_at", e.last_heartbeat_at)


def _gpu_fault(e: GpuFault) -> Reason:
    return (
        _id("gpu_uuid", e.gpu_uuid)
        or _id("node", e.node)
        or _enum("kind", e.kind, GPU_FAULT_KINDS)
        or _opt_int("xid", e.xid, 0, MAX_XID)
        or _text("detail", e.detail)
    )


def _gpu_health(e: GpuQuarantined | GpuRestored) -> Reason:
    return _id("gpu_uuid", e.gpu_uuid) or _id("node", e.node) or _text("reason", e.reason)


def _gpu_holding(e: GpuAllocated | GpuReleased) -> Reason:
    return _id("gpu_uuid", e.gpu_uuid) or _id("node", e.node) or _attempt(e)


def _task_submitted(e: TaskSubmitted) -> Reason:
    return (
        _id("task_id", e.task_id)
        or _name("name", e.name)
        or _image(e.image)
        or _command(e.command)
        or _int("gpus", e.gpus, 0, MAX_GPUS)
        or (None if e.gpu_model is None else _name("gpu_model", e.gpu_model))
        or _int("min_gpu_memory_mb", e.min_gpu_memory_mb, 0, MAX_GPU_MEMORY_MB)
        or _env(e.env)
        or _name("owner", e.owner)
        or _opt_int("memory_mb", e.memory_mb, 1, MAX_MEMORY_MB)
        or _opt_id("request_id", e.request_id)
    )


def _task_pending(e: TaskPending) -> Reason:
    return _attempt(e) or _text("reason", e.reason)


def _task_scheduled(e: TaskScheduled) -> Reason:
    # 0 GPUs: the supervisor places a task that asked for none (intake never asks).
    return _on_node(e) or _ids("gpu_uuids", e.gpu_uuids, 0, MAX_GPUS, distinct=True)


def _container_started(e: ContainerStarted) -> Reason:
    return _on_node(e) or _container_id(e.container_id)


def _container_start_failed(e: ContainerStartFailed) -> Reason:
    return _on_node(e) or _text("error", e.error)


def _container_exited(e: ContainerExited) -> Reason:
    return (
        _on_node(e)
        or _container_id(e.container_id)
        or _opt_int("exit_code", e.exit_code, MIN_EXIT_CODE, MAX_EXIT_CODE)
        or _opt_int("signal", e.signal, MIN_SIGNAL, MAX_SIGNAL)
        or _text("error", e.error)
        or _opt_time("finished_at", e.finished_at)
    )


def _fault_classified(e: FaultClassified) -> Reason:
    return (
        _attempt(e)
        or _enum("fault", e.fault, _FAULTS)
        or _name("rule", e.rule, MAX_LABEL_CHARS)
        or _ids("evidence", e.evidence, 0, MAX_EVIDENCE)
    )


def _rebuild_decided(e: RebuildDecided) -> Reason:
    return (
        _attempt(e)
        or _int("previous_attempt", e.previous_attempt, MIN_ATTEMPT, MAX_ATTEMPT)
        or _enum("fault", e.fault, _FAULTS)
        or _opt_int("rule", e.rule, 0, MAX_RULE)
        or _time("not_before", e.not_before)
        or _ids("exclude_gpus", e.exclude_gpus, 0, MAX_EXCLUDES)
        or _ids("exclude_nodes", e.exclude_nodes, 0, MAX_EXCLUDES)
    )


def _task_completed(e: TaskCompleted) -> Reason:
    return _attempt(e)


def _task_failed(e: TaskFailed) -> Reason:
    return (
        _id("task_id", e.task_id)
        or _opt_int("attempt", e.attempt, MIN_ATTEMPT, MAX_ATTEMPT)
        or (None if e.fault is None else _enum("fault", e.fault, _FAULTS))
        or _enum("reason", e.reason, _FAILURE_REASONS)
        or _opt_int("rule", e.rule, 0, MAX_RULE)
        or _text("detail", e.detail)
    )


def _task_cancelled(e: TaskCancelled) -> Reason:
    return (
        _id("task_id", e.task_id)
        or _text("reason", e.reason)
        or _opt_int("attempt", e.attempt, MIN_ATTEMPT, MAX_ATTEMPT)
    )


_CHECKS: Final[dict[type[Any], Callable[[Any], Reason]]] = {
    NodeRegistered: _node_registered,
    NodeLost: _node_liveness,
    NodeRecovered: _node_liveness,
    GpuFault: _gpu_fault,
    GpuQuarantined: _gpu_health,
    GpuRestored: _gpu_health,
    GpuAllocated: _gpu_holding,
    GpuReleased: _gpu_holding,
    TaskSubmitted: _task_submitted,
    TaskPending: _task_pending,
    TaskScheduled: _task_scheduled,
    ContainerStarted: _container_started,
    ContainerStartFailed: _container_start_failed,
    ContainerExited: _container_exited,
    FaultClassified: _fault_classified,
    RebuildDecided: _rebuild_decided,
    TaskCompleted: _task_completed,
    TaskFailed: _task_failed,
    TaskCancelled: _task_cancelled,
}


def check_event(event: Event) -> str | None:
    """The stateless part: field values of one event (times, integers, strings,
    collections, enums, ids). None if sane, else the reason, naming the field."""
    try:
        check = _CHECKS.get(type(event))
        if check is None:
            return f"type: {type(event).__name__} is not an event of the catalog"
        return _common(event) or check(event)
    except Exception as exc:  # a value of the wrong type, built in memory: still no raise
        return f"unreadable event: {type(exc).__name__}"


# --- subjects ------------------------------------------------------------------------


def check_subject(subject: str, event: Event) -> str | None:
    """The event must be stored on exactly `subject_of(event)` (scheme 2) or
    `legacy_subject_of(event)` (scheme 1, old logs): the subject is what NATS
    permissions judged, so an event anywhere else spoke for a writer it is not."""
    try:
        expected = subject_of(event)
        if subject == expected or subject == legacy_subject_of(event):
            return None
        about = ""
        if writer_of(event).startswith(_NODE_WRITER):
            about = f" of node {_plain(getattr(event, 'node', ''))}"
        shown = _plain(subject)
        return f"subject {shown} is not where a {type_of(event)}{about} goes ({expected})"
    except Exception as exc:
        return f"subject: unreadable event ({type(exc).__name__})"


def check_size(size: int) -> str | None:
    """A stored message larger than any reader folds (every reader applies this)."""
    if size > MAX_EVENT_BYTES:
        return f"event of {size} bytes exceeds {MAX_EVENT_BYTES}"
    return None


# --- the stateful part ---------------------------------------------------------------

_Rule = Callable[["Admission", Any], Reason]


class Admission:
    """Stateful admission: the small fold it needs (which tasks exist, which attempt
    runs on which node, which GPU belongs to which node).

    It must see the whole stream in order, as the engine does: a reader of some
    subjects only would find GPUs of no node and attempts of no task.
    """

    __slots__ = ("_gpu_node", "_node_gpus", "_tasks")

    def __init__(self) -> None:
        self._tasks: dict[str, dict[int, str]] = {}  # task -> attempt -> node
        self._gpu_node: dict[str, str] = {}  # GPU uuid -> node, per latest registrations
        self._node_gpus: dict[str, tuple[str, ...]] = {}  # node -> its registered GPUs

    def check(self, subject: str, event: Event) -> str | None:
        """None if admitted, else the reason (one line, names the field, e.g. "at: time
        has no zone"). Never raises, never mutates."""
        try:
            reason = check_event(event) or check_subject(subject, event)
            if reason is not None:
                return reason
            rule = _STATE_RULES.get(type(event))
            return None if rule is None else rule(self, event)
        except Exception as exc:
            return f"unreadable event: {type(exc).__name__}"

    def admit(self, subject: str, event: Event) -> str | None:
        """check(); when admitted, fold the event into the admission state. Returns the
        reason when refused (state unchanged)."""
        reason = self.check(subject, event)
        if reason is None:
            fold = _FOLDS.get(type(event))
            if fold is not None:
                getattr(self, fold)(event)  # by name: a read model may fold its own way
        return reason

    # --- rules ---------------------------------------------------------------------

    def attempts_of(self, task_id: str) -> Mapping[int, str] | None:
        """A task's scheduled attempts and their nodes; None for a task never submitted.
        (A read model that keeps this in its own rows answers from them instead.)"""
        return self._tasks.get(task_id)

    def has_task(self, task_id: str) -> bool:
        return task_id in self._tasks

    def _task_exists(self, e: Any) -> Reason:
        return None if self.has_task(e.task_id) else f"no task {e.task_id}"

    def _new_task(self, e: TaskSubmitted) -> Reason:
        return f"task {e.task_id} already submitted" if self.has_task(e.task_id) else None

    def _own_attempt(self, e: ContainerStarted | ContainerStartFailed | ContainerExited) -> Reason:
        """NodeRestriction: an agent speaks only of attempts scheduled on its node."""
        attempts = self.attempts_of(e.task_id)
        if attempts is None:
            return f"no task {e.task_id}"
        node = attempts.get(e.attempt)
        if node is None:
            return f"task {e.task_id} has no attempt {e.attempt}"
        if node != e.node:
            return f"attempt {e.attempt} of task {e.task_id} runs on node {node}, not {e.node}"
        return None

    def _own_gpu(self, e: GpuFault) -> Reason:
        if self._gpu_node.get(e.gpu_uuid) == e.node:
            return None
        return f"GPU {e.gpu_uuid} is not on node {e.node}"

    def _free_gpus(self, e: NodeRegistered) -> Reason:
        """A node may claim only GPUs that no other node ever registered. A GPU stays its
        first node's for good, listed or not: a node that stops listing one (it fell
        off the bus, NVML lost it) must be able to list it again, and no other node may
        take it meanwhile. (A GPU moved to another machine is a new deployment.)"""
        for gpu in e.gpus:
            owner = self._gpu_node.get(gpu.uuid)
            if owner is not None and owner != e.node:
                return f"GPU {gpu.uuid} belongs to node {owner}"
        return None

    # --- folds ---------------------------------------------------------------------

    def _fold_submitted(self, e: TaskSubmitted) -> None:
        self._tasks[e.task_id] = {}

    def _fold_scheduled(self, e: TaskScheduled) -> None:
        self._tasks.setdefault(e.task_id, {})[e.attempt] = e.node

    def seed_gpu(self, uuid: str, node: str) -> None:
        """Start from a GPU's node as a read model's rows have it."""
        self._gpu_node.setdefault(uuid, node)

    def _fold_registered(self, e: NodeRegistered) -> None:
        uuids = tuple(gpu.uuid for gpu in e.gpus)
        for uuid in uuids:
            self._gpu_node[uuid] = e.node
        self._node_gpus[e.node] = uuids


_STATE_RULES: Final[dict[type[Any], _Rule]] = {
    NodeRegistered: Admission._free_gpus,
    GpuFault: Admission._own_gpu,
    GpuAllocated: Admission._task_exists,
    GpuReleased: Admission._task_exists,
    TaskSubmitted: Admission._new_task,
    TaskPending: Admission._task_exists,
    TaskScheduled: Admission._task_exists,
    ContainerStarted: Admission._own_attempt,
    ContainerStartFailed: Admission._own_attempt,
    ContainerExited: Admission._own_attempt,
    FaultClassified: Admission._task_exists,
    RebuildDecided: Admission._task_exists,
    TaskCompleted: Admission._task_exists,
    TaskFailed: Admission._task_exists,
    TaskCancelled: Admission._task_exists,
}

_FOLDS: Final[dict[type[Any], str]] = {
    TaskSubmitted: "_fold_submitted",
    TaskScheduled: "_fold_scheduled",
    NodeRegistered: "_fold_registered",
}
