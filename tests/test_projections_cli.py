"""The read-side commands, called as the CLI calls them, on a real SQLite file."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
from gpuwarden.engine.cli import query as cli
from gpuwarden.projections.errors import TaskNotFoundError
from gpuwarden.projections.export import read_jsonl

from tests.test_projections_log import ListLog, sample_log


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path)
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    return parser.parse_args(argv)


async def call(tmp_path: Path, *argv: str) -> str:
    args = parse("--data-dir", str(tmp_path), *argv)
    out = io.StringIO()
    runner = {
        "events": cli.run_events,
        "tasks": cli.run_tasks,
        "gpus": cli.run_gpus,
        "nodes": cli.run_nodes,
        "explain": cli.run_explain,
        "export": cli.run_export,
        "timeline": cli.run_timeline,
        "projections": cli.run_rebuild,
    }[args.command]
    assert await runner(args, ListLog(sample_log().stored), cli.store_path(args), out) == 0
    return out.getvalue()


def test_every_command_is_registered() -> None:
    args = parse("events", "--task", "t1", "--since", "2h", "--json")
    assert (args.task, args.since, args.json) == ("t1", "2h", True)
    for argv in (["tasks"], ["gpus", "--json"], ["nodes"], ["explain", "t1"],
                 ["export", "-o", "x"], ["timeline", "t1"], ["timeline", "--gpu", "G1"],
                 ["projections", "rebuild"]):  # fmt: skip
        assert callable(parse(*argv).handler)


async def test_events_filters_and_json(tmp_path: Path) -> None:
    text = await call(tmp_path, "events", "--task", "t2", "--type", "container.*")
    assert [line.split()[0] for line in text.splitlines()] == ["19"]
    lines = (await call(tmp_path, "events", "--gpu", "G1", "--json", "--limit", "2")).splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["seq"] for r in rows] == [11, 36]
    assert rows[0]["payload"]["type"] == "gpu.released"
    assert "2025" in (await call(tmp_path, "events", "--since", "2025-03-01T12:00:37Z"))


async def test_tables_and_json(tmp_path: Path) -> None:
    tasks = (await call(tmp_path, "tasks")).splitlines()
    assert tasks[0].split()[:4] == ["TASK", "NAME", "OWNER", "STATE"]
    assert tasks[2].split()[:4] == ["t2", "serve", "bob", "failed"]
    gpus = json.loads(await call(tmp_path, "gpus", "--json"))
    assert [g["uuid"] for g in gpus] == ["G1", "G2", "G3"] and gpus[0]["fault_count"] == 1
    nodes = (await call(tmp_path, "nodes")).splitlines()
    assert nodes[1].split()[:3] == ["n1", "docker", "alive"]


async def test_explain_text_and_json(tmp_path: Path) -> None:
    assert "classified gpu_hardware by rule xid_79" in await call(tmp_path, "explain", "t1")
    data = json.loads(await call(tmp_path, "explain", "t2", "--json"))
    assert data["final"]["reason"] == "not_target_fault"
    with pytest.raises(TaskNotFoundError):
        await call(tmp_path, "explain", "ghost")


async def test_export_to_a_file(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    await call(tmp_path, "export", "--task", "t1", "-o", str(target))
    assert [s.seq for s in read_jsonl(target)] == [3, 4, 6, 7, 9, 12, 13, 15, 23, 24, 25]


async def test_timeline_of_a_task_and_a_gpu(tmp_path: Path) -> None:
    page = await call(tmp_path, "timeline", "t1")
    assert page.count('class="attempt ') == 2 and "xid 79" in page
    gpu_page = await call(tmp_path, "timeline", "--gpu", "G2")
    assert "task t3 attempt 1 on n1: rebuilt" in gpu_page


async def test_rebuild_draws_a_progress_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "up to sequence 38" in await call(tmp_path, "projections", "rebuild")
    assert "[##############################] 100%  38/38 events" in capsys.readouterr().err
