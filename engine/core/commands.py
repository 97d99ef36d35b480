"""Commands the engine sends to node agents on `gw.cmd.<node>` (pure data).

Each command carries the id of the decision event that caused it; that id is the
`Nats-Msg-Id`, so a resent command is dropped by the server.
"""

from __future__ import annotations

from typing import Final, TypeAlias

import msgspec
from gpuwarden.engine.core.errors import EventDecodeError
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
from gpuwarden.engine.core.state import AttemptState, State, unended


class _Command(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    id: str  # = the msg id; derived from the deciding event
    node: str
    task_id: str
    attempt: int
    causation_id: str | None = None


class RunCommand(_Command, frozen=True, tag="run"):
    image: str
    command: tuple[str, ...]
    env: dict[str, str] = msgspec.field(default_factory=dict)
    gpu_uuids: tuple[str, ...] = ()
    memory_mb: int | None = None


class StopCommand(_Command, frozen=True, tag="stop"):
    reason: str = ""
    container_id: str | None = None
    # Seconds between SIGTERM and SIGKILL; None: the agent's own default. 0 for a process
    # on a GPU that failed under it (it will not shut down cleanly, and its task waits
    # on that exit to give its GPUs back).
    grace_s: float | None = None


class RemoveCommand(_Command, frozen=True, tag="remove"):
    container_id: str | None = None


Command: TypeAlias = RunCommand | StopCommand | RemoveCommand

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Command)


def encode_command(command: Command) -> bytes:
    return _encoder.encode(command)


def decode_command(data: bytes) -> Command:
    try:
        command: Command = _decoder.decode(data)
        return command
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise EventDecodeError(f"invalid command: {exc}") from None


# --- what the supervisor's decisions ask of node agents -------------------------


def commands_for(state: State, event: Event) -> list[Command]:
    """Commands to node agents that a decision (already folded) calls for."""
    handler = _COMMANDS.get(type(event))
    return [] if handler is None else handler(state, event)


def _run(state: State, event: TaskScheduled) -> list[Command]:
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


def _stop_cancelled(state: State, event: TaskCancelled) -> list[Command]:
    task = state.tasks.get(event.task_id)
    attempt = task.current if task is not None else None
    if attempt is None or not attempt.stop_requested or attempt.exited is not None:
        return []
    return [_stop(event.id, attempt, event.task_id, f"cancelled: {event.reason}")]


def _stop_superseded(state: State, event: TaskCompleted | TaskFailed) -> list[Command]:
    """A task ended by an earlier attempt's late exit: stop the replacement (folded with
    stop_requested by the same event)."""
    task = state.tasks.get(event.task_id)
    attempt = task.current if task is not None else None
    if attempt is None or attempt.n == event.attempt or not attempt.stop_requested:
        return []
    if attempt.exited is not None or attempt.start_failed is not None:
        return []
    how = "completed" if isinstance(event, TaskCompleted) else f"failed ({event.fault})"
    reason = f"superseded: attempt {event.attempt}'s late exit {how} the task"
    return [_stop(event.id, attempt, event.task_id, reason)]


def _stop_classified(state: State, event: FaultClassified) -> list[Command]:
    task = state.tasks.get(event.task_id)
    attempt = None if task is None else task.attempts.get(event.attempt)
    node = None if attempt is None else state.nodes.get(attempt.node)
    if attempt is None or node is None or not node.alive or not unended(attempt):
        return []  # ended, or on a lost node: stopped when the node comes back
    return [_stop_concluded(event.id, attempt, event.task_id)]


def _stop_stale(state: State, event: NodeRecovered) -> list[Command]:
    return [
        _stop_concluded(event.id, attempt, task.spec.task_id)
        for task in state.tasks.values()
        for attempt in task.attempts.values()
        if attempt.node == event.node and unended(attempt)
    ]


_COMMANDS: Final = dict(
    [
        on(TaskScheduled, _run),
        on(TaskCancelled, _stop_cancelled),
        on(FaultClassified, _stop_classified),
        on(NodeRecovered, _stop_stale),
        on(TaskCompleted, _stop_superseded),
        on(TaskFailed, _stop_superseded),
    ]
)
# Events that ask nothing of a node: facts the nodes told, a node's loss (what ran there
# is stopped when it comes back, on node.recovered), and decisions whose commands ride
# on another event of their group (the run on task.scheduled, a stop on
# fault.classified).
_COMMANDS_IGNORES: Final[frozenset[type[Event]]] = frozenset(
    {
        NodeRegistered,
        NodeLost,
        GpuFault,
        GpuQuarantined,
        GpuRestored,
        GpuAllocated,
        GpuReleased,
        TaskSubmitted,
        TaskPending,
        ContainerStarted,
        ContainerStartFailed,
        ContainerExited,
        RebuildDecided,
    }
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
