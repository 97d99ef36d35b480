"""The read side against a real nats-server: the JetStream log folds to the same rows."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.engine.ports import StoredEvent
from gpuwarden.projections import queries as q
from gpuwarden.projections.export import export, from_line
from gpuwarden.projections.model import INVALID_TYPE
from gpuwarden.projections.store import ProjectionStore

from tests.test_projections import (
    EXPECTED_ATTEMPTS,
    EXPECTED_GPUS,
    EXPECTED_NODES,
    EXPECTED_TASKS,
)
from tests.test_projections_log import sample_log


async def publish(log: JetStreamEventLog, stored: list[StoredEvent]) -> None:
    for item in stored:
        if item.event is not None:
            [seq] = await log.append(item.subject, [item.event])
        else:
            ack = await log.js.publish(item.subject, item.data)
            seq = ack.seq
        assert seq == item.seq


async def test_the_jetstream_log_folds_to_the_expected_rows(
    event_log: JetStreamEventLog, tmp_path: Path
) -> None:
    stored = sample_log().stored
    await publish(event_log, stored)
    async with ProjectionStore(tmp_path) as store:
        assert await store.catch_up(event_log, batch_size=10) == len(stored)
        assert await q.tasks(store) == EXPECTED_TASKS
        assert await q.attempts(store) == EXPECTED_ATTEMPTS
        assert await q.gpus(store) == EXPECTED_GPUS
        assert await q.nodes(store) == EXPECTED_NODES
        [bad] = await q.events(store, type=INVALID_TYPE)
        assert bad.seq == 38 and bad.error
        first = await q.events(store, limit=1, type="node.registered")
        assert first[0].headers.get("Nats-Msg-Id") == "e002"


async def test_follow_keeps_up_with_live_appends(
    event_log: JetStreamEventLog, tmp_path: Path
) -> None:
    stored = sample_log().stored
    await publish(event_log, stored[:10])
    async with ProjectionStore(tmp_path) as store:
        await store.catch_up(event_log)
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.follow, event_log)
            await publish(event_log, stored[10:])
            with anyio.fail_after(10):
                await store.wait_for(len(stored))
            tg.cancel_scope.cancel()
        assert await q.tasks(store) == EXPECTED_TASKS


async def test_export_of_the_real_log_reads_back_identically(
    event_log: JetStreamEventLog,
) -> None:
    await publish(event_log, sample_log().stored)
    original = [s async for s in event_log.read()]
    back = [from_line(line) async for line in export(event_log)]
    assert back == original and len(back) == 38


async def test_the_cli_end_to_end(
    event_log: JetStreamEventLog,
    nats_server: object,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import gpuwarden.engine.cli as engine_cli
    from gpuwarden.engine.cli import query

    await publish(event_log, sample_log().stored)
    monkeypatch.setattr(engine_cli, "COMMAND_MODULES", (query,))
    base = ["--nats", nats_server.url, "--data-dir", str(tmp_path)]  # type: ignore[attr-defined]

    def run(*argv: str) -> int:
        return engine_cli.main([*base, *argv])

    with anyio.fail_after(30):
        assert await anyio.to_thread.run_sync(run, "explain", "t1") == 0
        assert "rebuild as attempt 2" in capsys.readouterr().out
        assert await anyio.to_thread.run_sync(run, "events", "--task", "t2", "--limit", "1") == 0
        words = capsys.readouterr().out.split()
        assert (words[0], words[3]) == ("22", "gpu.released")
        assert await anyio.to_thread.run_sync(run, "projections", "rebuild") == 0
        assert "38/38 events" in capsys.readouterr().err
        assert await anyio.to_thread.run_sync(run, "explain", "ghost") == 2
        assert "no recorded event names task 'ghost'" in capsys.readouterr().err
