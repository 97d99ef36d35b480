"""Issue #13's findings, replayed against the real `gpuwarden up` processes.

Each attack was first made with nothing but nats-py and the URL `up` prints. Here it
is made again with the credentials a real deployment hands out (`up`'s own, plus a
second node's made by `gpuwarden auth`): what a principal may not do, the server
refuses (a permissions violation, and the log's last sequence does not move); what it
may do but makes no sense, the engine dead-letters; and the engine, the API and the
read commands go on working, before and after a restart.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from gpuwarden.adapters import auth
from gpuwarden.adapters.dead_letters import JetStreamDeadLetters
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core import wire
from nats.aio.client import Client as NatsClient

from tests.test_auth import Conn

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "gpuwarden.engine.cli"]
FAST = """
backoff_initial_s = 0.2
evidence_window_s = 0.3
"""


class Up:
    """`gpuwarden up` in a data directory whose credentials include a second node, n2."""

    def __init__(self, data: Path, runtime: str = "sim") -> None:
        self.data = data
        self.runtime = runtime
        self.url = ""
        self.proc: anyio.abc.Process | None = None
        self.conns: list[Conn] = []
        auth.generate(data / "auth", nodes=["local", "n2"], users=["bob"])
        (data / "policy.toml").write_text(FAST)

    async def start(self) -> None:
        self.proc = await anyio.open_process(
            [*CLI, "--data-dir", str(self.data), "up", "--runtime", self.runtime,
             "--policy", str(self.data / "policy.toml")],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert self.proc.stdout is not None
        with anyio.fail_after(30):
            self.url = (await self.proc.stdout.receive()).decode().strip()

    async def stop(self) -> None:
        for conn in self.conns:
            await conn.nc.close()
        self.conns.clear()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(20):
                assert await self.proc.wait() == 0
            await self.proc.aclose()
            self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def conn(self, principal: str) -> Conn:
        holder: list[Conn] = []

        async def on_error(exc: Exception) -> None:
            await holder[0].on_error(exc)

        nc = await connect(
            self.url, creds=str(self.data / "auth" / f"{principal}.creds"), error_cb=on_error
        )
        holder.append(Conn(principal, nc))
        self.conns.append(holder[0])
        return holder[0]

    async def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        with anyio.fail_after(30):
            return await anyio.run_process([*CLI, "--data-dir", str(self.data), *args], check=False)

    async def submit(self, *argv: str, env: str | None = None) -> str:
        extra = ["--env", env] if env else []
        image = "gpuwarden-test:latest"
        done = await self.cli("submit", "--image", image, "--gpus", "1", *extra, "--", *argv)
        assert done.returncode == 0, done.stderr
        return done.stdout.decode().strip()


@pytest.fixture
async def up(tmp_path: Path) -> AsyncIterator[Up]:
    running = Up(tmp_path / "data")
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def wait_for(
    log: JetStreamEventLog, task: str, kind: type[Any], count: int = 1, timeout_s: float = 20
) -> list[Any]:
    """The task's events of `kind`, once `count` of them are in the log."""
    found: list[Any] = []
    with anyio.fail_after(timeout_s):
        async for record in log.subscribe(1, ev.task_subject(task)):
            if isinstance(record.event, kind):
                found.append(record.event)
                if len(found) >= count:
                    return found
    raise AssertionError("unreachable")


async def dead_letters(nc: NatsClient, seqs: set[int], timeout_s: float = 10) -> dict[int, str]:
    """The dead letters of these sequences (their reasons), once all are there."""
    dlq = JetStreamDeadLetters(nc)
    with anyio.fail_after(timeout_s):
        while True:
            found = {int(h["Gw-Seq"]): h["Gw-Reason"] for h, _ in await dlq.read_all()}
            if seqs <= found.keys():
                return {seq: found[seq] for seq in seqs}
            await anyio.sleep(0.1)  # the engine writes them on its own; look again


async def reads_answer(up: Up, task: str) -> None:
    """Every read command answers, and `tasks --json` parses."""
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def run(name: str, *args: str) -> None:
        results[name] = await up.cli(*args)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "tasks", "tasks", "--json")
        tg.start_soon(run, "gpus", "gpus")
        tg.start_soon(run, "nodes", "nodes")
        tg.start_soon(run, "events", "events")
        tg.start_soon(run, "explain", "explain", task)
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr)
    assert any(row["id"] == task for row in json.loads(results["tasks"].stdout))


async def running_task(up: Up) -> tuple[Conn, JetStreamEventLog, str, str]:
    """The operator's connection and log, and a task running on node local (its GPU)."""
    operator = await up.conn("operator")
    log = JetStreamEventLog(operator.nc)
    task = await up.submit("sleep", "300")
    (scheduled,) = await wait_for(log, task, ev.TaskScheduled)
    await wait_for(log, task, ev.ContainerStarted)
    return operator, log, task, scheduled.gpu_uuids[0]


def raw_exit(task: str, **changes: object) -> bytes:
    body: dict[str, object] = {
        "type": "container.exited",
        "id": "01POISON00000000000000000X",
        "at": "2026-12-04T13:50:00Z",
        "actor": "agent:local",
        "task_id": task,
        "attempt": 1,
        "node": "local",
        "container_id": "c",
        "exit_code": 1,
    }
    body.update(changes)
    return json.dumps(body).encode()


async def test_poison_exits_are_dead_lettered_and_up_survives_a_restart(up: Up) -> None:
    operator = await up.conn("operator")
    log = JetStreamEventLog(operator.nc)
    task = await up.submit("sleep", "300")
    await wait_for(log, task, ev.ContainerStarted)
    agent = (await up.conn("node-local")).nc.jetstream()
    subject = f"gw.evt.task.{task}.node.local"
    seqs: dict[int, str] = {}
    for n, (changes, says) in enumerate([
        ({"at": "2026-12-04T13:50:00"}, "at: time has no zone"),
        ({"at": "9999-12-31T23:59:59.999Z"}, "at:"),
        ({"attempt": 10**30}, "attempt:"),
    ]):  # fmt: skip
        ack = await agent.publish(
            subject, raw_exit(task, id=f"01POISON0000000000000000{n}X", **changes)
        )
        seqs[ack.seq] = says
    reasons = await dead_letters(operator.nc, set(seqs))
    for seq, says in seqs.items():
        assert reasons[seq].startswith("refused: ") and says in reasons[seq], reasons[seq]
    assert up.alive()
    await reads_answer(up, task)

    await up.stop()
    await up.start()  # folds the same poison again, and goes on
    operator = await up.conn("operator")
    log = JetStreamEventLog(operator.nc)
    after = await up.submit("sleep", "300")
    await wait_for(log, after, ev.ContainerStarted)
    assert up.alive()
    await reads_answer(up, task)
    tasks = json.loads((await up.cli("tasks", "--json")).stdout)
    assert {row["id"]: row["state"] for row in tasks}[task] == "running"


async def test_forgeries_are_refused_by_the_server(up: Up) -> None:
    operator, log, task, gpu = await running_task(up)
    before = await log.last_seq()
    cmds_before = (await operator.nc.jetstream().stream_info(wire.COMMANDS_STREAM)).state.last_seq
    n2 = await up.conn("node-n2")
    exited = raw_exit(task, node="local", exit_code=3)
    for subject, payload in [
        (f"gw.evt.task.{task}.node.local", exited),  # speaking for node local
        (f"gw.evt.task.{task}.engine", b'{"type":"rebuild.decided"}'),  # deciding
        (ev.gpu_subject(gpu) + ".node.local", b'{"type":"gpu.fault","xid":48}'),
        (ev.gpu_subject(gpu) + ".op", b'{"type":"gpu.restored"}'),
        (f"gw.evt.task.{task}x.api", b'{"type":"task.submitted","gpus":-1,"command":["a\\u0000"]}'),
        (f"gw.evt.task.{task}", exited),  # the old scheme's subject
        ("gw.cmd.local", b'{"kind":"run","image":"x","command":["sh"]}'),
        ("gw.cmd.local", b'{"kind":"stop"}'),
        ("gw.evt.node.rogue.node.rogue", b'{"type":"node.registered","node":"rogue"}'),
        ("gw.hb.rogue", b'{"node":"rogue"}'),
        ("$JS.API.STREAM.DELETE.GW_EVENTS", b""),
        ("$JS.API.STREAM.UPDATE.GW_EVENTS", b'{"name":"GW_EVENTS","max_msgs":3}'),
        ("$JS.API.STREAM.PURGE.GW_EVENTS", b""),
    ]:
        await n2.publish_refused(subject, payload)
    agent = await up.conn("node-local")  # a node may not submit, decide or restore either
    for subject in (f"gw.evt.task.{task}y.api", f"gw.evt.task.{task}.engine", "gw.cmd.local"):
        await agent.publish_refused(subject, b"{}")
    reader = await up.conn("reader")
    await reader.publish_refused(ev.gpu_subject(gpu) + ".op", b"{}")
    assert await log.last_seq() == before
    info = await operator.nc.jetstream().stream_info(wire.EVENTS_STREAM)
    assert info.config.max_msgs in (-1, None) and info.state.first_seq == 1
    assert (
        await operator.nc.jetstream().stream_info(wire.COMMANDS_STREAM)
    ).state.last_seq == cmds_before
    assert up.alive()
    tasks = json.loads((await up.cli("tasks", "--json")).stdout)
    assert {row["id"]: row["state"] for row in tasks}[task] == "running"


async def test_what_a_node_may_write_but_means_wrong_is_dead_lettered(up: Up) -> None:
    operator, _, task, gpu = await running_task(up)
    n2 = (await up.conn("node-n2")).nc.jetstream()
    at = "2026-12-04T13:50:00Z"
    forged = [
        # its own subject, its own name: but the attempt runs on local
        (f"gw.evt.task.{task}.node.n2", raw_exit(task, node="n2"), "runs on node local"),
        # its own subject, another node's name in the body
        (f"gw.evt.task.{task}.node.n2", raw_exit(task, node="local"), "subject"),
        # a GPU fault for a GPU of node local
        (
            ev.gpu_subject(gpu) + ".node.n2",
            json.dumps(
                {
                    "type": "gpu.fault",
                    "id": "01FORGED0000000000000000GF",
                    "at": at,
                    "actor": "agent:n2",
                    "gpu_uuid": gpu,
                    "node": "n2",
                    "kind": "xid",
                    "xid": 48,
                }
            ).encode(),
            "not on node n2",
        ),
        # a registration that claims local's GPU
        (
            "gw.evt.node.n2.node.n2",
            json.dumps(
                {
                    "type": "node.registered",
                    "id": "01FORGED0000000000000000NR",
                    "at": at,
                    "actor": "agent:n2",
                    "node": "n2",
                    "runtime": "sim",
                    "gpus": [{"uuid": gpu, "index": 0}],
                }
            ).encode(),
            "belongs to node local",
        ),
    ]
    seqs: dict[int, str] = {}
    for n, (subject, payload, says) in enumerate(forged):
        ack = await n2.publish(subject, payload, headers={"Nats-Msg-Id": f"forged-{n}"})
        seqs[ack.seq] = says
    reasons = await dead_letters(operator.nc, set(seqs))
    for seq, says in seqs.items():
        assert reasons[seq].startswith("refused: ") and says in reasons[seq], reasons[seq]
    assert up.alive()
    tasks = json.loads((await up.cli("tasks", "--json")).stdout)
    assert {row["id"]: row["state"] for row in tasks}[task] == "running"
    gpus = json.loads((await up.cli("gpus", "--json")).stdout)
    row = next(g for g in gpus if g["uuid"] == gpu)
    assert not row["quarantined"] and row["node"] == "local"


@pytest.mark.docker
async def test_the_legitimate_flows_pass_under_the_same_config(
    tmp_path: Path, test_image: str
) -> None:
    running = Up(tmp_path / "data", runtime="docker")
    await running.start()
    try:
        await legitimate_flows(running, test_image)
    finally:
        await running.stop()
    violations = re.findall(r".*Violation.*", (tmp_path / "data/nats/nats.log").read_text())
    assert violations == []  # engine, API, agent and operator each within their rights


async def legitimate_flows(up: Up, image: str) -> None:
    import docker

    operator = await up.conn("operator")
    log = JetStreamEventLog(operator.nc)
    secret = "hf_s3cret_token"
    task = await up.submit("sh", "-c", "echo $HF_TOKEN; sleep 300", env=f"HF_TOKEN={secret}")
    (started,) = await wait_for(log, task, ev.ContainerStarted)
    raw = b"".join([r.data async for r in log.read(subject=ev.task_subject(task))])
    assert secret.encode() not in raw  # sealed in the log ...
    client = docker.from_env()
    try:
        container = client.containers.get(started.container_id)

        def first_output() -> bytes:
            for chunk in container.logs(stream=True, follow=True):
                return bytes(chunk)
            return b""

        with anyio.fail_after(10):  # in clear inside the one container
            assert secret.encode() in await anyio.to_thread.run_sync(
                first_output, abandon_on_cancel=True
            )
        container.kill()  # kill -> preempted -> rebuilt
        await wait_for(log, task, ev.ContainerStarted, count=2, timeout_s=30)
    finally:
        client.close()
    bob = await up.conn("user-bob")
    answer = json.loads(
        (
            await bob.nc.request(
                "gw.api.user-bob.task.cancel", json.dumps({"task_id": task}).encode(), timeout=5
            )
        ).data
    )
    assert answer["error"]["code"] == "forbidden"
    got = json.loads(
        (
            await bob.nc.request(
                "gw.api.user-bob.task.get", json.dumps({"task_id": task}).encode(), timeout=5
            )
        ).data
    )
    assert "env" not in got["task"] and got["task"]["env_names"] == ["HF_TOKEN"]
    mine = json.loads(
        (await operator.nc.request("gw.api.operator.task.get",
                                   json.dumps({"task_id": task}).encode(), timeout=5)).data
    )  # fmt: skip
    assert mine["task"]["env"] == {"HF_TOKEN": secret}
    cancelled = await up.cli("cancel", task)
    assert cancelled.returncode == 0, cancelled.stderr
    await wait_for(log, task, ev.TaskCancelled)
    await reads_answer(up, task)
    exported = await up.cli("export", "--task", task)
    assert exported.returncode == 0 and secret.encode() not in exported.stdout
