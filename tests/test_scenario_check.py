"""observe/check on hand-written logs: every expectation key can pass and can fail."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from gpuwarden.adapters.scenario_check import (
    ExpectationResult,
    Observed,
    all_passed,
    check,
    observe,
)
from gpuwarden.adapters.scenario_file import Scenario, parse_scenario
from gpuwarden.engine.core import events as ev

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Log:
    """Builds catalog events with fresh ids and a clock that ticks a second each."""

    def __init__(self) -> None:
        self.events: list[ev.Event] = []
        self._ids: Iterator[int] = itertools.count()

    def add(self, cls: type[Any], **fields: Any) -> Log:
        n = next(self._ids)
        common = {"id": f"e{n:04d}", "at": T0 + timedelta(seconds=n), "actor": "engine"}
        self.events.append(cls(**common, **fields))
        return self

    def node(self, name: str, gpus: int) -> Log:
        infos = tuple(ev.GpuInfo(uuid=f"{name}/{i}", index=i) for i in range(gpus))
        return self.add(ev.NodeRegistered, node=name, runtime="sim", gpus=infos)

    def submit(self, task: str) -> Log:
        return self.add(ev.TaskSubmitted, task_id=task, name=task, image="i", command=("a",))

    def schedule(self, task: str, attempt: int, node: str, *gpus: str) -> Log:
        for gpu in gpus:
            self.add(ev.GpuAllocated, gpu_uuid=gpu, node=node, task_id=task, attempt=attempt)
        return self.add(ev.TaskScheduled, task_id=task, attempt=attempt, node=node, gpu_uuids=gpus)

    def classify(self, task: str, attempt: int, fault: str) -> Log:
        return self.add(ev.FaultClassified, task_id=task, attempt=attempt, fault=fault, rule="r")

    def rebuild(self, task: str, attempt: int, *, counted: bool = True) -> Log:
        return self.add(
            ev.RebuildDecided,
            task_id=task,
            attempt=attempt,
            previous_attempt=attempt - 1,
            fault="x",
            counted=counted,
            rule=None,
            not_before=T0,
        )

    def failed(self, task: str, reason: str, attempt: int | None = 1) -> Log:
        return self.add(ev.TaskFailed, task_id=task, attempt=attempt, fault=None, reason=reason)


# --- observe -------------------------------------------------------------------------


def test_a_submitted_task_is_pending_with_no_attempts() -> None:
    task = observe(Log().submit("t1").events).tasks["t1"]
    assert (task.state, task.attempts, task.faults, task.reason) == ("pending", 0, (), None)


def test_scheduled_is_running_and_stays_running_while_a_rebuild_waits() -> None:
    log = Log().node("n", 2).submit("t1").schedule("t1", 1, "n", "n/0")
    assert observe(log.events).tasks["t1"].state == "running"
    log.classify("t1", 1, "preempted").rebuild("t1", 2)
    waiting = observe(log.events).tasks["t1"]
    assert (waiting.state, waiting.attempts, waiting.rebuilds) == ("running", 1, 1)
    log.schedule("t1", 2, "n", "n/1")
    placed = observe(log.events).tasks["t1"]
    assert (placed.state, placed.attempts) == ("running", 2)
    assert placed.last_placement is not None and placed.last_placement.gpu_uuids == ("n/1",)


def test_a_rebuild_that_cannot_be_placed_is_pending_until_placed() -> None:
    log = Log().submit("t1").schedule("t1", 1, "n", "n/0").classify("t1", 1, "node_lost")
    log.rebuild("t1", 2).add(ev.TaskPending, task_id="t1", reason="no GPU", attempt=2)
    assert observe(log.events).tasks["t1"].state == "pending"
    log.schedule("t1", 2, "m", "m/0")
    assert observe(log.events).tasks["t1"].state == "running"


def test_terminal_states_and_late_events_do_not_revive_a_task() -> None:
    log = Log().submit("a").submit("b").submit("c")
    log.schedule("a", 1, "n", "n/0").classify("a", 1, "completed")
    log.add(ev.TaskCompleted, task_id="a", attempt=1)
    log.failed("b", "unschedulable", attempt=None)
    log.add(ev.TaskCancelled, task_id="c", reason="owner")
    log.add(ev.TaskPending, task_id="c", reason="late")  # stale, after the end
    log.failed("a", "policy_rule")  # cannot happen; must not rewrite the end
    tasks = observe(log.events).tasks
    assert (tasks["a"].state, tasks["a"].faults, tasks["a"].reason) == ("completed", (), None)
    assert (tasks["b"].state, tasks["b"].reason, tasks["b"].attempts) == (
        "failed",
        "unschedulable",
        0,
    )
    assert tasks["c"].state == "cancelled"


def test_faults_in_order_without_completed_and_rebuild_counts() -> None:
    log = Log().submit("t1").schedule("t1", 1, "n", "n/0")
    log.classify("t1", 1, "gpu_hardware").rebuild("t1", 2)
    log.schedule("t1", 2, "n", "n/1").classify("t1", 2, "preempted").rebuild("t1", 3, counted=False)
    log.schedule("t1", 3, "n", "n/1").classify("t1", 3, "completed")
    task = observe(log.events).tasks["t1"]
    assert task.faults == ("gpu_hardware", "preempted")
    assert (task.rebuilds, task.counted_rebuilds, task.attempts) == (2, 1, 3)
    assert [p.attempt for p in task.placements] == [1, 2, 3]


def test_gpu_quarantine_restore_holder_and_node_loss() -> None:
    log = Log().node("n", 2).submit("t1").schedule("t1", 1, "n", "n/0")
    log.add(ev.GpuQuarantined, gpu_uuid="n/1", node="n", reason="xid 48")
    log.add(ev.NodeLost, node="n")
    observed = observe(log.events)
    assert observed.gpus["n/1"].quarantined and not observed.gpus["n/0"].quarantined
    assert observed.gpus["n/0"].task_id == "t1"
    assert observed.nodes["n"].lost
    log.add(ev.GpuRestored, gpu_uuid="n/1", node="n", reason="reset")
    log.add(ev.GpuReleased, gpu_uuid="n/0", node="n", task_id="t1", attempt=1)
    log.add(ev.NodeRecovered, node="n")
    observed = observe(log.events)
    assert not observed.gpus["n/1"].quarantined
    assert observed.gpus["n/0"].task_id is None
    assert not observed.nodes["n"].lost


def test_observed_is_plain_json_data() -> None:
    log = Log().node("n", 1).submit("t1").schedule("t1", 1, "n", "n/0")
    data = msgspec.json.decode(msgspec.json.encode(observe(log.events)))
    assert data["tasks"]["t1"]["placements"] == [{"attempt": 1, "node": "n", "gpu_uuids": ["n/0"]}]


# --- check ---------------------------------------------------------------------------

DRILL = """
name = "check"
[[nodes]]
name = "n"
gpus = 2
[[nodes]]
name = "m"
gpus = 1
[[steps]]
at = 0
submit = {{ task = "t1", gpus = 1, image = "i", command = ["a"] }}
[[expect]]
{expect}
"""


def scenario(expect: str) -> Scenario:
    return parse_scenario(DRILL.format(expect=expect), "check.toml")


def rebuilt_log() -> Observed:
    """t1: GPU fault on n/0, rebuilt on n/1, then preempted and rebuilt on m/0; failed."""
    log = Log().node("n", 2).node("m", 1).submit("t1")
    log.schedule("t1", 1, "n", "n/0").classify("t1", 1, "gpu_hardware")
    log.add(ev.GpuQuarantined, gpu_uuid="n/0", node="n", reason="xid 48")
    log.rebuild("t1", 2).schedule("t1", 2, "n", "n/1")
    log.classify("t1", 2, "preempted").rebuild("t1", 3, counted=False)
    log.schedule("t1", 3, "m", "m/0").classify("t1", 3, "user_error")
    log.failed("t1", "not_target_fault", attempt=3)
    return observe(log.events)


def results_for(expect: str, observed: Observed | None = None) -> list[ExpectationResult]:
    return check(scenario(expect), observed if observed is not None else rebuilt_log())


CASES = [
    ('state = "failed"', 'state = "running"', "expected state running, saw failed"),
    ("attempts = 3", "attempts = 2", "expected attempts 2, saw 3"),
    (
        'faults = ["gpu_hardware", "preempted", "user_error"]',
        'faults = ["gpu_hardware"]',
        "expected faults [gpu_hardware], saw [gpu_hardware, preempted, user_error]",
    ),
    ('reason = "not_target_fault"', 'reason = "budget_exhausted"', "saw not_target_fault"),
    ("rebuilds = 2", "rebuilds = 1", "expected rebuilds 1, saw 2"),
    ("counted_rebuilds = 1", "counted_rebuilds = 2", "expected counted_rebuilds 2, saw 1"),
    ("not_on_gpus_of_attempt = 1", "not_on_gpus_of_attempt = 3", "saw attempt 3 on [m/0]"),
    (
        "not_on_node_of_attempt = 2",
        "not_on_node_of_attempt = 3",
        "expected last attempt not on the node of attempt 3 (m), saw attempt 3 on m",
    ),
]


@pytest.mark.parametrize(("good", "bad", "message"), CASES, ids=[c[0].split()[0] for c in CASES])
def test_every_task_key_passes_and_fails(good: str, bad: str, message: str) -> None:
    (passed,) = results_for(f'task = "t1"\n{good}')
    assert passed.passed, passed.message
    assert passed.message.startswith("task t1: ")
    (failed,) = results_for(f'task = "t1"\n{bad}')
    assert not failed.passed
    assert failed.message.startswith("task t1: expected ")
    assert message in failed.message, failed.message
    assert (failed.index, failed.subject, failed.key) == (0, "task t1", bad.split()[0])


def test_state_message_reads_as_the_contract_says() -> None:
    (result,) = results_for('task = "t1"\nstate = "running"')
    assert result.message == "task t1: expected state running, saw failed"
    assert (result.expected, result.seen) == ("running", "failed")


def test_not_on_gpus_fails_when_the_last_attempt_reuses_a_gpu() -> None:
    log = Log().submit("t1").schedule("t1", 1, "n", "n/0", "n/1").rebuild("t1", 2)
    log.schedule("t1", 2, "n", "n/1", "n/2")
    (gpus, node) = results_for(
        'task = "t1"\nnot_on_gpus_of_attempt = 1\nnot_on_node_of_attempt = 1',
        observe(log.events),
    )
    assert not gpus.passed and "attempt 2 on [n/1, n/2]" in gpus.message
    assert gpus.seen["attempt_1_gpus"] == ["n/0", "n/1"]
    assert not node.passed


def test_not_on_attempt_that_never_ran_fails() -> None:
    log = Log().submit("t1").schedule("t1", 1, "n", "n/0")
    (result,) = results_for('task = "t1"\nnot_on_node_of_attempt = 2', observe(log.events))
    assert not result.passed
    assert "attempt 2 was never placed" in result.message


def test_a_task_missing_from_the_log_fails_every_key() -> None:
    results = results_for(
        'task = "t1"\nstate = "pending"\nattempts = 0\nnot_on_gpus_of_attempt = 1', observe([])
    )
    assert [r.passed for r in results] == [False, False, False]
    assert results[0].message == "task t1: expected state pending, saw none"


def test_gpu_quarantined_passes_and_fails() -> None:
    observed = rebuilt_log()
    (yes,) = results_for('gpu = "n/0"\nquarantined = true', observed)
    (no,) = results_for('gpu = "n/1"\nquarantined = false', observed)
    assert yes.passed and no.passed
    assert yes.message == "gpu n/0: quarantined true"
    (wrong,) = results_for('gpu = "n/1"\nquarantined = true', observed)
    assert not wrong.passed
    assert wrong.message == "gpu n/1: expected quarantined true, saw false"
    (unseen,) = results_for('gpu = "n/1"\nquarantined = false', observe([]))
    assert unseen.passed  # a GPU the log never mentions was never quarantined


def test_gpu_names_map_to_uuids() -> None:
    log = Log().submit("t1").schedule("t1", 1, "n", "GPU-aaa").rebuild("t1", 2)
    log.schedule("t1", 2, "n", "GPU-bbb")
    log.add(ev.GpuQuarantined, gpu_uuid="GPU-aaa", node="n", reason="xid 48")
    names = {"n/0": "GPU-aaa", "n/1": "GPU-bbb"}
    text = 'task = "t1"\nnot_on_gpus_of_attempt = 1\n[[expect]]\ngpu = "n/0"\nquarantined = true'
    results = check(scenario(text), observe(log.events), names)
    assert all_passed(results), [r.message for r in results]
    assert results[0].seen["gpus"] == ["n/1"]  # shown by scenario name


def test_results_are_in_file_order_and_json_able() -> None:
    text = 'task = "t1"\nstate = "failed"\n[[expect]]\ngpu = "n/0"\nquarantined = false'
    results = results_for(text)
    assert [(r.index, r.key, r.passed) for r in results] == [
        (0, "state", True),
        (1, "quarantined", False),
    ]
    assert not all_passed(results)
    decoded = msgspec.json.decode(msgspec.json.encode(results))
    assert decoded[1]["message"] == "gpu n/0: expected quarantined false, saw true"
