"""Why did a task end the way it did?

Every decision is an event with its evidence named, so the answer is a reading of the
recorded log, not a guess: attempt by attempt, where it ran, how it ended, which
events the classification rested on, which rule classified it and what the policy
decided, linked back through `causation_id`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Final

import msgspec
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.ports import StoredEvent
from gpuwarden.projections.errors import TaskNotFoundError
from gpuwarden.projections.model import format_time, screen

_MAX_CHAIN: Final = 32


class Link(msgspec.Struct, kw_only=True):
    """One recorded event cited in an explanation."""

    seq: int
    id: str
    type: str
    at: str | None
    summary: str


class Decision(msgspec.Struct, kw_only=True):
    kind: str  # rebuild | fail | complete | cancel
    at: str | None
    seq: int
    fault: str | None = None
    reason: str | None = None
    rule: int | None = None
    counted: bool | None = None
    not_before: str | None = None
    exclude_gpus: tuple[str, ...] = ()
    exclude_nodes: tuple[str, ...] = ()
    next_attempt: int | None = None
    detail: str = ""
    because: list[Link] = msgspec.field(default_factory=list)  # causation chain


class AttemptStory(msgspec.Struct, kw_only=True):
    attempt: int
    node: str | None = None
    gpus: tuple[str, ...] = ()
    scheduled_at: str | None = None
    started_at: str | None = None
    container_id: str | None = None
    end: str = "running"  # exited | start_failed | node_lost | running | not_started
    ended_at: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    oom_killed: bool = False
    error: str | None = None
    # The exit came after the attempt was already concluded (a hung process on a failed
    # GPU, a stale container on a node that came back): gpuwarden stopped it.
    stopped_after_conclusion: bool = False
    fault: str | None = None
    rule: str | None = None
    evidence: list[Link] = msgspec.field(default_factory=list)
    missing_evidence: list[str] = msgspec.field(default_factory=list)
    decision: Decision | None = None


class Explanation(msgspec.Struct, kw_only=True):
    task_id: str
    name: str = ""
    owner: str = ""
    image: str = ""
    state: ev.TaskStatus = "pending"
    submitted_at: str | None = None
    pending: list[Link] = msgspec.field(default_factory=list)
    attempts: list[AttemptStory] = msgspec.field(default_factory=list)
    final: Decision | None = None  # the decision that ended the task, if any
    invalid: list[Link] = msgspec.field(default_factory=list)


# --- summaries ---------------------------------------------------------------------


def _time(value: datetime | None) -> str | None:
    return format_time(value)


def summary(e: ev.Event) -> str:
    """One line naming what an event says (the evidence as a reader needs it)."""
    match e:
        case ev.ContainerExited():
            parts = [f"exit_code={e.exit_code}"] if e.exit_code is not None else []
            if e.signal is not None:
                parts.append(f"signal={e.signal}")
            if e.oom_killed:
                parts.append("oom_killed")
            if e.error:
                parts.append(f"error={e.error!r}")
            return f"container {e.container_id} on {e.node} exited: " + " ".join(parts)
        case ev.ContainerStartFailed():
            return f"container failed to start on {e.node}: {e.error}"
        case ev.ContainerStarted():
            return f"container {e.container_id} started on {e.node}"
        case ev.GpuFault():
            kind = f"xid {e.xid}" if e.kind == "xid" else e.kind
            if e.kind != "xid" and e.xid is not None:
                kind += f" (xid {e.xid})"
            detail = f" ({e.detail})" if e.detail else ""
            return f"GPU {e.gpu_uuid} on {e.node}: {kind}{detail}"
        case ev.NodeLost():
            return f"node {e.node} lost (last heartbeat {_time(e.last_heartbeat_at)})"
        case ev.NodeRecovered():
            return f"node {e.node} recovered"
        case ev.FaultClassified():
            return f"attempt {e.attempt} classified {e.fault} by rule {e.rule}"
        case ev.RebuildDecided():
            return f"rebuild as attempt {e.attempt} ({e.fault})"
        case ev.TaskScheduled():
            return f"attempt {e.attempt} placed on {e.node} GPUs {', '.join(e.gpu_uuids)}"
        case ev.TaskSubmitted():
            return f"task {e.task_id} submitted by {e.owner or e.actor}"
        case ev.TaskPending():
            return f"pending: {e.reason}"
        case ev.TaskFailed():
            return f"failed: {e.reason}"
        case _:
            return ev.type_of(e)


def link(stored: StoredEvent) -> Link:
    e = stored.event
    if e is None:
        return Link(seq=stored.seq, id="", type="!invalid", at=None,
                    summary=stored.error or "undecodable event")  # fmt: skip
    return Link(seq=stored.seq, id=e.id, type=ev.type_of(e), at=_time(e.at), summary=summary(e))


# --- building the story --------------------------------------------------------------


class _Builder:
    def __init__(self, task_id: str, by_id: dict[str, StoredEvent]) -> None:
        self.x = Explanation(task_id=task_id)
        self.by_id = by_id
        self.stories: dict[int, AttemptStory] = {}
        self.current: int | None = None

    def story(self, attempt: int | None) -> AttemptStory | None:
        number = attempt if attempt is not None else self.current
        if number is None:
            return None
        if number not in self.stories:
            self.stories[number] = AttemptStory(attempt=number, end="not_started")
        return self.stories[number]

    def chain(self, e: ev.Event) -> list[Link]:
        links: list[Link] = []
        cause = e.causation_id
        while cause and len(links) < _MAX_CHAIN:
            found = self.by_id.get(cause)
            if found is None or found.event is None:
                break
            links.append(link(found))
            cause = found.event.causation_id
        return links

    def feed(self, stored: StoredEvent) -> None:
        e = stored.event
        if e is None:
            self.x.invalid.append(link(stored))
            return
        handler = _FEED.get(type(e))
        if handler is not None:
            handler(self, e, stored, _time(e.at))

    def _submitted(self, e: ev.TaskSubmitted, stored: StoredEvent, at: str | None) -> None:
        self.x.name, self.x.owner, self.x.image = e.name, e.owner, e.image
        self.x.submitted_at = at

    def _pending(self, e: ev.TaskPending, stored: StoredEvent, at: str | None) -> None:
        self.x.pending.append(link(stored))
        self.x.state = "pending"

    def _scheduled(self, e: ev.TaskScheduled, stored: StoredEvent, at: str | None) -> None:
        self.current = e.attempt
        story = self.stories.setdefault(e.attempt, AttemptStory(attempt=e.attempt))
        story.node, story.gpus, story.scheduled_at = e.node, tuple(e.gpu_uuids), at
        story.end = "running"
        self.x.state = "scheduled"

    def _started(self, e: ev.ContainerStarted, stored: StoredEvent, at: str | None) -> None:
        story = self.story(e.attempt)
        assert story is not None
        story.node = story.node or e.node
        story.started_at, story.container_id, story.end = at, e.container_id, "running"
        self.x.state = "running"

    def _start_failed(
        self, e: ev.ContainerStartFailed, stored: StoredEvent, at: str | None
    ) -> None:
        story = self.story(e.attempt)
        assert story is not None
        story.node = story.node or e.node
        story.end, story.ended_at, story.error = "start_failed", at, e.error

    def _exited(self, e: ev.ContainerExited, stored: StoredEvent, at: str | None) -> None:
        story = self.story(e.attempt)
        assert story is not None
        story.node = story.node or e.node
        story.end = "exited"
        story.ended_at = _time(e.finished_at) if e.finished_at else at
        story.container_id = e.container_id
        story.exit_code, story.signal, story.oom_killed = e.exit_code, e.signal, e.oom_killed
        story.error = e.error or None
        story.stopped_after_conclusion = story.fault is not None

    def _classified(self, e: ev.FaultClassified, stored: StoredEvent, at: str | None) -> None:
        story = self.story(e.attempt)
        assert story is not None
        story.fault, story.rule = e.fault, e.rule
        story.evidence, story.missing_evidence = [], []
        for evidence_id in e.evidence:
            found = self.by_id.get(evidence_id)
            if found is None:
                story.missing_evidence.append(evidence_id)
                continue
            story.evidence.append(link(found))
            if isinstance(found.event, ev.NodeLost) and story.end == "running":
                story.end, story.ended_at = "node_lost", _time(found.event.at)

    def _decision(self, kind: str, e: ev.Event, stored: StoredEvent, at: str | None) -> Decision:
        return Decision(kind=kind, at=at, seq=stored.seq, because=self.chain(e))

    def _rebuild(self, e: ev.RebuildDecided, stored: StoredEvent, at: str | None) -> None:
        decision = self._decision("rebuild", e, stored, at)
        decision.fault, decision.rule = e.fault, e.rule
        decision.counted, decision.not_before = e.counted, _time(e.not_before)
        decision.exclude_gpus, decision.exclude_nodes = e.exclude_gpus, e.exclude_nodes
        decision.next_attempt = e.attempt
        self.current = e.attempt
        self.x.state = "pending"
        self._decided(decision, e.previous_attempt)

    def _completed(self, e: ev.TaskCompleted, stored: StoredEvent, at: str | None) -> None:
        self.x.state = "completed"
        self._decided(self._decision("complete", e, stored, at), e.attempt)

    def _failed(self, e: ev.TaskFailed, stored: StoredEvent, at: str | None) -> None:
        decision = self._decision("fail", e, stored, at)
        decision.fault, decision.reason = e.fault, e.reason
        decision.rule, decision.detail = e.rule, e.detail
        self.x.state = "failed"
        self._decided(decision, e.attempt)

    def _cancelled(self, e: ev.TaskCancelled, stored: StoredEvent, at: str | None) -> None:
        decision = self._decision("cancel", e, stored, at)
        decision.reason = e.reason
        self.x.state = "cancelled"
        self._decided(decision, e.attempt)

    def _decided(self, decision: Decision, attempt: int | None) -> None:
        if decision.kind != "rebuild":
            self.x.final = decision
        story = self.stories.get(attempt if attempt is not None else self.current or -1)
        if story is not None and (story.decision is None or decision.kind != "cancel"):
            story.decision = decision

    def result(self) -> Explanation:
        self.x.attempts = [self.stories[n] for n in sorted(self.stories)]
        return self.x


_FEED: Final = dict(
    [
        ev.on(ev.TaskSubmitted, _Builder._submitted),
        ev.on(ev.TaskPending, _Builder._pending),
        ev.on(ev.TaskScheduled, _Builder._scheduled),
        ev.on(ev.ContainerStarted, _Builder._started),
        ev.on(ev.ContainerStartFailed, _Builder._start_failed),
        ev.on(ev.ContainerExited, _Builder._exited),
        ev.on(ev.FaultClassified, _Builder._classified),
        ev.on(ev.RebuildDecided, _Builder._rebuild),
        ev.on(ev.TaskCompleted, _Builder._completed),
        ev.on(ev.TaskFailed, _Builder._failed),
        ev.on(ev.TaskCancelled, _Builder._cancelled),
    ]
)
# Not part of a task's own story: node and GPU events name no task (or, for an allocation
# or a release, tell the GPU's side of a placement); they appear only as the evidence
# and causes that the task's decisions cite.
IGNORED: Final[frozenset[type[ev.Event]]] = frozenset(
    {
        ev.NodeRegistered,
        ev.NodeLost,
        ev.NodeRecovered,
        ev.GpuFault,
        ev.GpuQuarantined,
        ev.GpuRestored,
        ev.GpuAllocated,
        ev.GpuReleased,
    }
)


def _belongs(stored: StoredEvent, task_id: str) -> bool:
    e = stored.event
    if e is None:
        return ev.aggregate_of_subject(stored.subject) == ev.task_subject(task_id)
    if isinstance(e, ev.GpuAllocated | ev.GpuReleased):
        return False  # the GPU's side of a placement; the task's own events tell it
    return getattr(e, "task_id", None) == task_id


def explain_events(events: Iterable[StoredEvent], task_id: str) -> Explanation:
    """The explanation from recorded events: the task's own, plus any evidence they cite."""
    ordered = sorted((screen(s) for s in events), key=lambda s: s.seq)
    by_id = {s.event.id: s for s in ordered if s.event is not None}
    builder = _Builder(task_id, by_id)
    mine = [s for s in ordered if _belongs(s, task_id)]
    if not mine:
        raise TaskNotFoundError(f"no recorded event names task {task_id!r}")
    for stored in mine:
        builder.feed(stored)
    return builder.result()


async def explain(source: Any, task_id: str) -> Explanation:
    """`source` is a ProjectionStore or any iterable of StoredEvents."""
    from gpuwarden.projections.store import ProjectionStore

    if isinstance(source, ProjectionStore):
        return explain_events(await task_events(source, task_id), task_id)
    return explain_events(source, task_id)


async def task_events(store: Any, task_id: str) -> list[StoredEvent]:
    """A task's events from the store, plus what its decisions cite (evidence, causes)."""
    from gpuwarden.projections import queries as q

    rows = await q.events(store, task=task_id)
    found = q.stored_events(rows)
    known = {s.event.id for s in found if s.event is not None}
    wanted = _cited(found) - known
    for _ in range(_MAX_CHAIN):
        if not wanted:
            break
        more = q.stored_events(await q.events_by_ids(store, wanted))
        found.extend(more)
        known |= wanted
        wanted = _cited(more) - known
    return sorted(found, key=lambda s: s.seq)


def _cited(events: Iterable[StoredEvent]) -> set[str]:
    ids: set[str] = set()
    for stored in events:
        e: Any = stored.event
        if e is None:
            continue
        if e.causation_id:
            ids.add(e.causation_id)
        if isinstance(e, ev.FaultClassified):
            ids.update(e.evidence)
    return ids


# --- rendering -----------------------------------------------------------------------


def to_json(explanation: Explanation) -> str:
    return msgspec.json.encode(explanation).decode()


def _end_line(story: AttemptStory) -> str:
    when = f" at {story.ended_at}" if story.ended_at else ""
    match story.end:
        case "exited":
            parts = [] if story.exit_code is None else [f"exit code {story.exit_code}"]
            if story.signal is not None:
                parts.append(f"signal {story.signal}")
            how = ", ".join(parts) or "no exit code"
            if story.oom_killed:
                how += ", killed for running out of memory (OOM)"
            if story.error:
                how += f", error: {story.error}"
            if story.stopped_after_conclusion:
                how += " (stopped by gpuwarden after it was classified)"
            return f"ended{when}: {how}"
        case "start_failed":
            return f"never started{when}: {story.error}"
        case "node_lost":
            return f"lost with its node{when}"
        case "not_started":
            return "not placed"
        case _:
            return "still running (no exit recorded)"


def _decision_lines(d: Decision) -> list[str]:
    match d.kind:
        case "rebuild":
            counted = "counted against the budget" if d.counted else "not counted"
            rule = f"policy rule {d.rule}" if d.rule is not None else "target fault type"
            lines = [f"decision: rebuild as attempt {d.next_attempt} ({rule}; {counted})"]
            lines.append(f"  not before {d.not_before}")
            if d.exclude_gpus:
                lines.append(f"  excluding GPUs {', '.join(d.exclude_gpus)}")
            if d.exclude_nodes:
                lines.append(f"  excluding nodes {', '.join(d.exclude_nodes)}")
        case "fail":
            rule = f", policy rule {d.rule}" if d.rule is not None else ""
            detail = f" — {d.detail}" if d.detail else ""
            lines = [f"decision: fail ({d.reason}{rule}; fault {d.fault}){detail}"]
        case "complete":
            lines = ["decision: completed"]
        case _:
            lines = [f"decision: cancelled ({d.reason})"]
    for cause in d.because:
        lines.append(f"  because #{cause.seq} {cause.type}: {cause.summary}")
    return lines


def render_text(x: Explanation) -> str:
    head = f"task {x.task_id}"
    if x.name:
        head += f" {x.name!r}"
    out = [f"{head}: {x.state}"]
    if x.owner or x.image:
        out.append(f"owner {x.owner or '?'}, image {x.image or '?'}")
    if x.submitted_at:
        out.append(f"submitted {x.submitted_at}")
    for pending in x.pending:
        out.append(f"#{pending.seq} {pending.at} {pending.summary}")
    for story in x.attempts:
        out.append("")
        where = f"on {story.node}" if story.node else "unplaced"
        gpus = f" GPUs {', '.join(story.gpus)}" if story.gpus else ""
        out.append(f"attempt {story.attempt} {where}{gpus}")
        if story.scheduled_at:
            out.append(f"  scheduled {story.scheduled_at}")
        if story.started_at:
            out.append(f"  started {story.started_at} (container {story.container_id})")
        out.append(f"  {_end_line(story)}")
        if story.fault:
            out.append(f"  classified {story.fault} by rule {story.rule}")
            for item in story.evidence:
                out.append(f"    evidence #{item.seq} {item.type}: {item.summary}")
            for missing in story.missing_evidence:
                out.append(f"    evidence {missing}: not in the log")
        if story.decision is not None:
            out.extend("  " + line for line in _decision_lines(story.decision))
    if x.final is not None and not any(s.decision is x.final for s in x.attempts):
        out.append("")
        out.extend(_decision_lines(x.final))
    for bad in x.invalid:
        out.append(f"! #{bad.seq} undecodable event on the task's subject: {bad.summary}")
    return "\n".join(out) + "\n"
