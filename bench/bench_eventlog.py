"""Event-log throughput against raw nats-py on the same server in the same run.

Appends: JetStreamEventLog.append vs js.publish_async with the same headers
(`Nats-Msg-Id` on every message, `Nats-Expected-Last-Subject-Sequence` and its
`...-Subject` filter over the aggregate on the first of each guarded append) on the same
subjects (`subject_of`), same append sizes and the same concurrency, each side on a
connection of its own. Replay:
JetStreamEventLog.read() vs a raw ordered push consumer over the same stream, once
counting bare messages and once decoding each payload (the work any reader does).
The server fsyncs every write, as the embedded one always does.

With `--auth` the server runs a generated authorization (adapters/auth.py): ours connects
as the `engine` principal (whose events these are), the raw baselines as `admin`, so
both sides pay for authorization.

Run: .venv/bin/python -m bench.bench_eventlog [--events N] [--auth]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from gpuwarden.adapters import auth
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core import wire
from gpuwarden.engine.ids import new_id
from nats.aio.client import Client as NatsClient
from nats.js import api

AT = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
CONCURRENCY = 16
ROUNDS = 2
VIOLATION = re.compile(r".*Violation.*")


def make_events(n: int, task: str) -> list[ev.Event]:
    return [
        ev.TaskPending(id=new_id(), at=AT, actor="engine", task_id=task, reason="no free GPU")
        for _ in range(n)
    ]


def workload(total: int, per_append: int, tag: str) -> list[tuple[str, list[ev.Event]]]:
    """(subject, events) appends: `per_append` events each, on distinct subjects."""
    appends = []
    for i in range(total // per_append):
        task = f"{tag}{i}"
        appends.append((ev.task_subject(task), make_events(per_append, task)))
    return appends


async def run_concurrently(
    appends: list[tuple[str, list[ev.Event]]],
    one: Callable[[str, list[ev.Event]], Awaitable[None]],
) -> float:
    queue = list(reversed(appends))

    async def worker() -> None:
        while queue:
            subject, events = queue.pop()
            await one(subject, events)

    start = time.perf_counter()
    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for _ in range(CONCURRENCY):
                tg.start_soon(worker)
    return time.perf_counter() - start


async def bench_appends(
    log: JetStreamEventLog, nc: NatsClient, total: int, per_append: int, guarded: bool
) -> tuple[float, float, float | None]:
    """Ours on `log`, the raw baselines on `nc` (another connection)."""
    js = nc.jetstream()

    async def ours(subject: str, events: list[ev.Event]) -> None:
        await log.append(subject, events, 0 if guarded else None)

    async def raw(subject: str, events: list[ev.Event]) -> None:
        futures = []
        for index, event in enumerate(events):
            headers = {"Nats-Msg-Id": event.id}
            if guarded and index == 0:
                headers["Nats-Expected-Last-Subject-Sequence"] = "0"
                headers["Nats-Expected-Last-Subject-Sequence-Subject"] = ev.aggregate_filter(
                    subject
                )
            futures.append(
                await js.publish_async(ev.subject_of(event), ev.encode(event), headers=headers)
            )
        await asyncio.gather(*futures)

    async def raw_batch(subject: str, events: list[ev.Event]) -> None:
        batch_id = new_id()
        for number, event in enumerate(events, 1):
            headers = {
                "Nats-Msg-Id": event.id,
                "Nats-Batch-Id": batch_id,
                "Nats-Batch-Sequence": str(number),
            }
            if number == 1:
                headers["Nats-Expected-Last-Subject-Sequence"] = "0"
                headers["Nats-Expected-Last-Subject-Sequence-Subject"] = ev.aggregate_filter(
                    subject
                )
            if number < len(events):
                await nc.publish(ev.subject_of(event), ev.encode(event), headers=headers)
            else:
                headers["Nats-Batch-Commit"] = "1"
                await nc.request(
                    ev.subject_of(event), ev.encode(event), headers=headers, timeout=30
                )

    tag = f"{'g' if guarded else 'p'}{per_append}-"
    cases = {"raw": raw, "ours": ours}
    if guarded and per_append > 1:  # ours is an atomic batch here: compare like with like
        cases["rawb"] = raw_batch
    best: dict[str, float] = {}
    for round_ in range(ROUNDS):  # alternate and keep the best: the machine is shared
        for name, one in cases.items():
            elapsed = await run_concurrently(
                workload(total, per_append, f"{name}{round_}-{tag}"), one
            )
            best[name] = max(best.get(name, 0.0), total / elapsed)
    return best["ours"], best["raw"], best.get("rawb")


async def bench_replay(log: JetStreamEventLog, nc: NatsClient) -> tuple[float, float, float]:
    last = await log.last_seq()
    js = nc.jetstream()

    async def raw(decode: bool) -> float:
        done = asyncio.Event()

        async def on_msg(msg: object) -> None:
            if decode:
                ev.decode(msg.data)  # type: ignore[attr-defined]
            if msg.metadata.sequence.stream >= last:  # type: ignore[attr-defined]
                done.set()

        start = time.perf_counter()
        sub = await js.subscribe(
            wire.EVENT_SUBJECTS,
            stream=wire.EVENTS_STREAM,
            cb=on_msg,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        with anyio.fail_after(120):
            await done.wait()
        elapsed = time.perf_counter() - start
        await sub.unsubscribe()
        return last / elapsed

    start = time.perf_counter()
    count = 0
    with anyio.fail_after(120):
        async for _ in log.read():
            count += 1
    ours = count / (time.perf_counter() - start)
    return ours, await raw(False), await raw(True)


async def main(total: int, use_auth: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        creds = Path(tmp) / "auth"
        ours_creds = raw_creds = None
        server_options: dict[str, Any] = {}
        if use_auth:
            auth.generate(creds, nodes=[])
            ours_creds = str(creds / f"{auth.ROLE_ENGINE}{auth.CREDS_SUFFIX}")
            raw_creds = str(creds / f"{auth.ROLE_ADMIN}{auth.CREDS_SUFFIX}")
            reader = auth.load_credentials(creds / f"{auth.ROLE_READER}{auth.CREDS_SUFFIX}")
            server_options = {
                "authorization": creds / auth.AUTH_CONF,
                "probe_options": auth.connect_options(reader),
            }
        async with EmbeddedNats(Path(tmp), **server_options) as server:
            ours_nc = await connect(server.url, creds=ours_creds, name="ours")
            nc = await connect(server.url, creds=raw_creds, name="raw")
            try:
                log = JetStreamEventLog(ours_nc, timeout_s=30)
                await log.ensure_streams()
                print(f"nats-server with sync_interval=always; {total} events per case")
                print(
                    "authorization on: ours as engine, raw as admin"
                    if use_auth
                    else "authorization off"
                )
                print(f"{'case':<38}{'ours/s':>10}{'raw/s':>10}{'ratio':>8}")
                for per_append, guarded in ((100, False), (10, True), (1, True)):
                    ours, raw, batch = await bench_appends(log, nc, total, per_append, guarded)
                    kind = "expected seq + msg id" if guarded else "msg id"
                    name = f"append x{per_append} ({kind})"
                    print(f"{name:<38}{ours:>10.0f}{raw:>10.0f}{ours / raw:>8.2f}")
                    if batch is not None:
                        name = f"  same, vs raw atomic batch x{per_append}"
                        print(f"{name:<38}{ours:>10.0f}{batch:>10.0f}{ours / batch:>8.2f}")
                ours, raw, raw_decoding = await bench_replay(log, nc)
                print(
                    f"{'replay read() vs raw ordered + decode':<38}"
                    f"{ours:>10.0f}{raw_decoding:>10.0f}{ours / raw_decoding:>8.2f}"
                )
                print(
                    f"{'replay read() vs raw ordered, no decode':<38}"
                    f"{ours:>10.0f}{raw:>10.0f}{ours / raw:>8.2f}"
                )
            finally:
                await nc.close()
                await ours_nc.close()
        violations = VIOLATION.findall((server.home / "nats.log").read_text(errors="replace"))
    print(f"server log: {len(violations)} permission violations")
    for line in violations[:5]:
        print(f"  {line.strip()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument(
        "--auth",
        action="store_true",
        help="run the server with generated authorization, each side as its principal",
    )
    args = parser.parse_args()
    anyio.run(main, args.events, args.auth)
