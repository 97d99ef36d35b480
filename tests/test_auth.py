"""Principals and least privilege, enforced by a real nats-server.

`gpuwarden auth` output is checked as files (modes, idempotence, errors); then every
principal runs its legitimate work through the real adapters without one permission
violation, and the server refuses what it may not do — forged decisions, another
node's facts or commands, stream deletes and updates — leaving the log unchanged.
"""

from __future__ import annotations

import json
import re
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from gpuwarden.adapters import auth
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.dead_letters import JetStreamDeadLetters
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.event_log import JetStreamEventLog, stored_event
from gpuwarden.adapters.heartbeats import NatsHeartbeats
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core import wire
from gpuwarden.engine.core.commands import RunCommand, encode_command
from gpuwarden.engine.core.wire import DLQ_STREAM
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.ports import EventLogError
from nats.aio.client import Client as NatsClient

CLI = [sys.executable, "-m", "gpuwarden.engine.cli"]
AT = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
NODES = ("n1", "n2")
USERS = ("alice",)


# --- generation ---------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_writes_private_files_for_every_principal(tmp_path: Path) -> None:
    out = tmp_path / "creds"
    issued = auth.generate(out, nodes=["n1", "gpu.box:7"], users=["alice"])
    names = {item.principal.name for item in issued}
    odd = "node-" + ev.subject_token("gpu.box:7")
    assert names == {
        "admin", "engine", "api", "reader", "operator", "node-n1", odd, "user-alice"
    }  # fmt: skip
    assert mode(out) == 0o700
    assert mode(out / "auth.conf") == 0o600
    conf = (out / "auth.conf").read_text()
    assert "nkey users" in conf and "authorization {" in conf
    for item in issued:
        assert mode(item.creds) == 0o600
        lines = item.creds.read_text().splitlines()
        assert lines[0] == (
            f"# gpuwarden credentials: principal {item.principal.name} (role "
            f"{item.principal.role}). Secret: whoever holds this file is that principal."
        )
        creds = auth.load_credentials(item.creds)
        assert (creds.principal, creds.role) == (item.principal.name, item.principal.role)
        assert creds.seed is not None and creds.seed.startswith("SU")
        assert creds.seed not in conf and f'nkey: "{item.public_key}"' in conf
        assert auth.connect_options(creds)["inbox_prefix"] == f"_INBOX.{creds.principal}"
    assert f'"gw.evt.*.*.node.{odd.removeprefix("node-")}"' in conf


def test_rerun_keeps_seeds_and_adds_principals(tmp_path: Path) -> None:
    out = tmp_path / "creds"
    first = {i.principal.name: i.creds.read_text() for i in auth.generate(out, nodes=["n1"])}
    second = auth.generate(out, nodes=["n2"], users=["bob"])
    again = {i.principal.name: i.creds.read_text() for i in second}
    assert {name: again[name] for name in first} == first  # same seeds, files untouched
    assert {"node-n1", "node-n2", "user-bob"} <= again.keys()  # n1 stays authorized
    assert [i.principal.name for i in second if i.new] == ["node-n2", "user-bob"]
    conf = (out / "auth.conf").read_text()
    assert '"gw.hb.n1"' in conf and '"gw.hb.n2"' in conf


async def gw(*args: str) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(20):
        return await anyio.run_process([*CLI, *args], check=False)


async def test_auth_command_prints_the_summary_and_json(tmp_path: Path) -> None:
    out = tmp_path / "creds"
    text = await gw("auth", "--out", str(out), "--node", "n1", "--user", "alice")
    assert text.returncode == 0, text.stderr
    table = text.stdout.decode()
    header = table.splitlines()[0].split()
    assert header[:2] == ["PRINCIPAL", "ROLE"] and "STREAMS" in header
    assert "gw.evt.*.*.node.n1, gw.hb.n1" in table
    assert "gw.api.user-alice.task.*" in table and "sealed" in table
    as_json = await gw("auth", "--out", str(out), "--json")
    rows = {row["principal"]: row for row in json.loads(as_json.stdout)}
    assert set(rows) == {"admin", "engine", "api", "reader", "operator", "node-n1", "user-alice"}
    assert not any(row["new"] for row in rows.values())  # the second run made nothing new
    assert rows["node-n1"]["publish"][:2] == ["gw.evt.*.*.node.n1", "gw.hb.n1"]
    assert rows["node-n1"]["subscribe"] == ["_INBOX.node-n1.>"]
    assert rows["admin"]["may_manage_streams"].startswith("all")
    assert rows["engine"]["may_manage_streams"].startswith("create")


@pytest.mark.parametrize(
    ("flag", "name", "message"),
    [
        ("--node", "bad name", "node name 'bad name' may not contain ' '"),
        ("--node", "", "a node name may not be empty"),
        ("--user", "a/b", "user name 'a/b' may not contain '/'"),
    ],
)
async def test_bad_names_are_refused(tmp_path: Path, flag: str, name: str, message: str) -> None:
    result = await gw("auth", "--out", str(tmp_path / "c"), flag, name)
    assert result.returncode == 2
    assert message in result.stderr.decode()
    assert not (tmp_path / "c").exists()  # nothing half-made


def test_unwritable_directory_and_damaged_credentials_are_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(auth.AuthError, match=r"cannot make credentials directory .*file/c"):
        auth.generate(blocker / "c")
    out = tmp_path / "creds"
    auth.generate(out)
    (out / "engine.creds").write_text("principal: engine\nrole: engine\n")
    with pytest.raises(auth.AuthError, match=r"engine\.creds: not a gpuwarden .*no `seed:`"):
        auth.generate(out)  # a damaged secret is reported, never silently replaced


def test_load_credentials_says_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "x.creds"
    with pytest.raises(auth.AuthError, match=r"x\.creds: no such credentials file"):
        auth.load_credentials(path)
    seed = auth.new_seed()
    cases = {
        "principal: engine\nrole: engine\nseed: SUNOTASEED\n": "not a valid nkey seed",
        "principal: engine\nrole: node\nseed: " + seed: "cannot have role 'node'",
        "principal: engine\nrole: boss\nseed: " + seed: "unknown role 'boss'",
        "principal engine\n": r"x\.creds:1: expected `key: value`",
        "principal: a.b\nrole: node\nseed: " + seed: "cannot have role",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(auth.AuthError, match=message):
            auth.load_credentials(path)
    path.write_text("-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.sig\n------END--\n")
    jwt = auth.load_credentials(path)
    assert (jwt.seed, jwt.role) == (None, auth.ROLE_JWT)
    assert auth.connect_options(jwt) == {"user_credentials": str(path), "inbox_prefix": "_INBOX.x"}


# --- a server with the generated authorization ---------------------------------------


@dataclass
class Conn:
    """One principal's connection, with the server's complaints as they arrive."""

    principal: str
    nc: NatsClient
    errors: list[str] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)

    async def on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc).lower())
        self.changed.set()
        self.changed = anyio.Event()

    def violations(self) -> list[str]:
        return [e for e in self.errors if "permissions violation" in e]

    async def refused(self, what: str, subject: str) -> None:
        """Wait (deadline) until the server refuses `what` ("publish to", "subscription
        to") on `subject`."""
        needle = f'permissions violation for {what} "{subject.lower()}"'
        with anyio.move_on_after(5):
            while not any(needle in e for e in self.errors):
                await self.changed.wait()
            return
        pytest.fail(f"the server did not refuse {self.principal} {what} {subject}")

    async def publish_refused(self, subject: str, payload: bytes = b"{}") -> None:
        await self.nc.publish(subject, payload)
        await self.refused("publish to", subject)


@dataclass
class Cluster:
    url: str
    creds: Path
    conns: list[Conn] = field(default_factory=list)

    async def conn(self, principal: str) -> Conn:
        holder: list[Conn] = []

        async def on_error(exc: Exception) -> None:
            await holder[0].on_error(exc)

        nc = await connect(
            self.url,
            creds=str(self.creds / f"{principal}.creds"),
            name=principal,
            error_cb=on_error,
        )
        holder.append(Conn(principal, nc))
        self.conns.append(holder[0])
        return holder[0]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A nats-server running the generated authorization (as `gpuwarden up` runs it),
    with the streams made by the engine."""
    creds = tmp_path / "auth"
    auth.generate(creds, nodes=NODES, users=USERS)
    probe = auth.connect_options(auth.load_credentials(creds / "reader.creds"))
    server = EmbeddedNats(tmp_path / "data", authorization=creds / "auth.conf", probe_options=probe)
    await server.start()
    found = Cluster(server.url, creds)
    try:
        engine = await found.conn("engine")
        await JetStreamEventLog(engine.nc).ensure_streams()
        await JetStreamDeadLetters(engine.nc).ensure_stream()
        yield found
    finally:
        for conn in found.conns:
            await conn.nc.close()
        await server.stop()


def assert_clean(*conns: Conn) -> None:
    """Legitimate work drew no complaint from the server."""
    for conn in conns:
        assert conn.violations() == [], conn.principal


def log_of(conn: Conn, **kwargs: Any) -> JetStreamEventLog:
    return JetStreamEventLog(conn.nc, heartbeat_s=0.5, timeout_s=kwargs.pop("timeout_s", 3.0))


def pending(task: str, event_id: str | None = None) -> ev.TaskPending:
    return ev.TaskPending(id=event_id or new_id(), at=AT, actor="engine", task_id=task, reason="r")


def submitted(task: str) -> ev.TaskSubmitted:
    return ev.TaskSubmitted(
        id=new_id(), at=AT, actor="api", task_id=task, name="n", image="img", command=("a",)
    )


def run_command(node: str, env: dict[str, str] | None = None) -> RunCommand:
    return RunCommand(
        id=new_id(), node=node, task_id="t", attempt=1, image="img", command=("a",),
        env=env or {},
    )  # fmt: skip


async def read_everything(log: JetStreamEventLog, task: str = "t") -> list[int]:
    """Every read path of the event log: positions, a full read, an aggregate's read,
    and a live subscription up to the end."""
    await log.ensure_streams()  # an existing stream is only looked at
    end = await log.last_seq()
    assert end > 0 and await log.last_seq(ev.task_subject(task)) > 0
    seqs = [r.seq async for r in log.read()]
    assert seqs == list(range(1, end + 1))
    assert [r async for r in log.read(subject=ev.task_subject(task))]
    with anyio.fail_after(5):
        async for record in log.subscribe(1):
            if record.seq >= end:
                break
    return seqs


async def test_engine_does_its_work_and_nothing_else(cluster: Cluster) -> None:
    engine = cluster.conns[0]
    log = log_of(engine)
    await engine.nc.jetstream().account_info()
    (first,) = await log.append(ev.task_subject("t"), [pending("t")], 0)
    retried = [pending("t", "p2"), pending("t", "p3")]
    seqs = await log.append(ev.task_subject("t"), retried, first)  # an atomic batch
    assert await log.append(ev.task_subject("t"), retried, first) == seqs  # its retry
    await log.append(ev.task_subject("u"), [pending("u"), pending("u")])  # pipelined
    batch = [pending("v", "b1"), pending("w", "b2")]
    expect = {ev.task_subject("v"): 0, ev.task_subject("w"): 0}
    stored = await log.append_batch(batch, expect)
    assert await log.append_batch(batch, expect) == stored  # a re-sent commit
    await read_everything(log)
    letters = JetStreamDeadLetters(engine.nc)
    await letters.dead_letter(stored_event(1, "gw.evt.task.t.engine", b"junk", {}), "bad")
    assert len(await letters.read_all()) == 1
    bus = JetStreamCommandBus(engine.nc, timeout_s=3)
    await bus.send(run_command("n1"))
    await bus.send_many([run_command("n1"), run_command("n2")])
    assert_clean(engine)

    end = await log.last_seq()
    for subject in ("gw.evt.task.T.api", "gw.evt.node.n1.node.n1", "gw.evt.gpu.G.op"):
        await engine.publish_refused(subject, ev.encode(submitted("T")))
    await engine.publish_refused("gw.evt.task.T", ev.encode(pending("T")))  # scheme 1
    for verb in ("DELETE", "PURGE", "UPDATE"):
        await engine.publish_refused(f"$JS.API.STREAM.{verb}.{wire.EVENTS_STREAM}")
    assert await log.last_seq() == end


async def test_node_agent_speaks_for_itself_and_reads_only_its_commands(
    cluster: Cluster,
) -> None:
    engine, n1, n2 = cluster.conns[0], await cluster.conn("node-n1"), await cluster.conn("node-n2")
    elog = log_of(engine)
    await elog.append(ev.task_subject("t"), [pending("t")])
    bus = JetStreamCommandBus(engine.nc, timeout_s=3)
    secret = {"HF_TOKEN": "for n2 only"}
    mine = [run_command("n1"), run_command("n1")]
    await bus.send_many([mine[0], run_command("n2", secret), mine[1]])

    log = log_of(n1)
    await read_everything(log)
    registered = ev.NodeRegistered(id=new_id(), at=AT, actor="agent:n1", node="n1", runtime="sim")
    await log.append(ev.node_subject("n1"), [registered], 0)
    started = ev.ContainerStarted(
        id=new_id(), at=AT, actor="agent:n1", task_id="t", attempt=1, node="n1", container_id="c"
    )
    await log.append(ev.task_subject("t"), [started], await log.last_seq(ev.task_subject("t")))

    got: list[Any] = []
    with anyio.fail_after(10):
        async for received in JetStreamCommandBus(n1.nc, poll_s=0.2).receive("n1"):
            if not got:
                got.append(received.command)
                await received.nak()  # comes again
                continue
            got.append(received.command)
            await received.ack()
            if len(got) == 3:
                break
    ids = [command.id for command in got]
    assert sorted(set(ids)) == sorted(c.id for c in mine)  # both of n1's, and only those
    assert ids.count(ids[0]) == 2  # the nak'ed one came again

    heard: list[str] = []

    async def listen() -> None:
        async for node in NatsHeartbeats(engine.nc).listen():
            heard.append(node)
            return

    async with anyio.create_task_group() as tg:
        tg.start_soon(listen)
        with anyio.fail_after(5):
            while not heard:  # beat until the engine's subscription is there to hear one
                await NatsHeartbeats(n1.nc).beat("n1")
                await n1.nc.flush()
                await engine.nc.flush()
    assert heard == ["n1"]
    assert_clean(engine, n1)

    # Node n2 tries everything it must not. Nothing it sends may change the log.
    events_before = await elog.last_seq()
    cmds_before = (await engine.nc.jetstream().stream_info(wire.COMMANDS_STREAM)).state
    forged = {
        "gw.evt.task.T.engine": ev.RebuildDecided(
            id=new_id(), at=AT, actor="engine", task_id="T", attempt=2, previous_attempt=1,
            fault="gpu_hardware", counted=True, rule=None, not_before=AT,
        ),  # a rebuild nobody decided
        "gw.evt.gpu.G.op": ev.GpuRestored(
            id=new_id(), at=AT, actor="api:x", gpu_uuid="G", node="n2", reason="r"
        ),  # a broken GPU back into service
        "gw.evt.task.T.api": submitted("T"),  # a task nobody asked for
        "gw.evt.task.T.node.n1": ev.ContainerStarted(
            id=new_id(), at=AT, actor="agent:n1", task_id="T", attempt=1, node="n1",
            container_id="c",
        ),  # n1's facts
        "gw.evt.node.rogue.node.rogue": ev.NodeRegistered(
            id=new_id(), at=AT, actor="agent:rogue", node="rogue", runtime="sim"
        ),  # a node that does not exist
        "gw.evt.task.T": pending("T"),  # the legacy scheme
    }  # fmt: skip
    for subject, event in forged.items():
        await n2.publish_refused(subject, ev.encode(event))
    await n2.publish_refused("gw.hb.rogue")
    await n2.publish_refused("gw.hb.n1")  # keeping a dead n1 alive
    await n2.publish_refused("gw.cmd.n1", encode_command(run_command("n1")))  # raw run
    for subject in (
        "$JS.API.CONSUMER.CREATE.GW_CMDS.gw-agent-n1.gw.cmd.n1",
        "$JS.API.CONSUMER.CREATE.GW_CMDS.gw-agent-n2.gw.cmd.n1",
        "$JS.API.CONSUMER.CREATE.GW_CMDS",
        "$JS.API.CONSUMER.DURABLE.CREATE.GW_CMDS.gw-agent-n1",
        "$JS.API.CONSUMER.INFO.GW_CMDS.gw-agent-n1",
        "$JS.API.CONSUMER.MSG.NEXT.GW_CMDS.gw-agent-n1",
        "$JS.API.STREAM.MSG.GET.GW_CMDS",
        "$JS.API.DIRECT.GET.GW_CMDS",
        "$JS.API.STREAM.DELETE.GW_EVENTS",
        "$JS.API.STREAM.PURGE.GW_EVENTS",
        "$JS.API.STREAM.MSG.DELETE.GW_EVENTS",
        "$JS.API.CONSUMER.CREATE.GW_DLQ",
    ):
        await n2.publish_refused(subject)
    update = {"name": "GW_EVENTS", "subjects": ["gw.evt.>"], "max_msgs": 3}
    await n2.publish_refused("$JS.API.STREAM.UPDATE.GW_EVENTS", json.dumps(update).encode())
    own = "$JS.API.CONSUMER.CREATE.GW_CMDS.gw-agent-n2.gw.cmd.n2"  # its own: allowed, but
    for body in ({"filter_subject": "gw.cmd.n1"}, {"filter_subjects": ["gw.cmd.n1"]}):
        config = {"name": "gw-agent-n2", "ack_policy": "explicit", **body}
        request = json.dumps({"stream_name": "GW_CMDS", "config": config}).encode()
        answer = json.loads((await n2.nc.request(own, request, timeout=3)).data)
        assert answer["error"]["err_code"] in (10131, 10137)  # ...the subject pins the filter
    with pytest.raises(EventLogError, match=r"cannot consume gw\.cmd\.n1"):  # the real adapter
        async for _ in JetStreamCommandBus(n2.nc, timeout_s=0.5).receive("n1"):
            pass
    for subject in ("_INBOX.>", "_INBOX.node-n1.>", "gw.cmd.n1", "gw.hb.*"):
        await n2.nc.subscribe(subject)
        await n2.refused("subscription to", subject)

    # n2 still gets its own command, with its env, and only that one.
    with anyio.fail_after(10):
        async for received in JetStreamCommandBus(n2.nc, poll_s=0.2).receive("n2"):
            assert isinstance(received.command, RunCommand)
            assert (received.command.node, received.command.env) == ("n2", secret)
            await received.ack()
            break
    assert await elog.last_seq() == events_before
    info = await engine.nc.jetstream().stream_info(wire.EVENTS_STREAM)
    assert info.config.max_msgs in (None, -1) and info.state.messages == events_before
    cmds = (await engine.nc.jetstream().stream_info(wire.COMMANDS_STREAM)).state
    assert cmds.last_seq == cmds_before.last_seq  # nothing was added to GW_CMDS
    assert_clean(engine, n1)


async def test_api_reader_operator_and_users(cluster: Cluster) -> None:
    engine = cluster.conns[0]
    await log_of(engine).append(ev.task_subject("t"), [pending("t")])
    await JetStreamDeadLetters(engine.nc).dead_letter(
        stored_event(1, "gw.evt.task.t.engine", b"junk", {}), "bad"
    )
    api = await cluster.conn("api")
    alog = log_of(api)
    await read_everything(alog)
    await alog.append(ev.task_subject("T"), [submitted("T")], 0)
    asked: list[str] = []

    async def answer(msg: Any) -> None:
        asked.append(msg.subject)
        await api.nc.publish(msg.reply, json.dumps({"principal": msg.subject}).encode())

    await api.nc.subscribe("gw.api.*.task.*", queue=auth.API_QUEUE, cb=answer)
    await api.nc.flush()

    reader = await cluster.conn("reader")
    rlog = log_of(reader)
    await read_everything(rlog)
    assert len(await JetStreamDeadLetters(reader.nc).read_all()) == 1
    names = {info.config.name for info in await reader.nc.jetstream().streams_info()}
    assert names == {wire.EVENTS_STREAM, wire.COMMANDS_STREAM, DLQ_STREAM}
    for verb in ("get", "list"):
        await reader.nc.request(f"gw.api.reader.task.{verb}", b"{}", timeout=3)

    operator = await cluster.conn("operator")
    olog = log_of(operator)
    await read_everything(olog)
    restored = ev.GpuRestored(
        id=new_id(), at=AT, actor="api:op", gpu_uuid="G", node="n1", reason="r"
    )
    await olog.append(ev.gpu_subject("G"), [restored], await olog.last_seq(ev.gpu_subject("G")))
    for verb in ("create", "cancel", "get", "list"):
        await operator.nc.request(f"gw.api.operator.task.{verb}", b"{}", timeout=3)

    alice = await cluster.conn("user-alice")
    reply = await alice.nc.request("gw.api.user-alice.task.create", b"{}", timeout=3)
    assert json.loads(reply.data) == {"principal": "gw.api.user-alice.task.create"}
    assert "gw.api.reader.task.list" in asked and "gw.api.operator.task.cancel" in asked
    assert_clean(engine, api, reader, operator, alice)

    end = await alog.last_seq()
    await api.publish_refused("gw.evt.task.T.engine", ev.encode(pending("T")))
    await api.publish_refused("gw.evt.node.n1.node.n1")
    await api.nc.subscribe("gw.api.*.task.*")  # only in its queue group
    await api.refused("subscription to", "gw.api.*.task.*")
    for subject in ("gw.evt.task.T.api", "gw.evt.gpu.G.op", "gw.evt.task.T.engine"):
        await reader.publish_refused(subject, ev.encode(submitted("T")))
    await reader.publish_refused("gw.api.reader.task.create")  # reads only
    await reader.publish_refused("gw.api.operator.task.list")  # not as someone else
    await operator.publish_refused("gw.evt.gpu.G.engine")
    await operator.publish_refused("gw.api.user-alice.task.cancel")
    for subject in ("gw.api.user-bob.task.create", "$JS.API.INFO", "gw.evt.task.T.api"):
        await alice.publish_refused(subject)
    await alice.nc.subscribe("_INBOX.operator.>")
    await alice.refused("subscription to", "_INBOX.operator.>")
    assert await alog.last_seq() == end


async def test_only_admin_changes_or_deletes_a_stream(cluster: Cluster) -> None:
    others = [cluster.conns[0]] + [
        await cluster.conn(p) for p in ("api", "node-n1", "reader", "operator", "user-alice")
    ]
    config = json.dumps({"name": DLQ_STREAM, "subjects": ["gw.dlq"], "description": "x"})
    for conn in others:
        await conn.publish_refused(f"$JS.API.STREAM.UPDATE.{DLQ_STREAM}", config.encode())
        await conn.publish_refused(f"$JS.API.STREAM.DELETE.{DLQ_STREAM}")
    admin = await cluster.conn("admin")
    js = admin.nc.jetstream()
    info = await js.stream_info(DLQ_STREAM)
    info.config.description = "changed by admin"
    assert (await js.update_stream(info.config)).config.description == "changed by admin"
    assert await js.delete_stream(DLQ_STREAM)
    assert_clean(admin)


# --- gpuwarden up ------------------------------------------------------------------------


async def start_up(data: Path, *extra: str) -> tuple[str, Callable[[], Any]]:
    up = await anyio.open_process(
        [*CLI, "--data-dir", str(data), "up", "--runtime", "sim", *extra],
        stderr=subprocess.PIPE,
    )
    assert up.stdout is not None
    with anyio.fail_after(20):
        url = (await up.stdout.receive()).decode().strip()
    assert url.startswith("nats://127.0.0.1:")

    async def stop() -> bytes:
        up.send_signal(signal.SIGTERM)
        with anyio.fail_after(15):
            assert await up.wait() == 0
        assert up.stderr is not None
        err = b""
        with anyio.move_on_after(2):
            async for chunk in up.stderr:
                err += chunk
        await up.aclose()
        return err

    return url, stop


async def test_up_runs_with_authorization_by_default(tmp_path: Path) -> None:
    data = tmp_path / "data"
    url, stop = await start_up(data)
    try:
        with pytest.raises(EventLogError, match=r"(?i)refused a client without credentials"):
            await connect(url, deadline_s=5)
        creds = data / "auth"
        assert mode(creds) == 0o700 and mode(creds / "node-local.creds") == 0o600
        nc = await connect(url, creds=str(creds / "operator.creds"))
        try:
            log = JetStreamEventLog(nc)
            with anyio.fail_after(15):  # the local agent, as node-local, registered itself
                async for record in log.subscribe(1):
                    if isinstance(record.event, ev.NodeRegistered):
                        assert record.subject == "gw.evt.node.local.node.local"
                        break
            # The task API answers on its own connection, as the api principal.
            reply = await nc.request("gw.api.operator.task.list", b"{}", timeout=5)
            assert isinstance(json.loads(reply.data), dict)
        finally:
            await nc.close()
        here = await gw("--data-dir", str(data), "events", "--type", "node.registered")
        assert here.returncode == 0, here.stderr  # found the operator's credentials itself
        assert b"node.registered" in here.stdout
        bare = await gw("--nats", url, "events")
        assert bare.returncode == 2
        assert b"pass --creds FILE" in bare.stderr and b"operator.creds" in bare.stderr
    finally:
        err = await stop()
    assert b"authorization on" in err and b"WARNING" not in err
    log = (data / "nats" / "nats.log").read_text()
    assert "authentication error" in log  # the clients without credentials
    violations = re.findall(r".*(?:Publish|Subscription) Violation.*", log)
    assert violations == []  # engine, API and agent each did their work within their rights


async def test_up_insecure_warns_and_lets_anyone_in(tmp_path: Path) -> None:
    url, stop = await start_up(tmp_path / "data", "--insecure")
    try:
        nc = await connect(url, deadline_s=5)
        await nc.close()
    finally:
        err = await stop()
    assert b"WARNING: --insecure" in err and b"WITHOUT authorization" in err
    assert not (tmp_path / "data" / "auth").exists()


def test_engine_credentials_alone_cannot_serve_the_api(tmp_path: Path) -> None:
    from dataclasses import replace

    from gpuwarden.engine.cli.config import ConnectionConfig, EngineConfig
    from gpuwarden.engine.cli.serve import _check_api_creds

    auth.generate(tmp_path)
    config = EngineConfig(
        connection=ConnectionConfig(creds=str(tmp_path / "engine.creds"), nats="nats://x")
    )
    with pytest.raises(auth.AuthError, match="--api-creds FILE"):
        _check_api_creds(config)
    _check_api_creds(replace(config, api_creds=str(tmp_path / "api.creds")))
    _check_api_creds(replace(config, serve_api=False))
