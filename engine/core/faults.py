"""Fault classification: what killed an attempt, decided from all of its evidence.

A rebuild only helps when the fault lies outside the task (a GPU, a node, the runtime,
an eviction); classifying wrongly either burns money on hopeless restarts or fails a
task that one more try would have saved. Evidence arrives in any order, so the
classification looks at everything known about the attempt -- its exit or start
failure, GPU faults on its GPUs around the exit, the loss of its node -- and the
caller waits `window_s` after an exit (`evidence_deadline`) before asking, so that an
Xid logged just after the process died still counts.

Precedence, first match wins (the `rule` names are stable; they go into the log):

1. start failure: `image_error` (`start_image`) when the runtime's message names a
   missing image or executable (`IMAGE_ERROR_MARKERS`, or runc's `exec: ...` failing
   with "no such file or directory" / "permission denied"), else `runtime_error`
   (`start_runtime`).
2. exit 0: `completed` (`exit_zero`); nothing else is consulted.
3. a hardware-class GPU fault (ECC double-bit error, fallen off the bus, a recovery
   action asking for a reset or reboot, an Xid of `xid_hardware` / `xid_node`) on the
   attempt's GPUs within +-`window_s` of the exit: `gpu_hardware` (`ecc_dbe`,
   `fallen_off_bus`, `recovery_action`, `xid_hardware`, `xid_node`). Those GPUs are
   quarantined and excluded; the node too when the fault calls for a node reboot.
4. the node was lost and there is no exit, or the exit came after the loss:
   `node_lost` (`node_lost`); the node is excluded.
4b. no exit, the node not lost, and a hardware-class GPU fault on the attempt's GPUs
   (recorded while it held them): `gpu_hardware` under the same rule names as 3. The caller
   asks only once the fault's evidence window has passed without an exit (a process
   hung on a broken GPU never exits by itself); the engine then stops the container.
5. the OOM flag: `container_oom` (`oom_flag`).
6. an application-class Xid within the window: `gpu_app_error` (`xid_app`).
7. a runtime error string on the exit: `image_error` (`exit_error_image`) when it names
   a missing image or executable (same test as 1), else `runtime_error`
   (`exit_runtime_error`).
8. death by signal (the `signal` field, or exit code 128+N): SIGKILL/SIGTERM that
   gpuwarden asked for is `user_error` (`stop_requested`: a stop we sent is no
   infrastructure fault and must not be rebuilt); otherwise `preempted`
   (`signal_preempted`); any other signal is `user_error` (`signal_user`).
9. exit 126 / 127 (not executable / not found): `image_error` (`exit_126_127`).
10. any other non-zero exit: `user_error` (`exit_nonzero`).
11. nothing to go on (no exit, no start failure, node not lost, or an exit without
    code, signal or error): `unknown` (`no_evidence`).

GPU faults are placed in time against the exit, so without an exit they only count
through 4b: a lost node's loss decides first. An Xid that is in no table (and 45, which
only repeats what it accompanies, and the informational 63 and 92) decides nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal, TypeAlias

from gpuwarden.engine.core.events import (
    ContainerExited,
    ContainerStartFailed,
    Fault,
    GpuFault,
    NodeLost,
)

# What one GPU fault says on its own: the GPU needs a reset (rebuild elsewhere, quarantine
# it), the node needs a reboot, or the application is at fault. None: it decides nothing.
GpuFaultClass: TypeAlias = Literal["gpu_hardware", "gpu_node", "gpu_app_error"]

# Fragments of the Docker daemon's / runc's error texts that mean the image or the
# command itself is wrong, so a rebuild on other hardware cannot help. Seen with the
# Docker daemon: 'No such image: x:latest' (create without pull), 'exec: "/nope": stat
# /nope: no such file or directory', 'exec: "nope": executable file not found in
# $PATH', 'exec: "/etc": permission denied'; from registries 'pull access denied',
# 'manifest unknown', 'repository does not exist'. A bare "not found" or "no such file
# or directory" is NOT enough: the daemon says 'error gathering device information while
# adding custom device "/dev/nvidia3": no such file or directory' when a GPU's device
# node vanished, and 'network x not found' -- faults of the node, which a rebuild cures.
IMAGE_ERROR_MARKERS: Final[tuple[str, ...]] = (
    "no such image",
    "image not found",
    "executable file not found",
    "command not found",
    "pull access denied",
    "manifest unknown",
    "repository does not exist",
    "invalid reference format",
    "exec format error",
)
_EXEC_FAILURES: Final = ("no such file or directory", "permission denied")  # after 'exec:'

_SIGKILL: Final = 9
_SIGTERM: Final = 15
_MAX_SIGNAL: Final = 64

# NVML's nvmlDeviceGpuRecoveryAction_t, by number or name (NONE = 0 decides nothing).
_RECOVERY_NODE: Final = frozenset({"2", "7", "node_reboot", "system_reboot"})
_RECOVERY_GPU: Final = frozenset(
    {
        "1",
        "3",
        "4",
        "5",
        "6",
        "gpu_reset",
        "drain_p2p",
        "drain_and_reset",
        "recover_imex_domain",
        "bus_reset",
    }
)


@dataclass(frozen=True, slots=True)
class FaultTable:
    """Which Xids mean what (NVIDIA's Xid catalog), and how long evidence may lag."""

    xid_app: frozenset[int] = frozenset({13, 31, 43})
    xid_hardware: frozenset[int] = frozenset({48, 64, 74, 94, 95, 119, 120, 46, 62, 109})
    xid_node: frozenset[int] = frozenset({79})
    xid_ignored: frozenset[int] = frozenset({45, 63, 92})
    window_s: float = 1.0


DEFAULT_TABLE: Final = FaultTable()


@dataclass(frozen=True, slots=True)
class AttemptEvidence:
    """Everything known about one attempt when it is classified."""

    task_id: str
    attempt: int
    node: str
    gpu_uuids: tuple[str, ...]
    exited: ContainerExited | None = None
    start_failed: ContainerStartFailed | None = None
    gpu_faults: tuple[GpuFault, ...] = ()
    node_lost: NodeLost | None = None
    stop_requested: bool = False


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one attempt, with the events that decided it."""

    fault: Fault
    rule: str
    evidence: tuple[str, ...]
    exclude_gpus: tuple[str, ...] = ()
    exclude_nodes: tuple[str, ...] = ()
    quarantine: tuple[str, ...] = ()
    exit_code: int | None = None


# --- single pieces of evidence -----------------------------------------------------


def is_image_error(message: str) -> bool:
    """Whether a runtime error text says the image or its command is what is wrong."""
    text = message.lower()
    if any(marker in text for marker in IMAGE_ERROR_MARKERS):
        return True
    return "exec:" in text and any(failure in text for failure in _EXEC_FAILURES)


def recovery_action_class(detail: str) -> GpuFaultClass | None:
    """The class of an NVML recovery action written as its number or name."""
    action = detail.strip().lower().removeprefix("nvml_").removeprefix("gpu_recovery_action_")
    if action in _RECOVERY_NODE:
        return "gpu_node"
    if action in _RECOVERY_GPU:
        return "gpu_hardware"
    return None


def gpu_fault_class(fault: GpuFault, table: FaultTable = DEFAULT_TABLE) -> GpuFaultClass | None:
    """ "gpu_hardware", "gpu_node" (the node needs a reboot), "gpu_app_error" or None."""
    match fault.kind:
        case "ecc_dbe":
            return "gpu_hardware"
        case "fallen_off_bus":
            return "gpu_node"
        case "recovery_action":
            return recovery_action_class(fault.detail)
        case "xid":
            return _xid_class(fault.xid, table)
        case _:
            return None  # an event built in memory with a kind no decoder would accept


def _xid_class(xid: int | None, table: FaultTable) -> GpuFaultClass | None:
    if xid is None or xid in table.xid_ignored:
        return None
    if xid in table.xid_node:
        return "gpu_node"
    if xid in table.xid_hardware:
        return "gpu_hardware"
    if xid in table.xid_app:
        return "gpu_app_error"
    return None


def gpu_fault_rule(fault: GpuFault, table: FaultTable = DEFAULT_TABLE) -> str:
    """The stable rule name a hardware-class fault is recorded under."""
    if fault.kind == "xid":
        return "xid_node" if fault.xid in table.xid_node else "xid_hardware"
    return fault.kind


def exit_time(exited: ContainerExited) -> datetime:
    """When the process died: the runtime's own finish time where it gave one."""
    return exited.finished_at if exited.finished_at is not None else exited.at


def exit_code_of(exited: ContainerExited) -> int | None:
    """The exit code, with a signal death written the way Docker writes it (128+N)."""
    if exited.exit_code is not None:
        return exited.exit_code
    if exited.signal is not None:
        return 128 + exited.signal
    return None


def signal_of(exited: ContainerExited) -> int | None:
    """The signal that killed the process, from the field or from a 128+N exit code."""
    if exited.signal is not None:
        return exited.signal
    code = exited.exit_code
    if code is not None and 128 < code <= 128 + _MAX_SIGNAL:
        return code - 128
    return None


def evidence_deadline(exited_at: datetime, table: FaultTable = DEFAULT_TABLE) -> datetime:
    """When an exit may be classified: late GPU evidence has had its window."""
    return exited_at + timedelta(seconds=table.window_s)


# --- classification ----------------------------------------------------------------


def classify(evidence: AttemptEvidence, table: FaultTable = DEFAULT_TABLE) -> Classification:
    """The attempt's fault type, by the precedence in the module docstring."""
    if evidence.start_failed is not None:
        return _classify_start_failure(evidence.start_failed)
    exited = evidence.exited
    if exited is not None and exit_code_of(exited) == 0:
        return Classification("completed", "exit_zero", (exited.id,), exit_code=0)
    node_lost = _relevant_node_loss(evidence)
    nearby = () if exited is None else _faults_near_exit(evidence, exited, table)
    if exited is not None:
        hardware = _hardware_classification(evidence, exited, nearby, node_lost, table)
        if hardware is not None:
            return hardware
    if node_lost is not None:
        ids = (node_lost.id,) if exited is None else (exited.id, node_lost.id)
        code = None if exited is None else exit_code_of(exited)
        return Classification("node_lost", "node_lost", ids, (), (evidence.node,), (), code)
    if exited is not None:
        return _classify_exit(evidence, exited, nearby, table)
    hung = _hardware_classification(evidence, None, _faults_on_gpus(evidence), None, table)
    if hung is not None:
        return hung
    return Classification("unknown", "no_evidence", ())


def _classify_start_failure(failed: ContainerStartFailed) -> Classification:
    if is_image_error(failed.error):
        return Classification("image_error", "start_image", (failed.id,))
    return Classification("runtime_error", "start_runtime", (failed.id,))


def _relevant_node_loss(evidence: AttemptEvidence) -> NodeLost | None:
    """The node's loss, unless the process had already exited before it."""
    lost = evidence.node_lost
    if lost is None or lost.node != evidence.node:
        return None
    if evidence.exited is not None and exit_time(evidence.exited) < lost.at:
        return None
    return lost


def _faults_near_exit(
    evidence: AttemptEvidence, exited: ContainerExited, table: FaultTable
) -> tuple[GpuFault, ...]:
    """GPU faults on this attempt's GPUs within the window around the exit, in order."""
    gpus = set(evidence.gpu_uuids)
    died = exit_time(exited)
    window = timedelta(seconds=table.window_s)
    near = (
        fault
        for fault in evidence.gpu_faults
        if fault.gpu_uuid in gpus and abs(fault.at - died) <= window
    )
    return tuple(sorted(near, key=lambda fault: (fault.at, fault.id)))


def _faults_on_gpus(evidence: AttemptEvidence) -> tuple[GpuFault, ...]:
    """GPU faults on this attempt's GPUs, in order. A hardware-class one can only be
    this attempt's: it quarantines its GPU, and a restore clears the GPU's faults."""
    gpus = set(evidence.gpu_uuids)
    held = (fault for fault in evidence.gpu_faults if fault.gpu_uuid in gpus)
    return tuple(sorted(held, key=lambda fault: (fault.at, fault.id)))


def _hardware_classification(
    evidence: AttemptEvidence,
    exited: ContainerExited | None,
    nearby: tuple[GpuFault, ...],
    node_lost: NodeLost | None,
    table: FaultTable,
) -> Classification | None:
    classes = [(fault, gpu_fault_class(fault, table)) for fault in nearby]
    bad = [(fault, cls) for fault, cls in classes if cls in ("gpu_hardware", "gpu_node")]
    if not bad:
        return None
    needs_node = [fault for fault, cls in bad if cls == "gpu_node"]
    decisive = needs_node[0] if needs_node else bad[0][0]
    gpus = _unique(fault.gpu_uuid for fault, _ in bad)
    ids = [*([] if exited is None else [exited.id]), *(fault.id for fault, _ in bad)]
    exclude_nodes: tuple[str, ...] = ()
    if needs_node or node_lost is not None:
        exclude_nodes = (evidence.node,)
    if node_lost is not None:
        ids.append(node_lost.id)
    return Classification(
        "gpu_hardware",
        gpu_fault_rule(decisive, table),
        tuple(ids),
        exclude_gpus=gpus,
        exclude_nodes=exclude_nodes,
        quarantine=gpus,
        exit_code=None if exited is None else exit_code_of(exited),
    )


def _classify_exit(
    evidence: AttemptEvidence,
    exited: ContainerExited,
    nearby: tuple[GpuFault, ...],
    table: FaultTable,
) -> Classification:
    code = exit_code_of(exited)
    ids = (exited.id,)

    def verdict(fault: Fault, rule: str, extra: tuple[str, ...] = ()) -> Classification:
        return Classification(fault, rule, ids + extra, exit_code=code)

    if exited.oom_killed:
        return verdict("container_oom", "oom_flag")
    app = tuple(f.id for f in nearby if gpu_fault_class(f, table) == "gpu_app_error")
    if app:
        return verdict("gpu_app_error", "xid_app", app)
    if exited.error.strip():
        if is_image_error(exited.error):
            return verdict("image_error", "exit_error_image")
        return verdict("runtime_error", "exit_runtime_error")
    signal = signal_of(exited)
    if signal is not None:
        return verdict(*_signal_fault(signal, evidence.stop_requested))
    if code in (126, 127):
        return verdict("image_error", "exit_126_127")
    if code is None:
        return verdict("unknown", "no_evidence")
    return verdict("user_error", "exit_nonzero")


def _signal_fault(signal: int, stop_requested: bool) -> tuple[Fault, str]:
    if signal in (_SIGKILL, _SIGTERM):
        if stop_requested:
            return ("user_error", "stop_requested")
        return ("preempted", "signal_preempted")
    return ("user_error", "signal_user")


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))
