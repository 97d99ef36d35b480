"""`gpuwarden submit` and `gpuwarden cancel`: the task API from a shell.

They are clients of the API service (NATS request-reply), never writers of the log
themselves, so every submission passes the same validation and idempotency as any
other client's. When nothing answers they say so instead of hanging. Read commands
(`tasks`, `gpus`, `nodes`, `events`) live in engine/cli/query.py, over the read model.

A request goes to `gw.api.<principal>.task.<verb>`: the principal of `--creds` (the
server lets it publish there only), else, on an insecure cluster, `--owner` or `$USER`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from gpuwarden.engine.cli.common import connect_with, nats_url
from gpuwarden.engine.core.errors import GpuwardenError
from gpuwarden.engine.core.events import subject_token

CREATE = "create"
CANCEL = "cancel"
ANONYMOUS = "anonymous"
DEFAULT_TIMEOUT_S = 5.0
EXIT_REFUSED = 1


class ApiUnavailableError(GpuwardenError):
    """No API service answered a request in time."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "submit",
        help="submit a task: gpuwarden submit --image IMG [options] -- CMD ARGS...",
        description="Submit a GPU task. Everything after `--` is the command, as argv "
        "(no shell runs it).",
    )
    p.add_argument("--image", required=True, help="container image reference")
    p.add_argument("--gpus", type=int, help="GPUs on one node (default 1)")
    p.add_argument("--gpu-model", help="GPU model, e.g. H100 (case-insensitive)")
    p.add_argument("--min-gpu-memory-mb", type=int, metavar="MB", help="per-GPU memory floor")
    p.add_argument("--memory-mb", type=int, metavar="MB", help="container memory limit")
    p.add_argument("--name", help="a name for the task")
    p.add_argument("--owner", help="who owns it (with --creds: must be your principal, or omitted)")
    p.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="environment (repeatable)"
    )
    p.add_argument("--request-id", metavar="R", help="idempotency key: resubmits return it")
    _common(p)
    p.add_argument("argv", nargs="+", metavar="CMD", help="the command and its arguments")
    p.set_defaults(handler=run_submit)

    p = subparsers.add_parser("cancel", help="cancel a task (stops its container)")
    p.add_argument("task_id", metavar="TASK")
    p.add_argument("--reason", help="why (recorded in task.cancelled)")
    p.add_argument("--owner", help="who you are, on a cluster without credentials (default $USER)")
    _common(p)
    p.set_defaults(handler=run_cancel)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the stored event as JSON")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"seconds to wait for the API service (default {DEFAULT_TIMEOUT_S:g})",
    )


def api_subject(principal: str, verb: str) -> str:
    """Where `principal` (a subject token) sends a `verb` request, as
    api_service.api_subject spells it."""
    return f"gw.api.{principal}.task.{verb}"


def principal_of(args: argparse.Namespace) -> str:
    """Who this CLI speaks as: the credentials' principal (already a subject token: the
    server's permissions name it as it is), else --owner or $USER made one."""
    from gpuwarden.adapters.auth import load_credentials, resolve_creds

    creds = resolve_creds(args)  # --creds, or the operator's where `up` made credentials
    if creds:
        return load_credentials(creds).principal
    name = getattr(args, "owner", None) or os.environ.get("USER") or ANONYMOUS
    return subject_token(name)


def submit_request(args: argparse.Namespace) -> dict[str, Any]:
    """The create request for parsed arguments; only what was given is sent."""
    request: dict[str, Any] = {"image": args.image, "command": list(args.argv)}
    for key in ("gpus", "gpu_model", "min_gpu_memory_mb", "memory_mb", "name", "owner"):
        value = getattr(args, key)
        if value is not None:
            request[key] = value
    if args.request_id is not None:
        request["request_id"] = args.request_id
    if args.env:
        request["env"] = parse_env(args.env)
    return request


def parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise GpuwardenError(f"--env {pair!r}: expected NAME=VALUE")
        env[key] = value
    return env


async def run_submit(args: argparse.Namespace) -> int:
    try:
        request = submit_request(args)
    except GpuwardenError as exc:
        print(f"gpuwarden: error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    answer = await call(args, api_subject(principal_of(args), CREATE), request)
    if "error" in answer:
        return _refused(answer)
    if args.json:
        print(json.dumps(answer["event"], separators=(",", ":")))
    else:
        print(answer["task_id"])
        if not answer.get("created", True):
            print("gpuwarden: already submitted with this request id", file=sys.stderr)
    return 0


async def run_cancel(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"task_id": args.task_id}
    if args.reason:
        request["reason"] = args.reason
    answer = await call(args, api_subject(principal_of(args), CANCEL), request)
    if "error" in answer:
        return _refused(answer)
    print(json.dumps(answer["event"], separators=(",", ":")) if args.json else answer["task_id"])
    return 0


def _refused(answer: dict[str, Any]) -> int:
    error = answer["error"]
    field = error.get("field")
    prefix = f"{field}: " if field else ""
    print(f"gpuwarden: refused: {prefix}{error.get('message')}", file=sys.stderr)
    return EXIT_REFUSED


async def request_as(nc: Any, subject: str, data: bytes, wait_s: float) -> Any:
    """A request whose reply comes to the caller's own inbox, `_INBOX.<principal>.`,
    the principal being the subject's: the task API answers nowhere else (a reply
    subject of the caller's choosing would let it write wherever the caller names).
    Connected with gpuwarden credentials, the connection's own inbox is that already."""
    import nats.errors
    from gpuwarden.adapters.api_service import route

    found = route(subject)
    if found is None or found[1] is None:
        return await nc.request(subject, data, timeout=wait_s)
    inbox = f"_INBOX.{found[1]}.{nc.new_inbox().rsplit('.', 1)[-1]}"
    sub = await nc.subscribe(inbox, max_msgs=1)
    try:
        await nc.publish(subject, data, reply=inbox)
        reply = await sub.next_msg(timeout=wait_s)
    finally:
        await sub.unsubscribe()
    if not reply.data and (reply.headers or {}).get("Status") == "503":
        raise nats.errors.NoRespondersError  # the server's answer: nobody subscribes
    return reply


async def call(args: argparse.Namespace, subject: str, request: dict[str, Any]) -> dict[str, Any]:
    """One request-reply round trip; raises ApiUnavailableError when nobody answers."""
    import nats.errors

    async with nats_url(args) as url:
        nc = await connect_with(args, url, "gpuwarden-cli", max_reconnect_attempts=0)
        try:
            reply = await request_as(nc, subject, json.dumps(request).encode(), args.timeout)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            raise ApiUnavailableError(
                f"no gpuwarden engine is answering on {subject} within {args.timeout:g}s "
                "— is `gpuwarden up` running?"
            ) from None
        finally:
            await nc.close()
    answer: dict[str, Any] = json.loads(reply.data)
    return answer
