"""Admission of stored messages: every rule refuses what it must, naming the field, and
admits every event a legitimate engine, agent, API or operator writes.

Pure and fast: no NATS, no Docker.
"""

from __future__ import annotations

import base64
import json
import time
import types
import typing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest
from gpuwarden.engine.core import admission as adm
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core import intake
from gpuwarden.engine.core.admission import Admission, check_event, check_subject
from gpuwarden.engine.core.state import GPU_FAULT_MEMORY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.supervisor_driver import Driver
from tests.test_layering import FORBIDDEN, imported_roots

AT = datetime(2026, 12, 4, 13, 50, tzinfo=UTC)
LATER = AT + timedelta(days=3650)
ULID = "01JEFGH0123456789ABCDEFGHJ"
CONTAINER = "f" * 64
GPU = "GPU-8f3c1e2a-5b6d-4c7e-9f80-1a2b3c4d5e6f"

# One sane event of every type: each table row changes one field.
REQUIRED: dict[type[Any], dict[str, Any]] = {
    ev.NodeRegistered: {
        "node": "n1",
        "runtime": "docker",
        "gpus": (ev.GpuInfo(uuid=GPU, index=0, model="NVIDIA H200", memory_mb=143771),),
    },
    ev.NodeLost: {"node": "n1", "last_heartbeat_at": AT},
    ev.NodeRecovered: {"node": "n1", "last_heartbeat_at": AT},
    ev.GpuFault: {"gpu_uuid": GPU, "node": "n1", "kind": "xid", "xid": 79, "detail": "Xid 79"},
    ev.GpuQuarantined: {"gpu_uuid": GPU, "node": "n1", "reason": "gpu_hardware: xid_node"},
    ev.GpuRestored: {"gpu_uuid": GPU, "node": "n1", "reason": "reset by hand"},
    ev.GpuAllocated: {"gpu_uuid": GPU, "node": "n1", "task_id": "T", "attempt": 1},
    ev.GpuReleased: {"gpu_uuid": GPU, "node": "n1", "task_id": "T", "attempt": 1},
    ev.TaskSubmitted: {
        "task_id": "T",
        "name": "train resnet",
        "image": "pytorch/pytorch:2.3",
        "command": ("python", "train.py"),
        "env": {"EPOCHS": "3"},
        "owner": "alice",
        "memory_mb": 4096,
        "request_id": "req-1",
    },
    ev.TaskPending: {"task_id": "T", "reason": "waiting for 1 free GPU on one node"},
    ev.TaskScheduled: {"task_id": "T", "attempt": 1, "node": "n1", "gpu_uuids": (GPU,)},
    ev.ContainerStarted: {"task_id": "T", "attempt": 1, "node": "n1", "container_id": CONTAINER},
    ev.ContainerStartFailed: {
        "task_id": "T",
        "attempt": 1,
        "node": "n1",
        "error": "No such image: x:1\nsee the registry",
    },
    ev.ContainerExited: {
        "task_id": "T",
        "attempt": 1,
        "node": "n1",
        "container_id": CONTAINER,
        "exit_code": 137,
        "signal": 9,
        "finished_at": AT,
    },
    ev.FaultClassified: {
        "task_id": "T",
        "attempt": 1,
        "fault": "preempted",
        "rule": "signal_preempted",
        "evidence": (ULID,),
    },
    ev.RebuildDecided: {
        "task_id": "T",
        "attempt": 2,
        "previous_attempt": 1,
        "fault": "preempted",
        "counted": True,
        "rule": None,
        "not_before": AT + timedelta(seconds=30),
        "exclude_gpus": (GPU,),
        "exclude_nodes": ("n1",),
    },
    ev.TaskCompleted: {"task_id": "T", "attempt": 1},
    ev.TaskFailed: {
        "task_id": "T",
        "attempt": 1,
        "fault": "user_error",
        "reason": "not_target_fault",
        "rule": 0,
    },
    ev.TaskCancelled: {"task_id": "T", "reason": "cancelled by owner", "attempt": 1},
}


def make(cls: type[Any], **fields: Any) -> Any:
    values: dict[str, Any] = {
        "id": ULID,
        "at": AT,
        "actor": "engine",
        "causation_id": None,
        "correlation_id": "T",
    }
    values.update(REQUIRED[cls])
    values.update(fields)
    return cls(**values)


def test_every_type_has_a_sane_example_that_is_admitted() -> None:
    assert set(REQUIRED) == set(ev.Event.__args__)  # type: ignore[attr-defined]
    for cls in REQUIRED:
        assert check_event(make(cls)) is None, cls


# --- the stateless rules ---------------------------------------------------------------

NAIVE = datetime(2026, 12, 4, 13, 50)
Y9999 = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
PLUS14 = timezone(timedelta(hours=14))

REFUSED: list[tuple[str, Any, str]] = [
    # times
    ("naive at", make(ev.TaskCompleted, at=NAIVE), "at: time has no zone"),
    ("year 9999", make(ev.TaskCompleted, at=Y9999), "at: 9999-12-31T23:59:59.999000+00:00 out"),
    ("year 1999", make(ev.TaskCompleted, at=datetime(1999, 12, 31, tzinfo=UTC)), "at: 1999"),
    ("at 2200 (excl.)", make(ev.TaskCompleted, at=datetime(2200, 1, 1, tzinfo=UTC)), "at: 2200"),
    ("year 1 at +14", make(ev.TaskCompleted, at=datetime(1, 1, 1, tzinfo=PLUS14)), "at: 0001"),
    ("naive finished_at", make(ev.ContainerExited, finished_at=NAIVE), "finished_at: time has"),
    ("naive heartbeat", make(ev.NodeLost, last_heartbeat_at=NAIVE), "last_heartbeat_at: time"),
    ("naive heartbeat 2", make(ev.NodeRecovered, last_heartbeat_at=NAIVE), "last_heartbeat_at"),
    ("not_before 9999", make(ev.RebuildDecided, not_before=Y9999), "not_before: 9999"),
    # integers
    ("attempt 0", make(ev.TaskCompleted, attempt=0), "attempt: 0 out of range 1..1000000"),
    (
        "attempt 10**30",
        make(ev.ContainerStarted, attempt=10**30),
        "attempt: 1000000000000000000000000000000 out of range 1..1000000",
    ),
    ("attempt 10**5000", make(ev.TaskCompleted, attempt=10**5000), "attempt: an integer of"),
    ("attempt -1", make(ev.GpuAllocated, attempt=-1), "attempt: -1 out of range"),
    ("pending attempt", make(ev.TaskPending, attempt=0), "attempt: 0"),
    ("scheduled attempt", make(ev.TaskScheduled, attempt=1_000_001), "attempt: 1000001"),
    ("failed attempt", make(ev.TaskFailed, attempt=0), "attempt: 0"),
    ("cancelled attempt", make(ev.TaskCancelled, attempt=0), "attempt: 0"),
    ("previous_attempt", make(ev.RebuildDecided, previous_attempt=0), "previous_attempt: 0"),
    ("exit_code 2**31", make(ev.ContainerExited, exit_code=2**31), "exit_code: 2147483648"),
    ("exit_code low", make(ev.ContainerExited, exit_code=-(2**31) - 1), "exit_code: -2147483649"),
    ("signal 0", make(ev.ContainerExited, signal=0), "signal: 0 out of range 1..128"),
    ("signal 129", make(ev.ContainerExited, signal=129), "signal: 129"),
    ("xid negative", make(ev.GpuFault, xid=-1), "xid: -1 out of range 0..1000000"),
    ("xid huge", make(ev.GpuFault, xid=1_000_001), "xid: 1000001"),
    ("gpus -1", make(ev.TaskSubmitted, gpus=-1), "gpus: -1 out of range 0..1024"),
    ("gpus 1025", make(ev.TaskSubmitted, gpus=1025), "gpus: 1025"),
    ("min memory", make(ev.TaskSubmitted, min_gpu_memory_mb=2**40 + 1), "min_gpu_memory_mb:"),
    ("memory_mb 0", make(ev.TaskSubmitted, memory_mb=0), "memory_mb: 0 out of range 1..67108864"),
    ("memory_mb big", make(ev.TaskSubmitted, memory_mb=64 * 1024 * 1024 + 1), "memory_mb: 6710"),
    (
        "gpu index",
        make(ev.NodeRegistered, gpus=(ev.GpuInfo(uuid=GPU, index=1024),)),
        "gpus[0].index: 1024 out of range 0..1023",
    ),
    (
        "gpu memory",
        make(ev.NodeRegistered, gpus=(ev.GpuInfo(uuid=GPU, index=0, memory_mb=-1),)),
        "gpus[0].memory_mb: -1",
    ),
    ("rebuild rule", make(ev.RebuildDecided, rule=10_001), "rule: 10001 out of range 0..10000"),
    ("failed rule", make(ev.TaskFailed, rule=-1), "rule: -1"),
    # ids
    ("empty id", make(ev.TaskCompleted, id=""), "id: empty"),
    ("long id", make(ev.TaskCompleted, id="x" * 129), "id: 129 characters, over 128"),
    ("NUL id", make(ev.TaskCompleted, id="a\0b"), "id: 'a\\x00b' has a control character"),
    ("space in task_id", make(ev.TaskCompleted, task_id="a b"), "task_id: 'a b' has"),
    ("tab in node", make(ev.NodeLost, node="n\t1"), "node: 'n\\t1' has"),
    ("nbsp in node", make(ev.GpuFault, node="n\xa01"), "node: "),
    ("line sep", make(ev.TaskCompleted, causation_id="a\u2028b"), "causation_id: "),
    ("empty correlation", make(ev.TaskCompleted, correlation_id=""), "correlation_id: empty"),
    ("gpu_uuid", make(ev.GpuQuarantined, gpu_uuid=""), "gpu_uuid: empty"),
    ("restored gpu", make(ev.GpuRestored, gpu_uuid="G 1"), "gpu_uuid: 'G 1'"),
    ("released node", make(ev.GpuReleased, node=""), "node: empty"),
    ("container id", make(ev.ContainerStarted, container_id="c\n"), "container_id: 'c\\n'"),
    ("exited container", make(ev.ContainerExited, container_id="x" * 129), "container_id: 129"),
    ("inventory uuid", make(ev.NodeRegistered, gpus=(ev.GpuInfo(uuid="", index=0),)), "gpus[0].uu"),
    ("request_id", make(ev.TaskSubmitted, request_id="r 1"), "request_id: 'r 1'"),
    ("evidence", make(ev.FaultClassified, evidence=("a", "")), "evidence[1]: empty"),
    ("exclude_nodes", make(ev.RebuildDecided, exclude_nodes=("n 1",)), "exclude_nodes[0]:"),
    ("exclude_gpus", make(ev.RebuildDecided, exclude_gpus=("\0",)), "exclude_gpus[0]:"),
    ("actor empty", make(ev.TaskCompleted, actor=""), "actor: empty"),
    ("actor newline", make(ev.TaskCompleted, actor="api:a\nb"), "actor: 'api:a\\nb' is not"),
    ("actor long", make(ev.TaskCompleted, actor="a" * 129), "actor: 129 characters"),
    # free text and names
    ("detail NUL", make(ev.GpuFault, detail="x\0"), "detail: has a NUL character"),
    ("error long", make(ev.ContainerStartFailed, error="e" * 16385), "error: 16385 characters"),
    ("exit error NUL", make(ev.ContainerExited, error="\0"), "error: has a NUL"),
    ("surrogate", make(ev.ContainerExited, error="\udc80"), "error: not valid UTF-8 text"),
    ("pending reason", make(ev.TaskPending, reason="\0"), "reason: has a NUL"),
    ("quarantine reason", make(ev.GpuQuarantined, reason="r" * 16385), "reason: 16385"),
    ("cancel reason NUL", make(ev.TaskCancelled, reason="bye\0"), "reason: has a NUL"),
    ("failed detail", make(ev.TaskFailed, detail="\0"), "detail: has a NUL"),
    ("name long", make(ev.TaskSubmitted, name="n" * 129), "name: 129 characters, over 128"),
    ("name newline", make(ev.TaskSubmitted, name="a\nb"), "name: 'a\\nb' is not printable"),
    ("owner", make(ev.TaskSubmitted, owner="o\0"), "owner: 'o\\x00' is not printable"),
    ("gpu_model", make(ev.TaskSubmitted, gpu_model="m" * 129), "gpu_model: 129"),
    ("image empty", make(ev.TaskSubmitted, image=""), "image: empty"),
    ("image long", make(ev.TaskSubmitted, image="i" * 513), "image: 513 characters, over 512"),
    ("image space", make(ev.TaskSubmitted, image="a b"), "image: 'a b' has"),
    ("image newline", make(ev.TaskSubmitted, image="img\n"), "image: 'img\\n' has"),
    ("runtime", make(ev.NodeRegistered, runtime="d\0"), "runtime: 'd\\x00' is not printable"),
    (
        "model",
        make(ev.NodeRegistered, gpus=(ev.GpuInfo(uuid=GPU, index=0, model="m" * 513),)),
        "gpus[0].model: 513 characters",
    ),
    ("classified rule", make(ev.FaultClassified, rule="r\0"), "rule: 'r\\x00' is not printable"),
    # the request
    ("command empty", make(ev.TaskSubmitted, command=()), "command: empty"),
    ("command args", make(ev.TaskSubmitted, command=("a",) * 4097), "command: 4097 arguments"),
    ("command NUL", make(ev.TaskSubmitted, command=("a", "b\0")), "command[1]: has a NUL"),
    ("command surrogate", make(ev.TaskSubmitted, command=("\ud800",)), "command[0]: not valid"),
    (
        "command bytes",
        make(ev.TaskSubmitted, command=("é" * (32 * 1024 + 1),)),
        "command: 65538 bytes, over 65536",
    ),
    ("env name", make(ev.TaskSubmitted, env={"1A": "x"}), "env: '1A' is not a variable name"),
    ("env name nl", make(ev.TaskSubmitted, env={"A\n": "x"}), "env: 'A\\n' is not a variable"),
    ("env NUL", make(ev.TaskSubmitted, env={"A": "x\0"}), "env.A: has a NUL character"),
    ("env surrogate", make(ev.TaskSubmitted, env={"A": "\udfff"}), "env.A: not valid UTF-8"),
    ("env value", make(ev.TaskSubmitted, env={"A": "v" * (96 * 1024 + 1)}), "env.A: 98305 byte"),
    (
        "env total",
        make(ev.TaskSubmitted, env={f"V{i}": "v" * 90_000 for i in range(3)}),
        "env: 270006 bytes, over 196608",
    ),
    (
        "env vars",
        make(ev.TaskSubmitted, env={f"V{i}": "" for i in range(1025)}),
        "env: 1025 variables, over 1024",
    ),
    # enums
    ("fault", make(ev.FaultClassified, fault="bad"), "fault: 'bad' is not one of completed"),
    ("rebuild fault", make(ev.RebuildDecided, fault=""), "fault: '' is not one of"),
    ("failed fault", make(ev.TaskFailed, fault="oops"), "fault: 'oops'"),
    ("failed reason", make(ev.TaskFailed, reason="why"), "reason: 'why' is not one of"),
    ("gpu fault kind", make(ev.GpuFault, kind="smoke"), "kind: 'smoke' is not one of ecc_dbe"),
    # collections
    (
        "node gpus",
        make(ev.NodeRegistered, gpus=tuple(ev.GpuInfo(uuid=f"G{i}", index=0) for i in range(1025))),
        "gpus: 1025 GPUs, over 1024",
    ),
    (
        "node gpus twice",
        make(
            ev.NodeRegistered, gpus=(ev.GpuInfo(uuid=GPU, index=0), ev.GpuInfo(uuid=GPU, index=1))
        ),
        "gpus: a GPU uuid appears twice",
    ),
    ("scheduled twice", make(ev.TaskScheduled, gpu_uuids=(GPU, GPU)), "gpu_uuids: has duplicates"),
    (
        "scheduled many",
        make(ev.TaskScheduled, gpu_uuids=tuple(f"G{i}" for i in range(1025))),
        "gpu_uuids: 1025 entries, not 0..1024",
    ),
    (
        "evidence many",
        make(ev.FaultClassified, evidence=tuple(f"e{i}" for i in range(adm.MAX_EVIDENCE + 1))),
        f"evidence: {adm.MAX_EVIDENCE + 1} entries",
    ),
    (
        "excludes many",
        make(ev.RebuildDecided, exclude_gpus=tuple(f"G{i}" for i in range(4097))),
        "exclude_gpus: 4097 entries, not 0..4096",
    ),
    # the wrong type of value, built in memory: a reason, not an exception
    ("wrong type", make(ev.TaskCompleted, attempt="1"), "unreadable event: TypeError"),
    ("not an event", object(), "type: object is not an event of the catalog"),
]


@pytest.mark.parametrize(("event", "reason"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_a_bad_value_is_refused_naming_the_field(event: Any, reason: str) -> None:
    got = check_event(event)
    assert got is not None and got.startswith(reason), got
    assert "\n" not in got


ADMITTED: list[tuple[str, Any]] = [
    ("offset time", make(ev.TaskCompleted, at=datetime(2026, 1, 1, tzinfo=PLUS14))),
    ("first moment", make(ev.TaskCompleted, at=adm.MIN_TIME)),
    ("last moment", make(ev.TaskCompleted, at=adm.MAX_TIME - timedelta(microseconds=1))),
    ("no heartbeat", make(ev.NodeLost, last_heartbeat_at=None)),
    ("attempt bounds", make(ev.ContainerStarted, attempt=adm.MAX_ATTEMPT)),
    ("no attempt", make(ev.TaskFailed, attempt=None, fault=None, reason="unschedulable")),
    ("cancel no attempt", make(ev.TaskCancelled, attempt=None)),
    ("exit code bounds", make(ev.ContainerExited, exit_code=-(2**31), signal=None)),
    ("exit code top", make(ev.ContainerExited, exit_code=2**31 - 1, signal=128)),
    ("exit nothing", make(ev.ContainerExited, exit_code=None, signal=None, finished_at=None)),
    ("xid none", make(ev.GpuFault, kind="ecc_dbe", xid=None, detail="")),
    ("xid 0", make(ev.GpuFault, kind="recovery_action", xid=0)),
    ("fallen off bus", make(ev.GpuFault, kind="fallen_off_bus", xid=79)),
    ("gpus 0", make(ev.TaskSubmitted, gpus=0)),
    ("gpus 1024", make(ev.TaskSubmitted, gpus=1024, min_gpu_memory_mb=2**40)),
    ("no memory limit", make(ev.TaskSubmitted, memory_mb=None, request_id=None, gpu_model=None)),
    ("empty owner", make(ev.TaskSubmitted, owner="", env={})),
    ("spaced names", make(ev.TaskSubmitted, name="my run #3", gpu_model="NVIDIA H200")),
    ("unicode name", make(ev.TaskSubmitted, name="训练 ✓", command=("python", "-c", "print('é')"))),
    ("digest image", make(ev.TaskSubmitted, image="ghcr.io/a/b:1@sha256:" + "a" * 64)),
    ("multi-line error", make(ev.ContainerStartFailed, error="OCI runtime create failed:\n\tx")),
    ("gone container", make(ev.ContainerExited, container_id="", exit_code=None, signal=None)),
    ("scheduled no GPU", make(ev.TaskScheduled, gpu_uuids=())),
    ("no evidence", make(ev.FaultClassified, fault="unknown", rule="no_evidence", evidence=())),
    ("evidence twice", make(ev.FaultClassified, evidence=(ULID, ULID))),
    ("operator actor", make(ev.GpuRestored, actor="api:Jane Doe")),
    ("unicode id", make(ev.NodeLost, node="\u30ce\u30fc\u30c91")),
    ("sim GPU", make(ev.GpuFault, gpu_uuid="node-a/0", node="node-a")),
    ("MIG GPU", make(ev.GpuFault, gpu_uuid="MIG-8f3c1e2a-5b6d-4c7e-9f80-1a2b3c4d5e6f")),
    ("derived id", make(ev.TaskCompleted, id=ev.derive_id(ULID, "completed"))),
    ("empty node", make(ev.NodeRegistered, gpus=())),
    ("declared", make(ev.NodeRegistered, gpus=(ev.GpuInfo(uuid="GPU-declared-n1-0", index=0),))),
]


@pytest.mark.parametrize("event", [r[1] for r in ADMITTED], ids=[r[0] for r in ADMITTED])
def test_a_sane_value_is_admitted(event: Any) -> None:
    assert check_event(event) is None


# --- the three crashes, as they arrive: JSON bytes -------------------------------------


def exited_json(**changes: Any) -> bytes:
    body = {
        "type": "container.exited",
        "id": ULID,
        "at": "2026-12-04T13:50:00Z",
        "actor": "agent:n1",
        "task_id": "T",
        "attempt": 1,
        "node": "n1",
        "container_id": CONTAINER,
        "exit_code": 1,
    }
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (exited_json(at="2026-12-04T13:50:00"), "at: time has no zone"),
        (
            exited_json(at="9999-12-31T23:59:59.999Z"),
            "at: 9999-12-31T23:59:59.999000+00:00 out of range "
            "2000-01-01T00:00Z..2200-01-01T00:00Z",
        ),
        (
            exited_json(attempt=10**30),
            "attempt: 1000000000000000000000000000000 out of range 1..1000000",
        ),
        (exited_json(finished_at="2026-12-04T13:50:00"), "finished_at: time has no zone"),
    ],
    ids=["naive", "year-9999", "attempt-10**30", "naive-finished_at"],
)
def test_the_inputs_that_crashed_the_engine_are_refused(data: bytes, reason: str) -> None:
    event = ev.decode(data)
    assert check_event(event) == reason
    admission = Admission()
    seed(admission)
    assert admission.admit(ev.subject_of(event), event) == reason


# --- subjects -------------------------------------------------------------------------


def test_an_event_is_admitted_on_its_own_subject_in_either_scheme() -> None:
    for cls in REQUIRED:
        event = make(cls)
        assert check_subject(ev.subject_of(event), event) is None, cls
        assert check_subject(ev.legacy_subject_of(event), event) is None, cls


@pytest.mark.parametrize(
    ("subject", "event", "reason"),
    [
        (
            "gw.evt.task.T.node.n2",
            make(ev.ContainerExited),
            "subject gw.evt.task.T.node.n2 is not where a container.exited of node n1 goes "
            "(gw.evt.task.T.node.n1)",
        ),
        (
            "gw.evt.task.T.api",
            make(ev.TaskScheduled),
            "subject gw.evt.task.T.api is not where a task.scheduled goes (gw.evt.task.T.engine)",
        ),
        (
            "gw.evt.task.U.api",
            make(ev.TaskSubmitted),
            "subject gw.evt.task.U.api is not where a task.submitted goes (gw.evt.task.T.api)",
        ),
        (
            f"gw.evt.gpu.{GPU}.engine",
            make(ev.GpuRestored),
            f"subject gw.evt.gpu.{GPU}.engine is not where a gpu.restored goes "
            f"(gw.evt.gpu.{GPU}.op)",
        ),
        (
            "gw.evt.node.n1.node.n2",
            make(ev.NodeRegistered),
            "subject gw.evt.node.n1.node.n2 is not where a node.registered of node n1 goes",
        ),
        ("gw.evt.node.n1", make(ev.GpuFault), "subject gw.evt.node.n1 is not where a gpu.fault"),
        ("", make(ev.TaskCompleted), "subject '' is not where a task.completed goes"),
        ("a\nb", make(ev.TaskCompleted), "subject 'a\\nb' is not where"),
        (
            "x",
            make(ev.ContainerExited, node="a\nb"),
            "subject x is not where a container.exited of node 'a\\nb' goes",
        ),
    ],
)
def test_an_event_on_another_subject_is_refused(subject: str, event: Any, reason: str) -> None:
    got = check_subject(subject, event)
    assert got is not None and got.startswith(reason), got


def test_an_escaped_name_has_its_escaped_subject() -> None:
    event = make(ev.ContainerStarted, node="gpu1.example.com", task_id="team/run.1")
    assert check_subject(ev.subject_of(event), event) is None
    assert check_subject("gw.evt.task.team/run.1.node.gpu1.example.com", event) is not None


# --- the stateful rules ---------------------------------------------------------------


def seed(admission: Admission) -> None:
    """Task T with attempt 1 on n1; n1 owns GPU; n2 owns G2."""
    for event in (
        make(ev.NodeRegistered),
        make(ev.NodeRegistered, node="n2", gpus=(ev.GpuInfo(uuid="G2", index=0),)),
        make(ev.TaskSubmitted),
        make(ev.TaskScheduled),
    ):
        assert admission.admit(ev.subject_of(event), event) is None


def verdict(admission: Admission, event: Any) -> str | None:
    return admission.admit(ev.subject_of(event), event)


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (make(ev.TaskSubmitted), "task T already submitted"),
        (make(ev.TaskCompleted, task_id="U"), "no task U"),
        (make(ev.TaskPending, task_id="U"), "no task U"),
        (make(ev.TaskScheduled, task_id="U"), "no task U"),
        (make(ev.FaultClassified, task_id="U"), "no task U"),
        (make(ev.RebuildDecided, task_id="U"), "no task U"),
        (make(ev.TaskFailed, task_id="U"), "no task U"),
        (make(ev.TaskCancelled, task_id="U"), "no task U"),
        (make(ev.GpuAllocated, task_id="U"), "no task U"),
        (make(ev.GpuReleased, task_id="U"), "no task U"),
        (make(ev.ContainerStarted, task_id="U"), "no task U"),
        (make(ev.ContainerExited, attempt=99), "task T has no attempt 99"),
        (make(ev.ContainerStartFailed, attempt=2), "task T has no attempt 2"),
        (make(ev.ContainerStarted, node="n2"), "attempt 1 of task T runs on node n1, not n2"),
        (make(ev.ContainerExited, node="n2"), "attempt 1 of task T runs on node n1, not n2"),
        (make(ev.ContainerStartFailed, node="n2"), "attempt 1 of task T runs on node n1, not n2"),
        (make(ev.GpuFault, node="n2"), f"GPU {GPU} is not on node n2"),
        (make(ev.GpuFault, gpu_uuid="G9"), "GPU G9 is not on node n1"),
        (make(ev.NodeRegistered, node="n3"), f"GPU {GPU} belongs to node n1"),
    ],
)
def test_a_fact_about_someone_else_is_refused(event: Any, reason: str) -> None:
    admission = Admission()
    seed(admission)
    assert admission.check(ev.subject_of(event), event) == reason
    assert verdict(admission, event) == reason


@pytest.mark.parametrize(
    "event",
    [
        make(ev.ContainerStarted),
        make(ev.ContainerExited),
        make(ev.ContainerStartFailed),
        make(ev.GpuFault),
        make(ev.GpuFault, node="n2", gpu_uuid="G2"),
        make(ev.FaultClassified, attempt=7),  # engine decisions need only the task
        make(ev.TaskCompleted, attempt=7),
        make(ev.GpuAllocated, attempt=2, node="n2", gpu_uuid="G2"),
        make(ev.GpuReleased, attempt=5),
        make(ev.TaskCancelled, attempt=None),
        make(ev.GpuQuarantined, node="n9", gpu_uuid="G9"),  # the engine's word
        make(ev.GpuRestored),
        make(ev.NodeLost, node="n9"),
        make(ev.NodeRecovered),
        make(ev.NodeRegistered),  # the same inventory again
        make(ev.NodeRegistered, node="n3", gpus=(ev.GpuInfo(uuid="G3", index=0),)),
    ],
)
def test_a_fact_about_oneself_is_admitted(event: Any) -> None:
    admission = Admission()
    seed(admission)
    assert verdict(admission, event) is None


def test_check_never_mutates_and_admit_folds_only_what_it_admits() -> None:
    admission = Admission()
    submitted = make(ev.TaskSubmitted, task_id="U")
    started = make(ev.ContainerStarted, task_id="U")
    assert admission.check(ev.subject_of(submitted), submitted) is None
    assert admission.check(ev.subject_of(started), started) == "no task U"  # not folded
    bad = make(ev.TaskSubmitted, task_id="U", at=NAIVE)
    assert admission.admit(ev.subject_of(bad), bad) == "at: time has no zone"
    assert admission.check(ev.subject_of(submitted), submitted) is None  # still new
    misplaced = ev.subject_of(make(ev.TaskSubmitted, task_id="V"))
    assert admission.admit(misplaced, submitted) is not None
    assert admission.check(ev.subject_of(submitted), submitted) is None
    assert admission.admit(ev.subject_of(submitted), submitted) is None
    assert admission.check(ev.subject_of(submitted), submitted) == "task U already submitted"


def test_a_rescheduled_task_runs_its_new_attempt_on_its_new_node() -> None:
    admission = Admission()
    seed(admission)
    second = make(ev.TaskScheduled, attempt=2, node="n2", gpu_uuids=("G2",))
    assert verdict(admission, second) is None
    assert verdict(admission, make(ev.ContainerStarted, attempt=2, node="n2")) is None
    assert verdict(admission, make(ev.ContainerExited, attempt=1, node="n1")) is None  # stale
    assert verdict(admission, make(ev.ContainerExited, attempt=2, node="n1")) == (
        "attempt 2 of task T runs on node n2, not n1"
    )


def test_a_gpu_stays_its_first_nodes_even_while_unlisted() -> None:
    """A node that stops listing a GPU (it fell off the bus) keeps it: no other node can
    squat its uuid meanwhile, so the node's next registration, listing it again, and
    its faults are still admitted."""
    admission = Admission()
    seed(admission)
    claim = make(ev.NodeRegistered, node="n2", gpus=(ev.GpuInfo(uuid=GPU, index=0),))
    assert verdict(admission, claim) == f"GPU {GPU} belongs to node n1"
    assert verdict(admission, make(ev.GpuFault, node="n2")) == f"GPU {GPU} is not on node n2"
    assert verdict(admission, make(ev.NodeRegistered, gpus=())) is None  # n1 lists none
    assert verdict(admission, make(ev.GpuFault)) is None  # an Xid 79 of the lost GPU
    assert verdict(admission, claim) == f"GPU {GPU} belongs to node n1"
    back = make(ev.NodeRegistered, gpus=(ev.GpuInfo(uuid=GPU, index=0),))
    assert verdict(admission, back) is None


# --- what legitimate writers write ------------------------------------------------------


def admit_all(events: list[Any]) -> list[tuple[str, str]]:
    """Every refusal of a history, as (type, reason); also checks the times of what
    was admitted are safe to compute with."""
    admission = Admission()
    refused = []
    for event in events:
        reason = admission.admit(ev.subject_of(event), event)
        if reason is not None:
            refused.append((ev.type_of(event), reason))
        else:
            assert_times_usable(event)
    return refused


def assert_times_usable(event: Any) -> None:
    for name in ("at", "finished_at", "last_heartbeat_at", "not_before"):
        value = getattr(event, name, None)
        if value is not None:
            assert (value < LATER) or (value >= LATER)  # aware: no TypeError
            assert value + timedelta(days=3650) > value  # no OverflowError
            assert value.astimezone(UTC) - timedelta(days=3650) < value


def test_the_normal_flows_are_admitted() -> None:
    d = Driver()
    d.node("n1", 2)
    d.node("n2", 2, model="A100")
    d.submit("t1")
    d.submit("t2", gpus=2, gpu_model="A100", memory_mb=1024, env={"A": "1"})
    d.submit("t3")
    d.submit("t4")
    for task in ("t1", "t2", "t3"):
        d.start(task)
    # an Xid 79 under t1: classified, quarantined, rebuilt on another node
    d.xid(d.attempt("t1").gpu_uuids[0], 79)
    d.exit("t1", 137)
    d.advance(5)
    d.advance(600)
    # t2 completes; t3 is cancelled by its owner and killed
    d.exit("t2", 0)
    d.emit(ev.TaskCancelled, task_id="t3", reason="cancelled by owner", actor="api", attempt=1)
    d.exit_attempt("t3", 1, 143)
    d.advance(600)
    # the node of the rebuilt t1 is lost, then comes back
    node = d.attempt("t1").node
    d.emit(ev.NodeLost, node=node, last_heartbeat_at=d.now - timedelta(seconds=3))
    d.advance(600)
    d.emit(ev.NodeRecovered, node=node, last_heartbeat_at=d.now)
    d.advance(600)
    # an operator restores the quarantined GPU; a stop that found nothing is answered
    for uuid, gpu in list(d.state.gpus.items()):
        if gpu.quarantined:
            d.emit(ev.GpuRestored, gpu_uuid=uuid, node=gpu.node, reason="reset", actor="api:op")
    d.advance(600)
    current = d.attempt("t4")
    d.emit(
        ev.ContainerExited,
        task_id="t4",
        attempt=current.n,
        node=current.node,
        container_id="",
        error="container gone: none found when asked to stop it",
    )
    d.advance(600)
    kinds = {ev.type_of(e) for e in d.log}
    assert {"rebuild.decided", "gpu.restored", "node.lost", "task.cancelled"} <= kinds
    assert len(d.of_type(ev.TaskScheduled, "t1")) >= 2
    assert admit_all(d.log) == []


def test_random_legitimate_histories_are_admitted() -> None:
    from tests.test_supervisor_properties import histories, run_history

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(histories)
    def check(history: Any) -> None:
        d = run_history(history)
        # "stranger" steps write facts about a task, node and GPU nobody registered:
        # exactly what admission is for
        legit = [e for e in d.log if "ghost" not in str(msgspec.to_builtins(e))]
        strangers = [e for e in d.log if e not in legit]
        assert admit_all(legit) == []
        admission = Admission()
        for event in legit:
            admission.admit(ev.subject_of(event), event)
        for event in strangers:
            assert admission.check(ev.subject_of(event), event) is not None

    check()


def test_what_intake_accepts_is_admitted() -> None:
    shape = intake.ClusterShape()
    biggest = {
        "image": "registry.example.com:5000/team/train:v1",
        "command": ["python"] + ["a" * 15] * (intake.MAX_ARGS - 1),
        "gpus": intake.MAX_GPUS,
        "memory_mb": intake.MAX_MEMORY_MB,
        "min_gpu_memory_mb": 2**40,
        "env": {f"V{i}": "v" * 50 for i in range(intake.MAX_ENV_VARS)},
        "name": "n" * intake.MAX_TEXT_CHARS,
        "owner": "o" * intake.MAX_TEXT_CHARS,
        "request_id": "r" * intake.MAX_TEXT_CHARS,
    }
    for request in ({"image": "img", "command": ["run"]}, biggest):
        valid = intake.validate_create(request, shape)
        task_id = intake.task_id_for_request("owner", "req")
        event = valid.to_event(task_id, ULID, AT, "api")
        assert check_event(event) is None
        assert check_subject(ev.subject_of(event), event) is None


def seal(value: str) -> str:
    """The shape a sealed env value will have (48 bytes of nonce and tag)."""
    return "gw-sealed:v1:" + base64.b64encode(value.encode() + b"\0" * 48).decode()


def test_sealed_env_values_of_the_largest_env_intake_allows_are_admitted() -> None:
    one_big = {"A": "x" * (intake.MAX_ENV_BYTES - 1)}
    many = {f"V{i:04d}": "" for i in range(intake.MAX_ENV_VARS)}
    many["V0000"] = "x" * (intake.MAX_ENV_BYTES - sum(len(k) for k in many))
    for env in (one_big, many):
        intake.validate_create(
            {"image": "img", "command": ["run"], "env": env}, intake.ClusterShape()
        )
        sealed = {key: seal(value) for key, value in env.items()}
        assert check_event(make(ev.TaskSubmitted, env=sealed)) is None


def test_bounds_agree_with_intake_and_the_supervisor() -> None:
    assert adm.MAX_MEMORY_MB == intake.MAX_MEMORY_MB
    assert adm.MAX_NAME_CHARS == intake.MAX_TEXT_CHARS
    assert adm.MAX_LABEL_CHARS == intake.MAX_IMAGE_CHARS
    assert adm.MAX_ARGS == intake.MAX_ARGS
    assert adm.MAX_COMMAND_BYTES == intake.MAX_COMMAND_BYTES
    assert adm.MAX_ENV_VARS == intake.MAX_ENV_VARS
    assert adm.MAX_GPUS == intake.MAX_GPUS
    assert adm.MAX_EVIDENCE >= 2 + GPU_FAULT_MEMORY * adm.MAX_GPUS
    assert adm.MIN_TIME.utcoffset() == adm.MAX_TIME.utcoffset() == timedelta(0)


def test_admission_is_pure() -> None:
    path = Path(adm.__file__)
    roots = imported_roots(path)
    assert not roots & FORBIDDEN
    stdlib = {r for r in roots if not r.startswith("gpuwarden")}
    assert stdlib <= {"__future__", "re", "collections", "datetime", "typing"}
    assert all(r.startswith("gpuwarden.engine.core") for r in roots - stdlib - {"gpuwarden"})
    assert "gpuwarden.adapters" not in str(roots) and "gpuwarden.projections" not in str(roots)


# --- never raises ---------------------------------------------------------------------

NAMES = st.sampled_from(["T", "U", "n1", "n2", GPU, "G2", ULID, CONTAINER, "", "a b", "x\0"])
TEXTS = st.one_of(
    NAMES,
    st.text(max_size=30),
    st.text(st.characters(categories=["Cs", "Cc", "Zs", "Zl", "Co", "Cn"]), max_size=5),
    st.sampled_from(["x" * 200_000, "é" * 70_000, "\U0001f600" * 20_000]),
)
INTS = st.one_of(
    st.integers(-3, 1030),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**31, -(2**31) - 1, 10**30, -(10**30), 10**5000, 2**40 + 1]),
)
ZONES = st.sampled_from(
    [UTC, PLUS14, timezone(timedelta(hours=-23, minutes=-59)), timezone(timedelta(hours=23))]
)
TIMES = st.one_of(
    st.datetimes(),  # naive, years 1..9999
    st.datetimes(timezones=ZONES),
    st.sampled_from(
        [
            datetime.min,
            datetime.max,
            datetime.min.replace(tzinfo=PLUS14),
            datetime.max.replace(tzinfo=timezone(timedelta(hours=-23, minutes=-59))),
            AT,
            adm.MAX_TIME,
        ]
    ),
)


def strategy(tp: Any) -> st.SearchStrategy[Any]:
    """Values of a Struct field's type, sane and extreme."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is str:
        return TEXTS
    if tp is int:
        return INTS
    if tp is bool:
        return st.booleans()
    if tp is datetime:
        return TIMES
    if tp is ev.GpuInfo:
        return st.builds(ev.GpuInfo, uuid=TEXTS, index=INTS, model=TEXTS, memory_mb=INTS)
    if origin is typing.Literal:  # the closed words, and anything a forged event may carry
        return st.sampled_from(args) | TEXTS
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(strategy(a) for a in args))
    if origin is tuple:
        return st.lists(strategy(args[0]), max_size=4).map(tuple) | st.just(("G",) * 5000)
    if origin is dict:
        keys = st.one_of(st.sampled_from(["A", "_B1", "1A", "A\n", ""]), st.text(max_size=5))
        return st.dictionaries(keys, TEXTS, max_size=4)
    if tp is type(None):
        return st.none()
    raise AssertionError(f"no strategy for {tp!r}")


def events_of(cls: type[Any]) -> st.SearchStrategy[Any]:
    """Events of a type: every field drawn, or a sane event with a few fields changed
    (so that the checks past the first one, and the stateful ones, are reached)."""
    fields = msgspec.structs.fields(cls)
    anything = st.fixed_dictionaries({f.name: strategy(f.type) for f in fields})
    some = st.lists(st.sampled_from(fields), max_size=3, unique_by=lambda f: f.name).flatmap(
        lambda chosen: st.fixed_dictionaries({f.name: strategy(f.type) for f in chosen})
    )
    sane = make(cls)
    changed = some.map(lambda values: msgspec.structs.replace(sane, **values))
    return st.one_of(anything.map(lambda values: cls(**values)), changed, changed, changed)


ANY_EVENT = st.one_of(*(events_of(cls) for cls in REQUIRED))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_EVENT, st.one_of(st.none(), TEXTS))
def test_check_and_admit_never_raise(event: Any, subject: str | None) -> None:
    if subject is None:
        try:
            subject = ev.subject_of(event)
        except Exception:
            subject = "gw.evt.x"
    admission = Admission()
    seed(admission)
    reason = admission.check(subject, event)
    assert reason is None or (isinstance(reason, str) and "\n" not in reason)
    assert admission.admit(subject, event) == reason
    if reason is None:
        assert_times_usable(event)
        assert ev.decode(ev.encode(event)) == event  # storable as it is


# --- cost -----------------------------------------------------------------------------


def test_admission_costs_a_few_microseconds_per_event() -> None:
    d = Driver()
    d.node("n1", 4)
    d.node("n2", 4)
    for i in range(8):
        d.submit(f"t{i}")
    for i in range(8):
        d.start(f"t{i}")
    d.xid("n1/0", 48)
    for i in range(8):
        d.exit(f"t{i}", i % 3)
    d.advance(600)
    log = [(ev.subject_of(e), e) for e in d.log]
    rounds = 50
    began = time.perf_counter()
    for _ in range(rounds):
        admission = Admission()
        for subject, event in log:
            admission.admit(subject, event)
    per_event_us = (time.perf_counter() - began) / (rounds * len(log)) * 1e6
    print(f"\nadmission: {per_event_us:.2f} us per event over {len(log)} events")
    assert per_event_us < 50  # a few us here; the bound only catches a gross regression
