"""SCENARIOS.md promises checked through the real runner and CLI (review findings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gpuwarden.engine.cli import main

ONE_NODE = """
[[nodes]]
name = "node-a"
gpus = 2
"""
SUBMIT = """
[[steps]]
at = 0
submit = { task = "t1", gpus = 1, image = "i", command = ["x"] }
"""


def write(tmp_path: Path, body: str, name: str = "drill.toml") -> Path:
    path = tmp_path / name
    path.write_text(f'name = "review drill"\n{body}', encoding="utf-8")
    return path


def run_json(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, object]]:
    status = main(["scenario", "run", "--json", str(path)])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    result: dict[str, object] = json.loads(out[0])
    return status, result


def test_unknown_key_in_an_expectation_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "Unknown keys are an error that names the key and the file."
    path = write(tmp_path, ONE_NODE + SUBMIT + '[[expect]]\ntsk = "t1"\nstate = "running"\n')
    assert main(["scenario", "run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'tsk'" in err and str(path) in err, err
    assert len(err.strip().splitlines()) == 1


def test_run_for_lets_its_seconds_pass_beyond_the_tail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `run_for = {seconds}` lets virtual time pass: a backoff longer than the one-day
    # tail still runs out when the drill says to wait for it.
    body = (
        "[policy]\nbackoff_initial_s = 90000\nbackoff_max_s = 90000\n"
        + ONE_NODE
        + SUBMIT
        + '[[steps]]\nat = 10\npreempt = { task = "t1" }\n'
        + "[[steps]]\nat = 20\nrun_for = { seconds = 100000 }\n"
        + '[[expect]]\ntask = "t1"\nstate = "running"\nattempts = 2\n'
    )
    status, result = run_json(write(tmp_path, body), capsys)
    assert result["passed"] is True and status == 0, result["expectations"]
    assert float(result["virtual_s"]) >= 100020  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ("[policy]\nbackoff_initial_s = 1e300\nbackoff_max_s = 1e300\n", "backoff_initial_s"),
        ("[policy]\nnode_lost_after_s = 1e300\n", "node_lost_after_s"),
        ("[policy]\nevidence_window_s = 1e300\n", "evidence_window_s"),
    ],
)
def test_an_absurd_policy_duration_is_refused_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, where: str
) -> None:
    # Finite but beyond any datetime: the engine crashed on the first rebuild/deadline
    # with an OverflowError inside a task group ("ExceptionGroup: ..." and exit 2).
    drill = body + ONE_NODE + SUBMIT + '[[steps]]\nat = 5\npreempt = { task = "t1" }\n'
    path = write(tmp_path, drill + '[[expect]]\ntask = "t1"\nstate = "running"\n')
    assert main(["scenario", "run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"policy.{where}" in err and str(path) in err, err


def test_an_absurd_step_time_is_refused_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = ONE_NODE + SUBMIT + '[[steps]]\nat = 1e12\nexit = { task = "t1", code = 0 }\n'
    path = write(tmp_path, body + '[[expect]]\ntask = "t1"\nstate = "completed"\n')
    assert main(["scenario", "run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "steps[1].at" in err and str(path) in err, err
