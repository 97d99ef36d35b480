"""Task intake: a task-create request (EP3869336A1) checked before anything is logged.

A request the cluster can never serve is refused at the door, naming the field, rather
than logged and failed later as `unschedulable`: the client learns at once what to fix,
and the log only holds tasks someone could run. The cluster's shape (which GPU models
exist, how many GPUs the biggest node has, the largest GPU memory) is a fold of
`node.registered` events; until a node is known, the cluster-dependent checks wait
for placement to judge.

Pure: no I/O, clock or randomness. Ids and time come in as arguments.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from gpuwarden.engine.core.errors import TaskRequestError
from gpuwarden.engine.core.events import Event, GpuInfo, NodeRegistered, TaskSubmitted

FIELDS: Final = frozenset(
    {
        "image",
        "command",
        "gpus",
        "gpu_model",
        "min_gpu_memory_mb",
        "memory_mb",
        "env",
        "name",
        "owner",
        "request_id",
    }
)
MAX_IMAGE_CHARS: Final = 512
MAX_TEXT_CHARS: Final = 128  # name, owner, gpu_model, request_id
MAX_ARGS: Final = 4096
MAX_COMMAND_BYTES: Final = 64 * 1024
MAX_ENV_VARS: Final = 1024
MAX_ENV_BYTES: Final = 64 * 1024
MIN_MEMORY_MB: Final = 4
MAX_MEMORY_MB: Final = 64 * 1024 * 1024  # 64 TiB: anything above is a typo
MAX_GPUS: Final = 1024  # the ceiling while no node is known

# Docker's reference grammar, slightly simplified: [host[:port]/]path[:tag][@digest].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]+)?/)?"  # noqa: E501
_IMAGE = re.compile(
    rf"^{_HOST}{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,})?$"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/@+=-]+$")
_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# --- the cluster's shape -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterShape:
    """What the registered nodes offer, as far as a request's validity is concerned.

    The summaries are computed once per registration, not once per request: a
    create request is checked against them in constant time on the fast path.
    """

    nodes: Mapping[str, tuple[GpuInfo, ...]] = field(default_factory=dict)
    models: Mapping[str, str] = field(init=False)  # lower-cased -> as nodes spell it
    max_gpus: int = field(init=False)
    max_gpu_memory_mb: int = field(init=False)
    max_of_model: Mapping[str, int] = field(init=False)  # most GPUs of a model on one node

    def __post_init__(self) -> None:
        gpus = [g for node in self.nodes.values() for g in node]
        per_model: dict[str, int] = {}
        for node in self.nodes.values():
            counts: dict[str, int] = {}
            for g in node:
                counts[g.model.lower()] = counts.get(g.model.lower(), 0) + 1
            for model, count in counts.items():
                per_model[model] = max(per_model.get(model, 0), count)
        object.__setattr__(self, "models", {g.model.lower(): g.model for g in gpus})
        object.__setattr__(self, "max_gpus", max(map(len, self.nodes.values()), default=0))
        object.__setattr__(self, "max_gpu_memory_mb", max((g.memory_mb for g in gpus), default=0))
        object.__setattr__(self, "max_of_model", per_model)

    @property
    def known(self) -> bool:
        return bool(self.nodes)

    def most_fitting(self, model: str | None, min_memory_mb: int) -> int:
        """The most GPUs one node has that match a model and memory floor."""
        wanted = model.lower() if model is not None else None
        if min_memory_mb <= 0:
            return self.max_gpus if wanted is None else self.max_of_model.get(wanted, 0)
        return max(
            (
                sum(
                    1
                    for g in gpus
                    if (wanted is None or g.model.lower() == wanted)
                    and g.memory_mb >= min_memory_mb
                )
                for gpus in self.nodes.values()
            ),
            default=0,
        )


def fold_shape(shape: ClusterShape, event: Event) -> ClusterShape:
    """The shape after one event: a registration (re)declares its node's GPUs."""
    if not isinstance(event, NodeRegistered):
        return shape
    nodes = dict(shape.nodes)
    nodes[event.node] = tuple(event.gpus)
    return ClusterShape(nodes=nodes)


def shape_of(events: Iterable[Event]) -> ClusterShape:
    shape = ClusterShape()
    for event in events:
        shape = fold_shape(shape, event)
    return shape


# --- the validated request -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ValidTask:
    """A request that passed every check, normalised (model spelled as the nodes do)."""

    image: str
    command: tuple[str, ...]
    gpus: int = 1
    gpu_model: str | None = None
    min_gpu_memory_mb: int = 0
    memory_mb: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    name: str | None = None
    owner: str = ""
    request_id: str | None = None

    def to_event(self, task_id: str, event_id: str, at: datetime, actor: str) -> TaskSubmitted:
        return TaskSubmitted(
            id=event_id,
            at=at,
            actor=actor,
            correlation_id=task_id,
            task_id=task_id,
            name=self.name or task_id,
            image=self.image,
            command=self.command,
            gpus=self.gpus,
            gpu_model=self.gpu_model,
            min_gpu_memory_mb=self.min_gpu_memory_mb,
            env=dict(self.env),
            owner=self.owner,
            memory_mb=self.memory_mb,
            request_id=self.request_id,
        )

    def same_request(self, submitted: TaskSubmitted) -> bool:
        """Whether a stored submission asked for exactly this (idempotent replays)."""
        return (
            submitted.image == self.image
            and tuple(submitted.command) == self.command
            and submitted.gpus == self.gpus
            and (submitted.gpu_model or "").lower() == (self.gpu_model or "").lower()
            and submitted.min_gpu_memory_mb == self.min_gpu_memory_mb
            and submitted.memory_mb == self.memory_mb
            and dict(submitted.env) == dict(self.env)
            and submitted.owner == self.owner
            and (self.name is None or submitted.name == self.name)
        )


def task_id_for_request(owner: str, request_id: str) -> str:
    """The task id a client's idempotency key maps to, the same on every service.

    Two services handed the same request at once both append `task.submitted` with an
    expected subject sequence of 0 on this id's subject: one wins, the other learns
    which task it is.
    """
    digest = hashlib.blake2b(f"{owner}\0{request_id}".encode(), digest_size=16).digest()
    value = int.from_bytes(digest, "big")
    chars = [_CROCKFORD[(value >> (5 * i)) & 31] for i in range(26)]
    return "R" + "".join(chars[:25])


# --- validation ----------------------------------------------------------------------


def validate_create(request: Mapping[str, object], cluster: ClusterShape) -> ValidTask:
    """Check a task-create request; raises TaskRequestError naming the first bad field."""
    if not isinstance(request, Mapping):
        raise TaskRequestError("a task-create request must be a JSON object", field=None)
    unknown = sorted(str(k) for k in request if k not in FIELDS)
    if unknown:
        raise TaskRequestError(
            f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(FIELDS))}",
            field=unknown[0],
        )
    image = _image(request.get("image"))
    command = _command(request.get("command"))
    gpus = _int(request, "gpus", default=1, low=1, high=MAX_GPUS)
    model = _model(request.get("gpu_model"), cluster)
    min_memory = _int(request, "min_gpu_memory_mb", default=0, low=0, high=None)
    memory = _optional_int(request, "memory_mb", low=MIN_MEMORY_MB, high=MAX_MEMORY_MB)
    _fits(cluster, gpus, model, min_memory)
    return ValidTask(
        image=image,
        command=command,
        gpus=gpus,
        gpu_model=model,
        min_gpu_memory_mb=min_memory,
        memory_mb=memory,
        env=_env(request.get("env")),
        name=_text(request.get("name"), "name", default=None),
        owner=_text(request.get("owner"), "owner", default="") or "",
        request_id=_request_id(request.get("request_id")),
    )


def _image(value: object) -> str:
    if value is None:
        raise TaskRequestError("image is required (e.g. 'pytorch/pytorch:2.3')", field="image")
    if not isinstance(value, str) or not value.strip():
        raise TaskRequestError("image must be a non-empty string", field="image")
    if len(value) > MAX_IMAGE_CHARS:
        raise TaskRequestError(f"image is longer than {MAX_IMAGE_CHARS} characters", field="image")
    if not _IMAGE.fullmatch(value):
        raise TaskRequestError(
            f"image {value!r} is not a valid image reference "
            "([registry/]name[:tag][@sha256:digest], lower-case name)",
            field="image",
        )
    return value


def _command(value: object) -> tuple[str, ...]:
    if value is None:
        raise TaskRequestError(
            'command is required, as an argv list (e.g. ["python", "train.py"])',
            field="command",
        )
    if isinstance(value, str):
        raise TaskRequestError(
            "command must be an argv list of strings, not a shell string: pass "
            f'{_suggest(value)} (no shell runs it; use ["sh", "-c", ...] '
            "explicitly if you need one)",
            field="command",
        )
    if not isinstance(value, list | tuple) or not value:
        raise TaskRequestError("command must be a non-empty argv list of strings", field="command")
    if len(value) > MAX_ARGS:
        raise TaskRequestError(f"command has more than {MAX_ARGS} arguments", field="command")
    for index, arg in enumerate(value):
        if not isinstance(arg, str):
            raise TaskRequestError(
                f"command[{index}] must be a string, not {_kind(arg)}", field="command"
            )
        if "\0" in arg:
            raise TaskRequestError(f"command[{index}] contains a NUL byte", field="command")
    if not value[0].strip():
        raise TaskRequestError("command[0] (the program) must not be empty", field="command")
    if sum(len(a.encode()) for a in value) > MAX_COMMAND_BYTES:
        raise TaskRequestError(f"command is larger than {MAX_COMMAND_BYTES} bytes", field="command")
    return tuple(value)


def _suggest(shell: str) -> str:
    words = shell.split()[:4]
    return "[" + ", ".join(f'"{w}"' for w in words) + (", ...]" if len(shell.split()) > 4 else "]")


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(
    request: Mapping[str, object], name: str, *, default: int, low: int, high: int | None
) -> int:
    value = request.get(name)
    if value is None:
        return default
    return _bounded(value, name, low, high)


def _optional_int(
    request: Mapping[str, object], name: str, *, low: int, high: int | None
) -> int | None:
    value = request.get(name)
    return None if value is None else _bounded(value, name, low, high)


def _bounded(value: object, name: str, low: int, high: int | None) -> int:
    if not _is_int(value):
        raise TaskRequestError(f"{name} must be an integer, not {_kind(value)}", field=name)
    assert isinstance(value, int)
    if value < low:
        raise TaskRequestError(f"{name} must be >= {low}, got {value}", field=name)
    if high is not None and value > high:
        raise TaskRequestError(f"{name} must be <= {high}, got {value}", field=name)
    return value


def _model(value: object, cluster: ClusterShape) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT_CHARS:
        raise TaskRequestError(
            f"gpu_model must be a non-empty string of at most {MAX_TEXT_CHARS} characters",
            field="gpu_model",
        )
    if not cluster.known:
        return value
    models = cluster.models
    found = models.get(value.lower())
    if found is None:
        raise TaskRequestError(
            f"no registered node has GPU model {value!r}; known models: "
            f"{', '.join(sorted(models.values())) or 'none'}",
            field="gpu_model",
        )
    return found


def _fits(cluster: ClusterShape, gpus: int, model: str | None, min_memory: int) -> None:
    """Refuse what no registered node could ever host, naming the field to change."""
    if not cluster.known:
        return
    if gpus > cluster.max_gpus:
        raise TaskRequestError(
            f"gpus = {gpus} but the largest node has {cluster.max_gpus} GPUs "
            "(all GPUs of a task sit on one node)",
            field="gpus",
        )
    if min_memory > cluster.max_gpu_memory_mb:
        raise TaskRequestError(
            f"min_gpu_memory_mb = {min_memory} but the largest GPU has "
            f"{cluster.max_gpu_memory_mb} MiB",
            field="min_gpu_memory_mb",
        )
    fitting = cluster.most_fitting(model, min_memory)
    if fitting < gpus:
        what = f" of model {model}" if model else ""
        what += f" with >= {min_memory} MiB" if min_memory else ""
        raise TaskRequestError(
            f"gpus = {gpus} but no node has more than {fitting} GPUs{what}", field="gpus"
        )


def _env(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TaskRequestError("env must be a map of variable names to string values", field="env")
    if len(value) > MAX_ENV_VARS:
        raise TaskRequestError(f"env has more than {MAX_ENV_VARS} variables", field="env")
    env: dict[str, str] = {}
    size = 0
    for key, val in value.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise TaskRequestError(
                f"env name {key!r} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)",
                field=f"env.{key}",
            )
        if not isinstance(val, str):
            raise TaskRequestError(
                f"env {key} must be a string, not {_kind(val)}", field=f"env.{key}"
            )
        if "\0" in val:
            raise TaskRequestError(f"env {key} contains a NUL byte", field=f"env.{key}")
        size += len(key.encode()) + len(val.encode())
        env[key] = val
    if size > MAX_ENV_BYTES:
        raise TaskRequestError(f"env is larger than {MAX_ENV_BYTES} bytes", field="env")
    return env


def _text(value: object, name: str, *, default: str | None) -> str | None:
    if value is None:
        return default
    if not isinstance(value, str):
        raise TaskRequestError(f"{name} must be a string, not {_kind(value)}", field=name)
    if len(value) > MAX_TEXT_CHARS:
        raise TaskRequestError(f"{name} is longer than {MAX_TEXT_CHARS} characters", field=name)
    if not value.isprintable():
        raise TaskRequestError(f"{name} must be printable text", field=name)
    return value.strip() or default


def _request_id(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT_CHARS:
        raise TaskRequestError(
            f"request_id must be a non-empty string of at most {MAX_TEXT_CHARS} characters",
            field="request_id",
        )
    if not _REQUEST_ID.fullmatch(value):
        raise TaskRequestError(
            "request_id may hold letters, digits and . _ : / @ + = - only", field="request_id"
        )
    return value
