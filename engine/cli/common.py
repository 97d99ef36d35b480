"""Plumbing every subcommand shares: the server to talk to, a connection honouring the
global --creds/--tls-* options, and an event log opened for the length of a block.

Each takes the connection options as a ConnectionConfig, or as the parsed arguments
they are read from (the subcommands that have no config object of their own).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from gpuwarden.engine.cli.config import ConnectionConfig

if TYPE_CHECKING:
    from gpuwarden.adapters.event_log import JetStreamEventLog

Handler = Callable[[argparse.Namespace], Awaitable[int]]
EXIT_ERROR = 2

Connection = ConnectionConfig | argparse.Namespace


def connection_of(options: Connection) -> ConnectionConfig:
    """The connection options, from a config or from parsed arguments."""
    if isinstance(options, ConnectionConfig):
        return options
    return ConnectionConfig.from_args(options)


@asynccontextmanager
async def nats_url(options: Connection) -> AsyncIterator[str]:
    """The server to talk to: --nats, else the data directory's embedded server
    (started for the duration of the block when it is not already running, with the
    authorization `gpuwarden up` keeps in `<data-dir>/auth/` when it made one)."""
    conn = connection_of(options)
    if conn.nats:
        yield conn.nats
        return
    from gpuwarden.adapters.auth import embedded_server_auth
    from gpuwarden.adapters.embedded_nats import EmbeddedNats

    authorization, probe = embedded_server_auth(conn)
    async with EmbeddedNats(
        conn.data_dir, authorization=authorization, probe_options=probe
    ) as server:
        yield server.url


@asynccontextmanager
async def open_event_log(options: Connection) -> AsyncIterator[JetStreamEventLog]:
    """A connected event log with its streams ensured, closed at the end of the block."""
    conn = connection_of(options)
    async with nats_url(conn) as url, event_log_at(conn, url) as log:
        yield log


async def connect_with(options: Connection, url: str, name: str, **kwargs: Any) -> Any:
    """A NATS connection honouring the global --creds and --tls-* options.

    Without --creds and --nats, a call in a data directory where `gpuwarden up` made
    credentials acts as its `operator` (reads, the task API, gpu-restore).
    """
    from gpuwarden.adapters.auth import ConnectRefusedError, refused_hint, resolve_creds
    from gpuwarden.adapters.nats_connection import connect

    conn = connection_of(options)
    creds = resolve_creds(conn)
    try:
        return await connect(
            url,
            creds=creds,
            tls_ca=conn.tls_ca,
            tls_cert=conn.tls_cert,
            tls_key=conn.tls_key,
            name=name,
            **kwargs,
        )
    except ConnectRefusedError as exc:
        raise ConnectRefusedError(
            f"{exc}; {refused_hint(conn, creds)}", url=exc.url, creds=exc.creds
        ) from None


@asynccontextmanager
async def event_log_at(options: Connection, url: str) -> AsyncIterator[JetStreamEventLog]:
    from gpuwarden.adapters.auth import msg_id_key, resolve_creds
    from gpuwarden.adapters.event_log import JetStreamEventLog

    conn = connection_of(options)
    nc = await connect_with(conn, url, "gpuwarden-cli", deadline_s=5.0)
    try:
        log = JetStreamEventLog(nc, msg_id_key=msg_id_key(resolve_creds(conn)))
        await log.ensure_streams()
        yield log
    finally:
        await nc.close()
