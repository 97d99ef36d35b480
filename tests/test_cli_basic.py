"""`gpuwarden up` and `gpuwarden events` as a user runs them (real processes, real server)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import anyio
from gpuwarden.adapters.embedded_nats import STATE_FILE, _answers
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.ids import new_id

CLI = [sys.executable, "-m", "gpuwarden.engine.cli"]
AT = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


async def gw(*args: str) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(20):
        return await anyio.run_process([*CLI, *args], check=False)


async def test_help_does_not_import_the_adapters() -> None:
    code = "import sys, gpuwarden.engine.cli as c; c.build_parser(); print('nats' in sys.modules)"
    result = await anyio.run_process([sys.executable, "-c", code])
    assert result.stdout.strip() == b"False"
    assert b"events" in (await gw("--help")).stdout


async def test_up_serves_the_log_and_events_prints_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    up = await anyio.open_process([*CLI, "--data-dir", str(data), "up", "--runtime", "sim"])
    try:
        assert up.stdout is not None
        with anyio.fail_after(10):
            url = (await up.stdout.receive()).decode().strip()
        assert url.startswith("nats://127.0.0.1:")
        nc = await connect(url, creds=str(data / "auth" / "api.creds"))  # `up` made them
        log = JetStreamEventLog(nc)
        submitted = ev.TaskSubmitted(
            id=new_id(), at=AT, actor="api", task_id="t1", name="n", image="img", command=("a",)
        )
        await log.append(ev.task_subject("t1"), [submitted])
        with anyio.fail_after(10):  # the engine places it on the local simulated node
            async for stored in log.subscribe(1, ev.task_subject("t1")):
                if isinstance(stored.event, ev.TaskScheduled):
                    break
        await nc.close()

        as_json = await gw("--data-dir", str(data), "events", "--json", "--task", "t1")
        assert as_json.returncode == 0, as_json.stderr
        rows = [json.loads(line) for line in as_json.stdout.splitlines()]
        assert rows[0]["subject"] == "gw.evt.task.t1.api"
        assert rows[0]["type"] == "task.submitted" and rows[0]["id"] == submitted.id

        operator = str(data / "auth" / "operator.creds")
        text = await gw(
            *("--nats", url, "--creds", operator, "--data-dir", str(data)),
            *("events", "--type", "node.registered"),
        )
        assert b"node.registered" in text.stdout and b"local" in text.stdout
    finally:
        up.send_signal(signal.SIGTERM)
        with anyio.fail_after(10):
            assert await up.wait() == 0
        await up.aclose()
    assert not await _answers(url)


async def test_events_starts_the_server_for_the_call_and_stops_it(tmp_path: Path) -> None:
    result = await gw("--data-dir", str(tmp_path), "events")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    assert not (tmp_path / "nats" / STATE_FILE).exists()


async def test_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = await gw("--data-dir", str(blocker), "events")
    assert result.returncode == 2
    assert result.stderr.startswith(b"gpuwarden: error:") and b"Traceback" not in result.stderr


def test_connection_options_go_before_or_after_the_command() -> None:
    from gpuwarden.engine.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["engine", "--nats", "nats://a"]).nats == "nats://a"
    assert parse(["--nats", "nats://b", "engine"]).nats == "nats://b"
    assert parse(["--nats", "nats://b", "engine", "--nats", "nats://a"]).nats == "nats://a"
    after = parse(["tasks", "--tls-ca", "ca.pem", "--data-dir", "d"])
    assert (after.tls_ca, str(after.data_dir)) == ("ca.pem", "d")
    assert parse(["scenario", "run", "x.toml", "--nats", "nats://c"]).nats == "nats://c"
