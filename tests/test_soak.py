"""Soak: no false failover under load, for ten minutes.

A real `gpuwarden engine` (default policy: a node is lost after 30 s without
heartbeats) and two real `gpuwarden agent --runtime sim` processes (the real agent over
in-memory containers, heartbeats every 1 s) run 50 long tasks while a spinning process
takes one core. For GPUWARDEN_SOAK_S seconds (default 600) nothing may happen: no
node.lost, no rebuild, no exit, no classification; at the end every task is still on
its first attempt and every process still runs. Any such event fails the test at once.

Try it short with GPUWARDEN_SOAK_S=60.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.ids import new_id

from tests.fixtures.processes import BeatWatch, GwProcess, LogTail

pytestmark = pytest.mark.slow

SOAK_S = float(os.environ.get("GPUWARDEN_SOAK_S", "600"))
TASKS = 50
NODES = 2
GPUS_PER_NODE = TASKS // NODES  # every GPU taken: all 50 must be placed at once
STEP_S = 60.0
# One core spun flat out, pinned where the OS allows.
BURNER = (
    "import os\n"
    "if hasattr(os, 'sched_setaffinity'):\n"
    "    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
    "while True: pass\n"
)


async def submit(log: JetStreamEventLog, token: str, i: int) -> str:
    task_id = f"soak-{token}-{i:02d}"
    submitted = ev.TaskSubmitted(
        id=new_id(),
        at=datetime.now(UTC),
        actor="api",
        correlation_id=task_id,
        task_id=task_id,
        name=task_id,
        image="sim",
        command=("sleep", "infinity"),
        gpus=1,
    )
    await log.append(ev.task_subject(task_id), [submitted], 0)
    return task_id


async def test_fifty_long_tasks_under_load_see_no_false_failover(
    tmp_path: Path, nats_server: EmbeddedNats, event_log: JetStreamEventLog
) -> None:
    token = uuid.uuid4().hex[:8]
    url = nats_server.url
    engine = GwProcess.engine(url, tmp_path)  # the default policy
    names = [f"soak-{token}-n{i}" for i in range(NODES)]
    agents = [GwProcess.agent(url, tmp_path, n, runtime="sim", gpus=GPUS_PER_NODE) for n in names]
    tail = LogTail(event_log)
    beats = BeatWatch(event_log.nc)
    burner = await asyncio.create_subprocess_exec(sys.executable, "-c", BURNER)
    try:
        await tail.start()
        await engine.start()
        for name, agent in zip(names, agents, strict=True):
            await beats.watch(name)
            await agent.start()
            await tail.wait_for(ev.NodeRegistered, STEP_S, node=name)
        tasks = [await submit(event_log, token, i) for i in range(TASKS)]
        for task in tasks:
            await tail.wait_for(ev.ContainerStarted, STEP_S, task_id=task, attempt=1)
        began = time.monotonic()

        # The soak itself: SOAK_S seconds in which none of these may appear.
        await tail.absent_for(
            SOAK_S, ev.NodeLost, ev.RebuildDecided, ev.FaultClassified, ev.ContainerExited
        )

        lasted = time.monotonic() - began
        assert burner.returncode is None, "the burner ran throughout"
        for process in [engine, *agents]:
            assert process.running, f"{process.name} ended:\n{process.output()}"
        assert not tail.of(ev.NodeLost) and not tail.of(ev.RebuildDecided)
        scheduled = Counter(e.attempt for e in tail.of(ev.TaskScheduled))
        assert scheduled == Counter({1: TASKS}), f"attempts scheduled: {scheduled}"
        started = {e.task_id for e in tail.of(ev.ContainerStarted, attempt=1)}
        assert started == set(tasks) and len(tail.of(ev.ContainerStarted)) == TASKS
        placed = Counter(e.node for e in tail.of(ev.TaskScheduled))
        assert placed == Counter(dict.fromkeys(names, GPUS_PER_NODE))
        gaps = {name: beats.max_gap(name, since=began) for name in names}
        print(f"soak: {lasted:.0f} s, {TASKS} tasks, longest heartbeat gap per node: {gaps}")
        assert all(gap < 30 for gap in gaps.values()), gaps
    finally:
        burner.kill()
        await burner.wait()
        for process in [*agents, engine]:
            await process.kill()
        await beats.close()
        await tail.stop()
