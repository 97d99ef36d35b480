"""The drill library through the real engine and a real nats-server, and the CLI verdicts.

Every `scenarios/*.toml` must pass on the engine as it is: a drill that fails here is
either a wrong expectation or an engine bug, and either must be seen.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import anyio
import pytest
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.scenario_file import load_scenario, parse_scenario
from gpuwarden.adapters.scenario_runner import ScenarioResult, run_scenario
from gpuwarden.engine.cli import main
from gpuwarden.projections.export import read_jsonl

LIBRARY = sorted((Path(__file__).parent.parent / "scenarios").glob("*.toml"))
WALL_LIMIT_S = 3.0  # "well under a second" on an idle machine; this one is shared

ONE_NODE = """
[[nodes]]
name = "node-a"
gpus = 1
"""


def drill(body: str, name: str = "test drill") -> str:
    return f'name = "{name}"\n{ONE_NODE}{body}'


@pytest.mark.parametrize("path", LIBRARY, ids=[p.stem for p in LIBRARY])
async def test_library_drill_passes(path: Path) -> None:
    result = await run_scenario(load_scenario(path))
    failed = [e.message for e in result.expectations if not e.passed]
    assert not failed, f"{path.name}: {failed}"
    assert result.passed and result.expectations
    assert not result.notes, result.notes
    assert result.wall_s < WALL_LIMIT_S, f"{path.name} took {result.wall_s:.2f}s of wall time"


def test_the_library_is_all_there() -> None:
    assert len(LIBRARY) >= 28


async def test_a_wrong_expectation_fails_with_expected_and_seen() -> None:
    text = drill(
        """
[[steps]]
at = 0
submit = { task = "t1", gpus = 1, image = "i", command = ["x"] }
[[steps]]
at = 10
exit = { task = "t1", code = 1 }
[[expect]]
task = "t1"
state = "completed"
faults = ["user_error"]
"""
    )
    result = await run_scenario(parse_scenario(text, "wrong.toml"))
    assert not result.passed
    by_key = {e.key: e for e in result.expectations}
    assert by_key["faults"].passed
    state = by_key["state"]
    assert not state.passed and (state.expected, state.seen) == ("completed", "failed")
    assert "expected state completed, saw failed" in state.message
    assert result.tasks["t1"].state == "failed"
    assert result.gpus["node-a/0"].task_id is None


async def test_a_step_that_cannot_apply_is_a_note_not_a_crash() -> None:
    text = drill(
        """
[[steps]]
at = 0
submit = { task = "t1", gpus = 1, image = "i", command = ["x"] }
[[steps]]
at = 0
submit = { task = "t2", gpus = 1, image = "i", command = ["x"] }
[[steps]]
at = 5
exit = { task = "t2", code = 0 }
[[expect]]
task = "t2"
state = "pending"
"""
    )
    result = await run_scenario(parse_scenario(text, "note.toml"))
    assert result.passed
    assert result.notes == ["steps[2] exit at 5s: task t2 has no running container; step skipped"]


async def test_drills_share_a_server_without_seeing_each_other(
    nats_server: EmbeddedNats,
) -> None:
    paths = [LIBRARY[1], LIBRARY[10]]
    results: dict[str, ScenarioResult] = {}

    async def play(path: Path) -> None:
        results[path.name] = await run_scenario(load_scenario(path), nats_url=nats_server.url)

    async with anyio.create_task_group() as tg:
        for path in paths:
            tg.start_soon(play, path)
    for path in paths:
        result = results[path.name]
        assert result.passed, [e.message for e in result.expectations if not e.passed]
        assert set(result.tasks) == set(load_scenario(path).task_ids)


def test_cli_json_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "log.jsonl"
    path = LIBRARY[6]  # xid 48: a rebuild, a quarantine
    started = time.perf_counter()
    assert main(["scenario", "run", str(path), "--json", "--export", str(out)]) == 0
    assert time.perf_counter() - started < 10
    row = json.loads(capsys.readouterr().out.strip())
    assert row["name"] == load_scenario(path).name and row["passed"] is True
    assert all(e["passed"] and "seen" in e for e in row["expectations"])
    assert row["tasks"]["t1"]["attempts"] == 2
    assert row["gpus"]["node-a/0"]["quarantined"] is True
    records = list(read_jsonl(out))
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert records[0].subject == "gw.evt.node.node-a.node.node-a"
    kinds = [type(r.event).__name__ for r in records]
    assert "GpuQuarantined" in kinds and "RebuildDecided" in kinds


def test_cli_failed_expectation_exits_1_and_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        drill(
            """
[[steps]]
at = 0
submit = { task = "t1", gpus = 1, image = "i", command = ["x"] }
[[expect]]
task = "t1"
attempts = 3
"""
        )
    )
    assert main(["scenario", "run", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "task t1: expected attempts 3, saw 1" in out


def test_cli_malformed_file_exits_2_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "typo.toml"
    bad.write_text(drill('[[steps]]\nat = 0\nsubmitt = { task = "t1" }\n'))
    assert main(["scenario", "run", str(bad), str(LIBRARY[0])]) == 2
    captured = capsys.readouterr()
    assert f"{bad}: steps[0]: unknown key 'submitt'" in captured.err
    assert "PASS" not in captured.out, "no drill runs when a file is malformed"


async def test_a_hung_process_on_a_failed_gpu_is_killed_by_the_engine() -> None:
    """Drill 29 through the real engine, agent and log: nothing in the drill ends the
    first container, so its exit can only come from the engine's stop, sent because of
    the classification (its causation) after the Xid's window closed."""
    from gpuwarden.engine.core import events as ev

    path = next(p for p in LIBRARY if p.name.startswith("29-"))
    result = await run_scenario(load_scenario(path))
    assert result.passed
    events = [r.event for r in result.records]
    [classified] = [e for e in events if isinstance(e, ev.FaultClassified)]
    [fault] = [e for e in events if isinstance(e, ev.GpuFault)]
    assert (classified.fault, classified.attempt) == ("gpu_hardware", 1)
    assert classified.at - fault.at >= timedelta(seconds=1)  # the window, in virtual time
    [killed] = [e for e in events if isinstance(e, ev.ContainerExited) and e.attempt == 1]
    assert killed.causation_id == classified.id and killed.signal == 9  # no grace period
    assert events.index(killed) > events.index(classified)
