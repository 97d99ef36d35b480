"""The catalog events the agent builds from what a container runtime reports (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from gpuwarden.adapters.agent_events import exit_event, observation_event, state_event_id
from gpuwarden.engine.core.events import ContainerExited, ContainerStarted, decode, encode
from gpuwarden.engine.ports import ContainerObservation, ExitInfo

AT = datetime(2026, 1, 1, 0, 0, 1, 250000, UTC)


def _exit(*, running: bool = False) -> ExitInfo:
    return ExitInfo(
        container_id="c" * 64,
        running=running,
        exit_code=None if running else 137,
        oom_killed=not running,
        signal=None if running else 9,
        error="",
        started_at=AT - timedelta(seconds=1),
        finished_at=None if running else AT,
    )


def test_exit_event_is_a_catalog_event_with_a_stable_id() -> None:
    info = _exit()
    assert info.finished_at is not None
    event_id = state_event_id(info.container_id, "die", info.finished_at)
    assert event_id == state_event_id(info.container_id, "die", info.finished_at)
    later = info.finished_at + timedelta(microseconds=1)
    assert event_id != state_event_id(info.container_id, "die", later)
    assert event_id != state_event_id(info.container_id, "start", info.finished_at)
    event = exit_event(info, task_id="t1", attempt=2, node="n1")
    assert isinstance(event, ContainerExited) and event.id == event_id
    assert (event.exit_code, event.signal, event.oom_killed) == (137, 9, True)
    assert event.at == info.finished_at and event.actor == "agent:n1"
    assert decode(encode(event)) == event


def test_exit_event_refuses_a_running_container() -> None:
    with pytest.raises(ValueError, match="not finished"):
        exit_event(_exit(running=True), task_id="t", attempt=1, node="n")


def test_an_observation_seen_twice_is_one_event() -> None:
    """The id derives from the container and the moment: a replay de-duplicates."""
    base = {"container_id": "c1", "task_id": "t1", "attempt": 1, "node": "n1",
            "command_id": "r1"}  # fmt: skip
    started = ContainerObservation(kind="started", at=AT, **base)
    died = ContainerObservation(kind="exited", at=AT, exit=_exit(), **base)
    first, again = observation_event(started, causation_id="s1"), observation_event(started)
    assert isinstance(first, ContainerStarted) and first.id == again.id
    assert first.causation_id == "s1" and first.correlation_id == "t1"
    exited = observation_event(died)
    assert isinstance(exited, ContainerExited) and exited.id != first.id
    assert exited.id == observation_event(died).id
