"""The `gpuwarden` command line.

Subcommands live in their own modules, listed in COMMAND_MODULES and imported only
when the parser is built; each module's `register(subparsers)` adds its commands and
sets `handler` (an async function of the parsed arguments returning an exit status).
Adapters are imported inside the handlers, so `gpuwarden --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuwarden.engine.errors import GpuwardenError

if TYPE_CHECKING:
    from gpuwarden.adapters.jetstream import JetStreamEventLog
    from gpuwarden.engine.ports import StoredEvent

Handler = Callable[[argparse.Namespace], Awaitable[int]]

# Modules that add subcommands: each defines `register(subparsers) -> None`.
COMMAND_MODULES: list[str] = [
    "gpuwarden.engine.service",
    "gpuwarden.adapters.api_cli",
    "gpuwarden.projections.replay_cli",
    "gpuwarden.adapters.scenario_cli",
    "gpuwarden.adapters.agent_cli",
]

EXIT_ERROR = 2
_COMMON_FIELDS = frozenset({"id", "at", "actor", "causation_id", "correlation_id", "type"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuwarden",
        description="Event-sourced fault supervision for GPU containers.",
    )
    parser.add_argument(
        "--nats",
        default=os.environ.get("GPUWARDEN_NATS_URL"),
        metavar="URL",
        help="NATS server URL(s), comma-separated (env GPUWARDEN_NATS_URL); "
        "without it an embedded nats-server runs in the data directory",
    )
    parser.add_argument("--creds", metavar="FILE", help="NATS credentials file")
    parser.add_argument("--tls-ca", metavar="FILE", help="CA certificate for TLS")
    parser.add_argument("--tls-cert", metavar="FILE", help="client certificate for TLS")
    parser.add_argument("--tls-key", metavar="FILE", help="client key for TLS")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("GPUWARDEN_DATA_DIR", ".gpuwarden")),
        help="state directory: embedded server store, read models (env GPUWARDEN_DATA_DIR)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _register_up(subparsers)
    _register_events(subparsers)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


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
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # no traceback for users; the message says what failed
        print(f"gpuwarden: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


# --- shared plumbing for commands ---------------------------------------------------


@asynccontextmanager
async def nats_url(args: argparse.Namespace) -> AsyncIterator[str]:
    """The server to talk to: --nats, else the data directory's embedded server
    (started for the duration of the block when it is not already running)."""
    if args.nats:
        yield args.nats
        return
    from gpuwarden.adapters.embedded_nats import EmbeddedNats

    async with EmbeddedNats(args.data_dir) as server:
        yield server.url


@asynccontextmanager
async def open_event_log(args: argparse.Namespace) -> AsyncIterator[JetStreamEventLog]:
    """A connected event log with its streams ensured, closed at the end of the block."""
    async with nats_url(args) as url, event_log_at(args, url) as log:
        yield log


@asynccontextmanager
async def event_log_at(args: argparse.Namespace, url: str) -> AsyncIterator[JetStreamEventLog]:
    from gpuwarden.adapters.jetstream import JetStreamEventLog, connect

    nc = await connect(
        url,
        creds=args.creds,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        name="gpuwarden-cli",
        deadline_s=5.0,
    )
    try:
        log = JetStreamEventLog(nc)
        await log.ensure_streams()
        yield log
    finally:
        await nc.close()


# --- gpuwarden up -------------------------------------------------------------------


def _register_up(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "up", help="run the event log (embedded nats-server unless --nats) until stopped"
    )
    parser.set_defaults(handler=run_up)


async def run_up(args: argparse.Namespace) -> int:
    import signal

    import anyio

    async with nats_url(args) as url, event_log_at(args, url):
        print(url, flush=True)
        print(f"gpuwarden: event log ready at {url}; Ctrl-C to stop", file=sys.stderr)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
    return 0


# --- gpuwarden events ---------------------------------------------------------------


def _register_events(subparsers: Any) -> None:
    parser = subparsers.add_parser("events", help="print the event log")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--limit", type=int, metavar="N", help="only the last N events")
    parser.set_defaults(handler=run_events)


async def run_events(args: argparse.Namespace) -> int:
    async with open_event_log(args) as log:
        last = await log.last_seq()
        start = 1 if args.limit is None else max(1, last - max(args.limit, 0) + 1)
        if args.limit == 0:
            return 0
        async for stored in log.read(from_seq=start, until_seq=last):
            print(json_line(stored) if args.json else text_line(stored))
    return 0


def json_line(stored: StoredEvent) -> str:
    from gpuwarden.engine.events import to_builtins

    row: dict[str, Any] = {"seq": stored.seq, "subject": stored.subject}
    if stored.event is None:
        row["event"] = None
        row["error"] = stored.error
    else:
        row["event"] = to_builtins(stored.event)
    return json.dumps(row, separators=(",", ":"), default=str)


def text_line(stored: StoredEvent) -> str:
    from gpuwarden.engine.events import to_builtins, type_of

    if stored.event is None:
        return f"{stored.seq:>6}  {'-':<19}  {stored.subject}  <undecodable>  {stored.error}"
    event = stored.event
    fields = to_builtins(event)
    summary = " ".join(
        f"{key}={_short(value)}" for key, value in fields.items() if key not in _COMMON_FIELDS
    )
    at = event.at.strftime("%Y-%m-%d %H:%M:%S")
    return f"{stored.seq:>6}  {at}  {stored.subject}  {type_of(event)}  {summary[:100]}"


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


if __name__ == "__main__":
    sys.exit(main())
