"""How fast the pure core folds and decides, against decoding the same bytes alone.

Replay, recovery after a crash and the engine's own read of the log all pay
decode + evolve + decide per event; msgspec decoding is the floor under that. The
log is built by the in-memory driver (tests/supervisor_driver.py): a 200-node x 8-GPU
cluster, thousands of tasks through their whole lifecycle with exits, preemptions,
OOMs, start failures, Xids and lost nodes. Goal: the full path at >= 0.4 x the
decode-only rate.

Run: .venv/bin/python -m bench.bench_core [--events N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import msgspec
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.decide import decide_many
from gpuwarden.engine.core.fold import evolve
from gpuwarden.engine.core.policy import Policy
from gpuwarden.engine.core.state import initial_state

from tests.supervisor_driver import Driver

NODES = 200
GPUS_PER_NODE = 8
POLICY = Policy(max_rebuilds=3, window_s=3600)
GOAL = 0.4

Plan = list[tuple[int, tuple[int, ...], datetime]]


class RecordingDriver(Driver):
    """The driver deciding as the engine loop does, noting each call for the replay.

    The engine folds a decision group back as a whole and decides once on all of it
    (`decide_many`), so a rebuild's GPU releases make one placement round, not one
    each; the plain driver decides after every single event. Each call is noted as
    (log length, trigger ids, now).
    """

    def __init__(self, policy: Policy) -> None:
        super().__init__(policy)
        self.calls: list[tuple[int, tuple[str, ...], datetime]] = []

    def append(self, event: ev.Event) -> None:  # no index recount: tests do that
        self.log.append(event)
        evolve(self.state, event)
        self._decide(event)

    def _decide(self, trigger: ev.Event | None) -> None:
        self._decide_group(() if trigger is None else (trigger,))

    def _decide_group(self, triggers: tuple[ev.Event, ...]) -> None:
        self.calls.append((len(self.log), tuple(e.id for e in triggers), self.now))
        basis = len(self.log)
        group = decide_many(self.state, triggers, self.now)
        if not group:
            return
        self.decisions.append((basis, triggers[0].id if triggers else "timer", group))
        for event in group:
            self.log.append(event)
            evolve(self.state, event)
        self._decide_group(tuple(group))


class LogBuilder:
    """Drives a random but seeded workload through the driver until the log is long."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.d = RecordingDriver(POLICY)
        self.seen = 0
        self.to_start: list[tuple[str, int]] = []
        self.running: list[tuple[str, int]] = []
        self.tasks = 0
        self.lost: dict[str, int] = {}  # node -> step it comes back
        self.step = 0
        self.seen_quarantine = 0
        self.reset: list[tuple[int, str, str]] = []  # (step, gpu, node) to restore
        for n in range(NODES):
            self.d.node(f"node-{n:03d}", GPUS_PER_NODE)

    def build(self, target: int) -> tuple[list[ev.Event], Plan]:
        """The log, and the engine loop's decide calls on it: (after event i, trigger, now)."""
        while len(self.d.log) < target:
            self.one_step()
        log = self.d.log[:target]
        index = {e.id: i for i, e in enumerate(log)}
        plan: Plan = []
        for basis, triggers, now in self.d.calls:
            if basis > target:
                break
            plan.append((basis, tuple(index[t] for t in triggers), now))
        return log, plan

    def one_step(self) -> None:
        self.step += 1
        rng, d = self.rng, self.d
        backlog = len(d.state.waiting)  # clients back off when the cluster is full
        for _ in range(rng.randint(30, 60) if backlog < 40 else 0):
            self.tasks += 1
            d.submit(
                f"task-{self.tasks:06d}",
                gpus=rng.choice((1, 1, 1, 2, 2, 4, 8)),
                image="train:1",
                command=("python", "train.py"),
                owner="bench",
            )
        self.collect()
        self.start_new()
        self.end_some()
        self.nodes_come_and_go()
        d.advance(rng.choice((1.5, 2.0, 5.0, 12.0)))

    def collect(self) -> None:
        for event in self.d.log[self.seen :]:
            if isinstance(event, ev.TaskScheduled):
                self.to_start.append((event.task_id, event.attempt))
        self.seen = len(self.d.log)

    def is_current(self, task: str, n: int) -> bool:
        state = self.d.state.tasks[task]
        attempt = state.current
        return (
            state.status == "running"
            and attempt is not None
            and attempt.n == n
            and attempt.exited is None
            and attempt.classified is None
        )

    def start_new(self) -> None:
        d, rng = self.d, self.rng
        for task, n in self.to_start:
            if not self.is_current(task, n):
                continue
            if rng.random() < 0.02:
                error = rng.choice(("No such image: train:1", "OCI runtime create failed"))
                node = d.attempt(task).node
                d.emit(ev.ContainerStartFailed, task_id=task, attempt=n, node=node, error=error)
            else:
                d.start(task)
                self.running.append((task, n))
        self.to_start = []

    def end_some(self) -> None:
        rng, keep = self.rng, []
        for task, n in self.running:
            if not self.is_current(task, n):
                continue
            if rng.random() < 0.12:
                self.end(task)
            else:
                keep.append((task, n))
        self.running = keep

    def end(self, task: str) -> None:
        d, roll = self.d, self.rng.random()
        if roll < 0.60:
            d.exit(task, 0)
        elif roll < 0.75:
            d.exit(task, 1)
        elif roll < 0.87:
            d.exit(task, 137)  # preempted: rebuilt
        elif roll < 0.92:
            d.exit(task, 137, oom_killed=True)
        elif roll < 0.96:
            d.xid(d.attempt(task).gpu_uuids[0], 48)
            d.exit(task, 1)
        else:
            d.exit(task, 143, error="")

    def nodes_come_and_go(self) -> None:
        d = self.d
        for event in d.log[self.seen_quarantine :]:
            if isinstance(event, ev.GpuQuarantined):
                self.reset.append((self.step + 8, event.gpu_uuid, event.node))
        self.seen_quarantine = len(d.log)
        while self.reset and self.reset[0][0] <= self.step:  # an operator resets the GPU
            _, gpu, node = self.reset.pop(0)
            if d.state.gpus[gpu].quarantined:
                d.emit(ev.GpuRestored, gpu_uuid=gpu, node=node, reason="reset")
        for node, back in list(self.lost.items()):
            if back <= self.step:
                del self.lost[node]
                d.emit(ev.NodeRecovered, node=node, last_heartbeat_at=d.now)
        if self.step % 25 == 0:
            node = f"node-{self.rng.randrange(NODES):03d}"
            if node not in self.lost:
                self.lost[node] = self.step + 5
                d.emit(ev.NodeLost, node=node, last_heartbeat_at=d.now - timedelta(seconds=3))


def decode_only(blobs: list[bytes]) -> None:
    decoder = msgspec.json.Decoder(ev.Event)
    for blob in blobs:
        decoder.decode(blob)


def fold_only(blobs: list[bytes]) -> None:
    state = initial_state(POLICY)
    decoder = msgspec.json.Decoder(ev.Event)
    for blob in blobs:
        evolve(state, decoder.decode(blob))


def full_path(blobs: list[bytes], plan: Plan) -> None:
    """Decode, fold, and decide exactly where the recording did (timers included).

    Deciding after every single event instead would decide in the middle of an atomic
    group, a state the engine never sees, and re-derive the rest of the group there.
    """
    state = initial_state(POLICY)
    decoder = msgspec.json.Decoder(ev.Event)
    events: list[ev.Event] = []
    folded = 0
    for basis, triggers, now in plan:
        while folded < basis:
            event = decoder.decode(blobs[folded])
            evolve(state, event)
            events.append(event)
            folded += 1
        decide_many(state, [events[i] for i in triggers], now)
    for blob in blobs[folded:]:
        evolve(state, decoder.decode(blob))


def best_rate(fn: Callable[[], None], count: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return count / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="cProfile the full path")
    args = parser.parse_args()

    start = time.perf_counter()
    builder = LogBuilder(seed=7)
    log, plan = builder.build(args.events)
    blobs = [ev.encode(e) for e in log]
    built = time.perf_counter() - start
    kinds: dict[str, int] = {}
    for e in log:
        kinds[ev.type_of(e)] = kinds.get(ev.type_of(e), 0) + 1
    print(
        f"log: {len(blobs)} events, {sum(map(len, blobs)) / 2**20:.1f} MiB, "
        f"{builder.tasks} tasks on {NODES}x{GPUS_PER_NODE} GPUs, built in {built:.1f} s"
    )
    print("  " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))

    print(f"  {len(plan)} decide calls (each outside event, each decision group, each due timer)")
    raw = best_rate(lambda: decode_only(blobs), len(blobs), args.repeats)
    fold = best_rate(lambda: fold_only(blobs), len(blobs), args.repeats)
    full = best_rate(lambda: full_path(blobs, plan), len(blobs), args.repeats)
    print(f"decode only (msgspec):      {raw:>10,.0f} events/s")
    print(f"decode + evolve:            {fold:>10,.0f} events/s ({fold / raw:.2f})")
    print(f"decode + evolve + decide:   {full:>10,.0f} events/s")
    ratio = full / raw
    print(f"ratio: {ratio:.2f} (goal >= {GOAL})  {'OK' if ratio >= GOAL else 'BELOW GOAL'}")

    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(full_path, blobs, plan)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
