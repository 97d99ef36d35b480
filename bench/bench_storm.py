"""Storm bench: a whole rack lost at once, on a cluster full of running tasks.

The question is whether the engine keeps up with its own log when a burst of faults
lands: 1,000 nodes x 8 GPUs with 8,000 tasks running, plus a spare rack, then a rack of
125 nodes (1,000 GPUs) goes silent. Every affected task must be classified node_lost,
rebuilt and placed on the spare rack. The result is the rate at which the engine
stores those decisions, as a ratio to the raw append rate of the same server measured
in the same run (goal: >= 0.5), plus the process's peak memory.

The starting state (registrations, 8,000 submitted-scheduled-started tasks) is seeded
into the log as a recorded history, since placing 8,000 tasks one decision at a time
is not what is measured; seeding it is the raw append baseline. The engine folds it
on start (catch-up); after the storm, the simulated spare rack (one real Agent per
node, over in-memory containers) consumes the rebuilt tasks' run commands, so its work
stays out of the engine's measured time; heartbeats are beaten straight into Liveness
on the virtual clock.

    .venv/bin/python -m bench.bench_storm [--nodes 1000] [--gpus 8] [--rack 125] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import pstats
import resource
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.adapters.sim_runtime import CountingCommandBus, SimCluster, SimNodeSpec
from gpuwarden.engine.clock import VirtualClock
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.liveness import Liveness
from gpuwarden.engine.core.policy import Policy
from gpuwarden.engine.runtime import Engine

T0 = datetime(2026, 1, 1, tzinfo=UTC)
IN_FLIGHT = 256
GOAL = 0.5


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def node_name(i: int) -> str:
    return f"n{i:04d}"


def seed_history(nodes: int, gpus: int, tasks: int) -> list[list[ev.Event]]:
    """Phases of events in the order they must be folded: nodes, submits, placements."""
    registered: list[ev.Event] = []
    for n in range(nodes):
        name = node_name(n)
        infos = tuple(
            ev.GpuInfo(uuid=f"{name}/{g}", index=g, model="H100", memory_mb=81920)
            for g in range(gpus)
        )
        registered.append(
            ev.NodeRegistered(
                id=f"reg-{name}", at=T0, actor=f"agent:{name}", node=name, runtime="sim", gpus=infos
            )
        )
    submitted: list[ev.Event] = []
    placed: list[ev.Event] = []
    started: list[ev.Event] = []
    for t in range(tasks):
        task, name, gpu = f"t{t:05d}", node_name(t // gpus), f"{node_name(t // gpus)}/{t % gpus}"
        common = {"at": T0, "correlation_id": task, "task_id": task}
        submitted.append(
            ev.TaskSubmitted(
                id=f"sub-{task}", actor="api", name=task, image="i", command=("x",), **common
            )
        )
        placed.append(
            ev.GpuAllocated(
                id=f"alloc-{task}", actor="engine", gpu_uuid=gpu, node=name, attempt=1, **common
            )
        )
        placed.append(
            ev.TaskScheduled(
                id=f"sched-{task}", actor="engine", attempt=1, node=name, gpu_uuids=(gpu,), **common
            )
        )
        started.append(
            ev.ContainerStarted(
                id=f"start-{task}",
                actor=f"agent:{name}",
                attempt=1,
                node=name,
                container_id=f"sim-{task}-1",
                **common,
            )
        )
    return [registered, submitted, placed, started]


async def append_all(log: JetStreamEventLog, events: Sequence[ev.Event]) -> None:
    """Plain appends (no expectations), IN_FLIGHT at a time: the raw baseline."""
    limiter = anyio.Semaphore(IN_FLIGHT)

    async def one(event: ev.Event) -> None:
        async with limiter:
            await log.append(ev.subject_of(event), [event])

    async with anyio.create_task_group() as tg:
        for event in events:
            tg.start_soon(one, event)


async def storm(args: argparse.Namespace) -> None:
    nodes = args.nodes + args.spare
    tasks = args.nodes * args.gpus
    rack = [node_name(i) for i in range(args.rack)]
    spare = [node_name(i) for i in range(args.nodes, nodes)]
    with tempfile.TemporaryDirectory(prefix="gw-storm-") as home:
        async with EmbeddedNats(Path(home)) as server:
            nc = await connect(server.url, name="bench-storm")
            try:
                await measure(args, nc, nodes, tasks, rack, spare)
            finally:
                await nc.close()


async def measure(
    args: argparse.Namespace, nc: object, nodes: int, tasks: int, rack: list[str], spare: list[str]
) -> None:
    log = JetStreamEventLog(nc, timeout_s=30)  # type: ignore[arg-type]
    await log.ensure_streams()
    phases = seed_history(nodes, args.gpus, tasks)
    seeded = sum(len(p) for p in phases)
    began = time.perf_counter()
    for phase in phases:
        await append_all(log, phase)
    raw_s = time.perf_counter() - began
    raw_rate = seeded / raw_s
    print(f"cluster: {nodes} nodes x {args.gpus} GPUs ({len(spare)} spare), {tasks} tasks running")
    print(f"raw append: {seeded} events in {raw_s:.2f}s = {raw_rate:,.0f} events/s")

    policy = Policy(backoff_initial_s=0, node_lost_after_s=5, max_rebuilds=-1)
    clock = VirtualClock(T0)
    liveness = Liveness(policy.node_lost_after_s)
    bus = CountingCommandBus(JetStreamCommandBus(nc, poll_s=5.0))  # type: ignore[arg-type]
    engine = Engine(log, bus, clock, policy, liveness=liveness)
    specs = [SimNodeSpec(node_name(i), args.gpus, "H100", 81920) for i in range(nodes)]
    sim = SimCluster(log, bus.inner, clock, liveness, specs, counting=bus)
    rss_before = rss_mb()
    began = time.perf_counter()
    engine_task = asyncio.create_task(engine.run())
    with anyio.fail_after(120):
        await engine.caught_up.wait()
    print(f"engine catch-up: {seeded} events folded in {time.perf_counter() - began:.2f}s")
    await engine.wait_idle(60)

    affected = {t.spec.task_id for t in engine.state.tasks.values() if t.current.node in rack}  # type: ignore[union-attr]
    start_seq = await log.last_seq()
    for name in rack:
        sim.node_down(name)
    moment = T0 + timedelta(seconds=policy.node_lost_after_s + 0.001)
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    began = time.perf_counter()
    sim.beat(moment)
    clock.advance_to(moment)
    with anyio.fail_after(args.timeout):
        while not all_rebuilt(engine, affected, set(rack)):
            await engine.progress.wait()
    storm_s = time.perf_counter() - began
    if profiler is not None:
        profiler.disable()
    # The spare rack's agents (real Agents over in-memory containers) start only now:
    # on a cluster they run on their own hosts, so their CPU must not count against the
    # engine's in this process. Their run commands waited in the work queue meanwhile.
    sim_task = asyncio.create_task(sim.serve(spare))
    with anyio.fail_after(120):
        await engine.wait_idle(60)
        await sim.wait_handled(120)
    decisions = 0
    async for record in log.read(start_seq + 1):
        if record.event is not None and record.event.actor == "engine":
            decisions += 1
    rate = decisions / storm_s
    ratio = rate / raw_rate
    print(
        f"storm: {len(rack)} nodes lost, {len(affected)} tasks rebuilt elsewhere; "
        f"{decisions} decision events stored in {storm_s:.2f}s = {rate:,.0f}/s"
    )
    print(f"ratio to raw append rate: {ratio:.2f} (goal >= {GOAL})")
    print(
        f"peak RSS: {rss_mb():.0f} MiB (before the engine: {rss_before:.0f} MiB); "
        f"run commands handled by the spare rack: {sum(sim.handled.values())}"
    )
    for task in (engine_task, sim_task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


def all_rebuilt(engine: Engine, affected: set[str], rack: set[str]) -> bool:
    for task_id in affected:
        attempt = engine.state.tasks[task_id].current
        if attempt is None or attempt.n < 2 or attempt.node in rack:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000, help="nodes full of running tasks")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--rack", type=int, default=125, help="nodes lost at once")
    parser.add_argument("--spare", type=int, help="empty nodes (default: --rack)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the storm")
    parser.add_argument("--profile", action="store_true", help="cProfile the storm")
    args = parser.parse_args()
    if args.spare is None:
        args.spare = args.rack
    anyio.run(storm, args)


if __name__ == "__main__":
    main()
