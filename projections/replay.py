"""Replay: the log folded again, to audit the engine's decisions and question its policy.

Every decision the engine appends carries the stream sequence it had folded when it
decided (`Gw-Basis`) and the events it decided on (`Gw-Trigger`: their ids, `timer`,
or `reconcile`). Folding the log again and calling the same pure functions on the same
state at the same `now` must give the recorded events bit for bit; anything else is a
bug, a tampered log, or a log recorded under another policy (`Gw-Policy` says which).

A round's basis lies before the round itself: events between the two (another writer's
observations, the engine's liveness verdicts) were not in the state that decided. So
records are folded lazily, up to each round's basis when the round is complete, and a
bounded lookahead keeps memory flat on long logs.

No network code: the records come from `EventLog.read` or `read_jsonl`, sync or async.

Size: one module, past 600 lines, on purpose: `--check`, `--diff` and the state dump
share the lazy fold and the round re-derivation above, which must stay one code path.
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
from gpuwarden.engine.core.admission import Admission
from gpuwarden.engine.core.decide import decide_guarded, reconcile_guarded
from gpuwarden.engine.core.errors import GpuwardenError
from gpuwarden.engine.core.events import (
    Event,
    NodeLost,
    NodeRecovered,
    RebuildDecided,
    TaskCompleted,
    TaskFailed,
    TaskPending,
    TaskScheduled,
    to_builtins,
    type_of,
)
from gpuwarden.engine.core.fold import evolve
from gpuwarden.engine.core.policy import DEFAULT_POLICY, Policy
from gpuwarden.engine.core.state import State, TaskState, initial_state
from gpuwarden.engine.core.wire import (
    BASIS_HEADER,
    MAX_EVENT_BYTES,
    POLICY_HEADER,
    TRIGGER_HEADER,
    policy_digest,
)
from gpuwarden.engine.ports import StoredEvent

Records = Iterable[StoredEvent] | AsyncIterable[StoredEvent]
Progress = Callable[[int], None]

LOOKAHEAD = 100_000  # records held unfolded while waiting for the next round's basis
TRIGGER_MEMORY = 100_000  # recent events kept by id, to look up a round's triggers
_TRIGGER_SPAN = re.compile(r"(\d+)-(\d+)")
PROGRESS_EVERY = 2_000
ENGINE = "engine"


class ReplayError(GpuwardenError):
    """A replay cannot be done as asked (bad arguments, unreadable input)."""


# --- rounds --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoundKey:
    """The headers that make consecutive decision messages one round."""

    basis: str
    trigger: str
    policy: str | None


@dataclass(slots=True)
class Round:
    """One decision round as recorded: one or more consecutive batches, same headers."""

    key: RoundKey
    records: list[StoredEvent] = field(default_factory=list)

    @property
    def first_seq(self) -> int:
        return self.records[0].seq

    @property
    def last_seq(self) -> int:
        return self.records[-1].seq

    @property
    def events(self) -> list[Event | None]:
        return [r.event for r in self.records]


def round_key(record: StoredEvent) -> RoundKey | None:
    basis = record.headers.get(BASIS_HEADER)
    trigger = record.headers.get(TRIGGER_HEADER)
    if basis is None or trigger is None:
        return None
    return RoundKey(basis, trigger, record.headers.get(POLICY_HEADER))


@dataclass(frozen=True, slots=True)
class Unverifiable:
    """A record that looks like a decision but cannot be re-derived, and why."""

    seq: int
    type: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A round whose re-derivation differs from the log, at its first differing event."""

    seq: int  # the first recorded message that differs (or the round's last, if missing)
    first_seq: int
    last_seq: int
    basis: int
    trigger: str
    index: int  # position within the round
    recorded: Event | None
    derived: Event | None
    recorded_count: int
    derived_count: int

    def to_builtins(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "round": [self.first_seq, self.last_seq],
            "basis": self.basis,
            "trigger": self.trigger,
            "index": self.index,
            "recorded": _plain(self.recorded),
            "derived": _plain(self.derived),
            "recorded_count": self.recorded_count,
            "derived_count": self.derived_count,
        }


def _plain(event: Event | None) -> dict[str, Any] | None:
    return None if event is None else to_builtins(event)


# --- the walk ------------------------------------------------------------------------


RoundHook = Callable[[State, Round, list[Event] | None], None]


class _Walk:
    """Folds records lazily and hands each complete round the state at its basis.

    `on_round(state, round, triggers)` gets `triggers=None` for a reconcile round.
    The hook must not change the state; the walk folds the recorded events after it.
    """

    def __init__(
        self,
        policy: Policy,
        on_round: RoundHook | None = None,
        *,
        lookahead: int = LOOKAHEAD,
        progress: Progress | None = None,
    ) -> None:
        self.state = initial_state(policy)
        self.admission = Admission()
        self.on_round = on_round
        self.lookahead = lookahead
        self.progress = progress
        self.pending: deque[StoredEvent] = deque()
        self.current: Round | None = None
        self.folded_seq = 0
        self.last_at: datetime | None = None
        self.by_id: OrderedDict[str, Event] = OrderedDict()
        self.by_seq: OrderedDict[int, Event] = OrderedDict()
        self.rounds = 0
        self.read = 0
        self.unverifiable: list[Unverifiable] = []
        self.policies: Counter[str] = Counter()

    def feed(self, record: StoredEvent) -> None:
        self.read += 1
        if self.progress is not None and self.read % PROGRESS_EVERY == 0:
            self.progress(self.read)
        key = round_key(record)
        if self.current is not None and key == self.current.key:
            self.current.records.append(record)
        else:
            self._settle_current()
            if key is not None:
                self.current = Round(key, [record])
            else:
                self._note_headerless(record)
        self.pending.append(record)
        while len(self.pending) > self.lookahead:
            self._fold(self.pending.popleft())

    def cut(self, beyond: StoredEvent) -> None:
        """The input stops before `beyond`: a round it continues is only partly here."""
        found = self.current
        if found is not None and round_key(beyond) == found.key:
            self.current = None
            self._skip(found, f"cut off by the replay limit before sequence {beyond.seq}")

    def finish(self) -> State:
        self._settle_current()
        while self.pending:
            self._fold(self.pending.popleft())
        if self.progress is not None:
            self.progress(self.read)
        return self.state

    def _note_headerless(self, record: StoredEvent) -> None:
        event = record.event
        if event is None or event.actor != ENGINE or isinstance(event, NodeLost | NodeRecovered):
            return
        reason = f"written by {ENGINE} without {BASIS_HEADER}/{TRIGGER_HEADER} headers"
        self.unverifiable.append(Unverifiable(record.seq, type_of(event), reason))

    def _fold(self, record: StoredEvent) -> None:
        if record.seq <= self.folded_seq:
            return  # a duplicate delivery, as the engine skips it
        self.folded_seq = record.seq
        event = record.event
        if event is None or len(record.data) > MAX_EVENT_BYTES:
            return  # the engine dead-letters it and folds on
        if self.admission.admit(record.subject, event) is not None:
            return  # refused at admission: dead-lettered by the engine too
        try:
            evolve(self.state, event)
        except Exception:
            return  # crash-only: the engine dead-letters an event whose fold raises
        self.last_at = event.at
        self.by_id[event.id] = event
        self.by_id.move_to_end(event.id)
        if len(self.by_id) > TRIGGER_MEMORY:
            self.by_id.popitem(last=False)
        self.by_seq[record.seq] = event
        if len(self.by_seq) > TRIGGER_MEMORY:
            self.by_seq.popitem(last=False)

    def _settle_current(self) -> None:
        found, self.current = self.current, None
        if found is None:
            return
        first = found.records[0]
        try:
            basis = int(found.key.basis)
        except ValueError:
            self._skip(found, f"{BASIS_HEADER} {found.key.basis!r} is not a sequence")
            return
        if basis >= first.seq:
            self._skip(found, f"{BASIS_HEADER} {basis} is not before the round")
            return
        while self.pending and self.pending[0].seq <= basis:
            self._fold(self.pending.popleft())
        if self.folded_seq > basis:
            self._skip(found, f"already folded past its basis {basis} (out of order round)")
            return
        if any(e is None for e in found.events):
            self._skip(found, "a message of the round does not decode")
            return
        triggers = self._triggers(found)
        if isinstance(triggers, str):
            self._skip(found, triggers)
            return
        self.rounds += 1
        if found.key.policy is not None:
            self.policies[found.key.policy] += 1
        if self.on_round is not None:
            self.on_round(self.state, found, triggers)

    def _triggers(self, found: Round) -> list[Event] | str | None:
        """The trigger events, None for reconcile, or why they cannot be had."""
        text = found.key.trigger
        if text == "reconcile":
            return None
        if text == "timer":
            return []
        span = _TRIGGER_SPAN.fullmatch(text)
        if span is not None:  # the folded events from..to (undecodable ones were skipped)
            first, last = int(span.group(1)), int(span.group(2))
            if first not in self.by_seq and first <= self.folded_seq:
                return f"triggers from sequence {first} are no longer in replay's memory"
            return [e for seq, e in self.by_seq.items() if first <= seq <= last]
        events = []
        for trigger_id in text.split(","):  # the older form: a list of event ids
            event = self.by_id.get(trigger_id)
            if event is None:
                return f"trigger {trigger_id} is not in the log before the round's basis"
            events.append(event)
        return events

    def _skip(self, found: Round, reason: str) -> None:
        event = found.records[0].event
        kind = None if event is None else type_of(event)
        self.unverifiable.append(Unverifiable(found.first_seq, kind, reason))


def rederive(state: State, found: Round, triggers: list[Event] | None) -> list[Event]:
    """What the supervisor decides in this round's state at the round's `now`."""
    first = found.records[0].event
    assert first is not None
    if triggers is None:
        return reconcile_guarded(state, first.at)
    return decide_guarded(state, triggers, first.at)[0]


async def _each(records: Records) -> AsyncIterator[StoredEvent]:
    if isinstance(records, AsyncIterable):
        async for record in records:
            yield record
    else:
        for record in records:
            yield record


async def _run(records: Records, walk: _Walk, until: Callable[[StoredEvent], bool]) -> State:
    async for record in _each(records):
        if until(record):
            walk.cut(record)
            break
        walk.feed(record)
    return walk.finish()


def _no_limit(record: StoredEvent) -> bool:
    return False


# --- time travel ---------------------------------------------------------------------


@dataclass(slots=True)
class Snapshot:
    """The supervisor's state after folding a prefix of the log."""

    state: State
    seq: int  # last sequence folded
    at: datetime | None  # time of the last event folded

    @property
    def summary(self) -> dict[str, Any]:
        return summarize(self.state, self.seq, self.at)


def summarize(state: State, seq: int = 0, at: datetime | None = None) -> dict[str, Any]:
    """Tasks, GPUs and nodes as plain data (JSON-able)."""
    return {
        "seq": seq,
        "at": at.isoformat() if at is not None else None,
        "policy": policy_digest(state.policy),
        "tasks": [_task_row(task) for task in state.tasks.values()],
        "gpus": [
            {
                "uuid": gpu.uuid,
                "node": gpu.node,
                "index": gpu.index,
                "model": gpu.model,
                "holder": None if gpu.holder is None else f"{gpu.holder[0]}#{gpu.holder[1]}",
                "quarantined": gpu.quarantined,
            }
            for gpu in state.gpus.values()
        ],
        "nodes": [
            {"name": node.name, "alive": node.alive, "gpus": list(node.gpus)}
            for node in state.nodes.values()
        ],
    }


def _task_row(task: TaskState) -> dict[str, Any]:
    attempt = task.current
    failure = task.failure
    return {
        "task_id": task.spec.task_id,
        "name": task.spec.name,
        "status": task.status,
        "attempt": None if attempt is None else attempt.n,
        "node": None if attempt is None else attempt.node,
        "gpus": [] if attempt is None else list(attempt.gpu_uuids),
        "rebuilds": task.rebuilds,
        "pending_reason": task.pending_reason,
        "fault": None if failure is None else failure.fault,
        "reason": None if failure is None else failure.reason,
    }


async def state_at(
    records: Records,
    until_seq: int | None = None,
    until_time: datetime | None = None,
    policy: Policy = DEFAULT_POLICY,
    *,
    progress: Progress | None = None,
) -> Snapshot:
    """The state folded through `until_seq`, or through the last event at or before
    `until_time` (a prefix of the log: the first later event ends it), or the end."""
    if until_seq is not None and until_time is not None:
        raise ReplayError("give at most one of until_seq and until_time")
    walk = _Walk(policy, progress=progress)
    state = await _run(records, walk, _until(until_seq, until_time))
    return Snapshot(state, walk.folded_seq, walk.last_at)


def _until(until_seq: int | None, until_time: datetime | None) -> Callable[[StoredEvent], bool]:
    if until_seq is not None:
        return lambda record: record.seq > until_seq
    if until_time is not None:
        return lambda r: r.event is not None and _aware(r.event.at, until_time) > until_time
    return _no_limit


def _aware(at: datetime, like: datetime) -> datetime:
    if at.tzinfo is None and like.tzinfo is not None:
        return at.replace(tzinfo=like.tzinfo)
    return at


# --- check ---------------------------------------------------------------------------


@dataclass(slots=True)
class CheckResult:
    """How re-deriving every recorded round went."""

    rounds: int
    mismatches: list[Mismatch]
    unverifiable: list[Unverifiable]
    events: int  # records read
    policy: str  # digest of the policy replayed under
    recorded_policies: dict[str, int]  # Gw-Policy digests seen, with their round counts

    @property
    def ok(self) -> bool:
        return not self.mismatches

    @property
    def other_policies(self) -> dict[str, int]:
        return {d: n for d, n in self.recorded_policies.items() if d != self.policy}

    def to_builtins(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "rounds": self.rounds,
            "mismatches": [m.to_builtins() for m in self.mismatches],
            "unverifiable": [
                {"seq": u.seq, "type": u.type, "reason": u.reason} for u in self.unverifiable
            ],
            "policy": self.policy,
            "recorded_policies": self.recorded_policies,
        }


def compare_round(found: Round, derived: list[Event]) -> Mismatch | None:
    """The first difference between a recorded round and its re-derivation."""
    recorded = found.events
    if recorded == derived:
        return None
    index = next(
        (i for i, (a, b) in enumerate(zip(recorded, derived, strict=False)) if a != b),
        min(len(recorded), len(derived)),
    )
    seq = found.records[min(index, len(recorded) - 1)].seq
    return Mismatch(
        seq=seq,
        first_seq=found.first_seq,
        last_seq=found.last_seq,
        basis=int(found.key.basis),
        trigger=found.key.trigger,
        index=index,
        recorded=recorded[index] if index < len(recorded) else None,
        derived=derived[index] if index < len(derived) else None,
        recorded_count=len(recorded),
        derived_count=len(derived),
    )


async def check(
    records: Records,
    policy: Policy = DEFAULT_POLICY,
    *,
    until_seq: int | None = None,
    progress: Progress | None = None,
) -> CheckResult:
    """Re-derive every recorded decision round and report those that differ."""
    mismatches: list[Mismatch] = []

    def on_round(state: State, found: Round, triggers: list[Event] | None) -> None:
        mismatch = compare_round(found, rederive(state, found, triggers))
        if mismatch is not None:
            mismatches.append(mismatch)

    walk = _Walk(policy, on_round, progress=progress)
    await _run(records, walk, _until(until_seq, None))
    return CheckResult(
        rounds=walk.rounds,
        mismatches=mismatches,
        unverifiable=walk.unverifiable,
        events=walk.read,
        policy=policy_digest(policy),
        recorded_policies=dict(walk.policies),
    )


# --- diff ----------------------------------------------------------------------------


class TaskVerdict(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a round decided for one task, reduced to what a policy can change."""

    kind: str  # completed | rebuilt | failed | placed | pending
    attempt: int | None = None
    fault: str | None = None
    reason: str | None = None
    rule: int | None = None
    counted: bool | None = None
    not_before: datetime | None = None
    node: str | None = None
    gpus: tuple[str, ...] | None = None


def task_verdicts(events: Iterable[Event]) -> dict[str, list[TaskVerdict]]:
    """Per task, the verdicts among a round's decisions, in order."""
    found: dict[str, list[TaskVerdict]] = {}
    for event in events:
        verdict = _verdict(event)
        if verdict is not None:
            found.setdefault(getattr(event, "task_id", ""), []).append(verdict)
    return found


def _verdict(event: Event) -> TaskVerdict | None:
    match event:
        case TaskCompleted():
            return TaskVerdict(kind="completed", attempt=event.attempt)
        case RebuildDecided():
            return TaskVerdict(
                kind="rebuilt",
                attempt=event.previous_attempt,
                fault=event.fault,
                rule=event.rule,
                counted=event.counted,
                not_before=event.not_before,
            )
        case TaskFailed():
            return TaskVerdict(
                kind="failed",
                attempt=event.attempt,
                fault=event.fault,
                reason=event.reason,
                rule=event.rule,
            )
        case TaskScheduled():
            return TaskVerdict(
                kind="placed", attempt=event.attempt, node=event.node, gpus=event.gpu_uuids
            )
        case TaskPending():
            return TaskVerdict(kind="pending", reason=event.reason)
    return None


@dataclass(frozen=True, slots=True)
class Divergence:
    """The first round where another policy decides differently for a task."""

    task_id: str
    seq: int  # the recorded verdict's message (the round's first if it has none)
    change: str  # rebuilt | failed | completed | placed_elsewhere | placed | pending | changed
    recorded: tuple[TaskVerdict, ...]
    alternative: tuple[TaskVerdict, ...]

    def to_builtins(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "seq": self.seq,
            "change": self.change,
            "recorded": msgspec.to_builtins(self.recorded),
            "alternative": msgspec.to_builtins(self.alternative),
        }


def _verdict_seq(found: Round, task_id: str) -> int:
    """The message of the round holding the task's recorded verdict (else its first)."""
    for record in found.records:
        event = record.event
        if event is not None and getattr(event, "task_id", None) == task_id:
            if _verdict(event) is not None:
                return record.seq
    return found.first_seq


@dataclass(slots=True)
class DiffResult:
    rounds: int
    divergences: list[Divergence]
    events: int
    recorded_policy: str
    other_policy: str

    def tasks(self, change: str) -> list[str]:
        return [d.task_id for d in self.divergences if d.change == change]

    def to_builtins(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "rounds": self.rounds,
            "recorded_policy": self.recorded_policy,
            "other_policy": self.other_policy,
            "divergences": [d.to_builtins() for d in self.divergences],
        }


def classify_change(recorded: tuple[TaskVerdict, ...], other: tuple[TaskVerdict, ...]) -> str:
    """A word for how the alternative differs: what the task would have become."""
    rec_kinds = {v.kind for v in recorded}
    alt_kinds = {v.kind for v in other}
    for kind in ("rebuilt", "failed", "completed"):
        if kind in alt_kinds and kind not in rec_kinds:
            return kind
    if "placed" in alt_kinds and "placed" in rec_kinds:
        return "placed_elsewhere"
    if "placed" in alt_kinds:
        return "placed"
    if "pending" in alt_kinds and "pending" not in rec_kinds:
        return "pending"
    if not other:
        return "undecided"
    return "changed"


async def diff(
    records: Records,
    recorded_policy: Policy,
    other_policy: Policy,
    *,
    until_seq: int | None = None,
    progress: Progress | None = None,
) -> DiffResult:
    """What `other_policy` would have decided at each recorded round, per task.

    Only the first divergence of a task is reported: after it the log holds no
    observations of the counterfactual attempt, so its future cannot be simulated.
    Other tasks are judged against the recorded history (a knock-on effect of one
    task's different fate on another's placement is not modelled).
    """
    other_template = initial_state(other_policy)
    diverged: dict[str, Divergence] = {}

    def on_round(state: State, found: Round, triggers: list[Event] | None) -> None:
        saved = state.policy, state.table
        state.policy, state.table = other_template.policy, other_template.table
        try:
            alternative = rederive(state, found, triggers)
        finally:
            state.policy, state.table = saved
        recorded = task_verdicts(e for e in found.events if e is not None)
        other = task_verdicts(alternative)
        for task_id in list(recorded) + [t for t in other if t not in recorded]:
            if task_id in diverged:
                continue
            rec, alt = tuple(recorded.get(task_id, ())), tuple(other.get(task_id, ()))
            if rec != alt:
                seq = _verdict_seq(found, task_id)
                diverged[task_id] = Divergence(task_id, seq, classify_change(rec, alt), rec, alt)

    walk = _Walk(recorded_policy, on_round, progress=progress)
    await _run(records, walk, _until(until_seq, None))
    return DiffResult(
        rounds=walk.rounds,
        divergences=list(diverged.values()),
        events=walk.read,
        recorded_policy=policy_digest(recorded_policy),
        other_policy=policy_digest(other_policy),
    )
