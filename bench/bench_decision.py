"""Decision latency: container.exited stored -> rebuild.decided stored, at a steady fault rate.

Simulated agents report preemptions (exit 137) of running tasks at a fixed rate into
the real log; a real `gpuwarden engine` process classifies each one and decides a
rebuild. One ordered consumer watches the stream and stamps when each exit and each
rebuild decision became visible, so both ends of the latency are measured by the same
clock and the same delivery path. The baseline is one raw JetStream hop measured in
the same run on the same server: an ordered consumer that appends a reply for each
message it reads (its own process too), timed the same way.

A second baseline is the same hop with the reply appended as a JetStream atomic batch
of one message, which is how the engine appends every decision (all of a round's
events, or none), run at 100/s so that commits never queue: on nats-server 2.15 the
batch commit alone costs about 2 ms more than a plain append (with or without fsync),
a floor under the engine's latency that no engine code can remove. The server stages
each atomic batch of a one-replica file-storage stream in a file store of its own,
made and removed per batch (server/jetstream_batching.go, newBatchStore); other
streams stage in memory. So the batch is measured a third time, on a memory stream:
there it costs what a plain append does. The engine's log must be on disk, so the
file-stream figure is the one that bounds it.

Each simulated node agent has a connection of its own and states its facts on its own
subjects (`subject_of`: `gw.evt.task.<task>.node.<node>` for an exit). With `--auth` the
server runs a generated authorization (adapters/auth.py) and everyone connects as its
principal: the engine as `engine` (its task API as `api`), each agent as `node-<N>`, task
submissions as `api`, and the watcher, the setup reads and the raw baselines as `admin`;
so the ratios compare like with like, authorization on for both sides.

Admission's share of the engine's CPU is measured in the same run: the log is read back
and `Admission().admit` timed over every record in order (the same work the engine did),
counting the records stored while firing.

The evidence window is 0 here (the default waits up to 1 s for a late Xid by design;
that wait is policy, not engine cost). Run:
    .venv/bin/python -m bench.bench_decision [--rate 1000] [--seconds 2] [--auth]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
from gpuwarden.adapters import auth
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.admission import Admission
from gpuwarden.engine.ports import StoredEvent
from nats.aio.client import Client as NatsClient
from nats.js import api

POLICY = """
max_rebuilds = -1
backoff_initial_s = 3600
backoff_max_s = 3600
node_lost_after_s = 86400
evidence_window_s = 0
"""
RAW_STREAM = "BENCH_HOP"
FLOOR_RATE = 100.0  # the atomic-batch hop, one commit at a time
FLOOR_SAMPLES = 300
ADMISSION_REPEATS = 3  # the admission pass is timed this many times; the best counts
ADMISSION_GOAL = 0.10  # of the engine's CPU per fault
VIOLATION = re.compile(r".*Violation.*")


class Principals:
    """Who connects as whom. With `--auth`: a generated credentials directory, and each
    role its own principal; without: nobody (every connection is anonymous)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def creds(self, principal: str) -> str | None:
        if self.directory is None:
            return None
        return str(self.directory / f"{principal}{auth.CREDS_SUFFIX}")

    def node(self, node: str) -> str | None:
        return self.creds(auth.node_principal(node).name)


def raw_options(creds: str | None) -> dict[str, Any]:
    """nats-py connect options of a raw baseline client (nkey and inbox, or none)."""
    return {} if creds is None else auth.connect_options(auth.load_credentials(creds))


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def watch(
    url: str, subject: str, seen: dict[str, float], stop: asyncio.Event, creds: str | None
) -> None:
    """Stamp the first sight of every message (keyed by its Nats-Msg-Id)."""
    nc = await nats.connect(url, **raw_options(creds))
    js = nc.jetstream()

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        key = (msg.headers or {}).get("Nats-Msg-Id") or ""
        seen.setdefault(key + "|" + msg.subject, time.perf_counter())
        if msg.data:
            try:
                body = json.loads(msg.data)
            except ValueError:
                return
            if isinstance(body, dict) and body.get("type"):
                seen.setdefault(f"{body['type']}|{body.get('task_id')}", time.perf_counter())

    sub = await js.subscribe(subject, ordered_consumer=True, cb=on_msg)
    await stop.wait()
    await sub.unsubscribe()
    await nc.close()


def node_names(nodes: int) -> list[str]:
    return [f"b{n}" for n in range(nodes)]


async def connect_agents(url: str, who: Principals, nodes: list[str]) -> dict[str, NatsClient]:
    """One connection per simulated node agent (as its `node-<N>` principal with --auth)."""
    agents: dict[str, NatsClient] = {}
    for node in nodes:
        agents[node] = await connect(url, creds=who.node(node), name=f"agent-{node}")
    return agents


async def setup_cluster(
    agents: dict[str, NatsClient], api_log: JetStreamEventLog, gpus_per_node: int, tasks: int
) -> None:
    """Each agent registers its node; the API's connection submits the tasks."""
    at = datetime.now(UTC)
    for n, (node, nc) in enumerate(agents.items()):
        gpus = tuple(
            ev.GpuInfo(uuid=f"b{n}/{i}", index=i, model="sim") for i in range(gpus_per_node)
        )
        await JetStreamEventLog(nc).append(
            ev.node_subject(node),
            [
                ev.NodeRegistered(
                    id=f"reg-{n}", at=at, actor="agent", node=node, runtime="sim", gpus=gpus
                )
            ],
        )
    for t in range(tasks):
        task = f"d{t:05d}"
        await api_log.append(
            ev.task_subject(task),
            [
                ev.TaskSubmitted(
                    id=f"sub-{t}",
                    at=at,
                    actor="api",
                    task_id=task,
                    name=task,
                    image="img",
                    command=("x",),
                )
            ],
        )


async def scheduled_nodes(log: JetStreamEventLog, tasks: int, deadline_s: float) -> dict[str, str]:
    start = time.perf_counter()
    while time.perf_counter() - start < deadline_s:
        where = {
            r.event.task_id: r.event.node
            async for r in log.read()
            if isinstance(r.event, ev.TaskScheduled)
        }
        if len(where) >= tasks:
            return where
        await asyncio.sleep(0.5)
    raise SystemExit(f"engine placed only {len(where)} of {tasks} tasks in {deadline_s}s")


async def fire(agents: dict[str, NatsClient], where: dict[str, str], rate: float) -> None:
    """Each task's node agent appends one container.exited (exit 137) on its own subject
    (`subject_of`), paced at `rate` per second over all of them."""
    streams = {node: nc.jetstream() for node, nc in agents.items()}
    interval = 1.0 / rate
    start = time.perf_counter()
    futures = []
    for i, (task, node) in enumerate(sorted(where.items())):
        target = start + i * interval
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        event = ev.ContainerExited(
            id=f"exit-{task}",
            at=datetime.now(UTC),
            actor=f"agent:{node}",
            task_id=task,
            attempt=1,
            node=node,
            container_id=f"c-{task}",
            exit_code=137,
            signal=9,
        )
        futures.append(
            await streams[node].publish_async(
                ev.subject_of(event), ev.encode(event), headers={"Nats-Msg-Id": event.id}
            )
        )
    await asyncio.gather(*futures)


def latencies(seen: dict[str, float], start_type: str, end_type: str) -> list[float]:
    out = []
    for key, t0 in seen.items():
        kind, _, task = key.partition("|")
        if kind == start_type and f"{end_type}|{task}" in seen:
            out.append((seen[f"{end_type}|{task}"] - t0) * 1000)
    return out


def time_admission(records: list[StoredEvent], after: int) -> tuple[float, int, int]:
    """Admit every record in order, as the engine does, timing those past `after`.

    Returns (seconds, records timed, refused among them), best of ADMISSION_REPEATS."""
    best = float("inf")
    timed = refused = 0
    for _ in range(ADMISSION_REPEATS):
        admission = Admission()
        timed = refused = 0
        elapsed = 0.0
        for record in records:
            if record.event is None:
                continue
            if record.seq <= after:
                admission.admit(record.subject, record.event)
                continue
            t0 = time.perf_counter()
            reason = admission.admit(record.subject, record.event)
            elapsed += time.perf_counter() - t0
            timed += 1
            refused += reason is not None
        best = min(best, elapsed)
    return best, timed, refused


async def raw_hop_process(url: str, atomic: bool, creds: str | None) -> None:
    """The baseline: read each message with an ordered consumer, append a reply (as an
    atomic batch of one message with `atomic`)."""
    nc = await nats.connect(url, **raw_options(creds))
    js = nc.jetstream()
    queue: asyncio.Queue[nats.aio.msg.Msg] = asyncio.Queue()

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        await queue.put(msg)

    await js.subscribe(f"{RAW_STREAM.lower()}.in.>", ordered_consumer=True, cb=on_msg)
    print("ready", flush=True)
    while True:
        msg = await queue.get()
        token = msg.subject.rsplit(".", 1)[1]
        subject = f"{RAW_STREAM.lower()}.out.{token}"
        body = json.dumps({"type": "out", "task_id": token}).encode()
        headers = {"Nats-Msg-Id": f"out-{token}", "Nats-Expected-Last-Subject-Sequence": "0"}
        if not atomic:
            await js.publish(subject, body, headers=headers)
            continue
        batch = {"Nats-Batch-Id": f"hop-{token}", "Nats-Batch-Sequence": "1"}
        reply = await nc.request(
            subject, body, headers={**headers, **batch, "Nats-Batch-Commit": "1"}, timeout=5
        )
        assert b'"error"' not in reply.data, reply.data


async def raw_baseline(
    url: str,
    count: int,
    rate: float,
    atomic: bool,
    creds: str | None,
    storage: api.StorageType = api.StorageType.FILE,
) -> list[float]:
    nc = await nats.connect(url, **raw_options(creds))
    js = nc.jetstream()
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_stream(RAW_STREAM)
    await js.add_stream(
        api.StreamConfig(
            name=RAW_STREAM,
            subjects=[f"{RAW_STREAM.lower()}.>"],
            storage=storage,
            allow_atomic=atomic or None,
        )
    )
    mode = ["--atomic"] if atomic else []
    if creds is not None:
        mode += ["--raw-creds", creds]
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before any timing
        [sys.executable, "-m", "bench.bench_decision", "--raw-hop", url, *mode],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert proc.stdout is not None
    await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
    seen: dict[str, float] = {}
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch(url, f"{RAW_STREAM.lower()}.>", seen, stop, creds))
    await asyncio.sleep(0.3)
    interval = 1.0 / rate
    start = time.perf_counter()
    futures = []
    for i in range(count):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        token = f"{i:06d}"
        body = json.dumps({"type": "in", "task_id": token}).encode()
        futures.append(
            await js.publish_async(
                f"{RAW_STREAM.lower()}.in.{token}", body, headers={"Nats-Msg-Id": f"in-{token}"}
            )
        )
    await asyncio.gather(*futures)
    for _ in range(100):
        if sum(1 for k in seen if k.startswith("out|")) >= count:
            break
        await asyncio.sleep(0.1)
    stop.set()
    await watcher
    proc.terminate()
    proc.wait(10)
    await nc.close()
    return latencies(seen, "in", "out")


def engine_command(
    url: str, policy: Path, who: Principals, profile: str | None, no_api: bool
) -> list[str]:
    prefix = [sys.executable] + (["-m", "cProfile", "-o", profile] if profile else [])
    command = [*prefix, "-m", "gpuwarden.engine.cli", "--nats", url]
    if who.directory is not None:
        command += ["--creds", str(who.creds(auth.ROLE_ENGINE))]
    command += ["engine", "--policy", str(policy)]
    if no_api:
        command.append("--no-api")
    elif who.directory is not None:
        command += ["--api-creds", str(who.creds(auth.ROLE_API))]
    if who.directory is not None:
        command += ["--env-key", str(who.directory / auth.ENV_KEY)]
    return command


async def main(rate: float, seconds: float, gpus_per_node: int, use_auth: bool) -> None:
    faults = int(rate * seconds)
    nodes = node_names((faults + gpus_per_node - 1) // gpus_per_node)
    with tempfile.TemporaryDirectory() as tmp:
        who = Principals(Path(tmp) / "auth" if use_auth else None)
        server_options: dict[str, Any] = {}
        if who.directory is not None:
            auth.generate(who.directory, nodes=nodes)
            server_options = {
                "authorization": who.directory / auth.AUTH_CONF,
                "probe_options": raw_options(who.creds(auth.ROLE_READER)),
            }
        server = EmbeddedNats(Path(tmp) / "nats", **server_options)
        url = await server.start()
        policy = Path(tmp) / "policy.toml"
        policy.write_text(POLICY)
        admin = who.creds(auth.ROLE_ADMIN)
        nc = await connect(url, creds=admin)
        log = JetStreamEventLog(nc)
        await log.ensure_streams()
        api_nc = await connect(url, creds=who.creds(auth.ROLE_API))
        connecting = time.perf_counter()
        agents = await connect_agents(url, who, nodes)
        connected = time.perf_counter() - connecting
        engine_log = Path(tmp) / "engine.log"
        with engine_log.open("wb") as stderr:
            engine = subprocess.Popen(  # noqa: ASYNC220 - started once, before any timing
                engine_command(
                    url,
                    policy,
                    who,
                    os.environ.get("BENCH_PROFILE_ENGINE"),
                    bool(os.environ.get("BENCH_NO_API")),
                ),
                stderr=stderr,
            )
        try:
            await setup_cluster(agents, JetStreamEventLog(api_nc), gpus_per_node, faults)
            where = await scheduled_nodes(log, faults, deadline_s=120)
            seen: dict[str, float] = {}
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch(url, "gw.evt.task.>", seen, stop, admin))
            await asyncio.sleep(0.5)
            fired_after = await log.last_seq()
            began = time.perf_counter()
            cpu_before = cpu_seconds(engine.pid)
            await fire(agents, where, rate)
            fired = time.perf_counter() - began
            for _ in range(300):
                if sum(1 for k in seen if k.startswith("rebuild.decided|")) >= faults:
                    break
                await asyncio.sleep(0.1)
            cpu_after = cpu_seconds(engine.pid)
            settled = time.perf_counter() - began
            stop.set()
            await watcher
        finally:
            engine.send_signal(2)  # SIGINT: a clean stop (lets a profiler write its file)
            engine.wait(10)
        ours = latencies(seen, "container.exited", "rebuild.decided")
        if not ours:
            sys.exit(f"no rebuild decision seen; the engine said: {engine_log.read_text()[-2000:]}")
        records = [record async for record in log.read()]
        admitted_s, admitted, refused = time_admission(records, fired_after)
        for agent in agents.values():
            await agent.close()
        await api_nc.close()
        raw = await raw_baseline(url, faults, rate, atomic=False, creds=admin)
        # One commit at a time, at a rate it can keep up with: the floor, not a queue.
        batch = await raw_baseline(url, FLOOR_SAMPLES, FLOOR_RATE, atomic=True, creds=admin)
        # The same on a memory stream: where the batch's extra cost lives (see above).
        in_memory = await raw_baseline(
            url, FLOOR_SAMPLES, FLOOR_RATE, atomic=True, creds=admin, storage=api.StorageType.MEMORY
        )
        await nc.close()
        await server.stop()
        violations = VIOLATION.findall((server.home / "nats.log").read_text(errors="replace"))
        engine_said = [
            line
            for line in engine_log.read_text(errors="replace").splitlines()
            if line.strip() and "engine running on" not in line and "SIGINT received" not in line
        ]
    print(
        f"faults: {faults} at {faults / fired:,.0f}/s offered ({rate:,.0f}/s asked), "
        f"{len(ours)} rebuild decisions seen"
    )
    print(
        f"authorization {'on' if use_auth else 'off'}: {len(nodes)} node agents "
        f"({gpus_per_node} GPUs each), one connection each, connected in {connected:.2f} s"
    )
    print(
        f"engine  exited->rebuild.decided: p50 {pct(ours, 0.5):6.2f} ms  "
        f"p99 {pct(ours, 0.99):6.2f} ms  mean {statistics.mean(ours):6.2f} ms"
    )
    per_fault_us = admitted_s * 1e6 / faults
    admission = (
        f"admission: {per_fault_us:.1f} µs per fault ({admitted} records stored while firing, "
        f"{admitted_s * 1e6 / max(admitted, 1):.1f} µs each, best of {ADMISSION_REPEATS}, "
        f"{refused} refused)"
    )
    if cpu_before is not None and cpu_after is not None:
        used = cpu_after - cpu_before
        print(
            f"  engine CPU while firing: {used * 1000 / faults:.2f} ms per fault "
            f"({used / settled:.0%} of a core until the last decision)"
        )
        share = admitted_s / used if used > 0 else float("nan")
        admission = (
            f"admission: {per_fault_us:.1f} µs per fault = {share:.1%} of the engine's CPU "
            f"per fault (goal <= {ADMISSION_GOAL:.0%}; {admitted} records stored while "
            f"firing, {admitted_s * 1e6 / max(admitted, 1):.1f} µs each, best of "
            f"{ADMISSION_REPEATS}, {refused} refused)"
        )
    print(f"  {admission}")
    print(
        f"raw hop consume->append:         p50 {pct(raw, 0.5):6.2f} ms  "
        f"p99 {pct(raw, 0.99):6.2f} ms  ({len(raw)} samples)"
    )
    print(
        f"raw hop, atomic batch of 1:      p50 {pct(batch, 0.5):6.2f} ms  "
        f"p99 {pct(batch, 0.99):6.2f} ms  ({len(batch)} samples at {FLOOR_RATE:.0f}/s)"
    )
    print(
        f"  same, on a memory stream:      p50 {pct(in_memory, 0.5):6.2f} ms  "
        f"p99 {pct(in_memory, 0.99):6.2f} ms  (the batch's cost is its on-disk staging)"
    )
    print(
        f"ratio p50 {pct(ours, 0.5) / pct(raw, 0.5):.2f}  "
        f"p99 {pct(ours, 0.99) / pct(raw, 0.99):.2f}   (goal: engine p50 <= 2 ms, p99 <= 10 ms)"
    )
    print(f"server log: {len(violations)} permission violations")
    for line in violations[:5]:
        print(f"  {line.strip()}")
    for line in engine_said[:5]:
        print(f"engine said: {line.strip()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="faults per second")
    parser.add_argument("--seconds", type=float, default=2.0, help="how long to fire")
    parser.add_argument(
        "--gpus-per-node", type=int, default=8, help="GPUs per simulated node (one task each)"
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help="run the server with generated authorization, every client as its principal",
    )
    parser.add_argument("--raw-hop", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--atomic", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw-creds", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_hop:
        asyncio.run(raw_hop_process(args.raw_hop, args.atomic, args.raw_creds))
    else:
        asyncio.run(main(args.rate, args.seconds, args.gpus_per_node, args.auth))
