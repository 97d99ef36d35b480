"""A pure in-memory driver of the supervisor for tests: the engine loop without I/O.

It does what the engine runtime does — fold an event, decide, fold the decisions and
decide on them in turn, fire timers at their due time — against a plain list.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.decide import decide, decide_many, reconcile
from gpuwarden.engine.core.fold import evolve
from gpuwarden.engine.core.policy import DEFAULT_POLICY, Policy
from gpuwarden.engine.core.state import State, initial_state, next_due

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def check_indexes(state: State) -> None:
    """The placement index (free GPUs per node, ranked free nodes) agrees with a recount."""
    for name, node in state.nodes.items():
        free = sum(
            1 for u in node.gpus if state.gpus[u].holder is None and not state.gpus[u].quarantined
        )
        assert node.free == free, f"{name}: index says {node.free} free, recount {free}"
    ranked = sorted((n.free, name) for name, n in state.nodes.items() if n.free > 0)
    assert state.free_ranked == ranked, "the ranked free-node index is out of step"


class Driver:
    def __init__(self, policy: Policy = DEFAULT_POLICY) -> None:
        self.state: State = initial_state(policy)
        self.now = T0
        self.log: list[ev.Event] = []
        # (basis, trigger, group); trigger: an event id, "timer", "reconcile", or the
        # ids of a round that decided on several folded events at once
        self.decisions: list[tuple[int, str | tuple[str, ...], list[ev.Event]]] = []
        self.down = False  # the engine is down: events are logged, nothing decides
        self.batch: list[ev.Event] | None = None  # events folded for one round
        self._n = 0

    def _id(self) -> str:
        self._n += 1
        return f"x{self._n:06d}"

    def emit(self, cls: type[Any], **fields: Any) -> ev.Event:
        fields.setdefault("actor", "scenario")
        event = cls(id=self._id(), at=self.now, **fields)
        self.append(event)
        return event

    def append(self, event: ev.Event) -> None:
        self.log.append(event)
        evolve(self.state, event)
        check_indexes(self.state)
        if self.down:
            return
        if self.batch is not None:
            self.batch.append(event)
            return
        self._decide(event)

    def decide_batch(self) -> None:
        """One round on everything folded since the batch began (as the engine loop
        does when several events arrive between two rounds)."""
        triggers, self.batch = tuple(self.batch or ()), None
        if triggers:
            self._record(tuple(e.id for e in triggers), decide_many(self.state, triggers, self.now))

    def restart(self) -> None:
        """A new engine: the fold of the log from scratch, then its startup sweep."""
        self.down = False
        self.state = initial_state(self.state.policy, self.state.table)
        for event in self.log:
            evolve(self.state, event)
        check_indexes(self.state)
        self._record("reconcile", reconcile(self.state, self.now))

    def _record(self, trigger: str | tuple[str, ...], group: list[ev.Event]) -> None:
        if not group:
            return
        self.decisions.append((len(self.log), trigger, group))
        for event in group:
            self.log.append(event)
            evolve(self.state, event)
            check_indexes(self.state)
        for event in group:
            self._decide(event)

    def _decide(self, trigger: ev.Event | None) -> None:
        group = decide(self.state, trigger, self.now)
        self._record(trigger.id if trigger else "timer", group)

    def advance(self, seconds: float) -> None:
        target = self.now + timedelta(seconds=seconds)
        while not self.down and (due := next_due(self.state)) is not None and due <= target:
            self.now = max(self.now, due)
            self._decide(None)
        self.now = target

    # conveniences ---------------------------------------------------------------

    def node(self, name: str, gpus: int, model: str = "H100", memory_mb: int = 81920) -> None:
        infos = tuple(
            ev.GpuInfo(uuid=f"{name}/{i}", index=i, model=model, memory_mb=memory_mb)
            for i in range(gpus)
        )
        self.emit(ev.NodeRegistered, node=name, runtime="sim", gpus=infos)

    def submit(self, task: str, gpus: int = 1, **fields: Any) -> None:
        fields.setdefault("image", "img")
        fields.setdefault("command", ("run",))
        self.emit(ev.TaskSubmitted, task_id=task, name=task, gpus=gpus, **fields)

    def attempt(self, task: str) -> Any:
        current = self.state.tasks[task].current
        assert current is not None, f"{task} has no attempt"
        return current

    def start(self, task: str) -> None:
        a = self.attempt(task)
        self.emit(
            ev.ContainerStarted,
            task_id=task,
            attempt=a.n,
            node=a.node,
            container_id=f"c-{task}-{a.n}",
        )

    def exit(self, task: str, code: int, **fields: Any) -> None:
        a = self.attempt(task)
        self.emit(
            ev.ContainerExited,
            task_id=task,
            attempt=a.n,
            node=a.node,
            container_id=f"c-{task}-{a.n}",
            exit_code=code,
            **fields,
        )

    def exit_attempt(self, task: str, n: int, code: int) -> ev.Event:
        """An exit of a given (maybe no longer current) attempt."""
        a = self.state.tasks[task].attempts[n]
        return self.emit(
            ev.ContainerExited,
            task_id=task,
            attempt=n,
            node=a.node,
            container_id=f"c-{task}-{n}",
            exit_code=code,
        )

    def xid(self, gpu: str, code: int) -> None:
        node = self.state.gpus[gpu].node
        self.emit(ev.GpuFault, gpu_uuid=gpu, node=node, kind="xid", xid=code)

    def of_type(self, cls: type[Any], task: str | None = None) -> list[Any]:
        return [
            e
            for e in self.log
            if isinstance(e, cls) and (task is None or getattr(e, "task_id", None) == task)
        ]

    def faults(self, task: str) -> list[str]:
        return [e.fault for e in self.of_type(ev.FaultClassified, task) if e.fault != "completed"]
