"""Placement: which GPUs an attempt gets, and why it waits when none fit.

A wrong pick either strands a multi-GPU task (fragmentation), lands work on a bad GPU
or a dead node, or differs between an engine and its replay; these tables pin each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from gpuwarden.engine.core.placement import NoFit, Placement, PlacementRequest, matches, place


@dataclass
class Gpu:
    uuid: str
    node: str
    index: int
    model: str = "H100"
    memory_mb: int = 81920
    quarantined: bool = False
    holder: tuple[str, int] | None = None


@dataclass
class Node:
    name: str
    alive: bool = True
    gpus: list[str] = field(default_factory=list)


def cluster(**sizes: int) -> tuple[dict[str, Node], dict[str, Gpu]]:
    nodes: dict[str, Node] = {}
    gpus: dict[str, Gpu] = {}
    for name, count in sizes.items():
        nodes[name] = Node(name, gpus=[f"{name}/{i}" for i in range(count)])
        for i in range(count):
            gpus[f"{name}/{i}"] = Gpu(f"{name}/{i}", name, i)
    return nodes, gpus


def req(gpus: int = 1, **kw: object) -> PlacementRequest:
    return PlacementRequest(gpus=gpus, **kw)  # type: ignore[arg-type]


def test_one_gpu_on_an_idle_node() -> None:
    nodes, gpus = cluster(a=2)
    assert place(req(), nodes, gpus) == Placement("a", ("a/0",))


def test_skips_quarantined_held_and_taken_gpus() -> None:
    nodes, gpus = cluster(a=4)
    gpus["a/0"].quarantined = True
    gpus["a/1"].holder = ("t0", 1)
    assert place(req(), nodes, gpus, taken=["a/2"]) == Placement("a", ("a/3",))


def test_skips_lost_nodes() -> None:
    nodes, gpus = cluster(a=2, b=2)
    nodes["a"].alive = False
    assert place(req(2), nodes, gpus) == Placement("b", ("b/0", "b/1"))


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
    nodes, gpus = cluster(a=1, b=1)
    gpus["a/0"].model, gpus["a/0"].memory_mb = "A100", 40000 - 1
    result = place(req(gpu_model=model, min_gpu_memory_mb=memory), nodes, gpus)
    if expected is None:
        assert isinstance(result, NoFit) and not result.ever
    else:
        assert isinstance(result, Placement) and result.node == expected


def test_matches_is_static_fit_only() -> None:
    gpu = Gpu("g", "a", 0, quarantined=True, holder=("t", 1))
    assert matches(gpu, req(gpu_model="h100", min_gpu_memory_mb=81920))
    assert not matches(gpu, req(min_gpu_memory_mb=81921))


def test_all_gpus_of_an_attempt_sit_on_one_node() -> None:
    nodes, gpus = cluster(a=2, b=2)
    gpus["a/0"].holder = ("t0", 1)
    gpus["b/1"].holder = ("t1", 1)
    result = place(req(2), nodes, gpus)  # two free GPUs, but on two nodes
    assert isinstance(result, NoFit)
    assert result.ever
    assert result.reason == "waiting for 2 free GPUs on one node"


def test_best_fit_keeps_a_whole_node_free_for_a_later_big_task() -> None:
    nodes, gpus = cluster(a=4, b=4)
    gpus["b/0"].holder = ("t0", 1)
    small = place(req(1), nodes, gpus)
    assert small == Placement("b", ("b/1",))  # the fuller node, not the empty one
    gpus["b/1"].holder = ("t1", 1)
    assert place(req(4), nodes, gpus) == Placement("a", ("a/0", "a/1", "a/2", "a/3"))


def test_best_fit_counts_gpus_promised_in_the_same_round() -> None:
    nodes, gpus = cluster(a=2, b=3)
    first = place(req(1), nodes, gpus)
    assert first == Placement("a", ("a/0",))
    second = place(req(2), nodes, gpus, taken=first.gpu_uuids)  # type: ignore[union-attr]
    assert second == Placement("b", ("b/0", "b/1"))


def test_ties_break_on_node_name_then_gpu_index_whatever_the_order_given() -> None:
    nodes, gpus = cluster(b=2, a=2, c=2)
    shuffled_nodes = {name: nodes[name] for name in ("c", "a", "b")}
    shuffled_gpus = dict(reversed(list(gpus.items())))
    nodes["a"].gpus.reverse()
    assert place(req(), nodes, gpus) == Placement("a", ("a/0",))
    assert place(req(), shuffled_nodes, shuffled_gpus) == Placement("a", ("a/0",))
    gpus["a/0"].holder = ("t", 1)
    assert place(req(), nodes, gpus) == Placement("a", ("a/1",))  # a now has fewer free


def test_picks_the_lowest_indexes_on_the_chosen_node() -> None:
    nodes, gpus = cluster(a=4)
    gpus["a/1"].holder = ("t", 1)
    assert place(req(2), nodes, gpus) == Placement("a", ("a/0", "a/2"))


def test_exclusions() -> None:
    nodes, gpus = cluster(a=2, b=2)
    assert place(req(exclude_gpus=frozenset({"a/0"})), nodes, gpus) == Placement("a", ("a/1",))
    assert place(req(exclude_nodes=frozenset({"a"})), nodes, gpus) == Placement("b", ("b/0",))
    result = place(req(2, exclude_gpus=frozenset({"a/0", "b/1"})), nodes, gpus)
    assert isinstance(result, NoFit) and result.ever
    assert "2 excluded after a fault" in result.reason


def test_no_nodes_registered_may_fit_later() -> None:
    assert place(req(), {}, {}) == NoFit("no nodes registered", ever=True)


def test_never_fits_says_what_no_node_has() -> None:
    nodes, gpus = cluster(a=2)
    result = place(req(3, gpu_model="H100", min_gpu_memory_mb=1000), nodes, gpus)
    assert result == NoFit("no node has 3 GPUs of model H100 with >= 1000 MiB", ever=False)
    assert place(req(1, gpu_model="B200"), nodes, gpus) == NoFit(
        "no node has 1 GPU of model B200", ever=False
    )


def test_ever_counts_every_node_whatever_its_health() -> None:
    """A lost, excluded or quarantined node could still host it later: wait, not fail."""
    nodes, gpus = cluster(a=2, b=2, c=2)
    nodes["a"].alive = False
    gpus["b/0"].quarantined = True
    gpus["b/1"].quarantined = True
    result = place(req(2, exclude_nodes=frozenset({"c"})), nodes, gpus)
    assert result == NoFit(
        "waiting for 2 free GPUs on one node (1 node lost, 2 GPUs quarantined, "
        "1 excluded after a fault)",
        ever=True,
    )


def test_gpus_unknown_to_the_inventory_are_ignored() -> None:
    nodes, gpus = cluster(a=1)
    nodes["a"].gpus.append("ghost")
    result = place(req(2), nodes, gpus)
    assert isinstance(result, NoFit) and not result.ever


def test_place_does_not_touch_its_inputs() -> None:
    nodes, gpus = cluster(a=2)
    before = (repr(nodes), repr(gpus))
    taken = ["a/0"]
    place(req(1), nodes, gpus, taken)
    assert (repr(nodes), repr(gpus), taken) == (*before, ["a/0"])
