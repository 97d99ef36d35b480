"""The supervisor's lifecycle, driven end to end through the pure in-memory driver.

Each test plays a short history (register, submit, start, exit, faults, time) and
checks what the engine decided and what it left in its state: that is the contract
the scenario runner and the replay tool rely on, without NATS or Docker in the way.
"""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.commands import RunCommand, StopCommand, commands_for
from gpuwarden.engine.core.decide import decide, decide_many, reconcile
from gpuwarden.engine.core.fold import evolve
from gpuwarden.engine.core.policy import Policy, Rule
from gpuwarden.engine.core.state import initial_state, next_due

from tests.supervisor_driver import T0, Driver


def running(d: Driver, task: str = "t1", gpus: int = 1, **fields: Any) -> None:
    """Submit a task and start its first container."""
    d.submit(task, gpus=gpus, **fields)
    d.start(task)


def holders(d: Driver) -> dict[str, tuple[str, int] | None]:
    return {uuid: gpu.holder for uuid, gpu in d.state.gpus.items()}


def only(items: list[Any]) -> Any:
    assert len(items) == 1, items
    return items[0]


# --- the normal lifecycle ----------------------------------------------------------


def test_submit_allocates_and_schedules_the_first_attempt() -> None:
    d = Driver()
    d.node("a", 2)
    d.submit("t1", gpus=2)
    scheduled = only(d.of_type(ev.TaskScheduled, "t1"))
    assert (scheduled.attempt, scheduled.node, scheduled.gpu_uuids) == (1, "a", ("a/0", "a/1"))
    allocated = d.of_type(ev.GpuAllocated, "t1")
    assert [(a.gpu_uuid, a.attempt) for a in allocated] == [("a/0", 1), ("a/1", 1)]
    assert d.state.tasks["t1"].status == "running"
    assert holders(d) == {"a/0": ("t1", 1), "a/1": ("t1", 1)}
    [run] = commands_for(d.state, scheduled)
    assert isinstance(run, RunCommand)
    assert (run.node, run.gpu_uuids, run.image, run.command) == (
        "a",
        ("a/0", "a/1"),
        "img",
        ("run",),
    )
    assert run.causation_id == scheduled.id


def test_exit_zero_completes_at_once_and_frees_the_gpus() -> None:
    d = Driver()
    d.node("a", 1)
    running(d)
    d.exit("t1", 0)
    completed = only(d.of_type(ev.TaskCompleted, "t1"))
    assert completed.at == T0  # no evidence window for a success
    assert only(d.of_type(ev.FaultClassified, "t1")).fault == "completed"
    assert only(d.of_type(ev.GpuReleased, "t1")).gpu_uuid == "a/0"
    assert d.state.tasks["t1"].status == "completed"
    assert holders(d) == {"a/0": None}
    assert d.faults("t1") == []


def test_exit_one_fails_not_target_fault_after_the_evidence_window() -> None:
    d = Driver()
    d.node("a", 1)
    running(d)
    d.exit("t1", 1)
    assert d.of_type(ev.FaultClassified) == []  # the window is still open
    assert holders(d) == {"a/0": ("t1", 1)}
    d.advance(0.5)
    assert d.of_type(ev.FaultClassified) == []
    d.advance(0.5)
    classified = only(d.of_type(ev.FaultClassified, "t1"))
    assert (classified.fault, classified.rule, classified.at) == (
        "user_error",
        "exit_nonzero",
        T0 + timedelta(seconds=1),
    )
    failed = only(d.of_type(ev.TaskFailed, "t1"))
    assert (failed.reason, failed.fault, failed.attempt) == ("not_target_fault", "user_error", 1)
    released = only(d.of_type(ev.GpuReleased, "t1"))
    assert released.at == T0 + timedelta(seconds=1)
    assert holders(d) == {"a/0": None}
    assert d.state.tasks["t1"].status == "failed"
    d.advance(3600)
    assert d.of_type(ev.RebuildDecided) == []


@pytest.mark.parametrize(
    "exit_fields",
    [{"code": 137}, {"code": None, "signal": 9}, {"code": 143}],
    ids=["exit137", "signal9", "sigterm"],
)
def test_sigkill_without_oom_is_preempted_and_rebuilt_after_backoff(
    exit_fields: dict[str, Any],
) -> None:
    d = Driver()
    d.node("a", 1)
    running(d)
    d.exit("t1", **exit_fields)
    d.advance(1)
    assert d.faults("t1") == ["preempted"]
    rebuild = only(d.of_type(ev.RebuildDecided, "t1"))
    assert (rebuild.attempt, rebuild.previous_attempt, rebuild.counted, rebuild.rule) == (
        2,
        1,
        True,
        None,
    )
    assert rebuild.not_before == rebuild.at + timedelta(seconds=10)
    assert holders(d) == {"a/0": None}  # released while it waits
    assert d.state.tasks["t1"].status == "pending" and d.state.tasks["t1"].rebuild is not None
    d.advance(9.9)
    assert len(d.of_type(ev.TaskScheduled, "t1")) == 1  # not before the backoff
    d.advance(0.1)
    second = d.of_type(ev.TaskScheduled, "t1")[-1]
    assert (second.attempt, second.at) == (2, rebuild.not_before)
    assert d.state.tasks["t1"].status == "running"
    assert holders(d) == {"a/0": ("t1", 2)}


def test_oom_kill_fails_container_oom() -> None:
    d = Driver()
    d.node("a", 1)
    running(d)
    d.exit("t1", 137, oom_killed=True)
    d.advance(1)
    assert d.faults("t1") == ["container_oom"]
    failed = only(d.of_type(ev.TaskFailed, "t1"))
    assert (failed.fault, failed.reason) == ("container_oom", "not_target_fault")
    assert holders(d) == {"a/0": None}


def start_failed(d: Driver, task: str, error: str) -> None:
    a = d.attempt(task)
    d.emit(ev.ContainerStartFailed, task_id=task, attempt=a.n, node=a.node, error=error)


def test_start_failure_no_such_image_fails_image_error_at_once() -> None:
    d = Driver()
    d.node("a", 1)
    d.submit("t1")
    start_failed(d, "t1", "No such image: train:9")
    classified = only(d.of_type(ev.FaultClassified, "t1"))
    assert (classified.fault, classified.rule) == ("image_error", "start_image")
    assert only(d.of_type(ev.TaskFailed, "t1")).reason == "not_target_fault"
    assert holders(d) == {"a/0": None}


def test_start_failure_with_another_runtime_message_is_rebuilt() -> None:
    d = Driver()
    d.node("a", 1)
    d.submit("t1")
    start_failed(d, "t1", "OCI runtime create failed: cgroup setup: device or resource busy")
    assert d.faults("t1") == ["runtime_error"]
    rebuild = only(d.of_type(ev.RebuildDecided, "t1"))
    assert rebuild.counted and rebuild.fault == "runtime_error"
    d.advance(10)
    assert d.attempt("t1").n == 2


# --- GPU and node faults -----------------------------------------------------------


def test_xid48_then_exit_quarantines_the_gpu_and_rebuilds_on_another_gpu() -> None:
    d = Driver()
    d.node("a", 2)
    running(d)
    assert d.attempt("t1").gpu_uuids == ("a/0",)
    d.xid("a/0", 48)
    quarantine = only(d.of_type(ev.GpuQuarantined))
    assert quarantine.gpu_uuid == "a/0"
    assert d.state.gpus["a/0"].quarantined
    d.now += timedelta(seconds=0.2)
    d.exit("t1", 1)
    d.advance(1)
    classified = only(d.of_type(ev.FaultClassified, "t1"))
    assert (classified.fault, classified.rule) == ("gpu_hardware", "xid_hardware")
    rebuild = only(d.of_type(ev.RebuildDecided, "t1"))
    assert rebuild.exclude_gpus == ("a/0",)
    assert rebuild.exclude_nodes == ()
    assert len(d.of_type(ev.GpuQuarantined)) == 1  # not quarantined twice
    d.advance(10)
    assert d.attempt("t1").gpu_uuids == ("a/1",)
    assert holders(d) == {"a/0": None, "a/1": ("t1", 2)}


def test_a_process_hung_on_a_failed_gpu_is_concluded_stopped_and_rebuilt() -> None:
    """Xid 48 under a running two-GPU task that never exits: when the evidence window
    (from the quarantine) closes the attempt is classified gpu_hardware without an exit
    and rebuilt away from the bad GPU; its container is killed at once, and its GPUs are
    given back only when that kill's exit is logged (no other task runs next to it)."""
    d = Driver()
    d.node("a", 4)
    running(d, gpus=2)
    assert d.attempt("t1").gpu_uuids == ("a/0", "a/1")
    d.xid("a/1", 48)
    fault = only(d.of_type(ev.GpuFault))
    d.advance(0.5)
    assert d.of_type(ev.FaultClassified) == []  # the window is still open
    d.advance(0.6)
    classified = only(d.of_type(ev.FaultClassified, "t1"))
    assert (classified.fault, classified.rule) == ("gpu_hardware", "xid_hardware")
    assert classified.evidence == (fault.id,)
    assert classified.causation_id == fault.id
    rebuild = only(d.of_type(ev.RebuildDecided, "t1"))
    assert (rebuild.exclude_gpus, rebuild.exclude_nodes) == (("a/1",), ())
    assert d.of_type(ev.GpuReleased, "t1") == []  # still in use by the hung process
    [stop] = commands_for(d.state, classified)
    assert isinstance(stop, StopCommand)
    assert (stop.node, stop.task_id, stop.attempt, stop.grace_s) == ("a", "t1", 1, 0.0)
    assert stop.container_id == "c-t1-1"
    d.advance(10)  # the backoff: attempt 2 goes to the two GPUs nobody holds
    assert d.attempt("t1").gpu_uuids == ("a/2", "a/3")
    d.submit("t2", gpus=1)  # a/0 is healthy but still under the hung process: t2 waits
    assert d.state.tasks["t2"].current is None
    kill = d.exit_attempt("t1", 1, 137)
    released = d.of_type(ev.GpuReleased, "t1")
    assert {e.gpu_uuid for e in released} == {"a/0", "a/1"}
    assert {e.causation_id for e in released} == {kill.id}
    assert commands_for(d.state, classified) == []  # resent after a restart: not any more
    assert d.attempt("t2").gpu_uuids == ("a/0",)  # a/1 stays quarantined


def test_a_restore_within_the_window_lets_the_process_run_on() -> None:
    """Review finding: the timer used to conclude anyway, with nothing on record, as
    `unknown`, failing the task and leaving its process running."""
    d = Driver()
    d.node("a", 2)
    running(d)
    d.xid("a/0", 48)
    d.now += timedelta(seconds=0.5)
    d.emit(ev.GpuRestored, gpu_uuid="a/0", node="a", reason="reset")
    d.advance(60)
    assert d.of_type(ev.FaultClassified) == [] and d.attempt("t1").live
    assert d.state.timers == []


def test_a_storm_of_xid45s_does_not_erase_the_xid48_it_follows() -> None:
    d = Driver()
    d.node("a", 2)
    running(d)
    d.xid("a/0", 48)
    for _ in range(40):
        d.xid("a/0", 45)
    d.advance(2)
    classified = only(d.of_type(ev.FaultClassified, "t1"))
    assert (classified.fault, classified.rule) == ("gpu_hardware", "xid_hardware")


@pytest.mark.parametrize("skew_s", [-2.0, -30.0, 3600.0])
def test_the_window_runs_on_the_engines_clock_not_the_agents(skew_s: float) -> None:
    """An Xid stamped by an agent whose clock is off: the window starts at the engine's
    quarantine, so the attempt is neither killed at once nor left for an hour."""
    d = Driver()
    d.node("a", 2)
    running(d)
    d.now += timedelta(seconds=10)
    d.append(ev.GpuFault(id="late", at=d.now + timedelta(seconds=skew_s), actor="agent:a",
                         gpu_uuid="a/0", node="a", kind="xid", xid=48))  # fmt: skip
    assert d.of_type(ev.FaultClassified) == []
    d.advance(0.9)
    assert d.of_type(ev.FaultClassified) == []
    d.advance(0.2)
    assert only(d.of_type(ev.FaultClassified, "t1")).fault == "gpu_hardware"


def test_a_hung_attempts_gpus_come_back_with_a_start_failure_or_a_node_loss() -> None:
    for ending in ("start_failed", "node_lost"):
        d = Driver()
        d.node("a", 1)
        running(d)
        d.xid("a/0", 48)
        d.advance(2)
        assert d.state.gpus["a/0"].holder == ("t1", 1), ending
        if ending == "start_failed":
            d.emit(ev.ContainerStartFailed, task_id="t1", attempt=1, node="a", error="gone")
        else:
            d.emit(ev.NodeLost, node="a", last_heartbeat_at=d.now)
        assert d.state.gpus["a/0"].holder is None, ending
        assert len(d.of_type(ev.FaultClassified, "t1")) == 1, ending


@pytest.mark.parametrize("ended_by", ["cancel", "hung"])
@pytest.mark.parametrize("decided", ["in_one_round", "by_a_restarted_engine"])
def test_a_node_lost_and_back_before_its_loss_is_decided_still_frees_ended_attempts(
    ended_by: str, decided: str
) -> None:
    """Review finding: a cancelled (or hung) attempt waits for its exit while its node
    is alive. A node.lost and node.recovered folded before the loss is decided (one
    round, or an engine that was down) left the node alive again, so the attempt kept
    its GPUs, and waited for an exit its vanished container would never report. Decided
    event by event, the same log freed them at the loss."""
    d = Driver()
    d.node("a", 2)
    running(d, gpus=2)
    if ended_by == "cancel":
        cancel(d, "t1")
    else:
        d.xid("a/0", 48)
        d.advance(2)
    assert d.state.gpus["a/1"].holder == ("t1", 1)
    lost = ev.NodeLost(id="L", at=d.now, actor="engine", node="a", last_heartbeat_at=d.now)
    back = ev.NodeRecovered(id="R", at=d.now, actor="engine", node="a", last_heartbeat_at=d.now)
    for event in (lost, back):
        d.log.append(event)
        evolve(d.state, event)
    if decided == "in_one_round":
        group = decide_many(d.state, [lost, back], d.now)
    else:
        state = initial_state(d.state.policy)
        for event in d.log:
            evolve(state, event)
        group = reconcile(state, d.now)
    released = [e for e in group if isinstance(e, ev.GpuReleased) and e.task_id == "t1"]
    assert {e.gpu_uuid for e in released} >= {"a/1"}


def test_a_process_that_exits_within_the_window_is_classified_by_its_exit() -> None:
    """The usual case: the process dies of the Xid by itself. Its exit is the evidence
    (exit code kept for the policy), and no stop is sent."""
    d = Driver()
    d.node("a", 2)
    running(d)
    d.xid("a/0", 48)
    d.now += timedelta(seconds=0.9)
    d.exit("t1", 3)
    d.advance(5)
    classified = only(d.of_type(ev.FaultClassified, "t1"))
    assert (classified.fault, classified.rule) == ("gpu_hardware", "xid_hardware")
    assert classified.evidence[0] == d.of_type(ev.ContainerExited)[0].id
    assert commands_for(d.state, classified) == []
    assert d.state.timers == [] or all(t.kind != "fault" for t in d.state.timers)


def test_an_app_class_xid_on_a_running_task_concludes_nothing() -> None:
    d = Driver()
    d.node("a", 2)
    running(d)
    d.xid("a/0", 13)  # the application's own fault: its exit will tell
    d.advance(60)
    assert d.of_type(ev.FaultClassified) == [] and d.attempt("t1").live


def test_xid79_under_a_hung_process_rebuilds_on_another_node() -> None:
    d = Driver()
    d.node("a", 2)
    d.node("b", 2)
    running(d)
    d.xid("a/0", 79)
    d.advance(2)
    classified = only(d.of_type(ev.FaultClassified, "t1"))
    assert (classified.fault, classified.rule) == ("gpu_hardware", "xid_node")
    assert only(d.of_type(ev.RebuildDecided, "t1")).exclude_nodes == ("a",)
    assert len(commands_for(d.state, classified)) == 1
    d.advance(10)
    assert d.attempt("t1").node == "b"


def test_a_node_lost_under_a_hung_process_is_node_lost() -> None:
    d = Driver()
    d.node("a", 2)
    d.node("b", 2)
    running(d)
    d.xid("a/0", 48)
    d.emit(ev.NodeLost, node="a", last_heartbeat_at=d.now)
    classified = only(d.of_type(ev.FaultClassified, "t1"))
    assert classified.fault == "node_lost"
    assert commands_for(d.state, classified) == []  # its node is gone: stopped on recovery
    d.advance(5)
    assert len(d.of_type(ev.FaultClassified, "t1")) == 1


def test_xid79_rebuilds_on_another_node() -> None:
    d = Driver()
    d.node("a", 2)
    d.node("b", 2)
    running(d)
    assert d.attempt("t1").node == "a"
    d.xid("a/0", 79)
    d.exit("t1", 1)
    d.advance(1)
    classified = only(d.of_type(ev.FaultClassified, "t1"))
    assert (classified.fault, classified.rule) == ("gpu_hardware", "xid_node")
    rebuild = only(d.of_type(ev.RebuildDecided, "t1"))
    assert rebuild.exclude_nodes == ("a",)
    d.advance(10)
    assert d.attempt("t1").node == "b"  # a/1 is free and healthy, but its node needs a reboot


def lose(d: Driver, node: str) -> ev.Event:
    return d.emit(ev.NodeLost, node=node, last_heartbeat_at=d.now - timedelta(seconds=5))


def test_node_lost_classifies_running_attempts_and_rebuilds_them_elsewhere() -> None:
    d = Driver()
    d.node("a", 2)
    d.node("b", 2)
    running(d, "t1")
    running(d, "t2")
    assert {d.attempt("t1").node, d.attempt("t2").node} == {"a"}
    lost = lose(d, "a")
    for task in ("t1", "t2"):
        classified = only(d.of_type(ev.FaultClassified, task))
        assert (classified.fault, classified.evidence) == ("node_lost", (lost.id,))
        assert only(d.of_type(ev.RebuildDecided, task)).exclude_nodes == ("a",)
    assert holders(d) == {"a/0": None, "a/1": None, "b/0": None, "b/1": None}
    d.advance(10)
    assert {d.attempt("t1").node, d.attempt("t2").node} == {"b"}
    assert {d.attempt("t1").gpu_uuids, d.attempt("t2").gpu_uuids} == {("b/0",), ("b/1",)}


def test_node_recovered_stops_the_stale_container() -> None:
    d = Driver()
    d.node("a", 1)
    d.node("b", 1)
    running(d)
    lose(d, "a")
    d.advance(10)
    assert d.attempt("t1").node == "b"
    recovered = d.emit(ev.NodeRecovered, node="a")
    [stop] = commands_for(d.state, recovered)
    assert isinstance(stop, StopCommand)
    assert (stop.node, stop.task_id, stop.attempt, stop.container_id) == ("a", "t1", 1, "c-t1-1")
    assert stop.causation_id == recovered.id
    # the stale container's exit, when it comes, decides nothing
    before = len(d.log)
    a1 = d.state.tasks["t1"].attempts[1]
    d.emit(
        ev.ContainerExited, task_id="t1", attempt=1, node="a", container_id="c-t1-1", exit_code=137
    )
    d.advance(5)
    assert len(d.log) == before + 1
    assert a1.exited is not None
    assert commands_for(d.state, d.emit(ev.NodeRecovered, node="a")) == []


# --- evidence races ----------------------------------------------------------------


def test_xid_shortly_after_the_exit_still_counts_as_gpu_hardware() -> None:
    d = Driver()
    d.node("a", 2)
    running(d)
    d.exit("t1", 1)
    d.advance(0.3)
    d.xid("a/0", 48)
    d.advance(1)
    assert d.faults("t1") == ["gpu_hardware"]
    assert only(d.of_type(ev.RebuildDecided, "t1")).exclude_gpus == ("a/0",)
    assert d.of_type(ev.TaskFailed) == []


def test_xid_long_after_the_exit_is_too_late() -> None:
    d = Driver()
    d.node("a", 2)
    running(d)
    d.exit("t1", 1)
    d.advance(5)
    d.xid("a/0", 48)
    d.advance(60)
    assert d.faults("t1") == ["user_error"]
    assert only(d.of_type(ev.TaskFailed, "t1")).reason == "not_target_fault"
    assert d.state.gpus["a/0"].quarantined  # the GPU is still taken out of service


def test_node_lost_before_the_exit_decides_and_a_late_target_exit_decides_nothing() -> None:
    """137 (SIGKILL, preempted) is a target fault: the rebuild it calls for was made."""
    d = Driver()
    d.node("a", 1)
    d.node("b", 1)
    running(d)
    lose(d, "a")
    assert d.faults("t1") == ["node_lost"]
    d.advance(0.2)
    d.exit("t1", 137)  # the agent reports the kill once it can talk again
    d.advance(30)
    assert d.faults("t1") == ["node_lost"]  # no second classification
    assert len(d.of_type(ev.RebuildDecided, "t1")) == 1
    assert len(d.of_type(ev.GpuReleased, "t1")) == 1
    assert d.attempt("t1").n == 2 and d.attempt("t1").node == "b"


def test_exit_before_the_node_loss_is_classified_from_the_exit() -> None:
    d = Driver()
    d.node("a", 1)
    d.node("b", 1)
    running(d)
    d.exit("t1", 1)
    d.advance(0.5)
    lose(d, "a")
    assert d.of_type(ev.FaultClassified) == []  # the exit's window decides, not the loss
    d.advance(1)
    assert d.faults("t1") == ["user_error"]
    assert only(d.of_type(ev.TaskFailed, "t1")).reason == "not_target_fault"


def test_exit_finished_after_the_loss_but_reported_first_settles_the_attempt() -> None:
    """Late evidence wins (issue 15 (d)): the node was cut off, not gone. The real exit
    (1, a user error) fails the task as that fault; the rebuild is dropped."""
    d = Driver()
    d.node("a", 1)
    d.node("b", 1)
    running(d)
    lose(d, "a")
    d.advance(2)  # the rebuild waits out its backoff
    d.exit_attempt("t1", 1, 1)
    d.advance(30)
    assert d.faults("t1") == ["node_lost", "user_error"]
    failed = only(d.of_type(ev.TaskFailed, "t1"))
    assert (failed.attempt, failed.fault, failed.reason) == (1, "user_error", "not_target_fault")
    late = d.of_type(ev.FaultClassified, "t1")[-1]
    exited = d.of_type(ev.ContainerExited, "t1")[-1]
    assert late.causation_id == exited.id and failed.causation_id == late.id
    assert d.of_type(ev.TaskScheduled, "t1")[1:] == [], "the rebuild is never placed"


def late_exit_world(code: int, *, replacement_started: bool = True) -> tuple[Driver, ev.Event]:
    """t1 ran on a; a was declared lost and t1 rebuilt on b; then a's agent, back, says
    how attempt 1 really ended. Returns the driver and that exit."""
    d = Driver(Policy(backoff_initial_s=0))
    d.node("a", 1)
    d.node("b", 1)
    running(d)
    lose(d, "a")
    d.advance(1)
    assert d.attempt("t1").n == 2 and d.attempt("t1").node == "b"
    if replacement_started:
        d.start("t1")
    return d, d.exit_attempt("t1", 1, code)


def test_a_late_exit_0_completes_the_task_and_stops_the_replacement() -> None:
    d, exited = late_exit_world(0)
    completed = only(d.of_type(ev.TaskCompleted, "t1"))
    late = d.of_type(ev.FaultClassified, "t1")[-1]
    assert (late.attempt, late.fault, late.causation_id) == (1, "completed", exited.id)
    assert (completed.attempt, completed.causation_id) == (1, late.id)
    assert d.state.tasks["t1"].status == "completed"
    [stop] = commands_for(d.state, completed)
    assert isinstance(stop, StopCommand) and (stop.node, stop.attempt) == ("b", 2)
    assert stop.causation_id == completed.id and stop.reason.startswith("superseded")
    assert holders(d)["b/0"] == ("t1", 2), "the replacement's GPU waits for its exit"
    d.exit("t1", 143)  # the stop's SIGTERM
    assert holders(d)["b/0"] is None
    assert d.faults("t1") == ["node_lost"], "the stopped replacement is no fault"
    assert d.of_type(ev.RebuildDecided, "t1")[1:] == []


def test_a_late_non_target_exit_fails_the_task_as_that_fault() -> None:
    d, _ = late_exit_world(3)
    failed = only(d.of_type(ev.TaskFailed, "t1"))
    assert (failed.attempt, failed.fault) == (1, "user_error")
    [stop] = commands_for(d.state, failed)
    assert isinstance(stop, StopCommand) and stop.attempt == 2


def test_a_late_target_exit_leaves_the_replacement_standing() -> None:
    d, _ = late_exit_world(143)  # SIGTERM: preempted, which is rebuilt anyway
    assert d.of_type(ev.TaskCompleted, "t1") == d.of_type(ev.TaskFailed, "t1") == []
    assert d.faults("t1") == ["node_lost"]
    assert d.state.tasks["t1"].status == "running" and not d.attempt("t1").stop_requested


def test_a_late_exit_before_the_replacement_is_placed_places_nothing() -> None:
    d = Driver(Policy(backoff_initial_s=60))
    d.node("a", 1)
    d.node("b", 1)
    running(d)
    lose(d, "a")
    d.advance(1)
    assert d.state.tasks["t1"].rebuild is not None  # waiting out its backoff
    d.exit_attempt("t1", 1, 0)
    d.advance(120)
    assert d.state.tasks["t1"].status == "completed"
    assert d.of_type(ev.TaskScheduled, "t1")[1:] == [] and holders(d)["b/0"] is None


def test_a_late_exit_logged_while_no_engine_ran_is_settled_at_startup() -> None:
    d = Driver(Policy(backoff_initial_s=0))
    d.node("a", 1)
    d.node("b", 1)
    running(d)
    lose(d, "a")
    d.advance(1)
    d.start("t1")
    d.down = True
    d.exit_attempt("t1", 1, 0)
    d.restart()
    assert d.state.tasks["t1"].status == "completed"
    d.restart()  # and only once
    assert len(d.of_type(ev.TaskCompleted, "t1")) == 1


# --- budgets and backoff -----------------------------------------------------------


def preempt_and_wait(d: Driver, task: str = "t1") -> None:
    d.start(task)
    d.exit(task, 137)
    d.advance(1)


def test_backoff_doubles_and_is_capped() -> None:
    d = Driver(Policy(max_rebuilds=10, backoff_initial_s=10, backoff_max_s=50))
    d.node("a", 1)
    d.submit("t1")
    for _ in range(5):
        preempt_and_wait(d)
        d.advance(d.state.policy.backoff_max_s)
    delays = [(r.not_before - r.at).total_seconds() for r in d.of_type(ev.RebuildDecided)]
    assert delays == [10, 20, 40, 50, 50]
    assert d.attempt("t1").n == 6


def test_max_rebuilds_exhausted_fails_budget_exhausted() -> None:
    d = Driver(Policy(max_rebuilds=2))
    d.node("a", 1)
    d.submit("t1")
    for _ in range(3):
        preempt_and_wait(d)
        d.advance(300)
    assert len(d.of_type(ev.RebuildDecided, "t1")) == 2
    failed = only(d.of_type(ev.TaskFailed, "t1"))
    assert (failed.reason, failed.fault, failed.attempt) == ("budget_exhausted", "preempted", 3)
    assert d.state.tasks["t1"].status == "failed"
    assert holders(d) == {"a/0": None}


def test_the_budget_window_slides() -> None:
    d = Driver(Policy(max_rebuilds=1, window_s=100))
    d.node("a", 1)
    d.submit("t1")
    preempt_and_wait(d)
    d.advance(100)  # the first rebuild leaves the window
    preempt_and_wait(d)
    assert len(d.of_type(ev.RebuildDecided, "t1")) == 2
    delays = [(r.not_before - r.at).total_seconds() for r in d.of_type(ev.RebuildDecided)]
    assert delays == [10, 10]  # the backoff restarts with the window


def test_max_rebuilds_zero_allows_none() -> None:
    d = Driver(Policy(max_rebuilds=0))
    d.node("a", 1)
    d.submit("t1")
    preempt_and_wait(d)
    assert only(d.of_type(ev.TaskFailed, "t1")).reason == "budget_exhausted"


def test_rebuild_uncounted_does_not_use_the_budget() -> None:
    policy = Policy(
        max_rebuilds=1, rules=(Rule("rebuild_uncounted", faults=frozenset({"preempted"})),)
    )
    d = Driver(policy)
    d.node("a", 1)
    d.submit("t1")
    for _ in range(4):
        preempt_and_wait(d)
        d.advance(10)
    rebuilds = d.of_type(ev.RebuildDecided, "t1")
    assert [(r.counted, r.rule) for r in rebuilds] == [(False, 0)] * 4
    assert [(r.not_before - r.at).total_seconds() for r in rebuilds] == [10] * 4
    assert d.state.tasks["t1"].counted_rebuilds == []
    assert d.of_type(ev.TaskFailed) == []
    # a counted rebuild still has its whole budget
    d.start("t1")
    start_failed(d, "t1", "OCI runtime error")
    assert d.of_type(ev.RebuildDecided, "t1")[-1].counted


RULES = (
    Rule("fail", exit_codes_in=frozenset({42})),
    Rule("rebuild", exit_codes_in=frozenset({3}), faults=frozenset({"user_error"})),
    Rule("rebuild_uncounted", faults=frozenset({"preempted"})),
)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (42, ("failed", "policy_rule", 0)),
        (3, ("rebuild", True, 1)),
        (137, ("rebuild", False, 2)),
        (4, ("failed", "not_target_fault", None)),
    ],
)
def test_policy_rules_reach_the_log_with_their_index(code: int, expected: tuple[Any, ...]) -> None:
    d = Driver(Policy(rules=RULES))
    d.node("a", 1)
    running(d)
    d.exit("t1", code)
    d.advance(1)
    if expected[0] == "failed":
        failed = only(d.of_type(ev.TaskFailed, "t1"))
        assert ("failed", failed.reason, failed.rule) == expected
    else:
        rebuild = only(d.of_type(ev.RebuildDecided, "t1"))
        assert ("rebuild", rebuild.counted, rebuild.rule) == expected
        assert d.of_type(ev.TaskFailed) == []


# --- cancellation ------------------------------------------------------------------


def cancel(d: Driver, task: str) -> ev.Event:
    return d.emit(ev.TaskCancelled, task_id=task, reason="owner asked", actor="api")


def test_cancel_a_running_task_stops_it_and_frees_its_gpus_at_its_exit() -> None:
    d = Driver()
    d.node("a", 1)
    running(d)
    d.submit("t2")
    cancelled = cancel(d, "t1")
    assert d.state.tasks["t1"].status == "cancelled"
    [stop] = commands_for(d.state, cancelled)
    assert isinstance(stop, StopCommand)
    assert (stop.node, stop.attempt, stop.container_id) == ("a", 1, "c-t1-1")
    # its process still runs (and holds GPU memory) until the stop takes effect
    assert d.of_type(ev.GpuReleased, "t1") == []
    assert holders(d) == {"a/0": ("t1", 1)}
    assert d.of_type(ev.TaskScheduled, "t2") == []
    # the kill we asked for is no fault: nothing is classified or rebuilt
    d.exit("t1", 137)
    [died] = d.of_type(ev.ContainerExited, "t1")
    released = only(d.of_type(ev.GpuReleased, "t1"))
    assert released.causation_id == died.id
    assert only(d.of_type(ev.TaskScheduled, "t2")).gpu_uuids == ("a/0",)
    d.advance(60)
    assert d.of_type(ev.FaultClassified) == []
    assert d.of_type(ev.RebuildDecided) == []
    assert d.state.tasks["t1"].status == "cancelled"


@pytest.mark.parametrize("then", ["never_started", "started_late"])
def test_cancel_before_the_start_is_logged_holds_the_gpus_until_the_agent_answers(
    then: str,
) -> None:
    """The run command may already be at the agent: the GPUs wait for what it reports,
    a start failure (it refused to start a cancelled attempt) or a start and an exit."""
    d = Driver()
    d.node("a", 1)
    d.submit("t1")
    d.submit("t2")
    cancelled = cancel(d, "t1")
    [stop] = commands_for(d.state, cancelled)
    assert (stop.task_id, stop.attempt) == ("t1", 1)
    assert holders(d) == {"a/0": ("t1", 1)}
    if then == "never_started":
        answer = d.emit(ev.ContainerStartFailed, task_id="t1", attempt=1, node="a",
                        error="not started: the task was cancelled")  # fmt: skip
    else:
        d.start("t1")
        assert holders(d) == {"a/0": ("t1", 1)}
        answer = d.exit_attempt("t1", 1, 143)
    assert only(d.of_type(ev.GpuReleased, "t1")).causation_id == answer.id
    assert only(d.of_type(ev.TaskScheduled, "t2")).gpu_uuids == ("a/0",)
    assert d.of_type(ev.FaultClassified, "t1") == []


def test_a_cancelled_process_gives_its_gpus_back_with_its_node_or_a_start_failure() -> None:
    d = Driver()
    d.node("a", 1)
    d.node("b", 1)
    running(d, "t1")
    running(d, "t2")
    cancel(d, "t1")
    cancel(d, "t2")
    assert d.of_type(ev.GpuReleased) == []
    lost = d.emit(ev.NodeLost, node=d.attempt("t1").node, last_heartbeat_at=d.now)
    assert only(d.of_type(ev.GpuReleased, "t1")).causation_id == lost.id
    failed = d.emit(
        ev.ContainerStartFailed,
        task_id="t2",
        attempt=1,
        node=d.attempt("t2").node,
        error="OCI runtime create failed",
    )
    assert only(d.of_type(ev.GpuReleased, "t2")).causation_id == failed.id
    assert set(holders(d).values()) == {None}


def test_cancel_a_pending_task_never_places_it() -> None:
    d = Driver()
    d.node("a", 1)
    running(d, "t1")
    d.submit("t2")
    assert d.state.tasks["t2"].status == "pending"
    cancelled = cancel(d, "t2")
    assert commands_for(d.state, cancelled) == []
    d.exit("t1", 0)
    assert d.of_type(ev.TaskScheduled, "t2") == []
    assert d.state.tasks["t2"].status == "cancelled"
    assert holders(d) == {"a/0": None}


def test_cancel_during_backoff_stops_the_rebuild() -> None:
    d = Driver()
    d.node("a", 1)
    running(d)
    d.exit("t1", 137)
    d.advance(1)
    cancel(d, "t1")
    d.advance(60)
    assert len(d.of_type(ev.TaskScheduled, "t1")) == 1
    assert d.state.tasks["t1"].status == "cancelled"


# --- pending and unschedulable -----------------------------------------------------


def test_pending_tasks_get_a_reason_and_are_placed_in_submission_order() -> None:
    d = Driver()
    d.node("a", 2)
    running(d, "t1")
    running(d, "t2")
    d.submit("t3")
    d.submit("t4")
    for task in ("t3", "t4"):
        pending = only(d.of_type(ev.TaskPending, task))
        assert "waiting for 1 free GPU" in pending.reason
        assert d.state.tasks[task].status == "pending"
    d.exit("t2", 0)  # one GPU frees: the earlier submission gets it
    assert d.attempt("t3").gpu_uuids == ("a/1",)
    assert d.of_type(ev.TaskScheduled, "t4") == []
    assert len(d.of_type(ev.TaskPending, "t4")) == 1  # the same reason is not repeated
    d.exit("t1", 0)
    assert d.attempt("t4").gpu_uuids == ("a/0",)


def test_a_later_small_task_is_not_blocked_by_an_earlier_big_one() -> None:
    d = Driver()
    d.node("a", 2)
    running(d, "t1")
    d.submit("big", gpus=2)
    d.submit("small")
    assert d.state.tasks["big"].status == "pending"
    assert d.attempt("small").gpu_uuids == ("a/1",)


def test_a_task_larger_than_any_node_is_unschedulable() -> None:
    d = Driver()
    d.node("a", 2)
    d.node("b", 2)
    d.submit("t1", gpus=3)
    failed = only(d.of_type(ev.TaskFailed, "t1"))
    assert (failed.reason, failed.attempt, failed.fault) == ("unschedulable", None, None)
    assert "3 GPUs" in failed.detail
    assert d.state.tasks["t1"].status == "failed"
    assert d.of_type(ev.GpuAllocated) == []


def test_a_task_for_a_missing_model_is_unschedulable() -> None:
    d = Driver()
    d.node("a", 2, model="A100")
    d.submit("t1", gpu_model="H200")
    assert only(d.of_type(ev.TaskFailed, "t1")).reason == "unschedulable"


def test_a_task_submitted_before_any_node_waits_for_one() -> None:
    d = Driver()
    d.submit("t1")
    assert only(d.of_type(ev.TaskPending, "t1")).reason == "no nodes registered"
    d.node("a", 1)
    assert d.attempt("t1").gpu_uuids == ("a/0",)


def test_restored_gpu_places_a_waiting_task() -> None:
    d = Driver()
    d.node("a", 1)
    running(d)
    d.xid("a/0", 48)
    d.exit("t1", 1)
    d.advance(11)
    assert d.state.tasks["t1"].status == "pending" and d.state.tasks["t1"].rebuild is not None
    assert "quarantined" in d.of_type(ev.TaskPending, "t1")[-1].reason
    d.emit(ev.GpuRestored, gpu_uuid="a/0", node="a", reason="reset")
    # the fault excluded a/0 for this attempt: it must still wait
    assert d.of_type(ev.TaskScheduled, "t1")[-1].attempt == 1
    d.node("b", 1)
    assert d.attempt("t1").gpu_uuids == ("b/0",)


# --- ids, causation, determinism ---------------------------------------------------


def busy_history() -> Driver:
    d = Driver(Policy(max_rebuilds=5))
    d.node("a", 2)
    d.node("b", 2)
    running(d, "t1")
    running(d, "t2", gpus=2)
    d.submit("t3")
    d.xid("a/0", 48)
    d.exit("t1", 1)
    d.advance(1)
    lose(d, "b")
    d.advance(10)
    d.emit(ev.NodeRecovered, node="b")
    d.advance(30)
    return d


def test_decisions_carry_their_cause_and_their_task() -> None:
    d = busy_history()
    seen: dict[str, ev.Event] = {}
    engine_events = 0
    for event in d.log:
        if event.actor == "engine":
            engine_events += 1
            assert event.causation_id in seen, event
            task = getattr(event, "task_id", None)
            if task is not None:
                assert event.correlation_id == task, event
        seen[event.id] = event
    assert engine_events > 10
    assert len(seen) == len(d.log)  # ids are unique
    classified = d.of_type(ev.FaultClassified, "t1")[0]
    rebuild = d.of_type(ev.RebuildDecided, "t1")[0]
    assert rebuild.causation_id == classified.id
    assert classified.causation_id == d.of_type(ev.ContainerExited, "t1")[0].id
    submitted = only(d.of_type(ev.TaskSubmitted, "t1"))
    first = d.of_type(ev.TaskScheduled, "t1")[0]
    assert first.causation_id == submitted.id
    assert d.of_type(ev.TaskScheduled, "t1")[1].causation_id == rebuild.id
    for quarantine in d.of_type(ev.GpuQuarantined):
        assert quarantine.correlation_id == "t1"


def replay_each_decision(d: Driver, trigger_of: Any) -> int:
    """Re-derive every recorded decision from a fresh fold; returns how many."""
    by_id = {e.id: e for e in d.log}
    checked = 0
    for basis, trigger_id, group in d.decisions:
        state = initial_state(d.state.policy)
        for event in d.log[:basis]:
            evolve(state, event)
        trigger = None if trigger_id == "timer" else trigger_of(by_id[trigger_id])
        before = copy.deepcopy(state)
        first = decide(state, trigger, group[0].at)
        assert state == before  # decide does not mutate the state
        second = decide(state, trigger, group[0].at)
        assert first == second == group
        checked += 1
    return checked


def test_decide_is_deterministic_and_pure() -> None:
    d = busy_history()
    assert replay_each_decision(d, lambda e: e) > 5


def test_decide_depends_on_the_trigger_value_not_its_identity() -> None:
    """A replay decodes the trigger afresh: an equal copy must decide the same."""
    d = busy_history()
    assert replay_each_decision(d, lambda e: ev.decode(ev.encode(e))) > 5


def test_decide_on_a_decoded_log_re_derives_the_recorded_decisions() -> None:
    d = busy_history()
    decoded = [ev.decode(ev.encode(e)) for e in d.log]
    assert decoded == d.log
    state = initial_state(d.state.policy)
    groups = {basis: (trigger, group) for basis, trigger, group in d.decisions}
    for i, event in enumerate(decoded):
        if i in groups:
            trigger_id, group = groups[i]
            trigger = (
                None if trigger_id == "timer" else next(e for e in decoded if e.id == trigger_id)
            )
            assert decide(state, trigger, group[0].at) == group
        evolve(state, event)


def test_evolve_ignores_events_about_unknown_things() -> None:
    state = initial_state()
    strangers: list[ev.Event] = [
        ev.NodeLost(id="1", at=T0, actor="engine", node="ghost"),
        ev.NodeRecovered(id="2", at=T0, actor="engine", node="ghost"),
        ev.GpuFault(id="3", at=T0, actor="agent:x", gpu_uuid="g", node="ghost", kind="xid", xid=48),
        ev.GpuAllocated(
            id="4", at=T0, actor="engine", gpu_uuid="g", node="n", task_id="t", attempt=1
        ),
        ev.GpuReleased(
            id="5", at=T0, actor="engine", gpu_uuid="g", node="n", task_id="t", attempt=1
        ),
        ev.ContainerExited(
            id="6", at=T0, actor="agent:x", task_id="t", attempt=1, node="n", container_id="c"
        ),
        ev.TaskCancelled(id="7", at=T0, actor="api", task_id="t", reason="x"),
        ev.RebuildDecided(
            id="8",
            at=T0,
            actor="engine",
            task_id="t",
            attempt=2,
            previous_attempt=1,
            fault="preempted",
            counted=True,
            rule=None,
            not_before=T0,
        ),
    ]
    for event in strangers:
        evolve(state, event)
        assert decide(state, event, T0) == []
        assert commands_for(state, event) == []
    assert state.tasks == {} and state.gpus == {} and state.nodes == {}


def test_a_pending_reason_that_comes_back_gets_a_new_event_id() -> None:
    """Ids double as Nats-Msg-Id: a repeated id would be dropped as a duplicate."""
    d = Driver()
    d.node("a", 2)
    d.node("b", 1)
    running(d, "t1")
    running(d, "t3")
    assert (d.attempt("t1").node, d.attempt("t3").node) == ("b", "a")
    d.submit("t2", gpus=2)
    lose(d, "b")  # b/0 is released on a lost node: t2's reason changes
    d.emit(ev.NodeRecovered, node="b")  # ... and changes back
    reasons = [p.reason for p in d.of_type(ev.TaskPending, "t2")]
    assert len(reasons) == 3 and reasons[0] == reasons[-1] != reasons[1]
    ids = [e.id for e in d.log]
    assert len(ids) == len(set(ids))


def test_a_gpu_quarantined_in_a_round_is_not_allocated_in_the_same_round() -> None:
    """An Xid and a due backoff decided together (one burst): the rebuild avoids the GPU."""
    d = Driver()
    d.node("a", 2)
    running(d)
    d.exit("t1", 137)
    d.advance(1)
    rebuild = only(d.of_type(ev.RebuildDecided, "t1"))
    d.now = rebuild.not_before  # the Xid lands exactly when the backoff is due
    d.xid("a/0", 48)
    assert d.state.gpus["a/0"].quarantined
    assert d.attempt("t1").gpu_uuids == ("a/1",)


def test_a_lost_node_that_registers_again_stays_lost_until_it_recovers() -> None:
    from gpuwarden.engine.core.commands import StopCommand, commands_for

    d = Driver()
    d.node("a", 1)
    d.node("b", 1)
    d.submit("t1")
    d.start("t1")
    node = d.attempt("t1").node
    lost = d.emit(ev.NodeLost, node=node)
    assert d.faults("t1") == ["node_lost"]
    d.node(node, 1)  # the agent restarts and registers with a changed inventory
    assert not d.state.nodes[node].alive
    recovered = d.emit(ev.NodeRecovered, node=node, last_heartbeat_at=lost.at)
    stops = commands_for(d.state, recovered)
    assert [type(c) for c in stops] == [StopCommand] and stops[0].task_id == "t1"


def test_a_task_rebuilt_after_node_loss_may_return_to_the_node_once_it_recovered() -> None:
    d = Driver()
    d.node("a", 1)
    d.node("b", 1)
    d.submit("t1")
    d.submit("t2")
    d.start("t1")
    d.start("t2")
    lost = d.attempt("t1").node
    d.emit(ev.NodeLost, node=lost)
    d.advance(60)
    task = d.state.tasks["t1"]
    assert task.status == "pending" and task.rebuild is not None  # the other node is busy with t2
    d.emit(ev.NodeRecovered, node=lost)
    d.advance(1)
    assert d.state.tasks["t1"].status == "running"
    assert d.attempt("t1").n == 2 and d.attempt("t1").node == lost


def test_a_gpu_its_node_stopped_listing_does_not_count_as_free_when_released() -> None:
    """Review finding: node a re-registers without a/0 while t1 holds it; t1's release
    of a/0 used to add one to a's free count (a GPU a no longer has)."""
    d = Driver()
    d.node("a", 2)
    running(d)
    only_a1 = (ev.GpuInfo(uuid="a/1", index=1, model="H100", memory_mb=81920),)
    d.emit(ev.NodeRegistered, node="a", runtime="sim", gpus=only_a1)
    d.exit("t1", 0)  # the driver recounts every index after each fold
    assert d.state.nodes["a"].free == 1 and d.state.free_ranked == [(1, "a")]


def _fold_as_engine_round(d: Driver, appended_first: ev.Event, group: list[ev.Event]) -> None:
    """What the engine's log holds when its liveness step appends an event just before
    the decisions it made on the state without it, then its next round decides on both."""
    for event in (appended_first, *group):
        d.log.append(event)
        evolve(d.state, event)
    follow = decide_many(d.state, [appended_first, *group], d.now)
    for event in follow:
        d.append(event)


def test_a_hung_conclusion_logged_after_its_nodes_loss_is_stopped_on_recovery() -> None:
    """Second review: the fault timer's round decided on the state before the node.lost
    its own liveness step appended; the conclusion came after the loss, so neither it
    nor the recovery sent a stop, and the process ran on."""
    d = Driver()
    d.node("a", 2)
    running(d, gpus=2)
    d.xid("a/0", 48)
    due = next_due(d.state)
    assert due is not None
    d.now = due
    group = decide(d.state, None, d.now)
    classified = only([e for e in group if isinstance(e, ev.FaultClassified)])
    lost = ev.NodeLost(id="lost-a", at=d.now, actor="engine", node="a", last_heartbeat_at=d.now)
    _fold_as_engine_round(d, lost, group)
    assert commands_for(d.state, classified) == []  # its node is away
    recovered = d.emit(ev.NodeRecovered, node="a", last_heartbeat_at=d.now)
    [stop] = commands_for(d.state, recovered)
    assert isinstance(stop, StopCommand)
    assert (stop.task_id, stop.attempt, stop.grace_s) == ("t1", 1, 0.0)


def test_a_node_lost_conclusion_logged_after_the_recovery_is_stopped() -> None:
    """Second review (older path): node.recovered landed before the node_lost conclusion
    made on the state without it; nothing stopped the stale container."""
    d = Driver(Policy(backoff_initial_s=0))
    d.node("a", 1)
    running(d)
    lost = ev.NodeLost(id="lost-a", at=d.now, actor="engine", node="a", last_heartbeat_at=d.now)
    d.log.append(lost)
    evolve(d.state, lost)
    group = decide(d.state, lost, d.now)  # the round deciding on the loss...
    back = ev.NodeRecovered(id="back-a", at=d.now, actor="engine", node="a",
                            last_heartbeat_at=d.now)  # fmt: skip
    _fold_as_engine_round(d, back, group)  # ...after its liveness step logged the recovery
    assert d.log.index(back) < d.log.index(group[0])
    classified = only([e for e in group if isinstance(e, ev.FaultClassified)])
    assert classified.fault == "node_lost"
    [stop] = commands_for(d.state, classified)  # folded on a live node: stop it now
    assert (stop.task_id, stop.attempt, stop.grace_s) == ("t1", 1, None)


def test_a_hung_attempts_gpu_its_node_stopped_listing_comes_back_with_the_nodes_loss() -> None:
    """Second review: the node's loss released hung attempts' GPUs by walking the GPUs
    the node lists; one it no longer lists stayed held."""
    d = Driver()
    d.node("a", 2)
    running(d, task="t0")  # a/0
    running(d, task="t1")  # a/1
    d.xid("a/1", 48)
    d.advance(2)
    assert d.state.gpus["a/1"].holder == ("t1", 1)  # hung: held until its exit
    only_a0 = (ev.GpuInfo(uuid="a/0", index=0, model="H100", memory_mb=81920),)
    d.emit(ev.NodeRegistered, node="a", runtime="sim", gpus=only_a0)
    d.emit(ev.NodeLost, node="a", last_heartbeat_at=d.now)
    assert d.state.gpus["a/1"].holder is None


def test_a_restart_releases_citing_an_event_that_is_in_the_log() -> None:
    """Review finding: with the engine down, t1's node was lost and t1 cancelled; the
    restart's sweep released t1's GPU citing an id derived from the loss, an event
    nobody logged, so an audit of that release led nowhere."""
    d = Driver()
    d.node("a", 1)
    running(d)
    lost = ev.NodeLost(id="L", at=d.now, actor="engine", node="a", last_heartbeat_at=d.now)
    cancelled = ev.TaskCancelled(id="C", at=d.now, actor="api", task_id="t1", reason="owner")
    state = initial_state(d.state.policy)
    for event in [*d.log, lost, cancelled]:
        evolve(state, event)
    group = reconcile(state, d.now)
    released = only([e for e in group if isinstance(e, ev.GpuReleased)])
    assert released.causation_id == lost.id
