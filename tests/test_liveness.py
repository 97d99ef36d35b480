"""Liveness: silence makes a node lost; a graceful stop's announcement holds that off."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.heartbeats import MAX_AWAY_S, NatsHeartbeats, feed_liveness
from gpuwarden.engine.clock import VirtualClock
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.fold import evolve
from gpuwarden.engine.core.liveness import Liveness
from gpuwarden.engine.core.policy import DEFAULT_POLICY
from gpuwarden.engine.core.state import State, initial_state

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def cluster() -> State:
    state = initial_state()
    gpus = (ev.GpuInfo(uuid="a/0", index=0, model="H100", memory_mb=1),)
    evolve(state, ev.NodeRegistered(id="r", at=T0, actor="agent:a", node="a", runtime="sim",
                                    gpus=gpus))  # fmt: skip
    return state


def lost_at(liveness: Liveness, state: State, moments: list[float]) -> float | None:
    for s in moments:
        if liveness.check(state, T0 + timedelta(seconds=s), f"b{s}"):
            return s
    return None


def test_the_default_grace_outlasts_an_agent_restart() -> None:
    """Kubernetes marks a node NotReady after 40 s, Nomad after 10 s + 10 s of grace;
    gpuwarden fails a node over after 30 s of silence: an agent restart (seconds) is not
    a node loss, and a dead node is failed over within half a minute."""
    assert DEFAULT_POLICY.node_lost_after_s == 30
    state, liveness = cluster(), Liveness(DEFAULT_POLICY.node_lost_after_s)
    liveness.beat("a", T0)
    assert lost_at(liveness, state, [5, 10, 29.9]) is None
    assert lost_at(liveness, state, [30]) == 30


def test_an_announced_absence_holds_off_the_loss_until_it_runs_out() -> None:
    state, liveness = cluster(), Liveness(30)
    liveness.beat("a", T0, away_s=300)  # "stopping for an upgrade, back within 5 min"
    assert liveness.next_due(state) == T0 + timedelta(seconds=300)
    assert lost_at(liveness, state, [31, 120, 299]) is None
    assert lost_at(liveness, state, [300]) == 300


def test_a_plain_beat_ends_the_absence() -> None:
    state, liveness = cluster(), Liveness(30)
    liveness.beat("a", T0, away_s=300)
    liveness.beat("a", T0 + timedelta(seconds=10))  # back: the usual grace again
    assert lost_at(liveness, state, [39]) is None
    assert lost_at(liveness, state, [40]) == 40


def test_an_absence_shorter_than_the_grace_changes_nothing() -> None:
    state, liveness = cluster(), Liveness(30)
    liveness.beat("a", T0, away_s=5)
    assert lost_at(liveness, state, [29]) is None
    assert lost_at(liveness, state, [30]) == 30


async def test_an_announcement_travels_with_the_last_beat(event_log: JetStreamEventLog) -> None:
    """Over real NATS: the stopping agent's last beat carries its window into the
    engine's Liveness; an absurd window (past MAX_AWAY_S) is ignored, not obeyed."""
    liveness, clock = Liveness(30), VirtualClock(T0)
    beats = NatsHeartbeats(event_log.nc)
    async with anyio.create_task_group() as tg:
        tg.start_soon(feed_liveness, NatsHeartbeats(event_log.nc), liveness, clock)
        with anyio.fail_after(5):
            while "a" not in liveness.away_until:
                await beats.beat("a", away_s=300)
                await anyio.sleep(0.05)  # paces the beats; the deadline bounds the wait
            assert liveness.away_until["a"] == T0 + timedelta(seconds=300)
            clock.advance(1)
            while liveness.last_seen["a"] != clock.now():
                await beats.beat("a", away_s=MAX_AWAY_S * 10)
                await anyio.sleep(0.05)
        assert "a" not in liveness.away_until, "an absurd window counts as a plain beat"
        tg.cancel_scope.cancel()
