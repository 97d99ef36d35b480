"""`gpuwarden replay` on logs the real engine wrote to a real nats-server.

One history is recorded per module (a sync fixture with its own event loop and its own
server): nodes, submissions, exits of several kinds, an Xid, an OOM, an engine restart
(a reconcile round), a node lost through heartbeat silence, time on a VirtualClock.
Each test reads that log, or an exported copy of it, and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.engine.cli import main
from gpuwarden.engine.clock import VirtualClock
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.liveness import Liveness
from gpuwarden.engine.core.policy import DEFAULT_POLICY, Policy
from gpuwarden.engine.core.wire import BASIS_HEADER, POLICY_HEADER, TRIGGER_HEADER, policy_digest
from gpuwarden.engine.ports import StoredEvent
from gpuwarden.engine.runtime import Engine
from gpuwarden.projections import replay as rp
from gpuwarden.projections.export import read_jsonl, write_jsonl
from gpuwarden.projections.replay import summarize

from tests.supervisor_driver import Driver

T0 = datetime(2026, 3, 1, tzinfo=UTC)
ALIVE = ("n1", "n2")  # nodes that keep beating; n3 goes silent at the end


@dataclass
class History:
    records: list[StoredEvent]
    file: Path
    live_summary: dict[str, Any]  # replayed from the live log
    engine_summary: dict[str, Any]  # the running engine's own state at the end


class _Recorder:
    def __init__(self, log: JetStreamEventLog, bus: JetStreamCommandBus) -> None:
        self.log, self.bus = log, bus
        self.clock = VirtualClock(T0)
        self.n = 0
        self.engine = self._engine()
        self.task: asyncio.Task[None] | None = None

    def _engine(self) -> Engine:
        return Engine(self.log, self.bus, self.clock, liveness=Liveness(30))

    async def start(self) -> None:
        self.task = asyncio.create_task(self.engine.run())
        with anyio.fail_after(10):
            await self.engine.caught_up.wait()

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def emit(self, cls: type[Any], **fields: Any) -> None:
        self.n += 1
        fields.setdefault("actor", "test")
        event = cls(id=f"obs{self.n:04d}", at=self.clock.now(), **fields)
        await self.log.append(ev.subject_of(event), [event])

    async def settle(self) -> None:
        await self.engine.wait_idle(timeout_s=10)

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        for node in ALIVE:  # before the engine runs again: only n3 falls silent
            if self.engine.liveness is not None:
                self.engine.liveness.beat(node, self.clock.now())
        await self.settle()

    async def node(self, name: str, gpus: int, model: str = "H100") -> None:
        infos = tuple(ev.GpuInfo(uuid=f"{name}/{i}", index=i, model=model) for i in range(gpus))
        await self.emit(ev.NodeRegistered, node=name, runtime="sim", gpus=infos)

    async def submit(self, task: str, **fields: Any) -> None:
        await self.emit(
            ev.TaskSubmitted, task_id=task, name=task, image="i", command=("x",), **fields
        )

    async def exit(self, task: str, code: int, **fields: Any) -> None:
        current = self.engine.state.tasks[task].current
        assert current is not None
        await self.emit(
            ev.ContainerExited, task_id=task, attempt=current.n, node=current.node,
            container_id=f"c-{task}-{current.n}", exit_code=code, **fields,
        )  # fmt: skip

    def gpu_of(self, task: str) -> str:
        current = self.engine.state.tasks[task].current
        assert current is not None
        return current.gpu_uuids[0]


async def _play(r: _Recorder) -> None:
    await r.start()
    await r.node("n1", 2)
    await r.node("n2", 2)
    for task in ("ok", "user1", "user2", "pre", "xid", "oom"):
        await r.submit(task)  # six tasks on four GPUs: two wait
    await r.settle()
    await r.exit("ok", 0)
    await r.exit("user1", 1)
    await r.exit("user2", 2)
    await r.exit("pre", 137, signal=9)
    await r.advance(1.5)  # evidence windows close: fail, fail, rebuild; waiting tasks placed
    gpu = r.gpu_of("xid")
    await r.emit(ev.GpuFault, gpu_uuid=gpu, node=gpu.split("/")[0], kind="xid", xid=48)
    await r.exit("xid", 1)
    await r.advance(1.5)
    await r.advance(10)  # backoffs over: rebuilds placed
    await r.exit("oom", 137, oom_killed=True)
    await r.advance(1.5)
    await r.stop()
    await r.exit("pre", 0)  # while no engine runs: the restart reconciles it
    r.engine = r._engine()
    await r.start()
    await r.settle()
    await r.node("n3", 1, model="A100")
    await r.submit("lost", gpu_model="A100")
    await r.settle()
    await r.advance(31)  # n3 silent past its timeout: node.lost, its task rebuilt
    await r.advance(11)
    await r.stop()


async def _record(tmp: Path) -> History:
    server = EmbeddedNats(tmp / "nats-data")
    await server.start()
    try:
        nc = await connect(server.url, name="replay-test")
        try:
            log = JetStreamEventLog(nc, heartbeat_s=0.5, timeout_s=3.0)
            await log.ensure_streams()
            bus = JetStreamCommandBus(nc, ack_wait_s=1.0, poll_s=0.2, timeout_s=3.0)
            recorder = _Recorder(log, bus)
            await _play(recorder)
            records = [r async for r in log.read()]
            path = tmp / "log.jsonl"
            with open(path, "w", encoding="utf-8") as handle:  # noqa: ASYNC230
                await write_jsonl(log, handle)
            live = await rp.state_at(log.read())
            engine_summary = summarize(recorder.engine.state, live.seq, live.at)
            return History(records, path, live.summary, engine_summary)
        finally:
            await nc.close()
    finally:
        await server.stop()


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return asyncio.run(_record(tmp_path_factory.mktemp("replay")))


# --- helpers -----------------------------------------------------------------------


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(args)
    out, err = capsys.readouterr()
    return status, out, err


def first(history: History, cls: type[Any], task: str, **match: Any) -> StoredEvent:
    return next(
        r
        for r in history.records
        if isinstance(r.event, cls)
        and getattr(r.event, "task_id", None) == task
        and all(getattr(r.event, k) == v for k, v in match.items())
    )


def rewrite(history: History, tmp: Path, seq: int, **changes: Any) -> Path:
    """A copy of the exported log with one recorded event's fields changed."""
    out = tmp / "altered.jsonl"
    lines = []
    for text in history.file.read_text().splitlines():
        row = json.loads(text)
        if row["seq"] == seq:
            row["event"].update(changes)
        lines.append(json.dumps(row))
    out.write_text("\n".join(lines) + "\n")
    return out


# --- the real engine's log re-derives ------------------------------------------------


async def test_every_decision_of_the_real_engine_re_derives(history: History) -> None:
    result = await rp.check(history.records)
    assert result.mismatches == []
    assert result.unverifiable == []
    triggers = {r.headers[TRIGGER_HEADER] for r in history.records if BASIS_HEADER in r.headers}
    assert {"timer", "reconcile"} <= triggers, "history lacks timer or reconcile rounds"
    assert result.rounds >= 10
    assert result.recorded_policies == {policy_digest(DEFAULT_POLICY): result.rounds}


async def test_the_history_has_the_kinds_of_decisions_it_claims(history: History) -> None:
    events = [r.event for r in history.records if r.event is not None]
    faults = {e.fault for e in events if isinstance(e, ev.FaultClassified)}
    assert {"completed", "user_error", "preempted", "gpu_hardware", "container_oom"} <= faults
    assert {"node_lost"} <= faults
    lost = [e for e in events if isinstance(e, ev.NodeLost)]
    assert [e.node for e in lost] == ["n3"] and lost[0].actor == "engine"


async def test_decisions_carry_the_deciding_policy_digest(history: History) -> None:
    decisions = [r for r in history.records if BASIS_HEADER in r.headers]
    assert decisions
    assert {r.headers[POLICY_HEADER] for r in decisions} == {policy_digest(DEFAULT_POLICY)}
    other = Policy(rebuild_on=frozenset({"user_error"}))
    assert policy_digest(other) != policy_digest(DEFAULT_POLICY)
    assert policy_digest(Policy()) == policy_digest(DEFAULT_POLICY)


def test_check_cli_passes_on_the_exported_log(
    history: History, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = cli(["replay", "--from-file", str(history.file), "--check"], capsys)
    assert status == 0, out
    rounds = sum(
        1
        for prev, r in zip([None, *history.records], history.records, strict=False)
        if BASIS_HEADER in r.headers and (prev is None or rp.round_key(prev) != rp.round_key(r))
    )
    assert out.splitlines()[0] == f"{rounds} rounds re-derived, 0 mismatches"


def test_an_altered_backoff_is_reported_at_exactly_its_round(
    history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = first(history, ev.RebuildDecided, "pre")
    assert isinstance(record.event, ev.RebuildDecided)
    earlier = record.event.not_before.replace(microsecond=1).isoformat()  # still due in time
    altered = rewrite(history, tmp_path, record.seq, not_before=earlier)
    status, out, _ = cli(["replay", "--from-file", str(altered), "--check", "--json"], capsys)
    assert status == 1
    [mismatch] = json.loads(out)["mismatches"]
    assert mismatch["seq"] == record.seq
    assert mismatch["recorded"]["not_before"].startswith(earlier[:26])
    assert mismatch["derived"] == json.loads(json.dumps(ev.to_builtins(record.event), default=str))


def test_an_altered_failure_reason_is_reported_in_text(
    history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = first(history, ev.TaskFailed, "user1")
    altered = rewrite(history, tmp_path, record.seq, reason="policy_rule", rule=0)
    status, out, _ = cli(["replay", "--from-file", str(altered), "--check"], capsys)
    assert status == 1
    lines = out.splitlines()
    assert lines[0].endswith("rounds re-derived, 1 mismatches")
    assert lines[1].startswith(f"mismatch at seq {record.seq} ")
    assert '"reason": "policy_rule"' in lines[2] and lines[2].lstrip().startswith("recorded:")
    assert '"reason": "not_target_fault"' in lines[3]


async def test_an_engine_decision_without_headers_is_unverifiable_not_a_mismatch(
    history: History,
) -> None:
    last = history.records[-1]
    stray = ev.TaskCancelled(
        id="stray", at=T0, actor="engine", correlation_id="ok", task_id="ok", reason="x"
    )
    extra = StoredEvent(seq=last.seq + 1, subject=ev.subject_of(stray), event=stray)
    result = await rp.check([*history.records, extra])
    assert result.mismatches == []
    assert [(u.seq, u.type) for u in result.unverifiable] == [(last.seq + 1, "task.cancelled")]
    assert "without Gw-Basis/Gw-Trigger" in result.unverifiable[0].reason


async def test_a_log_checked_under_another_policy_says_so(history: History) -> None:
    other = Policy(max_rebuilds=0)
    result = await rp.check(history.records, other)
    assert result.other_policies == {policy_digest(DEFAULT_POLICY): result.rounds}
    assert result.mismatches, "no rebuild allowed: the recorded rebuilds cannot re-derive"


# --- what another policy would have done ---------------------------------------------


def test_diff_with_user_error_rebuilt_lists_exactly_the_user_error_failures(
    history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(
        'rebuild_on = ["gpu_hardware", "node_lost", "runtime_error", "preempted", "user_error"]\n'
    )
    failed_user = {
        r.event.task_id
        for r in history.records
        if isinstance(r.event, ev.TaskFailed) and r.event.fault == "user_error"
    }
    assert failed_user == {"user1", "user2"}
    args = ["replay", "--from-file", str(history.file), "--policy", str(policy), "--diff"]
    status, out, _ = cli([*args, "--json"], capsys)
    assert status == 0
    divergences = json.loads(out)["divergences"]
    assert {d["task_id"] for d in divergences} == failed_user
    assert {d["change"] for d in divergences} == {"rebuilt"}
    for d in divergences:
        assert d["seq"] == first(history, ev.TaskFailed, d["task_id"]).seq
        assert [v["kind"] for v in d["recorded"]] == ["failed"]
        assert [(v["kind"], v["counted"]) for v in d["alternative"]] == [("rebuilt", True)]
    status, out, _ = cli(args, capsys)
    assert status == 0
    assert "would have been rebuilt (2):" in out
    assert "user1" in out and "user2" in out and "oom" not in out


async def test_diff_under_the_same_policy_finds_nothing(history: History) -> None:
    result = await rp.diff(history.records, DEFAULT_POLICY, Policy())
    assert result.divergences == [] and result.rounds >= 10


async def test_diff_with_no_rebuilds_fails_the_rebuilt_tasks_once_each(history: History) -> None:
    result = await rp.diff(history.records, DEFAULT_POLICY, Policy(max_rebuilds=0))
    rebuilt = {r.event.task_id for r in history.records if isinstance(r.event, ev.RebuildDecided)}
    assert sorted(result.tasks("failed")) == sorted(rebuilt)
    assert len(result.divergences) == len(rebuilt)  # first divergence only, per task


# --- time travel ---------------------------------------------------------------------


def test_exported_file_replays_to_the_live_state(history: History) -> None:
    from_file = asyncio.run(rp.state_at(read_jsonl(history.file)))
    assert from_file.summary == history.live_summary
    assert history.live_summary == history.engine_summary
    assert from_file.seq == history.records[-1].seq


def _task_row(out: str, task: str) -> dict[str, Any]:
    summary = json.loads(out)
    [row] = [t for t in summary["tasks"] if t["task_id"] == task]
    return row


def test_until_seq_shows_a_task_running_before_its_exit_and_failed_after(
    history: History, capsys: pytest.CaptureFixture[str]
) -> None:
    exited = first(history, ev.ContainerExited, "user1")
    failed = first(history, ev.TaskFailed, "user1")
    base = ["replay", "--from-file", str(history.file), "--json", "--until-seq"]
    status, out, _ = cli([*base, str(exited.seq - 1)], capsys)
    assert status == 0 and json.loads(out)["seq"] == exited.seq - 1
    before = _task_row(out, "user1")
    assert (before["status"], before["attempt"]) == ("running", 1)
    assert before["gpus"] and before["fault"] is None
    status, out, _ = cli([*base, str(failed.seq)], capsys)
    after = _task_row(out, "user1")
    assert (after["status"], after["fault"], after["reason"]) == (
        "failed",
        "user_error",
        "not_target_fault",
    )


def test_until_time_and_text_output(history: History, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cli(
        ["replay", "--from-file", str(history.file), "--until-time", T0.isoformat()], capsys
    )
    assert status == 0
    assert out.startswith("state after sequence ")
    table = out.split("\n\n")[1].splitlines()
    assert table[0].split() == [
        "TASK", "STATE", "ATTEMPT", "NODE", "GPUS", "REBUILDS", "FAULT", "REASON",
    ]  # fmt: skip
    states = {line.split()[0]: line.split()[1] for line in table[1:]}
    assert states["ok"] == "completed" and states["user1"] == "running"
    assert "lost" not in states


# --- errors --------------------------------------------------------------------------


def test_errors_name_the_file_the_line_and_the_key(
    history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = cli(["replay", "--from-file", str(tmp_path / "none.jsonl")], capsys)
    assert status == 2 and "none.jsonl: no such file" in err
    bad = tmp_path / "bad.jsonl"
    lines = history.file.read_text().splitlines()
    bad.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    status, _, err = cli(["replay", "--from-file", str(bad), "--check"], capsys)
    assert status == 2 and f"{bad}:2:" in err
    policy = tmp_path / "p.toml"
    policy.write_text("max_rebuilds = 3\nbackoff_inital_s = 1\n")
    args = ["replay", "--from-file", str(history.file), "--policy", str(policy), "--diff"]
    status, _, err = cli(args, capsys)
    assert status == 2 and "p.toml: backoff_inital_s: unknown key" in err
    status, _, err = cli(["replay", "--from-file", str(history.file), "--diff"], capsys)
    assert status == 2 and "--diff needs --policy" in err


# --- the scenario library ------------------------------------------------------------

DRILLS = (
    "02-user-error-fails-and-frees-gpu.toml",
    "07-xid48-rebuild-other-gpu.toml",
    "11-node-lost-and-recovered.toml",
    "16-rules-exit-codes-in-first-match.toml",
    "19-budget-exhausted.toml",
    "28-start-error-on-rebuild.toml",
)
SCENARIOS = Path(__file__).parent.parent / "scenarios"


def _scenario_runner_ready() -> bool:
    if importlib.util.find_spec("gpuwarden.adapters.scenario_runner") is None:
        return False
    from gpuwarden.engine.cli import build_parser

    parser = build_parser()
    return any("scenario" in (getattr(a, "choices", None) or {}) for a in parser._actions)


def _toml(value: Any) -> str:
    """Just enough TOML for a policy table: scalars, lists, inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"


@pytest.mark.parametrize("drill", DRILLS)
def test_scenario_drill_logs_re_derive(
    drill: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not _scenario_runner_ready():
        pytest.skip("adapters/scenario_runner.py and `gpuwarden scenario run` have not landed")
    from gpuwarden.adapters.scenario_file import load_scenario

    path = SCENARIOS / drill
    export = tmp_path / "drill.jsonl"
    status, out, err = cli(["scenario", "run", str(path), "--export", str(export)], capsys)
    assert status == 0, out + err
    policy = tmp_path / "policy.toml"
    table = load_scenario(path).policy
    policy.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in table.items()))
    args = ["replay", "--from-file", str(export), "--check", "--policy", str(policy)]
    status, out, _ = cli(args, capsys)
    assert status == 0, out
    lines = out.splitlines()
    assert lines[0].endswith(" 0 mismatches") and not lines[0].startswith("0 rounds"), out
    assert not [line for line in lines[1:] if line.startswith(("note:", "unverifiable:"))], out


# --- a round larger than one atomic batch ---------------------------------------------


async def test_a_round_split_over_several_batches_re_derives_as_one(
    event_log: JetStreamEventLog, command_bus: JetStreamCommandBus
) -> None:
    r = _Recorder(event_log, command_bus)
    gpus = tuple(ev.GpuInfo(uuid=f"big/{i}", index=i, model="H100") for i in range(300))
    await r.emit(ev.NodeRegistered, node="big", runtime="sim", gpus=gpus)
    submissions = [
        ev.TaskSubmitted(id=f"s{i:03d}", at=T0, actor="test", task_id=f"t{i:03d}", name="t",
                         image="i", command=("x",))
        for i in range(300)
    ]  # fmt: skip
    for event in submissions:  # no engine yet: its startup sweep places all at once
        await event_log.append(ev.subject_of(event), [event])
    await r.start()
    await r.settle()
    await r.stop()
    records = [x async for x in event_log.read()]
    decisions = [x for x in records if x.headers.get(TRIGGER_HEADER) == "reconcile"]
    assert len(decisions) == 600 and len({x.headers.get("Nats-Batch-Id") for x in decisions}) > 1
    result = await rp.check(records)
    assert (result.rounds, result.mismatches, result.unverifiable) == (1, [], [])
    last = decisions[-1]
    assert isinstance(last.event, ev.TaskScheduled)
    changed = msgspec.structs.replace(last.event, node="elsewhere")
    tampered = [x if x is not last else msgspec.structs.replace(x, event=changed) for x in records]
    [mismatch] = (await rp.check(tampered)).mismatches
    assert (mismatch.seq, mismatch.first_seq, mismatch.last_seq) == (
        last.seq,
        decisions[0].seq,
        last.seq,
    )


# --- pure: logs from the in-memory driver ---------------------------------------------


def driver_records(d: Driver) -> list[StoredEvent]:
    """The driver's log as stored records, its decisions with basis/trigger headers."""
    headers: dict[int, dict[str, str]] = {}
    for basis, trigger, group in d.decisions:
        for event in group:
            headers[id(event)] = {BASIS_HEADER: str(basis), TRIGGER_HEADER: trigger}
    return [
        StoredEvent(seq=n, subject=ev.subject_of(e), event=e, headers=headers.get(id(e), {}))
        for n, e in enumerate(d.log, start=1)
    ]


def driven() -> Driver:
    d = Driver()
    d.node("n1", 2)
    for task in ("a", "b", "c"):
        d.submit(task)
    d.exit("a", 1)
    d.xid(d.attempt("b").gpu_uuids[0], 79)
    d.advance(2)
    d.advance(30)
    return d


async def test_a_driver_log_re_derives_round_by_round() -> None:
    d = driven()
    result = await rp.check(driver_records(d))
    assert (result.rounds, result.mismatches, result.unverifiable) == (len(d.decisions), [], [])
    assert result.events == len(d.log)


async def test_progress_reports_the_records_read() -> None:
    records = driver_records(driven())  # shorter than PROGRESS_EVERY: only the final count
    seen: list[int] = []
    await rp.check(records, progress=seen.append)
    assert seen == [len(records)]


async def test_a_round_whose_trigger_is_not_in_the_log_is_unverifiable() -> None:
    records = driver_records(driven())
    victim = next(r for r in records if r.headers.get(TRIGGER_HEADER, "timer") != "timer")
    key = rp.round_key(victim)
    bad = [
        msgspec.structs.replace(r, headers={**r.headers, TRIGGER_HEADER: "nope"})
        if rp.round_key(r) == key
        else r
        for r in records
    ]
    result = await rp.check(bad)
    assert result.mismatches == []
    [skipped] = result.unverifiable
    assert skipped.seq == victim.seq and "trigger nope is not in the log" in skipped.reason


async def test_a_limit_inside_a_round_leaves_that_round_unverified_not_mismatched() -> None:
    records = driver_records(driven())
    big = next(
        r for r, nxt in itertools.pairwise(records)
        if rp.round_key(r) is not None and rp.round_key(r) == rp.round_key(nxt)
    )  # fmt: skip
    result = await rp.check(records, until_seq=big.seq)
    assert result.mismatches == []
    [cut] = result.unverifiable
    assert "cut off by the replay limit" in cut.reason and cut.seq <= big.seq
    whole = await rp.check(records)
    assert result.rounds < whole.rounds


async def test_state_at_reads_async_and_sync_sources_alike() -> None:
    records = driver_records(driven())

    async def stream() -> AsyncIterator[StoredEvent]:
        for r in records:
            yield r

    sync, asyn = await rp.state_at(records, until_seq=5), await rp.state_at(stream(), until_seq=5)
    assert sync.seq == asyn.seq == 5 and sync.state == asyn.state
    with pytest.raises(rp.ReplayError):
        await rp.state_at(records, until_seq=1, until_time=T0)


# --- straight from NATS ---------------------------------------------------------------


def test_check_reads_the_log_from_nats_without_a_file(
    history: History, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str]
) -> None:
    async def copy() -> None:  # the recorded history, headers and all, into a fresh stream
        nc = await connect(nats_server.url, name="replay-copy")
        try:
            log = JetStreamEventLog(nc, timeout_s=3.0)
            await log.ensure_streams()
            for r in history.records:
                assert r.event is not None
                gw = {k: v for k, v in r.headers.items() if k.startswith("Gw-")}
                assert await log.append(r.subject, [r.event], headers=gw) == [r.seq]
        finally:
            await nc.close()

    asyncio.run(copy())
    status, out, _ = cli(["--nats", nats_server.url, "replay", "--check"], capsys)
    from_file = main(["replay", "--from-file", str(history.file), "--check"])
    expected, _ = capsys.readouterr()
    assert (status, from_file) == (0, 0) and out == expected
    status, out, _ = cli(["--nats", nats_server.url, "replay", "--json"], capsys)
    assert json.loads(out) == history.live_summary
