"""Placement: which GPUs an attempt gets, and why it waits when none fit.

A wrong pick either strands a multi-GPU task (fragmentation), lands work on a bad GPU
or a dead node, or differs between an engine and its replay; these tables pin each.
They go through the one placement there is, the supervisor's: the fold keeps the
ranked free-node index, a decision round walks it (`first_fit`) and diagnoses a miss
(`why_not`). A property holds that path to a best-fit recomputed from scratch over
every node, whatever the cluster went through before.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytest
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.decide import decide_many
from gpuwarden.engine.core.placement import NoFit, Placement, PlacementRequest, matches
from gpuwarden.engine.core.state import GpuState, State
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.supervisor_driver import Driver

Outcome = Placement | NoFit


# --- a cluster, and what placement made of a request ---------------------------------


def cluster(*nodes: tuple[str, int] | tuple[str, Sequence[tuple[str, int]]]) -> Driver:
    """Nodes registered in the order given: (name, GPU count) for H100s of 80 GiB, or
    (name, [(model, memory_mb), ...]) one entry per GPU."""
    d = Driver()
    for name, gpus in nodes:
        specs = [("H100", 81920)] * gpus if isinstance(gpus, int) else list(gpus)
        register(d, name, specs)
    return d


def register(d: Driver, name: str, specs: Sequence[tuple[str, int]], order: str = "") -> None:
    infos = [
        ev.GpuInfo(uuid=f"{name}/{i}", index=i, model=model, memory_mb=memory)
        for i, (model, memory) in enumerate(specs)
    ]
    if order == "reversed":
        infos.reverse()
    d.emit(ev.NodeRegistered, node=name, runtime="sim", gpus=tuple(infos))


def hold(d: Driver, *uuids: str) -> None:
    """Another attempt (of a task the supervisor never saw) holds these GPUs."""
    for uuid in uuids:
        node = d.state.gpus[uuid].node
        d.emit(ev.GpuAllocated, gpu_uuid=uuid, node=node, task_id="other", attempt=1)


def quarantine(d: Driver, *uuids: str) -> None:
    for uuid in uuids:
        node = d.state.gpus[uuid].node
        d.emit(ev.GpuQuarantined, gpu_uuid=uuid, node=node, reason="test")


def outcome(d: Driver, task: str) -> Outcome:
    """The supervisor's last answer for a task: where it placed it, or why it did not
    (pending: it may fit later; failed as unschedulable: it never will)."""
    for e in reversed(d.log):
        if getattr(e, "task_id", None) != task:
            continue
        if isinstance(e, ev.TaskScheduled):
            return Placement(e.node, e.gpu_uuids)
        if isinstance(e, ev.TaskPending):
            return NoFit(e.reason, ever=True)
        if isinstance(e, ev.TaskFailed) and e.reason == "unschedulable":
            return NoFit(e.detail, ever=False)
    raise AssertionError(f"no placement decision for {task}")


def place(d: Driver, *gpus: int, **fields: Any) -> list[Outcome]:
    """Submit one task per entry of `gpus`, all decided in one round (each later one
    sees the GPUs the earlier ones were promised), and return their outcomes."""
    first = len(d.state.tasks)
    names = [f"t{first + i}" for i in range(len(gpus))]
    d.batch = []
    for name, count in zip(names, gpus, strict=True):
        d.submit(name, gpus=count, **fields)
    d.decide_batch()
    return [outcome(d, name) for name in names]


def rebuild(
    d: Driver,
    gpus: int = 1,
    exclude_gpus: tuple[str, ...] = (),
    exclude_nodes: tuple[str, ...] = (),
) -> Outcome:
    """A task's rebuild, decided with these exclusions (its first attempt ran on a node
    that is gone), placed when its backoff is over."""
    task = f"t{len(d.state.tasks)}"
    d.down = True  # fold the history without deciding on it
    d.submit(task, gpus=gpus)
    d.emit(ev.TaskScheduled, task_id=task, attempt=1, node="gone", gpu_uuids=())
    d.emit(ev.FaultClassified, task_id=task, attempt=1, fault="gpu_hardware", rule="test")
    d.emit(ev.RebuildDecided, task_id=task, attempt=2, previous_attempt=1, fault="gpu_hardware",
           counted=True, rule=None, not_before=d.now, exclude_gpus=exclude_gpus,
           exclude_nodes=exclude_nodes)  # fmt: skip
    d.down = False
    d.advance(0)  # the backoff timer is due: a placement round
    return outcome(d, task)


# --- the tables --------------------------------------------------------------------


def test_one_gpu_on_an_idle_node() -> None:
    assert place(cluster(("a", 2)), 1) == [Placement("a", ("a/0",))]


def test_skips_quarantined_held_and_promised_gpus() -> None:
    d = cluster(("a", 4))
    quarantine(d, "a/0")
    hold(d, "a/1")
    # the first task is promised a/2 in the round; the second must not get it too
    assert place(d, 1, 1) == [Placement("a", ("a/2",)), Placement("a", ("a/3",))]


def test_skips_lost_nodes() -> None:
    d = cluster(("a", 2), ("b", 2))
    d.emit(ev.NodeLost, node="a")
    assert place(d, 2) == [Placement("b", ("b/0", "b/1"))]


@pytest.mark.parametrize(
    ("model", "memory", "expected"),
    [
        ("A100", 0, "a"),
        ("a100", 0, "a"),  # the model matches without regard to case
        ("H100", 0, "b"),
        (None, 40000, "b"),
        (None, 90000, None),
        ("A100", 40000, None),
    ],
)
def test_model_and_memory_must_match(model: str | None, memory: int, expected: str | None) -> None:
    d = cluster(("a", [("A100", 40000 - 1)]), ("b", 1))
    [result] = place(d, 1, gpu_model=model, min_gpu_memory_mb=memory)
    if expected is None:
        assert isinstance(result, NoFit) and not result.ever  # failed: unschedulable
    else:
        assert isinstance(result, Placement) and result.node == expected


def test_matches_is_static_fit_only() -> None:
    gpu = GpuState("g", "a", 0, "H100", 81920, quarantined=True, holder=("t", 1))
    assert matches(gpu, PlacementRequest(1, gpu_model="h100", min_gpu_memory_mb=81920))
    assert not matches(gpu, PlacementRequest(1, min_gpu_memory_mb=81921))


def test_all_gpus_of_an_attempt_sit_on_one_node() -> None:
    d = cluster(("a", 2), ("b", 2))
    hold(d, "a/0", "b/1")
    # two free GPUs, but on two nodes
    assert place(d, 2) == [NoFit("waiting for 2 free GPUs on one node", ever=True)]


def test_best_fit_keeps_a_whole_node_free_for_a_later_big_task() -> None:
    d = cluster(("a", 4), ("b", 4))
    hold(d, "b/0")
    assert place(d, 1) == [Placement("b", ("b/1",))]  # the fuller node, not the empty one
    assert place(d, 4) == [Placement("a", ("a/0", "a/1", "a/2", "a/3"))]


def test_best_fit_counts_gpus_promised_in_the_same_round() -> None:
    d = cluster(("a", 2), ("b", 3))
    assert place(d, 1, 2) == [Placement("a", ("a/0",)), Placement("b", ("b/0", "b/1"))]


def test_ties_break_on_node_name_then_gpu_index_whatever_the_order_given() -> None:
    d = Driver()
    for name in ("c", "b"):
        register(d, name, [("H100", 81920)] * 2)
    register(d, "a", [("H100", 81920)] * 2, order="reversed")
    assert place(d, 1) == [Placement("a", ("a/0",))]
    assert place(d, 1) == [Placement("a", ("a/1",))]  # a now has fewer free


def test_picks_the_lowest_indexes_on_the_chosen_node() -> None:
    d = cluster(("a", 4))
    hold(d, "a/1")
    assert place(d, 2) == [Placement("a", ("a/0", "a/2"))]


def test_exclusions() -> None:
    assert rebuild(cluster(("a", 2), ("b", 2)), exclude_gpus=("a/0",)) == Placement("a", ("a/1",))
    assert rebuild(cluster(("a", 2), ("b", 2)), exclude_nodes=("a",)) == Placement("b", ("b/0",))
    result = rebuild(cluster(("a", 2), ("b", 2)), 2, exclude_gpus=("a/0", "b/1"))
    assert isinstance(result, NoFit) and result.ever
    assert "2 excluded after a fault" in result.reason


def test_no_nodes_registered_may_fit_later() -> None:
    assert place(Driver(), 1) == [NoFit("no nodes registered", ever=True)]


def test_never_fits_says_what_no_node_has() -> None:
    d = cluster(("a", 2))
    assert place(d, 3, gpu_model="H100", min_gpu_memory_mb=1000) == [
        NoFit("no node has 3 GPUs of model H100 with >= 1000 MiB", ever=False)
    ]
    assert place(d, 1, gpu_model="B200") == [NoFit("no node has 1 GPU of model B200", ever=False)]


def test_ever_counts_every_node_whatever_its_health() -> None:
    """A lost, excluded or quarantined node could still host it later: wait, not fail."""
    d = cluster(("a", 2), ("b", 2), ("c", 2))
    d.emit(ev.NodeLost, node="a")
    quarantine(d, "b/0", "b/1")
    assert rebuild(d, 2, exclude_nodes=("c",)) == NoFit(
        "waiting for 2 free GPUs on one node (1 node lost, 2 GPUs quarantined, "
        "1 excluded after a fault)",
        ever=True,
    )


def test_a_gpu_its_node_no_longer_lists_is_never_placed_on() -> None:
    d = cluster(("a", 2))
    register(d, "a", [("H100", 81920)])  # a registers again without a/1
    assert place(d, 2) == [NoFit("no node has 2 GPUs", ever=False)]
    assert place(d, 1) == [Placement("a", ("a/0",))]


# --- the property: the incremental path is best-fit ---------------------------------


def best_fit(state: State, request: PlacementRequest, taken: set[str]) -> Placement | None:
    """The placement rule recomputed from scratch: every node ranked by its free GPUs
    (neither held, quarantined nor promised this round), fewest first, then by name;
    the first live, not excluded one with enough eligible GPUs gives its lowest."""

    def free(uuid: str) -> bool:
        gpu = state.gpus.get(uuid)
        return gpu is not None and gpu.holder is None and not gpu.quarantined and uuid not in taken

    ranked = sorted((sum(map(free, node.gpus)), name) for name, node in state.nodes.items())
    for count, name in ranked:
        node = state.nodes[name]
        if count < request.gpus or not node.alive or name in request.exclude_nodes:
            continue
        eligible = sorted(
            (state.gpus[u].index, u)
            for u in node.gpus
            if free(u) and u not in request.exclude_gpus and matches(state.gpus[u], request)
        )
        if len(eligible) >= request.gpus:
            return Placement(name, tuple(u for _, u in eligible[: request.gpus]))
    return None


def could_ever(state: State, request: PlacementRequest) -> bool:
    """Some node, idle and healthy, would fit it (else it fails as unschedulable)."""
    return not state.nodes or any(
        sum(1 for u in node.gpus if u in state.gpus and matches(state.gpus[u], request))
        >= request.gpus
        for node in state.nodes.values()
    )


MODELS = [("H100", 81920), ("H100", 40960), ("A100", 40960)]
node_specs = st.lists(st.lists(st.sampled_from(MODELS), min_size=1, max_size=4), max_size=6)
# What the cluster goes through before the round, each on GPU or node number i (mod):
churn = st.lists(
    st.tuples(
        st.sampled_from(["hold", "release", "quarantine", "restore", "lose", "recover", "shrink"]),
        st.integers(0, 30),
    ),
    max_size=25,
)
requests = st.lists(
    st.tuples(
        st.integers(1, 4),
        st.sampled_from([None, "H100", "a100"]),
        st.sampled_from([0, 0, 50000]),
    ),
    min_size=1,
    max_size=6,
)


def go_through(d: Driver, steps: list[tuple[str, int]]) -> None:
    for kind, i in steps:
        uuids, names = sorted(d.state.gpus), sorted(d.state.nodes)
        if not uuids:
            return
        uuid, name = uuids[i % len(uuids)], names[i % len(names)]
        gpu, node = d.state.gpus[uuid], d.state.nodes[name]
        if kind == "hold" and gpu.holder is None:
            hold(d, uuid)
        elif kind == "release" and gpu.holder is not None:
            d.emit(ev.GpuReleased, gpu_uuid=uuid, node=gpu.node, task_id="other", attempt=1)
        elif kind == "quarantine" and not gpu.quarantined:
            quarantine(d, uuid)
        elif kind == "restore" and gpu.quarantined:
            d.emit(ev.GpuRestored, gpu_uuid=uuid, node=gpu.node, reason="reset")
        elif kind == "lose" and node.alive:
            d.emit(ev.NodeLost, node=name)
        elif kind == "recover" and not node.alive:
            d.emit(ev.NodeRecovered, node=name)
        elif kind == "shrink" and len(node.gpus) > 1:  # registers again without a GPU
            kept = [d.state.gpus[u] for u in node.gpus[:-1]]
            infos = tuple(ev.GpuInfo(uuid=g.uuid, index=g.index, model=g.model,
                                     memory_mb=g.memory_mb) for g in kept)  # fmt: skip
            d.emit(ev.NodeRegistered, node=name, runtime="sim", gpus=infos)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(node_specs, churn, requests)
def test_the_supervisors_placements_are_best_fit(
    nodes: list[list[tuple[str, int]]],
    steps: list[tuple[str, int]],
    asked: list[tuple[int, str | None, int]],
) -> None:
    d = Driver()
    for i, specs in enumerate(nodes):
        register(d, f"n{i}", specs)
    go_through(d, steps)
    before = copy.deepcopy(d.state)
    triggers = []
    for i, (gpus, model, memory) in enumerate(asked):
        triggers.append(ev.TaskSubmitted(id=f"s{i:03d}", at=d.now, actor="api", task_id=f"t{i}",
                                         name=f"t{i}", image="img", command=("run",), gpus=gpus,
                                         gpu_model=model, min_gpu_memory_mb=memory))  # fmt: skip
    d.batch = []
    for trigger in triggers:
        d.append(trigger)
    folded = copy.deepcopy(d.state)
    decided = decide_many(d.state, d.batch, d.now)
    assert d.state == folded, "decide changed the state it decided on"
    scheduled = {e.task_id: e for e in decided if isinstance(e, ev.TaskScheduled)}
    pending = {e.task_id for e in decided if isinstance(e, ev.TaskPending)}
    failed = {e.task_id for e in decided if isinstance(e, ev.TaskFailed)}
    taken: set[str] = set()
    for trigger in triggers:
        request = PlacementRequest(trigger.gpus, trigger.gpu_model, trigger.min_gpu_memory_mb)
        expected = best_fit(before, request, taken)
        task = trigger.task_id
        if expected is not None:
            assert task in scheduled, f"{task}: best fit is {expected}, not placed"
            found = scheduled[task]
            assert Placement(found.node, found.gpu_uuids) == expected, task
            taken.update(expected.gpu_uuids)
        elif could_ever(before, request):
            assert task in pending and task not in scheduled, task
        else:
            assert task in failed and task not in scheduled, task
