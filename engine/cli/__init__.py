"""The `gpuwarden` command line.

This package is the outermost shell: the only code that turns options into running
services. Each subcommand module's `register(subparsers)` adds its commands and sets
`handler` (an async function of the parsed arguments returning an exit status); they
import `common` and never this module, so registration has no import cycle. Adapters
are imported inside the handlers, so `gpuwarden --help` stays fast. The processes
(`engine`, `up`, `agent`) turn the parsed arguments into the frozen settings of
`config` first: their services never see argparse.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from gpuwarden.engine.cli import agent, api, auth, gpu, query, replay, scenario, serve
from gpuwarden.engine.cli.common import EXIT_ERROR, Handler
from gpuwarden.engine.core.errors import GpuwardenError

COMMAND_MODULES = (serve, query, api, gpu, replay, scenario, agent, auth)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuwarden",
        description="Event-sourced fault supervision for GPU containers.",
    )
    _add_global_options(parser, defaults=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
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
