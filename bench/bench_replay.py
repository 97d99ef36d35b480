"""How fast does `replay --check` audit a log, against folding it without checking?

The floor is the fold alone (`evolve` over every event, what a plain state replay
costs); `check` adds grouping rounds, looking up triggers and re-deriving every round.
Both run in the same process over the same log: the supervisor driven in memory with
nodes, a stream of submissions, exits of several kinds and Xids, converted to stored
records with the engine's Gw-Basis/Gw-Trigger headers.

    .venv/bin/python -m bench.bench_replay [tasks]
"""

from __future__ import annotations

import sys
import time

import anyio
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.fold import evolve
from gpuwarden.engine.core.state import initial_state
from gpuwarden.engine.core.wire import BASIS_HEADER, TRIGGER_HEADER
from gpuwarden.engine.ports import StoredEvent
from gpuwarden.projections import replay as rp

from tests.supervisor_driver import Driver


def history(tasks: int) -> Driver:
    d = Driver()
    for n in range(tasks // 8 + 1):  # a GPU per task: the bench is of replay, not queueing
        d.node(f"n{n}", 8)
    for i in range(tasks):
        d.submit(f"t{i}")
        if i % 4 == 3:  # every fourth submission, four running tasks end, variously
            for k, code in zip(range(i - 3, i + 1), (0, 1, 137, 0), strict=True):
                task = f"t{k}"
                if d.state.tasks[task].status == "running":
                    if k % 16 == 5:
                        d.xid(d.attempt(task).gpu_uuids[0], 48)
                    d.exit(task, code, signal=9 if code == 137 else None)
            d.advance(2)
    d.advance(600)
    return d


def records(d: Driver) -> list[StoredEvent]:
    headers: dict[int, dict[str, str]] = {}
    for basis, trigger, group in d.decisions:
        for event in group:
            headers[id(event)] = {BASIS_HEADER: str(basis), TRIGGER_HEADER: trigger}
    return [
        StoredEvent(seq=n, subject=ev.subject_of(e), event=e, headers=headers.get(id(e), {}))
        for n, e in enumerate(d.log, start=1)
    ]


def fold_only(log: list[StoredEvent]) -> float:
    started = time.perf_counter()
    state = initial_state()
    for record in log:
        assert record.event is not None
        evolve(state, record.event)
    return time.perf_counter() - started


def check(log: list[StoredEvent]) -> tuple[float, rp.CheckResult]:
    started = time.perf_counter()
    result = anyio.run(rp.check, log)
    return time.perf_counter() - started, result


def main() -> None:
    tasks = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    log = records(history(tasks))
    raw = min(fold_only(log) for _ in range(3))
    checked, result = min((check(log) for _ in range(3)), key=lambda x: x[0])
    assert not result.mismatches and not result.unverifiable, result.mismatches[:1]
    print(f"log: {len(log)} events, {result.rounds} decision rounds, {tasks} tasks")
    print(f"fold only (raw):   {len(log) / raw:>10,.0f} events/s  ({raw:.3f} s)")
    print(f"replay --check:    {len(log) / checked:>10,.0f} events/s  ({checked:.3f} s)")
    print(f"ratio check/fold:  {checked / raw:.2f}x the time")


if __name__ == "__main__":
    main()
