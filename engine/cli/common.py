"""Plumbing every subcommand shares: the server to talk to, a connection honouring the
global --creds/--tls-* options, and an event log opened for the length of a block."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpuwarden.adapters.jetstream import JetStreamEventLog

Handler = Callable[[argparse.Namespace], Awaitable[int]]
EXIT_ERROR = 2


@asynccontextmanager
async def nats_url(args: argparse.Namespace) -> AsyncIterator[str]:
    """The server to talk to: --nats, else the data directory's embedded server
    (started for the duration of the block when it is not already running, with the
    authorization `gpuwarden up` keeps in `<data-dir>/auth/` when it made one)."""
    if args.nats:
        yield args.nats
        return
    from gpuwarden.adapters.auth import embedded_server_auth
    from gpuwarden.adapters.embedded_nats import EmbeddedNats

    authorization, probe = embedded_server_auth(args)
    async with EmbeddedNats(
        args.data_dir, authorization=authorization, probe_options=probe
    ) as server:
        yield server.url


@asynccontextmanager
async def open_event_log(args: argparse.Namespace) -> AsyncIterator[JetStreamEventLog]:
    """A connected event log with its streams ensured, closed at the end of the block."""
    async with nats_url(args) as url, event_log_at(args, url) as log:
        yield log


async def connect_with(args: argparse.Namespace, url: str, name: str, **options: Any) -> Any:
    """A NATS connection honouring the global --creds and --tls-* options.

    Without --creds and --nats, a call in a data directory where `gpuwarden up` made
    credentials acts as its `operator` (reads, the task API, gpu-restore).
    """
    from gpuwarden.adapters.auth import ConnectRefusedError, refused_hint, resolve_creds
    from gpuwarden.adapters.jetstream import connect

    creds = resolve_creds(args)
    try:
        return await connect(
            url,
            creds=creds,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            name=name,
            **options,
        )
    except ConnectRefusedError as exc:
        raise ConnectRefusedError(
            f"{exc}; {refused_hint(args, creds)}", url=exc.url, creds=exc.creds
        ) from None


@asynccontextmanager
async def event_log_at(args: argparse.Namespace, url: str) -> AsyncIterator[JetStreamEventLog]:
    from gpuwarden.adapters.auth import msg_id_key, resolve_creds
    from gpuwarden.adapters.jetstream import JetStreamEventLog

    nc = await connect_with(args, url, "gpuwarden-cli", deadline_s=5.0)
    try:
        log = JetStreamEventLog(nc, msg_id_key=msg_id_key(resolve_creds(args)))
        await log.ensure_streams()
        yield log
    finally:
        await nc.close()
