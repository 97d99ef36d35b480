"""A 3-server JetStream cluster with replicas=3: losing a server loses no acknowledged event."""

from __future__ import annotations

from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import nats.errors
from gpuwarden.adapters.embedded_nats import start_cluster
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core import wire
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.ports import EventLogError

AT = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def pending(task: str) -> ev.TaskPending:
    return ev.TaskPending(id=new_id(), at=AT, actor="engine", task_id=task, reason="r")


async def test_killing_the_stream_leader_loses_no_acknowledged_event(tmp_path: Path) -> None:
    async with await start_cluster(tmp_path, 3) as cluster:
        nc = await connect(cluster.url, reconnect_time_wait=0.05)
        try:
            log = JetStreamEventLog(nc, replicas=3, timeout_s=2.0)
            with anyio.fail_after(10):
                await log.ensure_streams()
            info = await _stream_with_leader(log)
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2
            leader = next(s for s in cluster.servers if s.server_name == info.cluster.leader)
            acked: list[str] = []
            after_kill = 0
            with anyio.fail_after(25):
                while after_kill < 20:
                    event = pending(f"t{len(acked) % 5}")
                    await _append_until_acked(log, event)
                    acked.append(event.id)
                    if len(acked) == 30:
                        await leader.kill()
                    elif len(acked) > 30:
                        after_kill += 1
                async with aclosing(log.read()) as stream:
                    stored = [s.event.id async for s in stream if s.event is not None]
            assert stored == acked  # all there, once each, in the order acknowledged
        finally:
            await nc.close()


async def _append_until_acked(log: JetStreamEventLog, event: ev.TaskPending) -> None:
    """Retry with the same id (de-duplicated by the server) until it is acknowledged."""
    while True:
        try:
            await log.append(ev.subject_of(event), [event])
            return
        except EventLogError:
            await anyio.sleep(0.05)


async def _stream_with_leader(log: JetStreamEventLog) -> Any:
    """The stream's info once its group has elected a leader (creation returns before)."""
    with anyio.fail_after(10):
        while True:
            try:
                info = await log.js.stream_info(wire.EVENTS_STREAM)
            except nats.errors.Error:
                info = None
            if info is not None and info.cluster is not None and info.cluster.leader:
                if len(info.cluster.replicas or []) == 2:
                    return info
            await anyio.sleep(0.05)  # polling the server's own state, with a deadline
