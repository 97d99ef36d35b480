"""Crash tests with real processes: engines killed with SIGKILL at random points.

A storm of 500 faults from simulated agents runs while `gpuwarden engine` processes
are killed and restarted (one at a time, then two at once, then with the nats-server
restarted under them). Afterwards the log itself must show: every container.exited
has exactly one fault.classified, no attempt was rebuilt or scheduled twice, and no
GPU was ever allocated to two live attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.ports import StoredEvent

from tests.sim_agents import SimAgents

pytestmark = pytest.mark.slow

POLICY = """
max_rebuilds = -1
backoff_initial_s = 0.01
backoff_max_s = 0.02
node_lost_after_s = 3600
evidence_window_s = 0.05
"""
TASKS = 125
SCRIPT = [137, 137, 143, 137, 0]  # four preemptions, then success: 500 faults in all
NODES = {f"n{i:02d}": 8 for i in range(16)}


class EngineProcess:
    def __init__(self, url: str, policy: Path, log_file: Path) -> None:
        self.log_file = log_file.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from gpuwarden.engine.cli import main; raise SystemExit(main())",
                "--nats",
                url,
                "engine",
                "--policy",
                str(policy),
            ],
            stdout=self.log_file,
            stderr=self.log_file,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log_file.close()


async def submit_all(log: JetStreamEventLog) -> None:
    for i in range(TASKS):
        task = f"t{i:03d}"
        await log.append(
            ev.task_subject(task),
            [
                ev.TaskSubmitted(
                    id=f"submit-{task}",
                    at=datetime.now(UTC),
                    actor="api",
                    task_id=task,
                    name=task,
                    image="img",
                    command=("run",),
                    correlation_id=task,
                )
            ],
            0,
        )


async def records(log: JetStreamEventLog) -> list[StoredEvent]:
    return [r async for r in log.read()]


def check_log(log: list[StoredEvent]) -> Counter[str]:
    """The invariants, read from the log alone; returns counts of event types."""
    events = [r.event for r in log if r.event is not None]
    exits = Counter((e.task_id, e.attempt) for e in events if isinstance(e, ev.ContainerExited))
    classified = Counter(
        (e.task_id, e.attempt) for e in events if isinstance(e, ev.FaultClassified)
    )
    for key, count in exits.items():
        assert classified[key] == 1, f"{key}: {count} exits, {classified[key]} classifications"
    assert set(classified) <= set(exits)
    rebuilt = Counter(
        (e.task_id, e.previous_attempt) for e in events if isinstance(e, ev.RebuildDecided)
    )
    assert max(rebuilt.values(), default=0) <= 1, "an attempt was rebuilt twice"
    scheduled = Counter((e.task_id, e.attempt) for e in events if isinstance(e, ev.TaskScheduled))
    assert max(scheduled.values(), default=0) <= 1, "an attempt was scheduled twice"
    holders: dict[str, tuple[str, int]] = {}
    for e in events:
        if isinstance(e, ev.GpuAllocated):
            assert e.gpu_uuid not in holders, f"{e.gpu_uuid} allocated twice: {holders[e.gpu_uuid]}"
            holders[e.gpu_uuid] = (e.task_id, e.attempt)
        elif isinstance(e, ev.GpuReleased):
            assert holders.pop(e.gpu_uuid, None) == (e.task_id, e.attempt), e
    return Counter(ev.type_of(e) for e in events)


async def finish(log: JetStreamEventLog, deadline_s: float = 90) -> Counter[str]:
    with anyio.fail_after(deadline_s):
        while True:
            counts = Counter(ev.type_of(r.event) for r in await records(log) if r.event is not None)
            if counts["task.completed"] == TASKS:
                return counts
            await anyio.sleep(0.2)  # polling the log, not synchronising on time


async def storm(
    tmp_path: Path,
    server: EmbeddedNats,
    log: JetStreamEventLog,
    bus: JetStreamCommandBus,
    *,
    engines_at_once: int,
    kills: int,
    restart_server: bool = False,
) -> Counter[str]:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    agents = SimAgents(log, bus, NODES, {f"t{i:03d}": SCRIPT for i in range(TASKS)})
    await agents.register()
    agent_task = asyncio.create_task(agents.run())
    rng = random.Random(20261129)
    await submit_all(log)
    try:
        for round_ in range(kills):
            procs = [
                EngineProcess(server.url, policy, tmp_path / f"engine-{round_}-{i}.log")
                for i in range(engines_at_once)
            ]
            await anyio.sleep(rng.uniform(0.8, 2.0))  # let it work, then kill it mid-stride
            if restart_server and round_ == kills // 2:
                await server.stop()
                await server.start()
            for proc in procs:
                await anyio.sleep(rng.uniform(0, 0.2))
                proc.kill()
        final = [
            EngineProcess(server.url, policy, tmp_path / f"engine-final-{i}.log")
            for i in range(engines_at_once)
        ]
        try:
            await finish(log)
        finally:
            for proc in final:
                proc.kill()
    finally:
        agent_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await agent_task
    return check_log(await records(log))


async def test_engine_killed_at_random_points_neither_loses_nor_repeats(
    tmp_path: Path,
    nats_server: EmbeddedNats,
    event_log: JetStreamEventLog,
    command_bus: JetStreamCommandBus,
) -> None:
    counts = await storm(tmp_path, nats_server, event_log, command_bus, engines_at_once=1, kills=4)
    assert counts["fault.classified"] == TASKS * len(SCRIPT)
    assert counts["rebuild.decided"] == TASKS * (len(SCRIPT) - 1)


async def test_two_engines_at_once_killed_at_random_points(
    tmp_path: Path,
    nats_server: EmbeddedNats,
    event_log: JetStreamEventLog,
    command_bus: JetStreamCommandBus,
) -> None:
    counts = await storm(tmp_path, nats_server, event_log, command_bus, engines_at_once=2, kills=3)
    assert counts["rebuild.decided"] == TASKS * (len(SCRIPT) - 1)


async def test_nats_server_restarted_mid_storm_loses_nothing(
    tmp_path: Path,
    nats_server: EmbeddedNats,
    event_log: JetStreamEventLog,
    command_bus: JetStreamCommandBus,
) -> None:
    counts = await storm(
        tmp_path,
        nats_server,
        event_log,
        command_bus,
        engines_at_once=1,
        kills=2,
        restart_server=True,
    )
    assert counts["task.completed"] == TASKS
