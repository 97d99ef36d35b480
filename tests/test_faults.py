"""Fault classification, table by table: every fault type, every rule, the evidence races."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.faults import (
    DEFAULT_TABLE,
    AttemptEvidence,
    Classification,
    FaultTable,
    classify,
    evidence_deadline,
    gpu_fault_class,
    is_image_error,
    recovery_action_class,
)
from hypothesis import given
from hypothesis import strategies as st

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
NODE = "node-a"
GPU0, GPU1, OTHER_GPU = "GPU-a0", "GPU-a1", "GPU-b0"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def exited(
    code: int | None = 1,
    *,
    t: float = 0.0,
    oom: bool = False,
    signal: int | None = None,
    error: str = "",
    finished: float | None = None,
    id: str = "exit",
) -> ev.ContainerExited:
    return ev.ContainerExited(
        id=id,
        at=at(t),
        actor=f"agent:{NODE}",
        task_id="t1",
        attempt=1,
        node=NODE,
        container_id="c1",
        exit_code=code,
        oom_killed=oom,
        signal=signal,
        error=error,
        finished_at=None if finished is None else at(finished),
    )


def xid(code: int, *, t: float = 0.0, gpu: str = GPU0, id: str | None = None) -> ev.GpuFault:
    return ev.GpuFault(
        id=id or f"xid{code}@{t}",
        at=at(t),
        actor="agent",
        gpu_uuid=gpu,
        node=NODE,
        kind="xid",
        xid=code,
    )


def gpu_fault(kind: str, *, detail: str = "", t: float = 0.0, gpu: str = GPU0) -> ev.GpuFault:
    return ev.GpuFault(
        id=f"{kind}@{t}", at=at(t), actor="agent", gpu_uuid=gpu, node=NODE, kind=kind, detail=detail
    )


def lost(t: float = 0.0, node: str = NODE) -> ev.NodeLost:
    return ev.NodeLost(id="lost", at=at(t), actor="engine", node=node)


def start_failed(error: str) -> ev.ContainerStartFailed:
    return ev.ContainerStartFailed(
        id="sf", at=T0, actor="agent", task_id="t1", attempt=1, node=NODE, error=error
    )


def evidence(
    exit: ev.ContainerExited | None = None,
    *faults: ev.GpuFault,
    node_lost: ev.NodeLost | None = None,
    start: ev.ContainerStartFailed | None = None,
    stop_requested: bool = False,
) -> AttemptEvidence:
    return AttemptEvidence(
        task_id="t1",
        attempt=1,
        node=NODE,
        gpu_uuids=(GPU0, GPU1),
        exited=exit,
        start_failed=start,
        gpu_faults=faults,
        node_lost=node_lost,
        stop_requested=stop_requested,
    )


# --- Docker's own texts (seen with the daemon at unix:///tmp/dk/docker.sock) -------------

DOCKER_NO_SUCH_FILE = (
    "failed to create shim task: OCI runtime create failed: runc create failed: unable to "
    'start container process: exec: "/nope": stat /nope: no such file or directory: unknown'
)
DOCKER_NOT_IN_PATH = (
    "failed to create shim task: OCI runtime create failed: runc create failed: unable to "
    'start container process: exec: "nope-cmd": executable file not found in $PATH: unknown'
)
DOCKER_NOT_EXECUTABLE = (
    "failed to create shim task: OCI runtime create failed: runc create failed: unable to "
    'start container process: exec: "/etc": permission denied: unknown'
)
DOCKER_NO_IMAGE = (
    '404 Client Error for http+docker://localhost/v1.41/containers/create: Not Found ("No such '
    'image: gpuwarden-missing-xyz:latest")'
)
DOCKER_PULL_DENIED = (
    "pull access denied for private/img, repository does not exist or may require 'docker login'"
)
DOCKER_REGISTRY_DOWN = (
    'Get "https://registry-1.docker.io/v2/": dial tcp: lookup registry-1.docker.io on '
    "10.255.255.53:53: no such host"
)

DOCKER_DEVICE_GONE = (
    'error gathering device information while adding custom device "/dev/nvidia3": no such '
    "file or directory"
)
DOCKER_NO_NETWORK = "network gw-net not found"


@pytest.mark.parametrize(
    ("message", "fault", "rule"),
    [
        (DOCKER_NO_SUCH_FILE, "image_error", "start_image"),
        (DOCKER_NOT_IN_PATH, "image_error", "start_image"),
        (DOCKER_NOT_EXECUTABLE, "image_error", "start_image"),
        (DOCKER_NO_IMAGE, "image_error", "start_image"),
        (DOCKER_PULL_DENIED, "image_error", "start_image"),
        ("manifest for img:9 not found: manifest unknown", "image_error", "start_image"),
        ("image not found: train:9", "image_error", "start_image"),
        (DOCKER_REGISTRY_DOWN, "runtime_error", "start_runtime"),
        (DOCKER_DEVICE_GONE, "runtime_error", "start_runtime"),
        (DOCKER_NO_NETWORK, "runtime_error", "start_runtime"),
        (
            "error gathering device information while adding custom device",
            "runtime_error",
            "start_runtime",
        ),
        (
            'could not select device driver "nvidia" with capabilities: [[gpu]]',
            "runtime_error",
            "start_runtime",
        ),
        ("context deadline exceeded", "runtime_error", "start_runtime"),
    ],
)
def test_start_failure_is_an_image_error_only_when_the_image_or_command_is_wrong(
    message: str, fault: str, rule: str
) -> None:
    got = classify(evidence(start=start_failed(message)))
    assert (got.fault, got.rule, got.evidence, got.exit_code) == (fault, rule, ("sf",), None)


def test_start_failure_wins_over_everything_else() -> None:
    got = classify(evidence(exited(137), xid(48), node_lost=lost(), start=start_failed("boom")))
    assert (got.fault, got.rule) == ("runtime_error", "start_runtime")


# --- one row per rule -----------------------------------------------------------------------

RULE_TABLE: list[tuple[str, AttemptEvidence, str, str, tuple[str, ...], int | None]] = [
    ("exit 0", evidence(exited(0)), "completed", "exit_zero", ("exit",), 0),
    (
        "exit 0 despite xid 48 and oom",
        evidence(exited(0, oom=True), xid(48)),
        "completed",
        "exit_zero",
        ("exit",),
        0,
    ),
    ("exit 1", evidence(exited(1)), "user_error", "exit_nonzero", ("exit",), 1),
    ("exit 42", evidence(exited(42)), "user_error", "exit_nonzero", ("exit",), 42),
    ("exit 255", evidence(exited(255)), "user_error", "exit_nonzero", ("exit",), 255),
    ("exit 128 is no signal", evidence(exited(128)), "user_error", "exit_nonzero", ("exit",), 128),
    (
        "exit 200 is past any signal",
        evidence(exited(200)),
        "user_error",
        "exit_nonzero",
        ("exit",),
        200,
    ),
    ("exit 126", evidence(exited(126)), "image_error", "exit_126_127", ("exit",), 126),
    ("exit 127", evidence(exited(127)), "image_error", "exit_126_127", ("exit",), 127),
    ("oom 137", evidence(exited(137, oom=True)), "container_oom", "oom_flag", ("exit",), 137),
    ("sigkill 137", evidence(exited(137)), "preempted", "signal_preempted", ("exit",), 137),
    ("sigterm 143", evidence(exited(143)), "preempted", "signal_preempted", ("exit",), 143),
    (
        "signal field 9",
        evidence(exited(None, signal=9)),
        "preempted",
        "signal_preempted",
        ("exit",),
        137,
    ),
    (
        "signal field 15 with its code",
        evidence(exited(143, signal=15)),
        "preempted",
        "signal_preempted",
        ("exit",),
        143,
    ),
    ("sigsegv 139", evidence(exited(139)), "user_error", "signal_user", ("exit",), 139),
    ("sigabrt 134", evidence(exited(134)), "user_error", "signal_user", ("exit",), 134),
    ("sigbus 135", evidence(exited(135)), "user_error", "signal_user", ("exit",), 135),
    ("sigfpe 136", evidence(exited(136)), "user_error", "signal_user", ("exit",), 136),
    ("sigill 132", evidence(exited(132)), "user_error", "signal_user", ("exit",), 132),
    ("sigint 130", evidence(exited(130)), "user_error", "signal_user", ("exit",), 130),
    (
        "signal field 11",
        evidence(exited(None, signal=11)),
        "user_error",
        "signal_user",
        ("exit",),
        139,
    ),
    (
        "stop requested sigterm",
        evidence(exited(143), stop_requested=True),
        "user_error",
        "stop_requested",
        ("exit",),
        143,
    ),
    (
        "stop requested sigkill",
        evidence(exited(137), stop_requested=True),
        "user_error",
        "stop_requested",
        ("exit",),
        137,
    ),
    (
        "runtime error on exit",
        evidence(exited(137, error="shim disconnected")),
        "runtime_error",
        "exit_runtime_error",
        ("exit",),
        137,
    ),
    (
        "runtime error, exec not found",
        evidence(exited(127, error=DOCKER_NOT_IN_PATH)),
        "image_error",
        "exit_error_image",
        ("exit",),
        127,
    ),
    (
        "xid 13",
        evidence(exited(1), xid(13, t=0.2)),
        "gpu_app_error",
        "xid_app",
        ("exit", "xid13@0.2"),
        1,
    ),
    (
        "xid 31",
        evidence(exited(134), xid(31, t=-0.5)),
        "gpu_app_error",
        "xid_app",
        ("exit", "xid31@-0.5"),
        134,
    ),
    ("xid 43", evidence(exited(1), xid(43)), "gpu_app_error", "xid_app", ("exit", "xid43@0.0"), 1),
    ("node lost, no exit", evidence(node_lost=lost()), "node_lost", "node_lost", ("lost",), None),
    ("no evidence", evidence(), "unknown", "no_evidence", (), None),
    ("exit without code", evidence(exited(None)), "unknown", "no_evidence", ("exit",), None),
]


@pytest.mark.parametrize(
    ("case", "facts", "fault", "rule", "ids", "code"), RULE_TABLE, ids=[r[0] for r in RULE_TABLE]
)
def test_each_rule(
    case: str,
    facts: AttemptEvidence,
    fault: str,
    rule: str,
    ids: tuple[str, ...],
    code: int | None,
) -> None:
    got = classify(facts)
    assert (got.fault, got.rule, got.evidence, got.exit_code) == (fault, rule, ids, code), case


def test_every_fault_type_is_reachable() -> None:
    seen = {row[2] for row in RULE_TABLE}
    seen.add(classify(evidence(exited(1), xid(48))).fault)
    seen.add(classify(evidence(start=start_failed("boom"))).fault)
    assert seen == set(ev.FAULT_TYPES)


# --- GPU hardware -------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(DEFAULT_TABLE.xid_hardware))
def test_hardware_xids_quarantine_and_exclude_the_gpu_but_keep_the_node(code: int) -> None:
    got = classify(evidence(exited(1), xid(code, t=0.1)))
    assert got == Classification(
        "gpu_hardware",
        "xid_hardware",
        ("exit", f"xid{code}@0.1"),
        exclude_gpus=(GPU0,),
        exclude_nodes=(),
        quarantine=(GPU0,),
        exit_code=1,
    )


def test_xid_79_excludes_the_node_too() -> None:
    got = classify(evidence(exited(137), xid(79, t=0.3)))
    assert (got.fault, got.rule) == ("gpu_hardware", "xid_node")
    assert (got.quarantine, got.exclude_gpus, got.exclude_nodes) == ((GPU0,), (GPU0,), (NODE,))


@pytest.mark.parametrize(
    ("kind", "detail", "rule", "nodes"),
    [
        ("ecc_dbe", "", "ecc_dbe", ()),
        ("fallen_off_bus", "", "fallen_off_bus", (NODE,)),
        ("recovery_action", "gpu_reset", "recovery_action", ()),
        ("recovery_action", "1", "recovery_action", ()),
        ("recovery_action", "NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET", "recovery_action", ()),
        ("recovery_action", "node_reboot", "recovery_action", (NODE,)),
        ("recovery_action", "2", "recovery_action", (NODE,)),
    ],
)
def test_non_xid_hardware_faults(kind: str, detail: str, rule: str, nodes: tuple[str, ...]) -> None:
    got = classify(evidence(exited(1), gpu_fault(kind, detail=detail, t=0.5)))
    assert (got.fault, got.rule, got.exclude_nodes, got.quarantine) == (
        "gpu_hardware",
        rule,
        nodes,
        (GPU0,),
    )


@pytest.mark.parametrize("detail", ["none", "0", "NVML_GPU_RECOVERY_ACTION_NONE", "weird"])
def test_recovery_action_none_decides_nothing(detail: str) -> None:
    assert classify(evidence(exited(1), gpu_fault("recovery_action", detail=detail))).fault == (
        "user_error"
    )


def test_faults_on_two_gpus_quarantine_both_and_node_class_names_the_rule() -> None:
    got = classify(evidence(exited(1), xid(48, gpu=GPU1, t=-0.2), xid(79, gpu=GPU0, t=0.4)))
    assert got.rule == "xid_node"
    assert set(got.quarantine) == {GPU0, GPU1}
    assert got.exclude_nodes == (NODE,)
    assert got.evidence == ("exit", "xid48@-0.2", "xid79@0.4")


def test_a_fault_on_another_gpu_is_not_this_attempts_evidence() -> None:
    got = classify(evidence(exited(1), xid(48, gpu=OTHER_GPU)))
    assert (got.fault, got.evidence) == ("user_error", ("exit",))


def test_hardware_beats_oom_and_app_xid_and_signal() -> None:
    got = classify(evidence(exited(137, oom=True), xid(13), xid(48, t=0.1)))
    assert (got.fault, got.evidence) == ("gpu_hardware", ("exit", "xid48@0.1"))


# --- evidence races -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("xid_at", "fault"),
    [
        (0.9, "gpu_hardware"),  # the Xid lands just after the exit, within the window
        (1.0, "gpu_hardware"),  # the window is inclusive
        (-0.7, "gpu_hardware"),  # the Xid came first
        (-1.0, "gpu_hardware"),
        (1.5, "user_error"),  # too late: outside the window
        (-3.0, "user_error"),  # long before: an old fault, not this death's cause
    ],
)
def test_xid_48_around_the_exit(xid_at: float, fault: str) -> None:
    assert classify(evidence(exited(1, t=10.0), xid(48, t=10.0 + xid_at))).fault == fault


def test_the_window_is_placed_around_finished_at_when_the_runtime_gives_it() -> None:
    # The exit was reported 5 s after the process died; the Xid was at the death.
    late_report = exited(1, t=15.0, finished=10.0)
    assert classify(evidence(late_report, xid(48, t=10.2))).fault == "gpu_hardware"
    assert classify(evidence(late_report, xid(48, t=14.9))).fault == "user_error"


def test_a_wider_table_window_admits_later_evidence() -> None:
    wide = FaultTable(window_s=5.0)
    assert classify(evidence(exited(1), xid(48, t=3.0)), wide).fault == "gpu_hardware"
    assert classify(evidence(exited(1), xid(48, t=3.0))).fault == "user_error"


def test_app_xid_outside_the_window_is_ignored() -> None:
    assert classify(evidence(exited(1), xid(13, t=2.0))).fault == "user_error"


def test_exit_after_node_lost_is_node_lost() -> None:
    got = classify(evidence(exited(255, t=5.0), node_lost=lost(t=3.0)))
    assert got == Classification(
        "node_lost", "node_lost", ("exit", "lost"), exclude_nodes=(NODE,), exit_code=255
    )


def test_exit_before_node_lost_is_classified_by_the_exit() -> None:
    got = classify(evidence(exited(1, t=1.0), node_lost=lost(t=3.0)))
    assert (got.fault, got.evidence, got.exclude_nodes) == ("user_error", ("exit",), ())


def test_an_exit_at_the_instant_of_the_loss_counts_as_after_it() -> None:
    assert classify(evidence(exited(1, t=3.0), node_lost=lost(t=3.0))).fault == "node_lost"


def test_loss_of_another_node_is_not_evidence() -> None:
    assert classify(evidence(exited(1), node_lost=lost(node="node-z"))).fault == "user_error"
    assert classify(evidence(node_lost=lost(node="node-z"))).fault == "unknown"


def test_hardware_fault_and_lost_node_exclude_both() -> None:
    got = classify(evidence(exited(1, t=4.0), xid(48, t=4.5), node_lost=lost(t=3.0)))
    assert (got.fault, got.exclude_gpus, got.exclude_nodes) == ("gpu_hardware", (GPU0,), (NODE,))
    assert got.evidence == ("exit", "xid48@4.5", "lost")


def test_node_lost_beats_oom() -> None:
    assert classify(evidence(exited(137, t=5.0, oom=True), node_lost=lost(t=3.0))).fault == (
        "node_lost"
    )


def test_gpu_faults_without_an_exit_do_not_decide_a_lost_node() -> None:
    got = classify(evidence(None, xid(79), node_lost=lost(t=3.0)))
    assert (got.fault, got.evidence, got.quarantine) == ("node_lost", ("lost",), ())


def test_xid_45_alone_is_ignored() -> None:
    assert classify(evidence(exited(1), xid(45))).fault == "user_error"


def test_xid_45_follows_what_it_accompanies() -> None:
    got = classify(evidence(exited(1), xid(45, t=0.1), xid(48, t=0.2)))
    assert (got.fault, got.evidence) == ("gpu_hardware", ("exit", "xid48@0.2"))
    got = classify(evidence(exited(1), xid(45, t=0.1), xid(43, t=0.2)))
    assert (got.fault, got.evidence) == ("gpu_app_error", ("exit", "xid43@0.2"))


@pytest.mark.parametrize("code", [63, 92, 999])
def test_informational_and_unknown_xids_are_ignored(code: int) -> None:
    assert classify(evidence(exited(137), xid(code))).fault == "preempted"


def test_oom_with_exit_137_is_container_oom_not_preempted() -> None:
    got = classify(evidence(exited(137, oom=True)))
    assert (got.fault, got.rule, got.exit_code) == ("container_oom", "oom_flag", 137)


def test_oom_beats_an_app_xid() -> None:
    assert classify(evidence(exited(137, oom=True), xid(13))).fault == "container_oom"


def test_stop_requested_does_not_change_a_plain_exit() -> None:
    assert classify(evidence(exited(1), stop_requested=True)).fault == "user_error"
    assert classify(evidence(exited(0), stop_requested=True)).fault == "completed"


# --- the fault table and helpers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        *[(xid(c), "gpu_app_error") for c in (13, 31, 43)],
        *[(xid(c), "gpu_hardware") for c in (48, 64, 74, 94, 95, 119, 120, 46, 62, 109)],
        (xid(79), "gpu_node"),
        *[(xid(c), None) for c in (45, 63, 92, 1)],
        (gpu_fault("ecc_dbe"), "gpu_hardware"),
        (gpu_fault("fallen_off_bus"), "gpu_node"),
        (gpu_fault("recovery_action", detail="system_reboot"), "gpu_node"),
        (gpu_fault("recovery_action", detail="bus_reset"), "gpu_hardware"),
        (gpu_fault("thermal"), None),
        (gpu_fault("xid"), None),  # an xid event without its number
    ],
)
def test_gpu_fault_class(fault: ev.GpuFault, expected: str | None) -> None:
    assert gpu_fault_class(fault) == expected


def test_a_custom_table_reclassifies_an_xid() -> None:
    table = FaultTable(xid_app=frozenset({13, 31, 43, 48}), xid_hardware=frozenset({64}))
    assert gpu_fault_class(xid(48), table) == "gpu_app_error"
    assert classify(evidence(exited(1), xid(48)), table).fault == "gpu_app_error"


def test_ignored_wins_when_a_table_lists_an_xid_twice() -> None:
    table = FaultTable(xid_hardware=frozenset({45, 48}), xid_ignored=frozenset({45}))
    assert gpu_fault_class(xid(45), table) is None
    assert gpu_fault_class(xid(48), table) == "gpu_hardware"


def test_recovery_action_names() -> None:
    assert recovery_action_class(" GPU_RECOVERY_ACTION_NODE_REBOOT ") == "gpu_node"
    assert recovery_action_class("drain_p2p") == "gpu_hardware"
    assert recovery_action_class("") is None


@pytest.mark.parametrize(
    ("message", "fault"),
    [
        (DOCKER_NOT_IN_PATH, "image_error"),
        (DOCKER_NO_SUCH_FILE, "image_error"),
        (DOCKER_NOT_EXECUTABLE, "image_error"),
        ("nvidia-container-cli: device error: GPU-a0: not found", "runtime_error"),
        (DOCKER_DEVICE_GONE, "runtime_error"),
    ],
)
def test_an_exit_error_is_an_image_error_only_when_it_names_the_image_or_command(
    message: str, fault: str
) -> None:
    assert classify(evidence(exited(1, error=message))).fault == fault


def test_is_image_error_is_case_insensitive() -> None:
    assert is_image_error("NO SUCH IMAGE: x")
    assert not is_image_error("permission denied while trying to connect to the Docker daemon")


def test_evidence_deadline_is_the_window_after_the_exit() -> None:
    assert evidence_deadline(T0) == T0 + timedelta(seconds=1)
    assert evidence_deadline(T0, FaultTable(window_s=2.5)) == T0 + timedelta(seconds=2.5)


# --- properties -------------------------------------------------------------------------------

codes = st.integers(min_value=0, max_value=255)
offsets = st.floats(min_value=-5, max_value=5, allow_nan=False)
xid_codes = st.sampled_from([13, 31, 43, 45, 48, 63, 64, 74, 79, 92, 94, 95, 109, 119, 120, 7])
fault_lists = st.lists(
    st.builds(
        lambda code, t, gpu, i: xid(code, t=t, gpu=gpu, id=f"f{i}"),
        xid_codes,
        offsets,
        st.sampled_from([GPU0, GPU1, OTHER_GPU]),
        st.integers(0, 10_000),
    ),
    max_size=6,
    unique_by=lambda f: f.id,
)


@given(code=codes, oom=st.booleans(), faults=fault_lists, lost_at=st.none() | offsets)
def test_classification_is_total_and_cites_only_given_events(
    code: int, oom: bool, faults: list[ev.GpuFault], lost_at: float | None
) -> None:
    facts = evidence(
        exited(code, oom=oom), *faults, node_lost=None if lost_at is None else lost(lost_at)
    )
    got = classify(facts)
    given_ids = {"exit", "lost", *(f.id for f in faults)}
    assert got.fault in ev.FAULT_TYPES
    assert set(got.evidence) <= given_ids
    assert got.evidence[0] == "exit"
    assert got.exit_code == code
    assert set(got.quarantine) <= {GPU0, GPU1}
    if code == 0:
        assert got.fault == "completed"


@given(code=codes, faults=fault_lists, data=st.data())
def test_the_order_gpu_faults_arrive_in_does_not_matter(
    code: int, faults: list[ev.GpuFault], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(faults))
    assert classify(evidence(exited(code), *faults)) == classify(evidence(exited(code), *shuffled))


@given(code=st.integers(min_value=1, max_value=255))
def test_a_bare_exit_code_maps_by_the_documented_rules(code: int) -> None:
    got = classify(evidence(exited(code)))
    if code in (137, 143):
        assert got.fault == "preempted"
    elif 128 < code <= 192:
        assert (got.fault, got.rule) == ("user_error", "signal_user")
    elif code in (126, 127):
        assert got.fault == "image_error"
    else:
        assert (got.fault, got.rule) == ("user_error", "exit_nonzero")


# --- no exit: a process hung on a GPU that failed under it (rule 4b) -----------------


@pytest.mark.parametrize(
    ("fault", "rule", "nodes"),
    [
        (xid(48, id="x48"), "xid_hardware", ()),
        (xid(79, id="x79"), "xid_node", (NODE,)),
        (gpu_fault("ecc_dbe"), "ecc_dbe", ()),
    ],
)
def test_a_hardware_fault_without_an_exit_is_gpu_hardware(
    fault: ev.GpuFault, rule: str, nodes: tuple[str, ...]
) -> None:
    got = classify(evidence(None, fault))
    assert (got.fault, got.rule, got.evidence) == ("gpu_hardware", rule, (fault.id,))
    assert (got.exclude_gpus, got.quarantine, got.exclude_nodes) == ((GPU0,), (GPU0,), nodes)
    assert got.exit_code is None


def test_without_an_exit_only_hardware_faults_on_its_own_gpus_decide() -> None:
    assert classify(evidence(None, xid(13))).fault == "unknown"  # the app's: wait for exit
    assert classify(evidence(None, xid(48, gpu="GPU-other"))).fault == "unknown"
    assert classify(evidence(None)).rule == "no_evidence"
