"""TLS (with client certificates) and user credentials pass through to a real server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from gpuwarden.adapters.embedded_nats import find_binary, free_port
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.ports import EventLogError

AT = datetime(2026, 11, 29, tzinfo=UTC)


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_pki(d: Path) -> Pki:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=gw-ca",
            "-keyout", d / "ca.key", "-out", d / "ca.crt")  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for who in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=gw-{who}",
                "-keyout", d / f"{who}.key", "-out", d / f"{who}.csr")  # fmt: skip
        openssl("x509", "-req", "-in", d / f"{who}.csr", "-CA", d / "ca.crt",
                "-CAkey", d / "ca.key", "-CAcreateserial", "-days", "1",
                "-extfile", d / "san.ext", "-out", d / f"{who}.crt")  # fmt: skip
    return Pki(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key")


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, Pki | None]]:
    """A nats-server with JetStream and either mutual TLS or user/password auth."""
    port = free_port()
    pki = make_pki(tmp_path) if request.param == "tls" else None
    lines = [f"listen: 127.0.0.1:{port}", f'jetstream {{ store_dir: "{tmp_path / "js"}" }}']
    if pki is not None:
        lines.append(
            f'tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}", '
            f'ca_file: "{pki.ca}", verify: true }}'
        )
    else:
        lines.append('authorization { users = [ { user: "agent", password: "s3cret" } ] }')
    config = tmp_path / "nats.conf"
    config.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([str(find_binary()), "-c", str(config)], stderr=subprocess.PIPE)
    try:
        yield f"127.0.0.1:{port}", pki
    finally:
        proc.terminate()
        proc.wait(10)


async def append_and_read(log: JetStreamEventLog) -> None:
    await log.ensure_streams()
    event = ev.TaskPending(id="p1", at=AT, actor="engine", task_id="t", reason="r")
    await log.append(ev.task_subject("t"), [event])
    assert [r.event async for r in log.read()] == [event]


async def connect_when_up(url: str, **options: object) -> object:
    with anyio.fail_after(10):
        while True:
            try:
                return await connect(url, deadline_s=1, **options)  # type: ignore[arg-type]
            except EventLogError as exc:
                if "refused" not in str(exc) and "within" not in str(exc):
                    raise
                await anyio.sleep(0.05)  # the server is still starting


@pytest.mark.parametrize("server", ["tls"], indirect=True)
async def test_mutual_tls_with_client_certificate(server: tuple[str, Pki | None]) -> None:
    address, pki = server
    assert pki is not None
    nc = await connect_when_up(
        f"tls://{address}",
        tls_ca=str(pki.ca),
        tls_cert=str(pki.client_cert),
        tls_key=str(pki.client_key),
    )
    try:
        await append_and_read(JetStreamEventLog(nc))  # type: ignore[arg-type]
    finally:
        await nc.close()  # type: ignore[attr-defined]
    with pytest.raises(EventLogError):  # trusted CA but no client certificate
        await connect(f"tls://{address}", tls_ca=str(pki.ca), deadline_s=3)


@pytest.mark.parametrize("server", ["tls"], indirect=True)
async def test_cli_passes_tls_options_through(server: tuple[str, Pki | None]) -> None:
    address, pki = server
    assert pki is not None
    await connect_when_up(
        f"tls://{address}",
        tls_ca=str(pki.ca),
        tls_cert=str(pki.client_cert),
        tls_key=str(pki.client_key),
    )
    cli = [sys.executable, "-m", "gpuwarden.engine.cli", "--nats", f"tls://{address}",
           "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
           "--tls-key", str(pki.client_key), "export"]  # fmt: skip
    with anyio.fail_after(30):
        result = await anyio.run_process(cli, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("server", ["auth"], indirect=True)
async def test_user_credentials_in_the_url(server: tuple[str, Pki | None]) -> None:
    address, _ = server
    nc = await connect_when_up(f"nats://agent:s3cret@{address}")
    try:
        await append_and_read(JetStreamEventLog(nc))  # type: ignore[arg-type]
    finally:
        await nc.close()  # type: ignore[attr-defined]
    with pytest.raises(EventLogError, match=r"(?i)authorization"):
        await connect(f"nats://agent:wrong@{address}", deadline_s=3)
