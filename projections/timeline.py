"""A task's or a GPU's history as one self-contained HTML page (inline SVG).

A flapping task (attempt after attempt, each ended by a fault) or a failing GPU (fault
markers under every tenant) is obvious in a picture and tedious in a table; the page
needs no scripts, styles from elsewhere or network, so it can be attached to a ticket.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from html import escape
from typing import Any, Final

import msgspec
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.ports import StoredEvent
from gpuwarden.projections.errors import TimelineError
from gpuwarden.projections.explain import AttemptStory, explain_events, summary
from gpuwarden.projections.model import screen

LEFT: Final = 190
RIGHT: Final = 40
ROW_H: Final = 34
TOP: Final = 40
WIDTH: Final = 1000
COLORS: Final = {
    "completed": "#2e9d4f",
    "rebuilt": "#e8912d",
    "failed": "#d33a2c",
    "cancelled": "#8a8a8a",
    "running": "#3778c2",
}
STYLE: Final = """
body { font: 13px system-ui, sans-serif; margin: 20px; color: #222; }
h1 { font-size: 18px; } .muted { color: #777; }
svg text { font: 11px system-ui, sans-serif; }
.axis { stroke: #bbb; } .grid { stroke: #eee; }
.legend span { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; }
"""


class Bar(msgspec.Struct, kw_only=True):
    label: str
    start: datetime
    end: datetime
    outcome: str
    tip: str
    faults: list[tuple[datetime, str]] = msgspec.field(default_factory=list)
    note: str = ""


class Arrow(msgspec.Struct, kw_only=True):
    from_row: int
    to_row: int
    at: datetime
    until: datetime
    label: str


class Span(msgspec.Struct, kw_only=True):
    start: datetime
    end: datetime
    label: str


def _dt(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _outcome(story: AttemptStory) -> str:
    if story.decision is None:
        return "running" if story.end in ("running", "not_started") else "failed"
    return {"rebuild": "rebuilt", "complete": "completed", "fail": "failed"}.get(
        story.decision.kind, "cancelled"
    )


def _last_time(events: list[StoredEvent]) -> datetime:
    times = [s.event.at for s in events if s.event is not None]
    return max(times)


# --- rows for a task ---------------------------------------------------------------


def _task_rows(events: list[StoredEvent], task_id: str) -> tuple[list[Bar], list[Arrow], str]:
    x = explain_events(events, task_id)
    last = _last_time(events)
    bars: list[Bar] = []
    row_of: dict[int, int] = {}
    for story in x.attempts:
        start = _dt(story.scheduled_at) or _dt(story.started_at) or last
        end = _dt(story.ended_at) or (_dt(story.decision.at) if story.decision else None) or last
        outcome = _outcome(story)
        where = f"{story.node or '?'} {','.join(story.gpus)}"
        fault = f" — {story.fault}" if story.fault else ""
        bar = Bar(label=f"attempt {story.attempt}", start=start, end=max(end, start),
                  outcome=outcome, tip=f"attempt {story.attempt} on {where}: {outcome}{fault}",
                  note=f"{story.node or ''} {fault.strip(' —')}".strip())  # fmt: skip
        bar.faults = _faults_for(events, story, start, max(end, start))
        row_of[story.attempt] = len(bars)
        bars.append(bar)
    arrows: list[Arrow] = []
    for story in x.attempts:
        d = story.decision
        if d is None or d.kind != "rebuild" or d.next_attempt is None:
            continue
        at = _dt(d.at) or last
        counted = "counted" if d.counted else "not counted"
        arrows.append(
            Arrow(
                from_row=row_of[story.attempt],
                to_row=row_of.get(d.next_attempt, -1),
                at=at,
                until=_dt(d.not_before) or at,
                label=f"rebuild: {d.fault} ({counted})",
            )
        )
    title = f"task {task_id}" + (f" “{x.name}”" if x.name else "") + f" — {x.state}"
    return bars, arrows, title


def _faults_for(
    events: list[StoredEvent], story: AttemptStory, start: datetime, end: datetime
) -> list[tuple[datetime, str]]:
    """GPU faults on the attempt's GPUs and losses of its node, near its lifetime."""
    cited = {item.id for item in story.evidence}
    slack = timedelta(seconds=5)  # late evidence the classification cited is kept anyway
    found: list[tuple[datetime, str]] = []
    for stored in events:
        e: Any = stored.event
        on_gpu = isinstance(e, ev.GpuFault) and e.gpu_uuid in story.gpus
        on_node = isinstance(e, ev.NodeLost) and e.node == story.node
        if not (on_gpu or on_node):
            continue
        if e.id in cited or start - slack <= e.at <= end + slack:
            found.append((e.at, summary(e)))
    return found


# --- rows for a GPU ------------------------------------------------------------------


def _gpu_rows(events: list[StoredEvent], uuid: str) -> tuple[list[Bar], list[Span], str]:
    if not any(getattr(s.event, "gpu_uuid", None) == uuid for s in events):
        raise TimelineError(f"no recorded event names GPU {uuid!r}")
    rows = _GpuRows(_last_time(events), _attempt_outcomes(events))
    for stored in sorted(events, key=lambda s: s.seq):
        e = stored.event
        if e is None or getattr(e, "gpu_uuid", None) != uuid:
            continue
        handler = _GPU_ROWS.get(type(e))
        if handler is not None:
            handler(rows, e)
    return rows.result(uuid)


class _GpuRows:
    """One GPU's tenants (a bar per attempt it was allocated to), faults and quarantines."""

    def __init__(self, last: datetime, outcomes: dict[tuple[str, int], str]) -> None:
        self.last = last
        self.outcomes = outcomes
        self.open_bars: dict[tuple[str, int], Bar] = {}
        self.bars: list[Bar] = []
        self.faults: list[tuple[datetime, str]] = []
        self.spans: list[Span] = []
        self.quarantine: tuple[datetime, str] | None = None

    def allocated(self, e: ev.GpuAllocated) -> None:
        key = (e.task_id, e.attempt)
        outcome = self.outcomes.get(key, "running")
        bar = Bar(label=f"{e.task_id} #{e.attempt}", start=e.at, end=self.last,
                  outcome=outcome, tip=f"task {e.task_id} attempt {e.attempt} "
                  f"on {e.node}: {outcome}")  # fmt: skip
        self.open_bars[key] = bar
        self.bars.append(bar)

    def released(self, e: ev.GpuReleased) -> None:
        released = self.open_bars.pop((e.task_id, e.attempt), None)
        if released is not None:
            released.end = e.at

    def fault(self, e: ev.GpuFault) -> None:
        self.faults.append((e.at, summary(e)))

    def quarantined(self, e: ev.GpuQuarantined) -> None:
        self.quarantine = (e.at, e.reason)

    def restored(self, e: ev.GpuRestored) -> None:
        if self.quarantine is not None:
            self.spans.append(Span(start=self.quarantine[0], end=e.at,
                                   label=f"quarantined: {self.quarantine[1]}"))  # fmt: skip
            self.quarantine = None

    def result(self, uuid: str) -> tuple[list[Bar], list[Span], str]:
        spans, faults, last = self.spans, self.faults, self.last
        if self.quarantine is not None:
            at, reason = self.quarantine
            spans.append(Span(start=at, end=last, label=f"quarantined: {reason}"))
        for bar in self.bars:
            bar.faults = [f for f in faults if bar.start <= f[0] <= bar.end]
        header = Bar(
            label="GPU faults", start=last, end=last, outcome="none", tip="", faults=faults
        )
        return [header, *self.bars], spans, f"GPU {uuid}"


_GPU_ROWS: Final = dict(
    [
        ev.on(ev.GpuAllocated, _GpuRows.allocated),
        ev.on(ev.GpuReleased, _GpuRows.released),
        ev.on(ev.GpuFault, _GpuRows.fault),
        ev.on(ev.GpuQuarantined, _GpuRows.quarantined),
        ev.on(ev.GpuRestored, _GpuRows.restored),
    ]
)
# Not about one GPU (no `gpu_uuid`): a GPU's page shows its own events only; how each
# tenant's attempt ended comes from `_attempt_outcomes`.
_GPU_ROWS_IGNORES: Final[frozenset[type[ev.Event]]] = frozenset(
    {
        ev.NodeRegistered,
        ev.NodeLost,
        ev.NodeRecovered,
        ev.TaskSubmitted,
        ev.TaskPending,
        ev.TaskScheduled,
        ev.ContainerStarted,
        ev.ContainerStartFailed,
        ev.ContainerExited,
        ev.FaultClassified,
        ev.RebuildDecided,
        ev.TaskCompleted,
        ev.TaskFailed,
        ev.TaskCancelled,
    }
)


def _attempt_outcomes(events: list[StoredEvent]) -> dict[tuple[str, int], str]:
    """How each attempt ended, by the decision that ended it."""
    outcomes: dict[tuple[str, int], str] = {}
    for stored in events:
        e = stored.event
        handler = None if e is None else _OUTCOMES.get(type(e))
        if handler is not None:
            handler(outcomes, e)
    return outcomes


def _rebuilt(outcomes: dict[tuple[str, int], str], e: ev.RebuildDecided) -> None:
    outcomes[(e.task_id, e.previous_attempt)] = "rebuilt"


def _completed(outcomes: dict[tuple[str, int], str], e: ev.TaskCompleted) -> None:
    outcomes[(e.task_id, e.attempt)] = "completed"


def _failed(outcomes: dict[tuple[str, int], str], e: ev.TaskFailed) -> None:
    if e.attempt is not None:
        outcomes[(e.task_id, e.attempt)] = "failed"


def _cancelled(outcomes: dict[tuple[str, int], str], e: ev.TaskCancelled) -> None:
    if e.attempt is not None:
        outcomes.setdefault((e.task_id, e.attempt), "cancelled")


_OUTCOMES: Final = dict(
    [
        ev.on(ev.RebuildDecided, _rebuilt),
        ev.on(ev.TaskCompleted, _completed),
        ev.on(ev.TaskFailed, _failed),
        ev.on(ev.TaskCancelled, _cancelled),
    ]
)
# Only a decision ends an attempt for good (an exit may still be rebuilt, a start may
# still fail): everything else leaves its outcome open.
_OUTCOMES_IGNORES: Final[frozenset[type[ev.Event]]] = frozenset(
    {
        ev.NodeRegistered,
        ev.NodeLost,
        ev.NodeRecovered,
        ev.GpuFault,
        ev.GpuQuarantined,
        ev.GpuRestored,
        ev.GpuAllocated,
        ev.GpuReleased,
        ev.TaskSubmitted,
        ev.TaskPending,
        ev.TaskScheduled,
        ev.ContainerStarted,
        ev.ContainerStartFailed,
        ev.ContainerExited,
        ev.FaultClassified,
    }
)


# --- drawing -------------------------------------------------------------------------


class _Axis:
    def __init__(self, start: datetime, end: datetime) -> None:
        span = (end - start).total_seconds() or 60.0
        pad = span * 0.03
        self.start = start - timedelta(seconds=pad)
        self.seconds = span + 2 * pad

    def x(self, when: datetime) -> float:
        offset = (when - self.start).total_seconds() / self.seconds
        return round(LEFT + offset * (WIDTH - LEFT - RIGHT), 1)

    def ticks(self, count: int = 6) -> list[datetime]:
        step = self.seconds / count
        return [self.start + timedelta(seconds=step * (i + 0.5)) for i in range(count)]


def _svg(bars: list[Bar], arrows: list[Arrow], spans: list[Span]) -> str:
    times = [t for b in bars for t in (b.start, b.end)]
    times += [f[0] for b in bars for f in b.faults] + [a.until for a in arrows]
    times += [t for s in spans for t in (s.start, s.end)]
    axis = _Axis(min(times), max(times))
    height = TOP + ROW_H * len(bars) + 20
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img">',
        '<defs><marker id="head" markerWidth="8" markerHeight="8" refX="7" refY="4" '
        'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>',
    ]
    for tick in axis.ticks():
        x = axis.x(tick)
        out.append(f'<line class="grid" x1="{x}" y1="{TOP - 8}" x2="{x}" y2="{height - 20}"/>')
        label = tick.strftime("%Y-%m-%d %H:%M:%S")
        out.append(f'<text x="{x}" y="{TOP - 14}" text-anchor="middle">{label}</text>')
    for span in spans:
        x1, x2 = axis.x(span.start), axis.x(span.end)
        out.append(
            f'<rect x="{x1}" y="{TOP - 8}" width="{max(x2 - x1, 2)}" '
            f'height="{height - TOP - 12}" fill="#f6d7d3" opacity="0.6">'
            f"<title>{escape(span.label)}</title></rect>"
        )
    for row, bar in enumerate(bars):
        out.extend(_bar(axis, row, bar))
    for arrow in arrows:
        out.extend(_arrow(axis, arrow))
    out.append("</svg>")
    return "\n".join(out)


def _bar(axis: _Axis, row: int, bar: Bar) -> list[str]:
    y = TOP + row * ROW_H
    parts = [f'<text x="8" y="{y + 16}">{escape(bar.label)}</text>']
    if bar.outcome != "none":
        x1, x2 = axis.x(bar.start), axis.x(bar.end)
        color = COLORS.get(bar.outcome, "#555")
        parts.append(
            f'<rect class="attempt {bar.outcome}" x="{x1}" y="{y + 4}" '
            f'width="{max(x2 - x1, 3)}" height="{ROW_H - 14}" rx="3" fill="{color}">'
            f"<title>{escape(bar.tip)}</title></rect>"
        )
        if bar.note:
            parts.append(f'<text x="{x2 + 4}" y="{y + 16}" class="muted">{escape(bar.note)}</text>')
    for when, text in bar.faults:
        x = axis.x(when)
        parts.append(
            f'<path class="fault" d="M{x},{y + 2} l5,9 l-5,9 l-5,-9 z" fill="#b0001e" '
            f'stroke="#fff"><title>{escape(text)}</title></path>'
        )
    return parts


def _arrow(axis: _Axis, arrow: Arrow) -> list[str]:
    y1 = TOP + arrow.from_row * ROW_H + ROW_H - 10
    y2 = TOP + (arrow.to_row if arrow.to_row >= 0 else arrow.from_row + 1) * ROW_H + 4
    x1, x2 = axis.x(arrow.at), axis.x(max(arrow.until, arrow.at))
    label = escape(arrow.label)
    return [
        f'<path class="rebuild" d="M{x1},{y1} C{x1},{y2} {x2},{y1} {x2},{y2}" fill="none" '
        f'stroke="#555" stroke-dasharray="4 3" marker-end="url(#head)">'
        f"<title>{label}</title></path>",
        f'<text x="{x1 + 6}" y="{y1 + 10}" fill="#555">{label}</text>',
    ]


def _legend() -> str:
    items = "".join(
        f'<span style="background:{color}"></span>{name}' for name, color in COLORS.items()
    )
    return (
        f'<p class="legend">{items}<span style="background:#b0001e"></span>GPU fault / '
        'node lost<span style="background:#f6d7d3"></span>quarantined</p>'
    )


def render_timeline(
    events: Iterable[StoredEvent], task_id: str | None = None, gpu: str | None = None
) -> str:
    """A standalone HTML page: one row per attempt (task) or per tenant (GPU)."""
    stored = sorted((screen(s) for s in events), key=lambda s: s.seq)
    if (task_id is None) == (gpu is None):
        raise TimelineError("a timeline needs exactly one of a task id or a GPU uuid")
    arrows: list[Arrow] = []
    spans: list[Span] = []
    if task_id is not None:
        bars, arrows, title = _task_rows(stored, task_id)
    else:
        assert gpu is not None
        bars, spans, title = _gpu_rows(stored, gpu)
    body = _svg(bars, arrows, spans) if bars else '<p class="muted">no attempts recorded</p>'
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8"/>'
        f"<title>{escape(title)} — gpuwarden timeline</title><style>{STYLE}</style></head>"
        f"<body><h1>{escape(title)}</h1>\n{body}\n{_legend()}\n"
        f'<p class="muted">{len(stored)} events, times in UTC</p></body></html>\n'
    )
