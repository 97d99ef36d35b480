"""Node liveness from heartbeats: heartbeats are not events, their absence is.

Agents beat on core NATS (or, in scenarios, straight into this object); the engine
appends `node.lost` once a node it thinks alive has been silent for
`node_lost_after_s`, with the last heartbeat time as evidence, and `node.recovered`
when a lost node beats again. Times are the engine clock's at receipt, so an agent's
clock skew cannot declare a node dead.

An agent that stops gracefully (an upgrade, a restart) says so in its last beat: "back
within `away_s`". Its node is then not lost before that time has passed since the
announcement, nor before the usual silence has; its next plain beat ends the absence.
The announcement lives here, not in the log: a node that comes back in time leaves no
trace, and one that does not is lost with its last heartbeat as evidence.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from gpuwarden.engine.core.events import Event, NodeLost, NodeRecovered, derive_id
from gpuwarden.engine.core.state import State

ACTOR = "engine"


class Liveness:
    def __init__(self, node_lost_after_s: float) -> None:
        self.after = timedelta(seconds=node_lost_after_s)
        self.last_seen: dict[str, datetime] = {}
        self.away_until: dict[str, datetime] = {}  # graceful stops announced
        self.pending: set[str] = set()  # nodes whose lost/recovered is on its way to the log
        self.lost: set[str] = set()  # nodes the log says are lost
        self.started_at: datetime | None = None
        self.on_news: Callable[[], None] | None = None  # the engine's wake-up

    def beat(self, node: str, at: datetime, *, away_s: float | None = None) -> None:
        seen = self.last_seen.get(node)
        if seen is None or at > seen:
            self.last_seen[node] = at
            if away_s is not None:
                self.away_until[node] = at + timedelta(seconds=away_s)
            else:
                self.away_until.pop(node, None)  # a plain beat: it is back
        if node in self.lost and self.on_news is not None:
            self.on_news()  # a lost node is back: the engine may be asleep with nothing due

    def start(self, state: State, now: datetime) -> None:
        """Give every known node a full timeout from now: silence before we ran is unknown."""
        self.started_at = now
        for name, node in state.nodes.items():
            if node.alive:  # a node the log says is lost needs a real beat to come back
                self.beat(name, now)

    def settled(self, node: str, *, lost: bool) -> None:
        """The log now holds the node's node.lost (lost=True) or node.recovered."""
        self.pending.discard(node)
        if lost:
            self.lost.add(node)
        else:
            self.lost.discard(node)

    def _seen(self, node: str) -> datetime | None:
        seen = self.last_seen.get(node)
        if seen is None and self.started_at is not None:
            return self.started_at
        return seen

    def _deadline(self, node: str, seen: datetime) -> datetime:
        """When silence since `seen` makes the node lost (a graceful stop's window too)."""
        silence = seen + self.after
        away = self.away_until.get(node)
        return silence if away is None else max(silence, away)

    def _beat_after(self, node: str, moment: datetime) -> bool:
        """A heartbeat really received after `moment` (start's benefit of the doubt is none)."""
        beat = self.last_seen.get(node)
        return beat is not None and beat > moment

    def next_due(self, state: State) -> datetime | None:
        """When check() next has something to say: a silence running out, or a lost node
        that beat again (due at once, or its recovery would wait for unrelated events)."""
        dues = []
        for name, node in state.nodes.items():
            seen = self._seen(name)
            if name in self.pending or seen is None:
                continue
            if node.alive:
                dues.append(self._deadline(name, seen))
            elif node.lost is not None and self._beat_after(name, node.lost.at):
                dues.append(seen)
        return min(dues) if dues else None

    def check(self, state: State, now: datetime, base_id: str) -> list[Event]:
        """node.lost for the silent, node.recovered for the lost that beat again."""
        out: list[Event] = []
        for name, node in sorted(state.nodes.items()):
            if name in self.pending:
                continue
            seen = self._seen(name)
            if seen is None:
                continue
            if node.alive and now >= self._deadline(name, seen):
                out.append(
                    NodeLost(
                        id=derive_id(base_id, f"lost/{name}"),
                        at=now,
                        actor=ACTOR,
                        node=name,
                        last_heartbeat_at=self.last_seen.get(name),
                    )
                )
                self.pending.add(name)
            elif not node.alive and node.lost is not None and self._beat_after(name, node.lost.at):
                out.append(
                    NodeRecovered(
                        id=derive_id(base_id, f"recovered/{name}"),
                        at=now,
                        actor=ACTOR,
                        node=name,
                        last_heartbeat_at=seen,
                    )
                )
                self.pending.add(name)
        return out
