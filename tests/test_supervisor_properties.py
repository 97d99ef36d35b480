"""Properties of the supervisor over random histories (hypothesis).

Random clusters, submissions, exits, Xids, node losses, cancellations and time go
through the in-memory driver, decided event by event, several events to a round, or
by an engine restarted after it missed some (its fold and startup sweep); whatever
the order, the log must replay to the same decisions, never hand one GPU to two live
attempts, never exceed the rebuild budget, never cite a cause that is not logged,
and never leave a finished attempt holding GPUs (but for one gpuwarden ended while
its process may still run, until its exit, start failure or node loss is logged).
"""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.decide import decide, decide_many, reconcile
from gpuwarden.engine.core.fold import evolve
from gpuwarden.engine.core.policy import DEFAULT_POLICY, Policy, Rule
from gpuwarden.engine.core.state import TERMINAL, State, awaits_kill, initial_state, next_due
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.supervisor_driver import T0, Driver

POLICIES = [
    DEFAULT_POLICY,
    Policy(max_rebuilds=1, window_s=60, backoff_initial_s=5, backoff_max_s=20),
    Policy(max_rebuilds=2, window_s=30, backoff_initial_s=0, backoff_max_s=0),
    Policy(max_rebuilds=-1, backoff_initial_s=1, backoff_max_s=4),
    Policy(
        max_rebuilds=2,
        window_s=120,
        rules=(
            Rule("fail", exit_codes_in=frozenset({42})),
            Rule("rebuild_uncounted", faults=frozenset({"preempted"})),
            Rule("rebuild", exit_codes_in=frozenset({3})),
        ),
    ),
]
EXIT_CODES = [0, 0, 1, 2, 3, 42, 126, 127, 137, 139, 143, None]
SIGNALS = [None, None, 9, 11, 15]
XIDS = [13, 31, 43, 45, 48, 63, 64, 79, 94, 999]
START_ERRORS = ["No such image: x:1", "OCI runtime create failed: cgroup busy", "boom"]
SECONDS = [0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 100.0, 400.0]
MODELS = ["H100", "A100"]

index = st.integers(0, 15)
submit = st.tuples(
    st.just("submit"),
    st.sampled_from([1, 1, 1, 2, 2, 3, 4]),
    st.sampled_from([None, None, *MODELS]),
)
live = st.tuples(st.just("start"), index) | st.tuples(
    st.just("exit"), index, st.sampled_from(EXIT_CODES), st.booleans(), st.sampled_from(SIGNALS)
)
step = st.one_of(
    submit,
    st.tuples(st.just("start"), index),
    st.tuples(
        st.just("exit"),
        index,
        st.sampled_from(EXIT_CODES),
        st.booleans(),
        st.sampled_from(SIGNALS),
    ),
    st.tuples(st.just("start_failed"), index, st.sampled_from(START_ERRORS)),
    st.tuples(st.just("xid"), index, st.sampled_from(XIDS)),
    st.tuples(st.just("task_xid"), index, st.sampled_from(XIDS)),
    st.tuples(st.just("xid_at_due"), index, st.sampled_from(XIDS)),
    # an agent whose clock is behind (or that reports late): the Xid is stamped earlier
    st.tuples(st.just("late_xid"), index, st.sampled_from(XIDS), st.sampled_from([0.6, 2.0, 30.0])),
    st.tuples(st.just("xid_storm"), index),  # Xid 45s enough to overflow a GPU's memory
    st.tuples(st.just("node_down"), index),
    st.tuples(st.just("node_up"), index),
    st.tuples(st.just("restore"), index),
    st.tuples(st.just("cancel"), index),
    st.tuples(st.just("stale_exit"), index, st.integers(1, 4)),
    st.tuples(st.just("stranger"), st.integers(0, 5)),
    st.tuples(st.just("advance"), st.sampled_from(SECONDS)),
    st.tuples(st.just("advance"), st.sampled_from(SECONDS)),
    # the engine's own shapes: several events decided in one round, a node that is
    # lost and back before its loss is decided, an engine down while events arrive
    st.tuples(st.just("flap"), index),
    st.tuples(st.just("crash")),
    st.tuples(st.just("restart")),
)
batched = st.tuples(st.just("batch"), step, step).filter(
    lambda b: not any(a[0] in ("advance", "crash", "restart", "flap") for a in b[1:])
)
clusters = st.lists(st.tuples(st.integers(1, 4), st.sampled_from(MODELS)), min_size=1, max_size=4)
histories = st.tuples(
    st.sampled_from(POLICIES),
    clusters,
    st.tuples(
        st.lists(submit, min_size=1, max_size=6),
        st.lists(st.one_of(step, live, live, submit, batched), min_size=25, max_size=120),
    ).map(lambda parts: parts[0] + parts[1]),
)


# --- playing a history -------------------------------------------------------------


def advance(d: Driver, seconds: float) -> None:
    """Driver.advance, but a timer that is due and decides nothing fails the test."""
    target = d.now + timedelta(seconds=seconds)
    if d.down:  # no engine, no timers
        d.now = target
        return
    for _ in range(10_000):
        due = next_due(d.state)
        if due is None or due > target:
            d.now = target
            return
        d.now = max(d.now, due)
        before = (len(d.log), next_due(d.state))
        d._decide(None)
        assert (len(d.log), next_due(d.state)) != before, f"timer due at {due} never settles"
    raise AssertionError("timers never settle")


def pick(items: list[Any], i: int) -> Any:
    return items[i % len(items)] if items else None


def current(d: Driver, task: str) -> Any:
    return d.state.tasks[task].current


def play(d: Driver, action: tuple[Any, ...]) -> None:
    tasks = list(d.state.tasks)
    nodes = sorted(d.state.nodes)
    gpus = sorted(d.state.gpus)
    kind = action[0]
    if kind == "submit":
        d.submit(f"t{len(tasks)}", gpus=action[1], gpu_model=action[2])
    elif kind == "crash":
        d.down = True
    elif kind == "restart":
        if d.down:
            d.restart()
    elif kind == "batch":
        if d.down:
            return
        d.batch = []
        play(d, action[1])
        play(d, action[2])
        d.decide_batch()
    elif kind == "flap":
        node = pick(nodes, action[1])
        if d.down or not d.state.nodes[node].alive:
            return
        d.batch = []
        d.emit(ev.NodeLost, node=node, last_heartbeat_at=d.now - timedelta(seconds=3))
        d.emit(ev.NodeRecovered, node=node, last_heartbeat_at=d.now)
        d.decide_batch()
    elif kind == "advance":
        advance(d, action[1])
    elif kind == "stranger":
        stranger(d, action[1])
    elif kind == "late_xid":
        gpu = pick(gpus, action[1])
        node = d.state.gpus[gpu].node
        at = d.now - timedelta(seconds=action[3])
        d.append(ev.GpuFault(id=d._id(), at=at, actor=f"agent:{node}", gpu_uuid=gpu, node=node,
                             kind="xid", xid=action[2]))  # fmt: skip
    elif kind == "xid_storm":
        gpu = pick(gpus, action[1])
        for _ in range(20):
            d.xid(gpu, 45)
    elif kind in ("xid", "xid_at_due", "restore", "node_down", "node_up"):
        gpu = pick(gpus, action[1])
        node = pick(nodes, action[1])
        if kind == "xid_at_due":  # an Xid and a due timer in one round
            due = next_due(d.state)
            d.now = max(d.now, due) if due is not None else d.now
            d.xid(gpu, action[2])
        elif kind == "xid":
            d.xid(gpu, action[2])
        elif kind == "restore" and d.state.gpus[gpu].quarantined:
            d.emit(ev.GpuRestored, gpu_uuid=gpu, node=d.state.gpus[gpu].node, reason="reset")
        elif kind == "node_down" and d.state.nodes[node].alive:
            d.emit(ev.NodeLost, node=node, last_heartbeat_at=d.now - timedelta(seconds=3))
        elif kind == "node_up" and not d.state.nodes[node].alive:
            d.emit(ev.NodeRecovered, node=node, last_heartbeat_at=d.now)
    else:  # a task step: mostly about a task still in play
        active = [t for t in tasks if d.state.tasks[t].status not in TERMINAL]
        task = pick(active if active and action[1] % 4 else tasks, action[1])
        if task is not None:
            task_step(d, task, action)


def task_step(d: Driver, task: str, action: tuple[Any, ...]) -> None:
    kind = action[0]
    if kind == "cancel":
        d.emit(ev.TaskCancelled, task_id=task, reason="owner", actor="api")
        return
    attempt = current(d, task)
    if kind == "stale_exit":
        old = d.state.tasks[task].attempts.get(action[2])
        if old is not None:
            d.emit(
                ev.ContainerExited,
                task_id=task,
                attempt=old.n,
                node=old.node,
                container_id=f"c-{task}-{old.n}",
                exit_code=137,
            )
        return
    if attempt is None:
        return
    if kind == "start" and not attempt.started:
        d.start(task)
    elif kind == "exit":
        _, _, code, oom, signal = action
        d.exit(task, code, oom_killed=oom, signal=signal)
    elif kind == "start_failed":
        d.emit(
            ev.ContainerStartFailed,
            task_id=task,
            attempt=attempt.n,
            node=attempt.node,
            error=action[2],
        )
    elif kind == "task_xid":
        d.xid(attempt.gpu_uuids[0], action[2])


def stranger(d: Driver, which: int) -> None:
    """Well-formed events about tasks, GPUs and nodes nobody registered."""
    common: dict[str, Any] = {"task_id": "ghost", "attempt": 1, "node": "nowhere"}
    if which == 0:
        d.emit(ev.ContainerExited, container_id="c", exit_code=1, **common)
    elif which == 1:
        d.emit(ev.GpuFault, gpu_uuid="ghost-gpu", node="nowhere", kind="xid", xid=48)
    elif which == 2:
        d.emit(ev.NodeLost, node="nowhere")
    elif which == 3:
        d.emit(ev.GpuReleased, gpu_uuid="ghost-gpu", **common)
    elif which == 4:
        d.emit(ev.TaskCancelled, task_id="ghost", reason="?")
    else:
        d.emit(ev.ContainerStartFailed, error="No such image", **common)


def run_history(history: tuple[Policy, list[tuple[int, str]], list[Any]]) -> Driver:
    policy, cluster, steps = history
    d = Driver(policy)
    for i, (gpus, model) in enumerate(cluster):
        d.node(f"n{i}", gpus, model=model)
    for action in steps:
        play(d, action)
        if not d.down:  # a down engine has not decided on what it missed yet
            check_no_finished_attempt_holds_gpus(d.state)
            check_ended_attempts_let_go(d)
    if d.down:
        d.restart()
    advance(d, 24 * 3600)  # let every timer run out
    check_no_finished_attempt_holds_gpus(d.state)
    check_ended_attempts_let_go(d)
    return d


# --- the properties ----------------------------------------------------------------


def check_no_finished_attempt_holds_gpus(state: State) -> None:
    for uuid, gpu in state.gpus.items():
        if gpu.holder is None:
            continue
        task_id, n = gpu.holder
        task = state.tasks[task_id]
        attempt = task.attempts[n]
        assert uuid in attempt.gpu_uuids
        if awaits_kill(state, attempt):
            continue  # a hung process on a failed GPU: released when its kill is logged
        assert task.status not in TERMINAL, f"{uuid} held by {task_id}/{n} ({task.status})"
        assert attempt.classified is None, f"{uuid} held by {task_id}/{n}, already classified"


def check_ended_attempts_let_go(d: Driver) -> None:
    """An ended attempt that still holds GPUs (awaits_kill) has no exit or start
    failure logged, and its node has not been lost since it was scheduled there."""
    position = {e.id: i for i, e in enumerate(d.log)}
    losses = [(i, e.node) for i, e in enumerate(d.log) if isinstance(e, ev.NodeLost)]
    for uuid, gpu in d.state.gpus.items():
        if gpu.holder is None:
            continue
        task = d.state.tasks[gpu.holder[0]]
        attempt = task.attempts[gpu.holder[1]]
        if attempt.classified is None and not attempt.stop_requested:
            continue
        assert attempt.exited is None and attempt.start_failed is None, f"{uuid} kept"
        since = position[attempt.scheduled.id]
        lost = [i for i, node in losses if node == attempt.node and i > since]
        assert not lost, f"{uuid} kept by {gpu.holder} after its node's loss at {lost[0]}"


def check_replay(d: Driver) -> int:
    """Fold the decoded log from scratch and re-derive every recorded decision group.

    On the way: a GPU is only ever allocated while free, healthy and on a live node.
    """
    log = [ev.decode(ev.encode(e)) for e in d.log]
    assert log == d.log
    by_id = {e.id: e for e in log}
    groups = {basis: (trigger, group) for basis, trigger, group in d.decisions}
    assert len(groups) == len(d.decisions)
    state = initial_state(d.state.policy)
    for i, event in enumerate(log):
        if i in groups:
            trigger_id, group = groups[i]
            before = copy.deepcopy(state) if i % 4 == 0 else None
            now = group[0].at
            if trigger_id == "reconcile":
                assert reconcile(state, now) == group
            elif isinstance(trigger_id, tuple):
                assert decide_many(state, [by_id[t] for t in trigger_id], now) == group
            else:
                trigger = None if trigger_id == "timer" else by_id[trigger_id]
                assert decide(state, trigger, now) == group
            if before is not None:
                assert state == before, "decide mutated the state"
        if isinstance(event, ev.GpuAllocated):
            gpu = state.gpus[event.gpu_uuid]
            assert gpu.holder is None, f"{event.gpu_uuid} allocated twice: {gpu.holder}"
            assert not gpu.quarantined
            assert state.nodes[gpu.node].alive
        evolve(state, event)
    return len(groups)


def check_budget(d: Driver) -> None:
    policy = d.state.policy
    window = timedelta(seconds=policy.window_s)
    counted: dict[str, list[Any]] = {}
    for e in d.of_type(ev.RebuildDecided):
        if e.counted:
            counted.setdefault(e.task_id, []).append(e.at)
    for times in counted.values():
        assert policy.max_rebuilds != 0
        if policy.max_rebuilds == -1:
            continue
        for t in times:
            in_span = [u for u in times if t - window < u <= t]
            assert len(in_span) <= policy.max_rebuilds


def check_causation(d: Driver) -> None:
    seen: set[str] = set()
    for e in d.log:
        assert e.id not in seen, f"duplicate id {e.id}"
        if e.actor == "engine":
            assert e.causation_id in seen, e
            task = getattr(e, "task_id", None)
            if task is not None:
                assert e.correlation_id == task
        seen.add(e.id)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(histories)
def test_random_histories_keep_the_supervisor_invariants(
    history: tuple[Policy, list[tuple[int, str]], list[Any]],
) -> None:
    d = run_history(history)
    check_replay(d)
    check_budget(d)
    check_causation(d)
    for task in d.state.tasks.values():
        assert task.status in TERMINAL | {"running", "pending"}
        if task.rebuild is not None:  # a decided rebuild awaiting its placement
            assert task.status == "pending"
            assert task.pending_reason is not None  # every timer has run out


def test_a_busy_history_exercises_every_path() -> None:
    """A fixed history, so a regression in the strategy cannot hide every case."""
    steps: list[Any] = [
        ("submit", 1, None),
        ("submit", 2, None),
        ("submit", 4, None),
        ("start", 0),
        ("start", 1),
        ("task_xid", 0, 48),
        ("exit", 0, 1, False, None),
        ("exit", 1, 137, False, None),
        ("advance", 30.0),
        ("node_down", 0),
        ("advance", 30.0),
        ("node_up", 0),
        ("stranger", 0),
        ("cancel", 1),  # frees n1: t0's third attempt lands there
        ("start", 0),
        ("exit", 0, 0, False, None),
        ("advance", 400.0),
    ]
    d = run_history((DEFAULT_POLICY, [(2, "H100"), (2, "H100")], steps))
    assert check_replay(d) >= 8
    kinds = {type(e).__name__ for e in d.log}
    assert {"RebuildDecided", "GpuQuarantined", "TaskFailed", "TaskCompleted"} <= kinds
    assert d.now > T0
