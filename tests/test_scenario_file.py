"""Scenario files: the shipped drills load, every step kind parses, every mistake is named."""

from __future__ import annotations

from pathlib import Path

import pytest
from gpuwarden.adapters import scenario_file as sf
from gpuwarden.adapters.scenario_file import ScenarioError

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
DRILLS = sorted(SCENARIOS.glob("*.toml"))

HEAD = """
name = "drill"

[[nodes]]
name = "node-a"
gpus = 2

[[nodes]]
name = "node-b"
gpus = 1

[[steps]]
at = 0
submit = { task = "t1", gpus = 1, image = "img", command = ["python", "x.py"] }
"""


def parse(text: str) -> sf.Scenario:
    return sf.parse_scenario(text, "drill.toml")


def error_of(text: str) -> str:
    with pytest.raises(ScenarioError) as info:
        parse(text)
    return str(info.value)


# --- the shipped library -------------------------------------------------------------


def test_library_has_at_least_sixteen_drills() -> None:
    assert len(DRILLS) >= 16
    assert all(p.name[:2].isdigit() and p.name[2] == "-" for p in DRILLS)


@pytest.mark.parametrize("path", DRILLS, ids=lambda p: p.name)
def test_every_drill_loads_and_expects_something(path: Path) -> None:
    scenario = sf.load_scenario(path)
    assert scenario.name
    assert scenario.steps and scenario.expectations
    scenario.rebuild_policy  # noqa: B018 - the [policy] table parses


def test_library_uses_every_step_kind_and_expectation_key() -> None:
    kinds: set[str] = set()
    keys: set[str] = set()
    for path in DRILLS:
        scenario = sf.load_scenario(path)
        kinds.update(step.kind for step in scenario.steps)
        for exp in scenario.expectations:
            fields = exp.__struct_fields__
            keys.update(f for f in fields if getattr(exp, f) is not None and f != "index")
    assert kinds == set(sf.STEP_KINDS)
    assert keys >= {
        "task",
        "state",
        "attempts",
        "faults",
        "reason",
        "not_on_gpus_of_attempt",
        "not_on_node_of_attempt",
        "rebuilds",
        "counted_rebuilds",
        "gpu",
        "quarantined",
    }


# --- parsing -------------------------------------------------------------------------

FULL = """
name = "xid 48 on a running task rebuilds it on another GPU"
description = "optional free text"

[policy]
rebuild_on = ["gpu_hardware", "node_lost", "runtime_error", "preempted"]
max_rebuilds = 3
window_s = 3600
backoff_initial_s = 10
backoff_max_s = 300
node_lost_after_s = 5

[[policy.rules]]
action = "fail"
exit_codes = { in = [42] }
faults = ["user_error"]

[[nodes]]
name = "node-a"
gpus = 2
model = "H100"
memory_mb = 81920

[[steps]]
at = 0
submit = { task = "t1", gpus = 1, image = "train:1", command = ["python", "train.py"] }

[[steps]]
at = 30
xid = { task = "t1", code = 48 }

[[steps]]
at = 30.2
exit = { task = "t1", code = 1 }

[[expect]]
task = "t1"
state = "running"
attempts = 2
faults = ["gpu_hardware"]
reason = "budget_exhausted"
not_on_gpus_of_attempt = 1
not_on_node_of_attempt = 1
rebuilds = 1
counted_rebuilds = 1

[[expect]]
gpu = "node-a/0"
quarantined = true
"""


def test_contract_example_parses_into_typed_parts() -> None:
    scenario = parse(FULL)
    assert scenario.source == "drill.toml"
    assert scenario.description == "optional free text"
    assert scenario.policy["node_lost_after_s"] == 5
    assert scenario.rebuild_policy.node_lost_after_s == 5.0
    assert scenario.nodes == (sf.NodeSpec(name="node-a", gpus=2, model="H100", memory_mb=81920),)
    assert scenario.gpu_names == ("node-a/0", "node-a/1")
    assert scenario.task_ids == ("t1",)
    submit, xid, exit_ = scenario.steps
    assert submit == sf.SubmitStep(
        at=0.0, index=0, task="t1", gpus=1, image="train:1", command=("python", "train.py")
    )
    assert xid == sf.XidStep(at=30.0, index=1, task="t1", code=48)
    assert exit_ == sf.ExitStep(at=30.2, index=2, task="t1", code=1)
    task, gpu = scenario.expectations
    assert task == sf.TaskExpectation(
        index=0,
        task="t1",
        state="running",
        attempts=2,
        faults=("gpu_hardware",),
        reason="budget_exhausted",
        not_on_gpus_of_attempt=1,
        not_on_node_of_attempt=1,
        rebuilds=1,
        counted_rebuilds=1,
    )
    assert gpu == sf.GpuExpectation(index=1, gpu="node-a/0", quarantined=True)


def test_every_step_kind_parses() -> None:
    steps = [
        'submit = { task = "t2", gpus = 2, image = "i", command = ["a"], gpu_model = "H100",'
        " min_gpu_memory_mb = 40000 }",
        'exit = { task = "t1", code = 3 }',
        'signal = { task = "t1", signal = 9 }',
        'oom = { task = "t1" }',
        'xid = { task = "t1", code = 48 }',
        'xid = { gpu = "node-b/0", code = 79 }',
        'node_down = { node = "node-b" }',
        'node_up = { node = "node-b" }',
        'runtime_error = { task = "t1", message = "shim died" }',
        'start_error = { task = "t1", message = "No such image: i" }',
        'preempt = { task = "t1" }',
        'cancel = { task = "t1" }',
        "run_for = { seconds = 3600 }",
    ]
    text = HEAD + "".join(f"\n[[steps]]\nat = {i + 1}\n{s}\n" for i, s in enumerate(steps))
    parsed = parse(text).steps[1:]
    assert [s.kind for s in parsed] == [
        "submit",
        "exit",
        "signal",
        "oom",
        "xid",
        "xid",
        "node_down",
        "node_up",
        "runtime_error",
        "start_error",
        "preempt",
        "cancel",
        "run_for",
    ]
    submit = parsed[0]
    assert isinstance(submit, sf.SubmitStep)
    assert (submit.gpu_model, submit.min_gpu_memory_mb, submit.gpus) == ("H100", 40000, 2)
    assert parsed[1] == sf.ExitStep(at=2.0, index=2, task="t1", code=3)
    signal = parsed[2]
    assert isinstance(signal, sf.SignalStep) and signal.exit_code == 137
    assert parsed[5] == sf.XidStep(at=6.0, index=6, gpu="node-b/0", code=79)
    assert parsed[6] == sf.NodeDownStep(at=7.0, index=7, node="node-b")
    assert parsed[8] == sf.RuntimeErrorStep(at=9.0, index=9, task="t1", message="shim died")
    assert parsed[12] == sf.RunForStep(at=13.0, index=13, seconds=3600.0)


def test_steps_are_sorted_by_time_and_keep_file_order_on_ties() -> None:
    text = HEAD + (
        '\n[[steps]]\nat = 20\nexit = { task = "t1", code = 1 }\n'
        '\n[[steps]]\nat = 5\nxid = { task = "t1", code = 13 }\n'
        '\n[[steps]]\nat = 5\nxid = { task = "t1", code = 31 }\n'
    )
    steps = parse(text).steps
    assert [(s.at, s.index) for s in steps] == [(0.0, 0), (5.0, 2), (5.0, 3), (20.0, 1)]


def test_a_task_submitted_earlier_in_time_but_later_in_the_file_is_known() -> None:
    text = (
        'name = "x"\n[[nodes]]\nname = "n"\ngpus = 1\n'
        '[[steps]]\nat = 9\ncancel = { task = "t1" }\n'
        '[[steps]]\nat = 1\nsubmit = { task = "t1", gpus = 1, image = "i", command = ["a"] }\n'
    )
    assert [s.kind for s in parse(text).steps] == ["submit", "cancel"]


def test_optional_parts_default() -> None:
    scenario = parse('name = "bare"\n')
    assert (scenario.description, scenario.policy, scenario.nodes) == ("", {}, ())
    assert (scenario.steps, scenario.expectations) == ((), ())


def test_load_scenario_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text(FULL)
    assert sf.load_scenario(path).source == str(path)
    assert sf.scenario_paths([tmp_path]) == [path]


def test_load_scenario_names_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ScenarioError, match=r"nope\.toml: cannot read"):
        sf.load_scenario(missing)


# --- errors --------------------------------------------------------------------------


def step(body: str, at: str = "1") -> str:
    return HEAD + f"\n[[steps]]\nat = {at}\n{body}\n"


def expect(body: str) -> str:
    return HEAD + f"\n[[expect]]\n{body}\n"


ERRORS = [
    # unknown keys anywhere
    pytest.param('colour = "red"\n' + HEAD, ["unknown top-level key 'colour'"], id="top-key"),
    pytest.param(
        HEAD.replace("gpus = 1\n", "gpus = 1\nrack = 3\n", 1),
        ["nodes[1]", "unknown key 'rack'"],
        id="node-key",
    ),
    pytest.param(
        step('exit = { task = "t1", code = 1 }\nnote = "x"'), ["steps[1]", "'note'"], id="step-key"
    ),
    pytest.param(
        step('exit = { task = "t1", code = 1, after = 2 }'),
        ["steps[1].exit", "unknown key 'after'"],
        id="kind-key",
    ),
    pytest.param(
        expect('task = "t1"\nstate = "running"\nstatus = "x"'),
        ["expect[0]", "unknown key 'status'"],
        id="expect-key",
    ),
    pytest.param(
        expect('gpu = "node-a/0"\nquarantined = true\nhot = true'),
        ["expect[0]", "unknown key 'hot'"],
        id="gpu-expect-key",
    ),
    pytest.param(
        HEAD + "[policy]\nmax_rebuild = 3\n",
        ["policy.max_rebuild", "unknown key"],
        id="policy-key",
    ),
    pytest.param(
        HEAD + '[[policy.rules]]\naction = "explode"\n',
        ["policy.rules[0].action", "unknown action"],
        id="policy-rule",
    ),
    # step kinds
    pytest.param(step(""), ["steps[1]", "no step kind"], id="zero-kinds"),
    pytest.param(
        step('exit = { task = "t1", code = 1 }\noom = { task = "t1" }'),
        ["steps[1]", "2 step kinds (exit, oom)"],
        id="two-kinds",
    ),
    pytest.param(
        step('exit = { task = "t1" }'), ["steps[1].exit", "missing key 'code'"], id="missing"
    ),
    pytest.param(
        HEAD + '[[steps]]\noom = { task = "t1" }\n', ["steps[1]", "missing key 'at'"], id="no-at"
    ),
    # types and ranges
    pytest.param(
        step('exit = { task = "t1", code = "1" }'), ["steps[1].exit.code", "integer"], id="type"
    ),
    pytest.param(
        step('exit = { task = "t1", code = 1.0 }'), ["steps[1].exit.code", "integer"], id="float"
    ),
    pytest.param(
        step('exit = { task = "t1", code = 300 }'), ["steps[1].exit.code", "at most 255"], id="code"
    ),
    pytest.param(
        step('signal = { task = "t1", signal = 0 }'), ["steps[1].signal.signal"], id="signal"
    ),
    pytest.param(step('oom = { task = "t1" }', at="-1"), ["steps[1].at", "negative"], id="neg-at"),
    pytest.param(
        step('oom = { task = "t1" }', at='"soon"'), ["steps[1].at", "seconds"], id="str-at"
    ),
    pytest.param(
        step("run_for = { seconds = -5 }"), ["steps[1].run_for.seconds", "negative"], id="run_for"
    ),
    pytest.param(step('oom = "t1"'), ["steps[1].oom", "must be a table"], id="kind-not-table"),
    pytest.param("name = 'x'\nsteps = 3\n", ["steps", "array of tables"], id="steps-not-array"),
    pytest.param(
        HEAD.replace("gpus = 2", "gpus = -1"), ["nodes[0].gpus", "at least 0"], id="node-gpus"
    ),
    pytest.param(
        HEAD.replace('image = "img"', 'image = ""'), ["steps[0].submit.image", "empty"], id="image"
    ),
    pytest.param(
        HEAD.replace("gpus = 1, image", "gpus = 0, image"),
        ["steps[0].submit.gpus", "at least 1"],
        id="submit-gpus",
    ),
    pytest.param(
        HEAD.replace('command = ["python", "x.py"]', 'command = "python x.py"'),
        ["steps[0].submit.command", "argv list of strings"],
        id="command-string",
    ),
    pytest.param(
        HEAD.replace('command = ["python", "x.py"]', 'command = ["python", 3]'),
        ["steps[0].submit.command", "argv list of strings"],
        id="command-int",
    ),
    pytest.param(
        HEAD.replace('command = ["python", "x.py"]', "command = []"),
        ["steps[0].submit.command", "non-empty"],
        id="command-empty",
    ),
    # names
    pytest.param(
        step('exit = { task = "t9", code = 1 }'),
        ["steps[1].exit.task", "unknown task 't9'", "never submitted"],
        id="task",
    ),
    pytest.param(
        step('cancel = { task = "t2" }')
        + '\n[[steps]]\nat = 5\nsubmit = { task = "t2", gpus = 1, image = "i", command = ["a"] }\n',
        ["steps[1].cancel.task", "unknown task 't2'", "only later, at steps[2]"],
        id="task-later",
    ),
    pytest.param(
        step('node_down = { node = "node-z" }'),
        ["steps[1].node_down.node", "unknown node 'node-z'"],
        id="node",
    ),
    pytest.param(
        step('node_up = { node = "node-z" }'),
        ["steps[1].node_up.node", "unknown node"],
        id="node-up",
    ),
    pytest.param(
        step('xid = { gpu = "node-b/1", code = 48 }'),
        ["steps[1].xid.gpu", "unknown GPU 'node-b/1'"],
        id="gpu",
    ),
    pytest.param(
        step("xid = { code = 48 }"),
        ["steps[1].xid", "exactly one of 'task' or 'gpu'"],
        id="xid-none",
    ),
    pytest.param(
        step('xid = { task = "t1", gpu = "node-a/0", code = 48 }'),
        ["steps[1].xid", "exactly one of"],
        id="xid-both",
    ),
    pytest.param(
        HEAD + '[[nodes]]\nname = "node-a"\ngpus = 1\n',
        ["nodes[2].name", "duplicate node 'node-a'", "nodes[0]"],
        id="dup-node",
    ),
    pytest.param(
        step('submit = { task = "t1", gpus = 1, image = "i", command = ["a"] }'),
        ["steps[1].submit.task", "duplicate task 't1'", "steps[0]"],
        id="dup-task",
    ),
    pytest.param(
        HEAD.replace('name = "node-b"', 'name = "rack/b"'),
        ["nodes[1].name", "'/'"],
        id="node-slash",
    ),
    # expectations
    pytest.param(
        expect('task = "t9"\nstate = "running"'),
        ["expect[0].task", "unknown task 't9'"],
        id="exp-task",
    ),
    pytest.param(
        expect('gpu = "node-c/0"\nquarantined = true'),
        ["expect[0].gpu", "unknown GPU"],
        id="exp-gpu",
    ),
    pytest.param(
        expect('task = "t1"\nstate = "done"'),
        ["expect[0].state", "unknown state 'done'"],
        id="exp-state",
    ),
    pytest.param(
        expect('task = "t1"\nfaults = ["cosmic_ray"]'),
        ["expect[0].faults[0]", "unknown fault type 'cosmic_ray'"],
        id="exp-fault",
    ),
    pytest.param(
        expect('task = "t1"\nfaults = ["completed"]'),
        ["expect[0].faults", "'completed' is never listed"],
        id="exp-completed",
    ),
    pytest.param(
        expect('task = "t1"\nreason = "bad_luck"'),
        ["expect[0].reason", "unknown reason"],
        id="exp-reason",
    ),
    pytest.param(
        expect('task = "t1"\nattempts = -1'), ["expect[0].attempts", "at least 0"], id="exp-count"
    ),
    pytest.param(
        expect('task = "t1"\nnot_on_gpus_of_attempt = 0'),
        ["expect[0].not_on_gpus_of_attempt", "at least 1"],
        id="exp-attempt",
    ),
    pytest.param(
        expect('gpu = "node-a/0"\nquarantined = "yes"'),
        ["expect[0].quarantined", "true or false"],
        id="exp-bool",
    ),
    pytest.param(
        expect('gpu = "node-a/0"'), ["expect[0]", "missing key 'quarantined'"], id="exp-gpu-bare"
    ),
    pytest.param(expect('task = "t1"'), ["expect[0]", "expects nothing"], id="exp-empty"),
    pytest.param(
        expect('task = "t1"\ngpu = "node-a/0"\nquarantined = true'),
        ["expect[0]", "exactly one of 'task' or 'gpu'"],
        id="exp-both",
    ),
    pytest.param(HEAD.replace('name = "drill"\n', ""), ["missing key 'name'"], id="no-name"),
]


@pytest.mark.parametrize(("text", "fragments"), ERRORS)
def test_errors_name_the_file_the_place_and_the_problem(text: str, fragments: list[str]) -> None:
    message = error_of(text)
    assert message.startswith("drill.toml: "), message
    for fragment in fragments:
        assert fragment in message, message


def test_toml_syntax_error_names_file_and_line() -> None:
    message = error_of('name = "x"\n\n[[steps]]\nat = = 3\n')
    assert message.startswith("drill.toml: line 4"), message
    assert "TOML syntax" in message


def test_toml_syntax_error_at_end_of_file_names_a_line() -> None:
    message = error_of('name = "x"\ndescription = """never closed\n')
    assert message.startswith("drill.toml: line "), message


def test_a_fault_step_may_name_an_earlier_attempt() -> None:
    """An addition to the format (issue 15): `attempt` picks an earlier attempt's
    container, one still running on a node that was cut off, for a late exit."""
    steps = [
        'exit = { task = "t1", code = 0, attempt = 1 }',
        'signal = { task = "t1", signal = 15, attempt = 2 }',
        'oom = { task = "t1", attempt = 1 }',
        'preempt = { task = "t1", attempt = 1 }',
        'runtime_error = { task = "t1", message = "m", attempt = 1 }',
        'exit = { task = "t1", code = 0 }',
    ]
    text = HEAD + "".join(f"\n[[steps]]\nat = {i + 1}\n{s}\n" for i, s in enumerate(steps))
    parsed = parse(text).steps[1:]
    assert [getattr(s, "attempt", "?") for s in parsed] == [1, 2, 1, 1, 1, None]
    bad = HEAD + '\n[[steps]]\nat = 1\nexit = { task = "t1", code = 0, attempt = 0 }\n'
    assert "steps[1].exit.attempt" in error_of(bad)
    wrong = (
        HEAD + '\n[[steps]]\nat = 1\nstart_error = { task = "t1", message = "m", attempt = 1 }\n'
    )
    assert "attempt" in error_of(wrong)
