"""The embedded nats-server: start, find the running one, stop, fsync configured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gpuwarden.adapters.embedded_nats import (
    STATE_FILE,
    EmbeddedNats,
    NatsServerError,
    _answers,
    render_config,
)
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.nats_connection import connect


async def test_second_start_finds_the_running_server(tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path) as first:
        assert first.owned and first.url.startswith("nats://127.0.0.1:")
        second = EmbeddedNats(tmp_path)
        assert await second.start() == first.url
        assert not second.owned
        await second.stop()  # not its server: must leave it running
        assert await _answers(first.url)
    assert not await _answers(first.url)
    assert not (tmp_path / "nats" / STATE_FILE).exists()


async def test_stale_state_file_is_ignored(tmp_path: Path) -> None:
    home = tmp_path / "nats"
    home.mkdir()
    (home / STATE_FILE).write_text(json.dumps({"pid": 2**22 + 17, "url": "nats://127.0.0.1:1"}))
    async with EmbeddedNats(tmp_path) as server:
        assert server.owned
        assert json.loads((home / STATE_FILE).read_text())["pid"] == server.pid


async def test_store_lives_in_the_data_dir_and_survives_restart(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path)
    await server.start()
    try:
        nc = await connect(server.url)
        await JetStreamEventLog(nc).ensure_streams()
        await nc.close()
        assert any(server.store_dir.rglob("GW_EVENTS"))
        url = server.url
        await server.stop()
        assert await server.start() == url  # same port on restart
        nc = await connect(server.url)
        names = await nc.jetstream().streams_info()
        assert {info.config.name for info in names} == {"GW_EVENTS", "GW_CMDS"}
        await nc.close()
    finally:
        await server.stop()


def test_config_fsyncs_every_write() -> None:
    text = render_config(store_dir=Path("/d/store"), port=None, ports_dir=Path("/d"))
    assert "sync_interval: always" in text
    assert 'listen: "127.0.0.1:-1"' in text


async def test_a_server_that_cannot_start_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NatsServerError, match="exited"):
        await EmbeddedNats(tmp_path, binary=Path("/bin/false")).start()
