"""Conformance: peers' documented failure semantics, written as gpuwarden policies.

Each row gives a failure as the peer sees it, the outcome the peer documents for it, and
the same failure as gpuwarden's evidence; the test classifies that evidence, judges it
under the translated policy, and checks the verdict is the peer's outcome. So the
policy language is shown able to say what Kubernetes and Kubeflow say, and where our
defaults differ on purpose, a last table says so.

Sources (checked, not recalled):
- Kubernetes Job pod failure policy (kubernetes.io/docs/tasks/job/pod-failure-policy and
  the batch/v1 API reference): rules evaluated in order, the first match decides;
  FailJob marks the Job failed; Ignore does not increment the counter towards
  backoffLimit and creates a replacement Pod; Count is the default handling (counter
  incremented, checked against backoffLimit, default 6); onExitCodes `In` / `NotIn`;
  containers that exited 0 are excluded from the exit-code check. Failed Pods are
  recreated with an exponential back-off delay (10s, 20s, 40s ...) capped at six minutes.
  The `DisruptionTarget` condition marks a Pod removed for a reason outside it:
  PreemptionByScheduler, EvictionByEvictionAPI, TerminationByKubelet, and for a lost
  node DeletionByTaintManager (NoExecute taint of an unreachable node) and
  DeletionByPodGC (node gone). gpuwarden's equivalent is the fault types `preempted`
  and `node_lost`.
- Kubeflow training operator `restartPolicy: ExitCode` (kubeflow/training-operator,
  pkg/util/train/train_util.go IsRetryableExitCode): 1, 2, 126, 127, 128, 139 are
  permanent; 130, 137, 143 (SIGINT, SIGKILL, SIGTERM: "usually caused by transient
  issues") and 138 (SIGUSR1, reserved for user-defined retryable errors) are retryable;
  other codes get no guarantee and are handled as permanent. The restarts do not honour
  backoffLimit (kubeflow/trainer#2045, confirmed by the maintainers as the specified
  behaviour), hence `rebuild_uncounted`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.faults import AttemptEvidence, classify
from gpuwarden.engine.core.policy import DEFAULT_POLICY, Policy, Verdict, judge, parse_policy

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
NODE = "node-a"

# The peer's outcome -> (action, counted, reason) of gpuwarden's verdict.
OUTCOMES: dict[str, tuple[str, bool, str | None]] = {
    # Kubernetes
    "Succeeded": ("complete", False, None),
    "FailJob": ("fail", False, "policy_rule"),
    "Ignore": ("rebuild", False, None),
    "Count": ("rebuild", True, None),
    "BackoffLimitExceeded": ("fail", False, "budget_exhausted"),
    # Kubeflow ExitCode
    "permanent": ("fail", False, "policy_rule"),
    "retryable": ("rebuild", False, None),
}


def exit_with(code: int, *, oom: bool = False) -> AttemptEvidence:
    exited = ev.ContainerExited(
        id="exit",
        at=NOW,
        actor=f"agent:{NODE}",
        task_id="t1",
        attempt=1,
        node=NODE,
        container_id="c1",
        exit_code=code,
        oom_killed=oom,
    )
    return AttemptEvidence("t1", 1, NODE, ("GPU-0",), exited=exited)


def node_gone() -> AttemptEvidence:
    lost = ev.NodeLost(id="lost", at=NOW, actor="engine", node=NODE)
    return AttemptEvidence("t1", 1, NODE, ("GPU-0",), node_lost=lost)


def xid_then_exit(xid: int, code: int) -> AttemptEvidence:
    fault = ev.GpuFault(
        id="xid", at=NOW, actor="agent", gpu_uuid="GPU-0", node=NODE, kind="xid", xid=xid
    )
    base = exit_with(code)
    return AttemptEvidence("t1", 1, NODE, ("GPU-0",), exited=base.exited, gpu_faults=(fault,))


@dataclass(frozen=True)
class Row:
    peer_input: str  # the failure in the peer's terms
    peer_outcome: str  # what the peer documents for it (a key of OUTCOMES)
    evidence: AttemptEvidence  # the same failure as gpuwarden's evidence
    rule: int | None  # the rule that decides, on both sides
    counted_before: int = 0  # failures already counted against the budget


def verdict_for(policy: Policy, row: Row) -> Verdict:
    found = classify(row.evidence)
    history = [NOW - timedelta(minutes=i + 1) for i in range(row.counted_before)]
    return judge(policy, found.fault, found.exit_code, history, NOW)


def check(policy: Policy, row: Row) -> None:
    got = verdict_for(policy, row)
    assert (got.action, got.counted, got.reason) == OUTCOMES[row.peer_outcome], row.peer_input
    assert got.rule == row.rule, row.peer_input


# --- Kubernetes: job-pod-failure-policy-example.yaml ------------------------------------------
#   backoffLimit: 6
#   podFailurePolicy.rules:
#   - action: FailJob,  onExitCodes: {containerName: main, operator: In, values: [42]}
#   - action: Ignore,   onPodConditions: [{type: DisruptionTarget}]

K8S_EXAMPLE = parse_policy(
    """
max_rebuilds = 6            # backoffLimit: 6
window_s = 31536000         # the Job's counter never decays: a year stands for its life
backoff_initial_s = 10      # 10s, 20s, 40s ...
backoff_max_s = 360         # ... capped at six minutes

[[rules]]                   # FailJob onExitCodes In [42]
action = "fail"
exit_codes = { in = [42] }

[[rules]]                   # Ignore onPodConditions DisruptionTarget
action = "rebuild_uncounted"
faults = ["preempted", "node_lost"]

[[rules]]                   # no rule matched: Count, Kubernetes' default handling
action = "rebuild"
""",
    "k8s-job-pod-failure-policy-example.toml",
)

K8S_EXAMPLE_ROWS = [
    Row("main exits 0: Pod Succeeded", "Succeeded", exit_with(0), None),
    Row("main exits 42", "FailJob", exit_with(42), 0),
    Row(
        "evicted (DisruptionTarget), its SIGTERM handler exits 42: FailJob, the first rule",
        "FailJob",
        exit_with(42),
        0,
    ),
    Row(
        "evicted via Eviction API: SIGTERM, exit 143, DisruptionTarget", "Ignore", exit_with(143), 1
    ),
    Row(
        "preempted by scheduler, killed after grace: exit 137, DisruptionTarget",
        "Ignore",
        exit_with(137),
        1,
    ),
    Row(
        "evicted with 6 failures already counted: Ignore is never limited",
        "Ignore",
        exit_with(143),
        1,
        counted_before=6,
    ),
    Row(
        "node unreachable, DeletionByTaintManager, no exit code, DisruptionTarget",
        "Ignore",
        node_gone(),
        1,
    ),
    Row("main exits 1, first failure", "Count", exit_with(1), 2),
    Row("main exits 1, 5 failures counted", "Count", exit_with(1), 2, counted_before=5),
    Row(
        "main exits 1, 6 failures counted: past backoffLimit 6",
        "BackoffLimitExceeded",
        exit_with(1),
        2,
        counted_before=6,
    ),
    Row("OOMKilled, exit 137, no DisruptionTarget", "Count", exit_with(137, oom=True), 2),
    Row("SIGSEGV, exit 139", "Count", exit_with(139), 2),
    Row("command not found, exit 127", "Count", exit_with(127), 2),
]


@pytest.mark.parametrize("row", K8S_EXAMPLE_ROWS, ids=[r.peer_input for r in K8S_EXAMPLE_ROWS])
def test_kubernetes_pod_failure_policy_example(row: Row) -> None:
    check(K8S_EXAMPLE, row)


def test_kubernetes_backoff_delays_10_20_40_capped_at_six_minutes() -> None:
    unlimited = Policy(
        rules=K8S_EXAMPLE.rules,
        max_rebuilds=-1,
        window_s=K8S_EXAMPLE.window_s,
        backoff_initial_s=10,
        backoff_max_s=360,
    )
    delays = [
        verdict_for(unlimited, Row("exit 1", "Count", exit_with(1), 2, counted_before=k)).backoff_s
        for k in range(8)
    ]
    assert delays == [10, 20, 40, 80, 160, 320, 360, 360]


# --- Kubernetes: job-pod-failure-policy-ignore.yaml -------------------------------------------
#   backoffLimit: 0
#   podFailurePolicy.rules: [{action: Ignore, onPodConditions: [{type: DisruptionTarget}]}]

K8S_IGNORE = parse_policy(
    """
max_rebuilds = 0
window_s = 31536000
[[rules]]
action = "rebuild_uncounted"
faults = ["preempted", "node_lost"]
[[rules]]
action = "rebuild"
""",
    "k8s-job-pod-failure-policy-ignore.toml",
)

K8S_IGNORE_ROWS = [
    Row("drained node: exit 143, DisruptionTarget", "Ignore", exit_with(143), 0),
    Row("node deleted, DeletionByPodGC, no exit code", "Ignore", node_gone(), 0),
    Row("main exits 1 with backoffLimit 0", "BackoffLimitExceeded", exit_with(1), 1),
]


@pytest.mark.parametrize("row", K8S_IGNORE_ROWS, ids=[r.peer_input for r in K8S_IGNORE_ROWS])
def test_kubernetes_ignore_disruptions_with_no_budget(row: Row) -> None:
    check(K8S_IGNORE, row)


# --- Kubernetes: onExitCodes NotIn ------------------------------------------------------------
#   backoffLimit: 6
#   podFailurePolicy.rules: [{action: FailJob, onExitCodes: {operator: NotIn, values: [137, 143]}}]
# NotIn is satisfied by an exit code outside the values; a Pod with no terminated
# container exit code does not satisfy an onExitCodes requirement, so it is Counted.

K8S_NOT_IN = parse_policy(
    """
max_rebuilds = 6
window_s = 31536000
[[rules]]
action = "fail"
exit_codes = { not_in = [137, 143] }
[[rules]]
action = "rebuild"
""",
    "k8s-not-in.toml",
)

K8S_NOT_IN_ROWS = [
    Row("main exits 1", "FailJob", exit_with(1), 0),
    Row("main exits 3", "FailJob", exit_with(3), 0),
    Row("main SIGTERMed, exit 143", "Count", exit_with(143), 1),
    Row("main OOMKilled, exit 137", "Count", exit_with(137, oom=True), 1),
    Row("main exits 0", "Succeeded", exit_with(0), None),
    Row("node gone, no exit code", "Count", node_gone(), 1),
]


@pytest.mark.parametrize("row", K8S_NOT_IN_ROWS, ids=[r.peer_input for r in K8S_NOT_IN_ROWS])
def test_kubernetes_on_exit_codes_not_in(row: Row) -> None:
    check(K8S_NOT_IN, row)


# --- Kubeflow: restartPolicy ExitCode ---------------------------------------------------------

KUBEFLOW_EXIT_CODE = parse_policy(
    """
max_rebuilds = -1
[[rules]]                   # retryable: SIGINT, SIGKILL, SIGTERM, and SIGUSR1 for the user
action = "rebuild_uncounted"
exit_codes = { in = [130, 137, 138, 143] }
[[rules]]                   # everything else is permanent
action = "fail"
""",
    "kubeflow-exit-code.toml",
)

KUBEFLOW_ROWS = [
    *[Row(f"exit {c}", "permanent", exit_with(c), 1) for c in (1, 2, 126, 127, 128, 139)],
    *[Row(f"exit {c}", "retryable", exit_with(c), 0) for c in (130, 137, 138, 143)],
    Row(
        "exit 137 with OOMKilled: the code decides, whatever the cause",
        "retryable",
        exit_with(137, oom=True),
        0,
    ),
    *[
        Row(f"exit {c}: no guarantee, handled as permanent", "permanent", exit_with(c), 1)
        for c in (3, 134, 255)
    ],
    Row(
        "retryable exit after many restarts: backoffLimit not honoured",
        "retryable",
        exit_with(143),
        0,
        counted_before=50,
    ),
    Row("exit 0", "Succeeded", exit_with(0), None),
]


@pytest.mark.parametrize("row", KUBEFLOW_ROWS, ids=[r.peer_input for r in KUBEFLOW_ROWS])
def test_kubeflow_exit_code_restart_policy(row: Row) -> None:
    check(KUBEFLOW_EXIT_CODE, row)


# --- where gpuwarden's defaults differ on purpose ---------------------------------------------
# A peer that judges by exit code alone cannot tell a GPU that died from a program that
# crashed; gpuwarden classifies from all the evidence first. Each row: the failure, what
# the peer's default does, gpuwarden's DEFAULT_POLICY verdict, and why.

DIVERGENCES: list[tuple[str, str, AttemptEvidence, Verdict, str]] = [
    (
        "exit 1",
        "Kubernetes Count (retries a user bug up to 6 times)",
        exit_with(1),
        Verdict("fail", reason="not_target_fault"),
        "a user_error is not cured by a rebuild",
    ),
    (
        "exit 137 with OOMKilled",
        "Kubeflow retryable",
        exit_with(137, oom=True),
        Verdict("fail", reason="not_target_fault"),
        "the same limits give the same OOM",
    ),
    (
        "exit 130 (SIGINT)",
        "Kubeflow retryable",
        exit_with(130),
        Verdict("fail", reason="not_target_fault"),
        "only SIGKILL/SIGTERM from outside are preemption; other signals are the program's",
    ),
    (
        "Xid 48 then exit 1",
        "Kubeflow permanent (exit 1)",
        xid_then_exit(48, 1),
        Verdict("rebuild", counted=True, backoff_s=10.0),
        "a double-bit ECC error is the GPU's fault: rebuild on another GPU",
    ),
    (
        "Xid 79 then exit 1",
        "Kubernetes Count on the same node if it schedules there",
        xid_then_exit(79, 1),
        Verdict("rebuild", counted=True, backoff_s=10.0),
        "fallen off the bus: rebuild on another node (placement excludes this one)",
    ),
]


@pytest.mark.parametrize(
    ("failure", "peer", "evidence", "expected", "why"),
    DIVERGENCES,
    ids=[d[0] for d in DIVERGENCES],
)
def test_gpuwarden_defaults_differ_where_the_evidence_says_more(
    failure: str, peer: str, evidence: AttemptEvidence, expected: Verdict, why: str
) -> None:
    found = classify(evidence)
    assert judge(DEFAULT_POLICY, found.fault, found.exit_code, [], NOW) == expected, why


def test_xid_79_divergence_excludes_the_node() -> None:
    assert classify(xid_then_exit(79, 1)).exclude_nodes == (NODE,)
