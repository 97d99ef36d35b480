"""The catalog events a node agent writes, built from what its runtime reports.

Ids of container starts and deaths derive from the container and the moment of the
change, so the same change seen twice (the watcher after a reconnect, a reconcile
after a restart) is one event (`Nats-Msg-Id`). Only the agent (`adapters/agent.py`)
calls these: the runtimes report containers, never events.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime

import msgspec
from gpuwarden.engine.core.admission import MAX_TEXT_CHARS
from gpuwarden.engine.core.events import (
    ContainerExited,
    ContainerStarted,
    Event,
    FaultClassified,
    RebuildDecided,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskScheduled,
    make_id,
)
from gpuwarden.engine.ports import ContainerObservation, ExitInfo


def state_event_id(container_id: str, change: str, at: datetime) -> str:
    """A stable event id for one state change of one container.

    Time-prefixed like every id, with entropy from the container id, the change and
    its exact moment: a repeat observation after a reconnect gets the same id, so the
    log's `Nats-Msg-Id` de-duplication drops it.
    """
    key = f"{container_id}/{change}/{at.isoformat()}".encode()
    entropy = int.from_bytes(hashlib.blake2b(key, digest_size=10).digest(), "big")
    return make_id(int(at.timestamp() * 1000), entropy)


def exit_event(
    info: ExitInfo,
    *,
    task_id: str,
    attempt: int,
    node: str,
    at: datetime | None = None,
    causation_id: str | None = None,
) -> ContainerExited:
    """The catalog event for a container's end, from what inspect said."""
    moment = at or info.finished_at
    if moment is None:
        raise ValueError(f"container {info.container_id} has not finished; no exit event")
    return ContainerExited(
        id=state_event_id(info.container_id, "die", moment),
        at=moment,
        actor=f"agent:{node}",
        causation_id=causation_id,
        correlation_id=task_id,
        task_id=task_id,
        attempt=attempt,
        node=node,
        container_id=info.container_id,
        exit_code=info.exit_code,
        oom_killed=info.oom_killed,
        signal=info.signal,
        error=info.error,
        finished_at=info.finished_at,
    )


def started_event(
    container_id: str,
    at: datetime,
    *,
    task_id: str,
    attempt: int,
    node: str,
    causation_id: str | None = None,
) -> ContainerStarted:
    return ContainerStarted(
        id=state_event_id(container_id, "start", at),
        at=at,
        actor=f"agent:{node}",
        causation_id=causation_id,
        correlation_id=task_id,
        task_id=task_id,
        attempt=attempt,
        node=node,
        container_id=container_id,
    )


def observation_event(
    observation: ContainerObservation, *, causation_id: str | None = None
) -> ContainerStarted | ContainerExited:
    """The catalog event an observation stands for."""
    if observation.kind == "started" or observation.exit is None:
        return started_event(
            observation.container_id,
            observation.at,
            task_id=observation.task_id,
            attempt=observation.attempt,
            node=observation.node,
            causation_id=causation_id,
        )
    return exit_event(
        observation.exit,
        task_id=observation.task_id,
        attempt=observation.attempt,
        node=observation.node,
        at=observation.at,
        causation_id=causation_id,
    )


def bounded(event: Event) -> Event:
    """The event with the runtime's error text clipped to what admission takes: Docker's
    message (or an exception's) is not ours to bound, and an exit refused for its text
    would leave its GPUs held until the node is lost."""
    error = getattr(event, "error", None)
    if not error or (len(error) <= MAX_TEXT_CHARS and "\x00" not in error):
        return event
    clipped = error.replace("\x00", "")
    if len(clipped) > MAX_TEXT_CHARS:
        clipped = clipped[: MAX_TEXT_CHARS - 20] + " ... (clipped)"
    return msgspec.structs.replace(event, error=clipped)


def superseded_by(events: Sequence[Event], task_id: str, attempt: int) -> Event | None:
    """The first of `events` (a task's log, in order) that ended the attempt for the
    engine: its classification, a rebuild from it, a newer attempt, or the task's end.
    A container of such an attempt that still runs holds GPUs the engine counts free."""
    for event in events:
        if getattr(event, "task_id", None) != task_id:
            continue
        match event:
            case FaultClassified() if event.attempt == attempt:
                return event
            case RebuildDecided() if event.previous_attempt == attempt:
                return event
            case TaskScheduled() if event.attempt > attempt:
                return event
            case TaskCompleted() | TaskFailed() | TaskCancelled():
                return event
    return None
