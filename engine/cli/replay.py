"""`gpuwarden replay`: time travel, decision audit and policy what-ifs over the log.

The log comes from the event log (as every other command) or from an exported JSONL
file (`--from-file`), so an audit can run far from the cluster. `run_replay` takes the
records as an argument, so tests and other front ends can skip the NATS plumbing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import anyio
import msgspec
from gpuwarden.engine.cli.common import open_event_log
from gpuwarden.engine.core.events import to_builtins, type_of
from gpuwarden.engine.core.policy import DEFAULT_POLICY, Policy, parse_policy
from gpuwarden.projections import replay as rp
from gpuwarden.projections.export import read_jsonl
from gpuwarden.projections.queries import parse_time

EXIT_MISMATCH = 1
PROGRESS_AFTER_S = 1.0  # a short replay prints no progress at all


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "replay",
        help="fold the log again: state at a point, check decisions, try another policy",
        description="Without --check or --diff, print the state at the end of the log "
        "(or at --until-seq / --until-time).",
    )
    p.add_argument("--from-file", metavar="FILE", help="an exported JSONL log instead of NATS")
    until = p.add_mutually_exclusive_group()
    until.add_argument("--until-seq", type=int, metavar="N", help="stop after sequence N")
    until.add_argument(
        "--until-time", metavar="T", help="stop after time T (ISO-8601, or 2h/30m/1d ago)"
    )
    p.add_argument(
        "--check", action="store_true", help="re-derive every decision; exit 1 on a mismatch"
    )
    p.add_argument(
        "--policy",
        metavar="FILE",
        help="policy TOML to replay/check under (default: the built-in policy)",
    )
    p.add_argument(
        "--diff",
        action="store_true",
        help="with --policy: what that policy would have decided instead of the recorded one",
    )
    p.add_argument(
        "--recorded-policy",
        metavar="FILE",
        help="with --diff: the policy the engine ran under (default: the built-in policy)",
    )
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(handler=handle_replay)


async def handle_replay(args: argparse.Namespace) -> int:
    _validate(args)
    async with _records(args) as records:
        return await run_replay(args, records)


def _validate(args: argparse.Namespace) -> None:
    if args.diff and not args.policy:
        raise rp.ReplayError("--diff needs --policy FILE (the policy to compare with)")
    if args.diff and args.check:
        raise rp.ReplayError("give one of --check and --diff")
    if args.recorded_policy and not args.diff:
        raise rp.ReplayError("--recorded-policy goes with --diff")
    if args.until_time is not None and (args.check or args.diff):
        raise rp.ReplayError("--until-time goes with a state replay; use --until-seq")


@asynccontextmanager
async def _records(args: argparse.Namespace) -> AsyncIterator[rp.Records]:
    if args.from_file:
        path = Path(args.from_file)
        if not await anyio.Path(path).is_file():
            raise rp.ReplayError(f"{path}: no such file (an exported JSONL log)")
        yield read_jsonl(path)
        return

    async with open_event_log(args) as log:
        last = await log.last_seq()
        yield log.read(1, last)


def load_policy(path: str | None) -> Policy:
    if path is None:
        return DEFAULT_POLICY
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise rp.ReplayError(f"{path}: cannot read policy file: {exc}") from None
    return parse_policy(text, path)


async def run_replay(
    args: argparse.Namespace, records: rp.Records, out: TextIO | None = None
) -> int:
    out = out or sys.stdout
    policy = load_policy(args.policy)
    progress = DelayedProgress()
    try:
        if args.check:
            result = await rp.check(records, policy, until_seq=args.until_seq, progress=progress)
            return _print_check(result, args.json, out)
        if args.diff:
            recorded = load_policy(args.recorded_policy)
            found = await rp.diff(
                records, recorded, policy, until_seq=args.until_seq, progress=progress
            )
            _print_diff(found, args.json, out)
            return 0
        until_time = _until_time(args.until_time)
        snapshot = await rp.state_at(records, args.until_seq, until_time, policy, progress=progress)
    finally:
        progress.done()
    _print_state(snapshot.summary, args.json, out)
    return 0


def _until_time(text: str | None) -> datetime | None:
    return None if text is None else parse_time(text, datetime.now(UTC))


class DelayedProgress:
    """`N events  R/s` on stderr, only once a replay has run for a second."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.started = time.monotonic()
        self.drawn = 0.0
        self.count = 0

    def __call__(self, done: int) -> None:
        self.count = done
        now = time.monotonic()
        if now - self.started < PROGRESS_AFTER_S or now - self.drawn < 0.2:
            return
        self.drawn = now
        rate = done / max(now - self.started, 1e-6)
        self.out.write(f"\rreplayed {done} events  {rate:,.0f}/s")
        self.out.flush()

    def done(self) -> None:
        if self.drawn:
            self.out.write(f"\rreplayed {self.count} events\n")
            self.out.flush()


# --- output --------------------------------------------------------------------------


def _dump(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, default=str, separators=(",", ":")) + "\n")


def _table(rows: list[list[Any]], header: list[str], out: TextIO) -> None:
    cells = [header] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _print_state(summary: dict[str, Any], as_json: bool, out: TextIO) -> None:
    if as_json:
        _dump(summary, out)
        return
    out.write(f"state after sequence {summary['seq']} (at {summary['at'] or '-'})\n\n")
    tasks = [
        [t["task_id"], t["status"], t["attempt"], t["node"], ",".join(t["gpus"]) or None,
         t["rebuilds"], t["fault"], t["reason"] or t["pending_reason"]]
        for t in summary["tasks"]
    ]  # fmt: skip
    header = ["TASK", "STATE", "ATTEMPT", "NODE", "GPUS", "REBUILDS", "FAULT", "REASON"]
    _table(tasks, header, out)
    out.write("\n")
    gpus = [
        [g["uuid"], g["node"], g["holder"], "quarantined" if g["quarantined"] else "ok"]
        for g in summary["gpus"]
    ]
    _table(gpus, ["GPU", "NODE", "HOLDER", "HEALTH"], out)
    out.write("\n")
    nodes = [
        [n["name"], "alive" if n["alive"] else "lost", len(n["gpus"])] for n in summary["nodes"]
    ]
    _table(nodes, ["NODE", "STATE", "GPUS"], out)


def _event_text(event: Any) -> str:
    if event is None:
        return "(nothing)"
    return f"{type_of(event)} {json.dumps(to_builtins(event), default=str, sort_keys=True)}"


def _print_check(result: rp.CheckResult, as_json: bool, out: TextIO) -> int:
    status = EXIT_MISMATCH if result.mismatches else 0
    if as_json:
        _dump(result.to_builtins(), out)
        return status
    out.write(f"{result.rounds} rounds re-derived, {len(result.mismatches)} mismatches\n")
    for m in result.mismatches:
        out.write(
            f"mismatch at seq {m.seq} (round {m.first_seq}-{m.last_seq}, basis {m.basis}, "
            f"trigger {_short(m.trigger)}, {m.recorded_count} recorded / "
            f"{m.derived_count} re-derived events)\n"
        )
        out.write(f"  recorded:   {_event_text(m.recorded)}\n")
        out.write(f"  re-derived: {_event_text(m.derived)}\n")
    for u in result.unverifiable:
        out.write(f"unverifiable: seq {u.seq} {u.type or '-'}: {u.reason}\n")
    for digest, count in result.other_policies.items():
        out.write(
            f"note: {count} rounds were decided under policy {digest}, replayed under "
            f"{result.policy}; pass the engine's policy with --policy FILE\n"
        )
    return status


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


_CHANGE_TEXT: dict[str, str] = {
    "rebuilt": "would have been rebuilt",
    "failed": "would have failed",
    "completed": "would have completed",
    "placed_elsewhere": "would have been placed elsewhere",
    "placed": "would have been placed",
    "pending": "would have waited",
    "undecided": "would have had no decision",
    "changed": "would have been decided differently",
}


def _verdict_text(verdicts: tuple[rp.TaskVerdict, ...]) -> str:
    if not verdicts:
        return "(no decision)"
    parts = []
    for v in verdicts:
        fields = {k: val for k, val in _builtins(v).items() if k != "kind"}
        parts.append(v.kind + "".join(f" {k}={val}" for k, val in fields.items()))
    return "; ".join(parts)


def _builtins(verdict: rp.TaskVerdict) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(verdict)
    return data


def _print_diff(result: rp.DiffResult, as_json: bool, out: TextIO) -> None:
    if as_json:
        _dump(result.to_builtins(), out)
        return
    out.write(
        f"{result.rounds} rounds replayed under policy {result.other_policy} "
        f"(recorded under {result.recorded_policy}): "
        f"{len(result.divergences)} tasks decided differently\n"
    )
    by_change: dict[str, list[rp.Divergence]] = {}
    for d in result.divergences:
        by_change.setdefault(d.change, []).append(d)
    for change, found in by_change.items():
        out.write(f"\n{_CHANGE_TEXT.get(change, change)} ({len(found)}):\n")
        for d in found:
            out.write(f"  {d.task_id}  at seq {d.seq}\n")
            out.write(f"    recorded:    {_verdict_text(d.recorded)}\n")
            out.write(f"    alternative: {_verdict_text(d.alternative)}\n")
