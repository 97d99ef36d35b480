"""The `gpuwarden` command line.

Subcommands live in their own modules, listed in COMMAND_MODULES and imported only
when the parser is built; each module's `register(subparsers)` adds its commands and
sets `handler` (an async function of the parsed arguments returning an exit status).
Adapters are imported inside the handlers, so `gpuwarden --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuwarden.engine.errors import GpuwardenError

if TYPE_CHECKING:
    from gpuwarden.adapters.jetstream import JetStreamEventLog

Handler = Callable[[argparse.Namespace], Awaitable[int]]

# Modules that add subcommands: each defines `register(subparsers) -> None`.
COMMAND_MODULES: list[str] = [
    "gpuwarden.engine.service",
    "gpuwarden.projections.cli",
    "gpuwarden.adapters.api_cli",
    "gpuwarden.adapters.gpu_cli",
    "gpuwarden.projections.replay_cli",
    "gpuwarden.adapters.scenario_cli",
    "gpuwarden.adapters.agent_cli",
    "gpuwarden.adapters.auth_cli",
]

EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuwarden",
        description="Event-sourced fault supervision for GPU containers.",
    )
    _add_global_options(parser, defaults=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for sub in subparsers.choices.values():
        _add_global_options(sub, defaults=False)  # `gpuwarden engine --nats URL` works too
    return parser


def _add_global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--nats, --creds, --tls-*, --data-dir: before or after the command name.

    After it, they carry no default (argparse.SUPPRESS), so they only ever override
    what was given before it or in the environment.
    """

    def option(*flags: str, default: Any = None, **kwargs: Any) -> None:
        if any(flag in parser._option_string_actions for flag in flags):
            return  # the command has its own option of that name
        parser.add_argument(*flags, default=default if defaults else argparse.SUPPRESS, **kwargs)

    option(
        "--nats",
        default=os.environ.get("GPUWARDEN_NATS_URL"),
        metavar="URL",
        help="NATS server URL(s), comma-separated (env GPUWARDEN_NATS_URL); "
        "without it an embedded nats-server runs in the data directory",
    )
    option("--creds", metavar="FILE", help="NATS credentials file")
    option("--tls-ca", metavar="FILE", help="CA certificate for TLS")
    option("--tls-cert", metavar="FILE", help="client certificate for TLS")
    option("--tls-key", metavar="FILE", help="client key for TLS")
    option(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("GPUWARDEN_DATA_DIR", ".gpuwarden")),
        help="state directory: embedded server store, read models (env GPUWARDEN_DATA_DIR)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    import anyio

    try:
        status: int = anyio.run(handler, args)
        return status
    except GpuwardenError as exc:
        print(f"gpuwarden: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BaseExceptionGroup as group:  # a task group's failure: say the first real one
        found = _first_error(group)
        if found is None:
            raise
        print(f"gpuwarden: error: {found}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # no traceback for users; the message says what failed
        print(f"gpuwarden: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _first_error(group: BaseExceptionGroup[BaseException]) -> GpuwardenError | None:
    for exc in group.exceptions:
        if isinstance(exc, GpuwardenError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            inner = _first_error(exc)
            if inner is not None:
                return inner
    return None


# --- shared plumbing for commands ---------------------------------------------------


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


if __name__ == "__main__":
    sys.exit(main())
