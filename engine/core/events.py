"""The event catalog: the contract every part of gpuwarden and its users rely on.

Each event is a frozen msgspec Struct tagged by `type`. Tags are never renamed; a
field added later gets a default so that events written before it still decode.
Pure module: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, Concatenate, Final, Literal, ParamSpec, TypeAlias, TypeVar, get_args

import msgspec
from gpuwarden.engine.core.errors import EventDecodeError

# --- the closed vocabularies ---------------------------------------------------------
#
# Values a field may take, checked when an event decodes. Only fields whose values
# admission refused anyway are closed here, so no stored event that was ever folded
# becomes undecodable (it was a dead letter before, and is one still); free text (a
# pending reason, a quarantine reason, a classification rule's name) stays open.

# How an attempt ended (`fault.classified`, `rebuild.decided`, `task.failed`).
Fault: TypeAlias = Literal[
    "completed",
    "user_error",
    "image_error",
    "container_oom",
    "gpu_app_error",
    "gpu_hardware",
    "node_lost",
    "runtime_error",
    "preempted",
    "unknown",
]
# Why a task failed (`task.failed`).
FailureReason: TypeAlias = Literal[
    "not_target_fault", "policy_rule", "budget_exhausted", "unschedulable"
]
# What a node's probe saw on a GPU (`gpu.fault`).
GpuFaultKind: TypeAlias = Literal["xid", "ecc_dbe", "fallen_off_bus", "recovery_action"]

# A task's state: one vocabulary for the supervisor (`TaskState.status`, and the task
# API that shows it), the read model (`tasks.state`) and scenario files (`expect.state`).
# No event carries it; each of those folds it from the log:
#   pending    not placed: submitted, or a decided rebuild awaiting its placement
#   scheduled  placed, its container not yet known to have started. Only the read model
#              watches container starts; the supervisor and scenario files say `running`
#   running    placed (read model: its container started)
#   completed, failed, cancelled: ended for good; nothing later changes it
# (Scenario files keep a rebuild that waits out its backoff `running`: see
# adapters/scenario_check.py.)
TaskStatus: TypeAlias = Literal[
    "pending", "scheduled", "running", "completed", "failed", "cancelled"
]


class _Base(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Common fields of every event."""

    id: str
    at: datetime
    actor: str
    causation_id: str | None = None
    correlation_id: str | None = None


class GpuInfo(msgspec.Struct, frozen=True, kw_only=True):
    uuid: str
    index: int
    model: str = "unknown"
    memory_mb: int = 0


# --- nodes -------------------------------------------------------------------------


class NodeRegistered(_Base, frozen=True, tag="node.registered"):
    node: str
    runtime: str
    gpus: tuple[GpuInfo, ...] = ()
    declared: bool = False  # inventory declared by hand (no NVML driver)


class NodeLost(_Base, frozen=True, tag="node.lost"):
    node: str
    last_heartbeat_at: datetime | None = None


class NodeRecovered(_Base, frozen=True, tag="node.recovered"):
    node: str
    last_heartbeat_at: datetime | None = None


# --- GPUs --------------------------------------------------------------------------


class GpuFault(_Base, frozen=True, tag="gpu.fault"):
    gpu_uuid: str
    node: str
    kind: GpuFaultKind
    xid: int | None = None
    detail: str = ""


class GpuQuarantined(_Base, frozen=True, tag="gpu.quarantined"):
    gpu_uuid: str
    node: str
    reason: str


class GpuRestored(_Base, frozen=True, tag="gpu.restored"):
    gpu_uuid: str
    node: str
    reason: str


class GpuAllocated(_Base, frozen=True, tag="gpu.allocated"):
    gpu_uuid: str
    node: str
    task_id: str
    attempt: int


class GpuReleased(_Base, frozen=True, tag="gpu.released"):
    gpu_uuid: str
    node: str
    task_id: str
    attempt: int


# --- tasks -------------------------------------------------------------------------


class TaskSubmitted(_Base, frozen=True, tag="task.submitted"):
    task_id: str
    name: str
    image: str
    command: tuple[str, ...]
    gpus: int = 1
    gpu_model: str | None = None
    min_gpu_memory_mb: int = 0
    env: dict[str, str] = msgspec.field(default_factory=dict)
    owner: str = ""
    memory_mb: int | None = None  # container memory limit; None = none
    request_id: str | None = None  # client's idempotency key


class TaskPending(_Base, frozen=True, tag="task.pending"):
    task_id: str
    reason: str
    attempt: int = 1


class TaskScheduled(_Base, frozen=True, tag="task.scheduled"):
    task_id: str
    attempt: int
    node: str
    gpu_uuids: tuple[str, ...]


class ContainerStarted(_Base, frozen=True, tag="container.started"):
    task_id: str
    attempt: int
    node: str
    container_id: str


class ContainerStartFailed(_Base, frozen=True, tag="container.start_failed"):
    task_id: str
    attempt: int
    node: str
    error: str


class ContainerExited(_Base, frozen=True, tag="container.exited"):
    task_id: str
    attempt: int
    node: str
    container_id: str
    exit_code: int | None = None
    oom_killed: bool = False
    signal: int | None = None
    error: str = ""
    finished_at: datetime | None = None


class FaultClassified(_Base, frozen=True, tag="fault.classified"):
    task_id: str
    attempt: int
    fault: Fault
    rule: str
    evidence: tuple[str, ...] = ()


class RebuildDecided(_Base, frozen=True, tag="rebuild.decided"):
    task_id: str
    attempt: int  # the new attempt
    previous_attempt: int
    fault: Fault
    counted: bool
    rule: int | None
    not_before: datetime
    exclude_gpus: tuple[str, ...] = ()
    exclude_nodes: tuple[str, ...] = ()


class TaskCompleted(_Base, frozen=True, tag="task.completed"):
    task_id: str
    attempt: int


class TaskFailed(_Base, frozen=True, tag="task.failed"):
    task_id: str
    attempt: int | None
    fault: Fault | None
    reason: FailureReason
    rule: int | None = None
    detail: str = ""


class TaskCancelled(_Base, frozen=True, tag="task.cancelled"):
    task_id: str
    reason: str
    attempt: int | None = None


Event: TypeAlias = (
    NodeRegistered
    | NodeLost
    | NodeRecovered
    | GpuFault
    | GpuQuarantined
    | GpuRestored
    | GpuAllocated
    | GpuReleased
    | TaskSubmitted
    | TaskPending
    | TaskScheduled
    | ContainerStarted
    | ContainerStartFailed
    | ContainerExited
    | FaultClassified
    | RebuildDecided
    | TaskCompleted
    | TaskFailed
    | TaskCancelled
)

EVENT_TYPES: Final[dict[str, type[Any]]] = {
    cls.__struct_config__.tag: cls for cls in Event.__args__
}
# Every event type: what each fold over the log must handle or ignore on purpose
# (tests/test_folds.py holds every fold to it).
CATALOG: Final[frozenset[type[Event]]] = frozenset(EVENT_TYPES.values())

FAULT_TYPES: Final[tuple[Fault, ...]] = get_args(Fault)
FAILURE_REASONS: Final[tuple[FailureReason, ...]] = get_args(FailureReason)
GPU_FAULT_KINDS: Final[tuple[GpuFaultKind, ...]] = get_args(GpuFaultKind)
TASK_STATUSES: Final[tuple[TaskStatus, ...]] = get_args(TaskStatus)
TERMINAL_STATUSES: Final[frozenset[TaskStatus]] = frozenset({"completed", "failed", "cancelled"})

# --- dispatch tables -----------------------------------------------------------------

_E = TypeVar("_E", bound=Event)
_S = TypeVar("_S")
_R = TypeVar("_R")
_P = ParamSpec("_P")
Handler: TypeAlias = Callable[Concatenate[_S, Any, _P], _R]


def on(
    kind: type[_E], handler: Callable[Concatenate[_S, _E, _P], _R]
) -> tuple[type[Any], Handler[_S, _P, _R]]:
    """One entry of a fold's dispatch table, `dict([on(Type, handler), ...])`: mypy
    refuses a handler whose event parameter does not take `kind`, so a table looked up
    by `type(event)` hands every handler the type it declares."""
    return kind, handler


# --- encoding ----------------------------------------------------------------------

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Event)
_PATH = re.compile(r" - at `(\$[^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def encode(event: Event) -> bytes:
    """The event as JSON, with its `type` tag."""
    return _encoder.encode(event)


def decode(data: bytes | str) -> Event:
    """One event from JSON; raises EventDecodeError naming the offending field."""
    try:
        event: Event = _decoder.decode(data)
        return event
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _PATH.search(message)
        path = match.group(1) if match else None
        missing = _MISSING.search(message)
        if missing:
            path = f"{path or '$'}.{missing.group(1)}"
        if path == "$.type" or "missing required field `type`" in message:
            raise EventDecodeError(
                f"unknown or missing event type: {message}", path="$.type"
            ) from None
        raise EventDecodeError(f"invalid event: {message}", path=path) from None
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"malformed JSON: {exc}") from None


def to_builtins(event: Event) -> dict[str, Any]:
    """The event as plain JSON-able data (for --json output and SQLite payloads)."""
    result: dict[str, Any] = msgspec.to_builtins(event)
    return result


def type_of(event: Event) -> str:
    """The event's `type` tag."""
    tag: str = event.__struct_config__.tag  # type: ignore[assignment]
    return tag


# --- subjects ----------------------------------------------------------------------


_TOKEN_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


_TOKENS: dict[str, str] = {}  # a memo: every event's subject needs two or three tokens
_TOKENS_MAX: Final = 1 << 16


def subject_token(value: str) -> str:
    """A value made safe as one NATS subject token (no dots, spaces or wildcards).

    Names that are already safe pass unchanged; others get a stable escape, so two
    different values never share a subject.
    """
    token = _TOKENS.get(value)
    if token is None:
        token = _escape(value)
        if len(_TOKENS) >= _TOKENS_MAX:
            _TOKENS.clear()
        _TOKENS[value] = token
    return token


def _escape(value: str) -> str:
    if _TOKEN_OK.match(value):
        return value
    digest = hashlib.blake2b(value.encode(), digest_size=6).hexdigest()
    cleaned = re.sub(r"[^A-Za-z0-9_\-]", "_", value)
    return f"{cleaned}~{digest}"


# Subjects, scheme 2: every event is stored under its aggregate (a task, a GPU, a node)
# and, below that, under the writer that may say it, so that NATS permissions can say who
# speaks: a node agent may publish only `gw.evt.*.*.node.<its node>`, an engine only
# `gw.evt.*.*.engine`, the task API only `gw.evt.task.*.api`, an operator only
# `gw.evt.gpu.*.op`. Which writer says an event follows from its type alone, so an event
# has exactly one subject (`subject_of`) and admission refuses it anywhere else.
#
#   gw.evt.task.<task>.api          task.submitted, task.cancelled
#   gw.evt.task.<task>.engine       task.pending/scheduled/completed/failed,
#                                   fault.classified, rebuild.decided
#   gw.evt.task.<task>.node.<node>  container.started/start_failed/exited
#   gw.evt.gpu.<uuid>.engine        gpu.quarantined/allocated/released
#   gw.evt.gpu.<uuid>.node.<node>   gpu.fault
#   gw.evt.gpu.<uuid>.op            gpu.restored
#   gw.evt.node.<node>.engine       node.lost, node.recovered
#   gw.evt.node.<node>.node.<node>  node.registered
#
# Scheme 1 (logs written before it) stored each event on its aggregate's subject itself
# (`gw.evt.task.<task>`); those messages still fold (`legacy_subject_of`). An aggregate's
# compare-and-set covers its scheme-2 subjects: `Nats-Expected-Last-Subject-Sequence`
# with `Nats-Expected-Last-Subject-Sequence-Subject: <aggregate>.>`.

WRITER_API: Final = "api"
WRITER_ENGINE: Final = "engine"
WRITER_OPERATOR: Final = "op"
WRITER_NODE: Final = "node"


def task_subject(task_id: str) -> str:
    """The task's aggregate: reads, and compare-and-set expectations, go by it."""
    return f"gw.evt.task.{subject_token(task_id)}"


def gpu_subject(gpu_uuid: str) -> str:
    """The GPU's aggregate."""
    return f"gw.evt.gpu.{subject_token(gpu_uuid)}"


def node_subject(node: str) -> str:
    """The node's aggregate."""
    return f"gw.evt.node.{subject_token(node)}"


def command_subject(node: str) -> str:
    return f"gw.cmd.{subject_token(node)}"


def node_writer(node: str) -> str:
    """The writer token of a node's agent: `node.<node>`."""
    return f"{WRITER_NODE}.{subject_token(node)}"


def aggregate_filter(aggregate: str) -> str:
    """The wildcard that matches an aggregate's scheme-2 subjects."""
    return aggregate + ".>"


def aggregate_of_subject(subject: str) -> str:
    """The aggregate a stored subject belongs to (its first four tokens), either scheme."""
    first, second, kind, key, *_ = (*subject.split(".", 4), "", "", "", "")
    return f"{first}.{second}.{kind}.{key}"


def is_legacy_subject(subject: str) -> bool:
    """True for a scheme-1 subject (the aggregate itself, no writer below it)."""
    return subject.count(".") == 3


# Per type (a dict: this runs for every event admitted, on the hot path): who writes it,
# and which of its fields names its aggregate.
_NODE_FACTS: Final = frozenset(
    {ContainerStarted, ContainerStartFailed, ContainerExited, GpuFault, NodeRegistered}
)
_WRITERS: Final[dict[type[Any], str]] = {
    TaskSubmitted: WRITER_API,
    TaskCancelled: WRITER_API,
    GpuRestored: WRITER_OPERATOR,
}
_NODE_KEYED: Final = frozenset({NodeRegistered, NodeLost, NodeRecovered})
_GPU_KEYED: Final = frozenset({GpuFault, GpuQuarantined, GpuRestored, GpuAllocated, GpuReleased})


def writer_of(event: Event) -> str:
    """The writer token an event's type (and, for a node's facts, its node) calls for."""
    kind = type(event)
    if kind in _NODE_FACTS:
        return node_writer(event.node)  # type: ignore[union-attr]
    return _WRITERS.get(kind, WRITER_ENGINE)


def aggregate_of(event: Event) -> str:
    """The aggregate an event belongs to (scheme 1's subject)."""
    kind = type(event)
    if kind in _GPU_KEYED:
        return gpu_subject(event.gpu_uuid)  # type: ignore[union-attr]
    if kind in _NODE_KEYED:
        return node_subject(event.node)  # type: ignore[union-attr]
    return task_subject(event.task_id)  # type: ignore[union-attr]


legacy_subject_of = aggregate_of


def subject_of(event: Event) -> str:
    """The one subject an event is stored on: its aggregate, then its writer."""
    return f"{aggregate_of(event)}.{writer_of(event)}"


# --- ids ---------------------------------------------------------------------------

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Every pair of Crockford digits, by the 10-bit value it encodes: a derived id's 80 bits
# are 8 table lookups (base64's base32 is pure Python and took twice as long).
_PAIRS: Final = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)


def _b32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def make_id(epoch_ms: int, entropy: int) -> str:
    """A ULID-shaped id: 10 chars of milliseconds, then 16 of entropy; sorts by time.

    The caller supplies time and entropy (the id generator lives outside the pure core).
    """
    return _b32(epoch_ms & ((1 << 50) - 1), 10) + _b32(entropy & ((1 << 80) - 1), 16)


def derive_id(parent_id: str, label: str) -> str:
    """A decision's id, derived from the event that caused it.

    The same trigger always yields the same ids, so a retried decision is dropped by
    the server's `Nats-Msg-Id` de-duplication and a replay re-derives it bit for bit.
    The parent's time prefix is kept, so derived ids still sort by time.
    """
    digest = hashlib.blake2b(f"{parent_id}/{label}".encode(), digest_size=10).digest()
    v, p = int.from_bytes(digest, "big"), _PAIRS
    return "".join((
        parent_id[:10], p[v >> 70], p[v >> 60 & 1023], p[v >> 50 & 1023], p[v >> 40 & 1023],
        p[v >> 30 & 1023], p[v >> 20 & 1023], p[v >> 10 & 1023], p[v & 1023],
    ))  # fmt: skip
