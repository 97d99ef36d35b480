"""`explain` tells each fault type's story from hand-written logs, from memory and SQLite."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.ports import StoredEvent
from gpuwarden.projections.errors import TaskNotFoundError
from gpuwarden.projections.explain import (
    Explanation,
    explain,
    explain_events,
    render_text,
    to_json,
)
from gpuwarden.projections.store import ProjectionStore

from tests.test_projections_log import T0, ListLog, LogBuilder, sample_log

Explainer = Callable[[list[StoredEvent], str], Awaitable[Explanation]]


@pytest.fixture(params=["events", "store"])
def explainer(request: pytest.FixtureRequest, tmp_path: Path) -> Explainer:
    async def from_events(stored: list[StoredEvent], task_id: str) -> Explanation:
        return await explain(stored, task_id)

    async def from_store(stored: list[StoredEvent], task_id: str) -> Explanation:
        async with ProjectionStore(tmp_path) as store:
            await store.catch_up(ListLog(stored))
            return await explain(store, task_id)

    return from_events if request.param == "events" else from_store


def started(b: LogBuilder, attempt: int = 1, node: str = "n1", gpu: str = "G1") -> Any:
    if attempt == 1:  # the node first: admission takes a GPU's faults from its own node only
        b.add(ev.NodeRegistered, node=node, runtime="sim", actor=f"agent:{node}",
              gpus=(ev.GpuInfo(uuid=gpu, index=0),))  # fmt: skip
        b.add(ev.TaskSubmitted, task_id="t", name="job", image="img", command=("run",),
              owner="dana", actor="api")  # fmt: skip
    sched = b.add(ev.TaskScheduled, task_id="t", attempt=attempt, node=node, gpu_uuids=(gpu,))
    b.add(ev.GpuAllocated, gpu_uuid=gpu, node=node, task_id="t", attempt=attempt)
    return b.add(ev.ContainerStarted, task_id="t", attempt=attempt, node=node,
                 container_id=f"c{attempt}", causation_id=sched.id)  # fmt: skip


def exited(b: LogBuilder, attempt: int = 1, **fields: Any) -> Any:
    fields.setdefault("node", "n1")
    return b.add(ev.ContainerExited, task_id="t", attempt=attempt,
                 container_id=f"c{attempt}", **fields)  # fmt: skip


def classified(b: LogBuilder, fault: str, rule: str, *evidence: Any, attempt: int = 1) -> Any:
    return b.add(ev.FaultClassified, task_id="t", attempt=attempt, fault=fault, rule=rule,
                 evidence=tuple(e.id for e in evidence), causation_id=evidence[0].id)  # fmt: skip


def rebuilt(b: LogBuilder, cause: Any, fault: str, counted: bool = True, **fields: Any) -> Any:
    fields.setdefault("rule", None)
    return b.add(ev.RebuildDecided, task_id="t", attempt=2, previous_attempt=1, fault=fault,
                 counted=counted, not_before=T0 + timedelta(minutes=5),
                 causation_id=cause.id, **fields)  # fmt: skip


def failed(b: LogBuilder, cause: Any, fault: str, reason: str, **fields: Any) -> Any:
    return b.add(ev.TaskFailed, task_id="t", attempt=1, fault=fault, reason=reason,
                 causation_id=cause.id, **fields)  # fmt: skip


async def test_completed(explainer: Explainer) -> None:
    b = LogBuilder()
    started(b)
    out = exited(b, exit_code=0)
    cls = classified(b, "completed", "exit_zero", out)
    b.add(ev.TaskCompleted, task_id="t", attempt=1, causation_id=cls.id)
    x = await explainer(b.stored, "t")
    assert (x.state, x.name, x.owner) == ("completed", "job", "dana")
    [a] = x.attempts
    assert (a.node, a.gpus, a.end, a.exit_code, a.fault) == (
        "n1",
        ("G1",),
        "exited",
        0,
        "completed",
    )
    assert a.decision is not None and a.decision.kind == "complete"
    assert [link.type for link in a.decision.because] == ["fault.classified", "container.exited"]
    assert "decision: completed" in render_text(x)


async def test_user_error_fails_as_not_target_fault(explainer: Explainer) -> None:
    b = LogBuilder()
    started(b)
    out = exited(b, exit_code=1)
    cls = classified(b, "user_error", "exit_nonzero", out)
    failed(b, cls, "user_error", "not_target_fault")
    x = await explainer(b.stored, "t")
    [a] = x.attempts
    assert a.decision is not None
    assert (a.decision.kind, a.decision.reason, a.decision.fault) == (
        "fail", "not_target_fault", "user_error")  # fmt: skip
    assert x.final is a.decision or x.final == a.decision
    text = render_text(x)
    assert "exit code 1" in text
    assert "classified user_error by rule exit_nonzero" in text
    assert "decision: fail (not_target_fault; fault user_error)" in text


async def test_preempted_is_rebuilt_uncounted(explainer: Explainer) -> None:
    b = LogBuilder()
    started(b)
    out = exited(b, exit_code=None, signal=15, error="preempted by scheduler")
    cls = classified(b, "preempted", "signal_term_preempt", out)
    rebuilt(b, cls, "preempted", counted=False, rule=2)
    started(b, attempt=2, node="n2", gpu="G2")
    x = await explainer(b.stored, "t")
    first, second = x.attempts
    assert (first.signal, first.error) == (15, "preempted by scheduler")
    d = first.decision
    assert d is not None
    assert (d.kind, d.counted, d.rule, d.next_attempt) == ("rebuild", False, 2, 2)
    assert d.not_before == "2025-03-01T12:05:00.000000+00:00"
    assert (second.node, second.end, x.state) == ("n2", "running", "running")
    text = render_text(x)
    assert "rebuild as attempt 2 (policy rule 2; not counted)" in text
    assert "signal 15" in text


async def test_gpu_hardware_cites_the_xid(explainer: Explainer) -> None:
    b = LogBuilder()
    started(b)
    out = exited(b, exit_code=None, signal=6)
    xid = b.add(ev.GpuFault, gpu_uuid="G1", node="n1", kind="xid", xid=48,
                detail="double bit ECC")  # fmt: skip
    cls = classified(b, "gpu_hardware", "xid_reset", xid, out)
    rebuilt(b, cls, "gpu_hardware", exclude_gpus=("G1",))
    x = await explainer(b.stored, "t")
    [a] = x.attempts
    assert [e.type for e in a.evidence] == ["gpu.fault", "container.exited"]
    assert "xid 48" in a.evidence[0].summary
    assert a.decision is not None and a.decision.exclude_gpus == ("G1",)
    assert [link.type for link in a.decision.because] == ["fault.classified", "gpu.fault"]
    text = render_text(x)
    assert "evidence #" in text and "xid 48 (double bit ECC)" in text
    assert "excluding GPUs G1" in text and "counted against the budget" in text


async def test_node_lost_ends_the_attempt_with_its_node(explainer: Explainer) -> None:
    b = LogBuilder()
    started(b)
    lost = b.add(ev.NodeLost, node="n1", last_heartbeat_at=T0)
    cls = classified(b, "node_lost", "node_lost", lost)
    rebuilt(b, cls, "node_lost", exclude_nodes=("n1",))
    x = await explainer(b.stored, "t")
    [a] = x.attempts
    assert (a.end, a.fault) == ("node_lost", "node_lost")
    assert a.evidence[0].type == "node.lost"
    text = render_text(x)
    assert "lost with its node" in text and "excluding nodes n1" in text
    assert "node n1 lost (last heartbeat 2025-03-01T12:00:00" in text


async def test_container_oom(explainer: Explainer) -> None:
    b = LogBuilder()
    started(b)
    out = exited(b, exit_code=137, oom_killed=True)
    cls = classified(b, "container_oom", "oom_killed", out)
    failed(b, cls, "container_oom", "not_target_fault")
    x = await explainer(b.stored, "t")
    assert x.attempts[0].oom_killed and x.state == "failed"
    assert "killed for running out of memory (OOM)" in render_text(x)


async def test_image_error_start_failure(explainer: Explainer) -> None:
    b = LogBuilder()
    b.add(ev.TaskSubmitted, task_id="t", name="job", image="nope:1", command=("x",))
    b.add(ev.TaskScheduled, task_id="t", attempt=1, node="n1", gpu_uuids=("G1",))
    sf = b.add(ev.ContainerStartFailed, task_id="t", attempt=1, node="n1",
               error="pull access denied for nope")  # fmt: skip
    cls = classified(b, "image_error", "start_failed_image", sf)
    failed(b, cls, "image_error", "not_target_fault")
    x = await explainer(b.stored, "t")
    [a] = x.attempts
    assert (a.end, a.error, a.started_at) == ("start_failed", "pull access denied for nope", None)
    assert "never started" in render_text(x)


async def test_budget_exhausted(explainer: Explainer) -> None:
    b = LogBuilder()
    started(b)
    out = exited(b, exit_code=None, signal=9)
    xid = b.add(ev.GpuFault, gpu_uuid="G1", node="n1", kind="xid", xid=79)
    cls = classified(b, "gpu_hardware", "xid_79", xid, out)
    failed(b, cls, "gpu_hardware", "budget_exhausted", detail="3 rebuilds within 1h")
    x = await explainer(b.stored, "t")
    d = x.attempts[0].decision
    assert d is not None and (d.reason, d.detail) == ("budget_exhausted", "3 rebuilds within 1h")
    assert "decision: fail (budget_exhausted; fault gpu_hardware) — 3 rebuilds" in render_text(x)


async def test_policy_rule_failure_names_the_rule(explainer: Explainer) -> None:
    b = LogBuilder()
    started(b)
    out = exited(b, exit_code=42)
    cls = classified(b, "user_error", "exit_nonzero", out)
    failed(b, cls, "user_error", "policy_rule", rule=0)
    x = await explainer(b.stored, "t")
    d = x.attempts[0].decision
    assert d is not None and (d.reason, d.rule) == ("policy_rule", 0)
    assert "decision: fail (policy_rule, policy rule 0; fault user_error)" in render_text(x)


async def test_unschedulable_failure_has_no_attempt(explainer: Explainer) -> None:
    b = LogBuilder()
    b.add(ev.TaskSubmitted, task_id="t", name="big", image="img", command=("x",), gpus=64)
    b.add(ev.TaskPending, task_id="t", reason="needs 64 GPUs, cluster has 8")
    b.add(ev.TaskFailed, task_id="t", attempt=None, fault=None, reason="unschedulable")
    x = await explainer(b.stored, "t")
    assert x.attempts == [] and x.final is not None and x.final.reason == "unschedulable"
    text = render_text(x)
    assert "pending: needs 64 GPUs" in text and "decision: fail (unschedulable" in text


async def test_the_sample_log_tells_every_task(explainer: Explainer) -> None:
    stored = sample_log().stored
    t1 = await explainer(stored, "t1")
    assert [a.decision.kind for a in t1.attempts if a.decision] == ["rebuild", "complete"]
    t3 = await explainer(stored, "t3")
    assert t3.state == "cancelled" and t3.final is not None and t3.final.kind == "cancel"


async def test_json_carries_the_same_story() -> None:
    x = explain_events(sample_log().stored, "t1")
    data = json.loads(to_json(x))
    assert data["task_id"] == "t1"
    assert [a["attempt"] for a in data["attempts"]] == [1, 2]
    assert data["attempts"][0]["evidence"][1]["type"] == "gpu.fault"


async def test_unknown_task_is_an_error(explainer: Explainer) -> None:
    with pytest.raises(TaskNotFoundError, match="nope"):
        await explainer(sample_log().stored, "nope")


def test_missing_evidence_is_named() -> None:
    b = LogBuilder()
    started(b)
    b.add(ev.FaultClassified, task_id="t", attempt=1, fault="unknown", rule="none",
          evidence=("ghost",))  # fmt: skip
    x = explain_events(b.stored, "t")
    assert x.attempts[0].missing_evidence == ["ghost"]
    assert "evidence ghost: not in the log" in render_text(x)


async def test_a_hung_process_is_concluded_before_its_exit_and_stopped(
    explainer: Explainer,
) -> None:
    """Rule 4b: the Xid decides without an exit; the exit that follows is gpuwarden's
    kill, and the story says so instead of presenting it as what ended the attempt."""
    b = LogBuilder()
    started(b)
    xid = b.add(ev.GpuFault, gpu_uuid="G1", node="n1", kind="xid", xid=48)
    cls = classified(b, "gpu_hardware", "xid_hardware", xid)
    rebuilt(b, cls, "gpu_hardware", exclude_gpus=("G1",))
    exited(b, exit_code=137, signal=9)
    x = await explainer(b.stored, "t")
    [a] = x.attempts
    assert [e.type for e in a.evidence] == ["gpu.fault"]
    assert a.stopped_after_conclusion and a.exit_code == 137
    assert "stopped by gpuwarden after it was classified" in render_text(x)
    assert '"stopped_after_conclusion":true' in to_json(x)
