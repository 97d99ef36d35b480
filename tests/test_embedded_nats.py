"""The embedded nats-server: start, find the running one, stop, fsync configured,
and a stable address: the port kept in the data directory across restarts."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import anyio
import pytest
from gpuwarden.adapters import embedded_nats
from gpuwarden.adapters.embedded_nats import (
    LOOPBACK,
    PORT_FILE,
    STATE_FILE,
    EmbeddedNats,
    NatsServerError,
    RecordedPorts,
    _answers,
    free_port,
    read_port_file,
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


# --- a stable address ----------------------------------------------------------------


def port_of(url: str) -> int:
    return int(url.rpartition(":")[2])


async def test_the_port_is_recorded_and_a_new_process_comes_back_on_it(tmp_path: Path) -> None:
    first = EmbeddedNats(tmp_path)
    url = await first.start()
    try:
        recorded = tmp_path / "nats" / PORT_FILE
        assert json.loads(recorded.read_text()) == {"client": port_of(url)}
        assert not recorded.with_name(PORT_FILE + ".tmp").exists()  # written, then renamed
        await first.kill()  # a crash: the state file stays behind, naming a dead pid
    finally:
        await first.stop()
    again = EmbeddedNats(tmp_path)  # as a new `gpuwarden up` would: a new object
    try:
        assert await again.start() == url and again.owned
        nc = await connect(url)
        await JetStreamEventLog(nc).ensure_streams()
        await nc.close()
    finally:
        await again.stop()
    assert read_port_file(tmp_path / "nats" / PORT_FILE) == RecordedPorts(port_of(url))


async def test_an_explicit_port_wins_and_is_recorded(tmp_path: Path) -> None:
    port = free_port()
    async with EmbeddedNats(tmp_path, port=port) as server:
        assert port_of(server.url) == port
    async with EmbeddedNats(tmp_path) as server:
        assert port_of(server.url) == port


async def test_a_recorded_port_held_by_another_process_is_a_clear_error(tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path) as server:
        port = port_of(server.url)
    recorded = tmp_path / "nats" / PORT_FILE
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, port))
        squatter.listen()
        with pytest.raises(NatsServerError) as caught:
            await EmbeddedNats(tmp_path, port_wait_s=0.2).start()
    message = str(caught.value)
    assert f"port {port}, recorded in {recorded}, is in use" in message
    assert "another process holds it" in message
    assert f"free the port, or delete {recorded}" in message
    assert json.loads(recorded.read_text()) == {"client": port}  # never silently moved
    assert not (tmp_path / "nats" / STATE_FILE).exists()  # and nothing was started


async def test_a_recorded_port_where_another_nats_answers_says_so(tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path / "other") as other:
        home = tmp_path / "mine" / "nats"
        home.mkdir(parents=True)
        (home / PORT_FILE).write_text(json.dumps({"client": port_of(other.url)}))
        with pytest.raises(NatsServerError, match="a NATS server answers there"):
            await EmbeddedNats(tmp_path / "mine", port_wait_s=0.2).start()
        assert await _answers(other.url)  # left alone


async def test_a_port_freed_within_the_wait_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server just killed holds its port for a moment: the next start waits it out."""
    async with EmbeddedNats(tmp_path) as server:
        port = port_of(server.url)
    squatter = socket.socket()
    squatter.bind((LOOPBACK, port))
    squatter.listen()
    seen_busy = anyio.Event()
    real = embedded_nats.port_in_use

    def watched(probe: int) -> bool:
        busy = real(probe)
        if busy:
            seen_busy.set()
        return busy

    monkeypatch.setattr(embedded_nats, "port_in_use", watched)
    again = EmbeddedNats(tmp_path, port_wait_s=30)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(again.start)
            with anyio.fail_after(10):
                await seen_busy.wait()  # the start found the port held, and waits
            squatter.close()
        assert port_of(again.url) == port and again.owned
    finally:
        squatter.close()
        await again.stop()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("4222", "is not an object"),
        ("{not json", "is not JSON"),
        ("[4222]", "is not an object"),
        ("{}", 'has no "client" port'),
        ('{"client": "4222"}', "\"client\" must be a port number 1..65535, not '4222'"),
        ('{"client": 70000}', '"client" must be a port number 1..65535, not 70000'),
        ('{"client": true}', '"client" must be a port number'),
        ('{"client": 4222, "cluster": 0}', '"cluster" must be a port number'),
        ('{"client": 4222, "host": "0.0.0.0"}', "has unknown keys ['host']"),
        (b"\xff\xfe", "cannot be read"),
    ],
)
async def test_a_corrupt_port_file_is_a_clear_error(
    tmp_path: Path, text: str | bytes, problem: str
) -> None:
    home = tmp_path / "nats"
    home.mkdir()
    recorded = home / PORT_FILE
    if isinstance(text, bytes):
        recorded.write_bytes(text)
    else:
        recorded.write_text(text)
    with pytest.raises(NatsServerError) as caught:
        await EmbeddedNats(tmp_path).start()
    message = str(caught.value)
    assert message.startswith(f"port file {recorded} ")
    assert problem in message
    assert "delete it to let the embedded nats-server pick a new port" in message
    assert recorded.read_bytes() == (text if isinstance(text, bytes) else text.encode())


async def test_a_command_names_the_corrupt_port_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "nats").mkdir(parents=True)
    (data / "nats" / PORT_FILE).write_text('{"client": -1}')
    cli = [sys.executable, "-m", "gpuwarden.engine.cli", "--data-dir", str(data), "events"]
    with anyio.fail_after(20):
        result = await anyio.run_process(cli, check=False)
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.startswith(f"gpuwarden: error: port file {data / 'nats' / PORT_FILE} ")
    assert "must be a port number" in err and "Traceback" not in err
