"""Placement: which GPUs an attempt gets (EP3869336A1's "allocate target GPUs").

Pure. All GPUs of an attempt sit on one node. Nodes are packed best-fit: the node
with the fewest free GPUs (neither held nor quarantined, nor promised earlier in the
same round) that still has enough eligible ones wins, so that whole nodes stay free
for multi-GPU tasks. Ties break on the node name, then the GPU index, so the same
state always yields the same placement (replay re-derives it).

There is one placement, the supervisor's: the fold keeps the nodes with a free GPU in
that order of preference (`State.free_ranked`), decide walks it lazily
(`decide._candidates`, which also counts GPUs promised earlier in the round), and
`first_fit` takes the first node of it that fits. A placement is a bisect and a short
walk, never a sort of every node. `why_not` says why nothing fit, once per request
shape and round. tests/test_placement.py holds the whole path to a from-scratch
best-fit over random clusters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol


class GpuView(Protocol):
    @property
    def uuid(self) -> str: ...
    @property
    def node(self) -> str: ...
    @property
    def index(self) -> int: ...
    @property
    def model(self) -> str: ...
    @property
    def memory_mb(self) -> int: ...
    @property
    def quarantined(self) -> bool: ...
    @property
    def holder(self) -> tuple[str, int] | None: ...


class NodeView(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def alive(self) -> bool: ...
    @property
    def gpus(self) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    gpus: int
    gpu_model: str | None = None
    min_gpu_memory_mb: int = 0
    exclude_gpus: frozenset[str] = field(default_factory=frozenset)
    exclude_nodes: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class Placement:
    node: str
    gpu_uuids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NoFit:
    reason: str
    ever: bool  # False: no registered node could host it even when idle and healthy


def matches(gpu: GpuView, request: PlacementRequest) -> bool:
    """Static fit: model and memory, whatever the GPU's current health or load."""
    if request.gpu_model is not None and gpu.model.lower() != request.gpu_model.lower():
        return False
    return gpu.memory_mb >= request.min_gpu_memory_mb


def _describe(request: PlacementRequest) -> str:
    what = f"{request.gpus} free GPU{'s' if request.gpus != 1 else ''}"
    if request.gpu_model:
        what += f" of model {request.gpu_model}"
    if request.min_gpu_memory_mb:
        what += f" with >= {request.min_gpu_memory_mb} MiB"
    return what


def first_fit(
    request: PlacementRequest,
    nodes: Mapping[str, NodeView],
    gpus: Mapping[str, GpuView],
    taken: set[str] | frozenset[str],
    names: Iterable[str],
) -> Placement | None:
    """The first of `names` (in preference order) with enough eligible GPUs."""
    for name in names:
        node = nodes[name]
        if name in request.exclude_nodes or not node.alive:
            continue
        eligible = [
            gpu
            for uuid in node.gpus
            if (gpu := gpus.get(uuid)) is not None
            and gpu.holder is None
            and not gpu.quarantined
            and uuid not in taken
            and uuid not in request.exclude_gpus
            and matches(gpu, request)
        ]
        if len(eligible) >= request.gpus:
            chosen = sorted(eligible, key=lambda g: (g.index, g.uuid))[: request.gpus]
            return Placement(node=name, gpu_uuids=tuple(g.uuid for g in chosen))
    return None


def why_not(
    request: PlacementRequest, nodes: Mapping[str, NodeView], gpus: Mapping[str, GpuView]
) -> NoFit:
    """Why nothing fits, from the whole cluster: could it ever, and what stands in the way."""
    ever = False
    lost = quarantined = excluded = 0
    for name in sorted(nodes):
        node = nodes[name]
        static = [gpus[u] for u in node.gpus if u in gpus and matches(gpus[u], request)]
        if len(static) >= request.gpus:
            ever = True
        if name in request.exclude_nodes:
            excluded += 1
            continue
        if not node.alive:
            lost += 1
            continue
        for gpu in static:
            if gpu.quarantined:
                quarantined += 1
            elif gpu.uuid in request.exclude_gpus:
                excluded += 1
    if not nodes:
        return NoFit("no nodes registered", ever=True)
    if not ever:
        return NoFit(f"no node has {_describe(request).replace(' free', '')}", ever=False)
    notes = []
    if lost:
        notes.append(f"{lost} node{'s' if lost != 1 else ''} lost")
    if quarantined:
        notes.append(f"{quarantined} GPU{'s' if quarantined != 1 else ''} quarantined")
    if excluded:
        notes.append(f"{excluded} excluded after a fault")
    suffix = f" ({', '.join(notes)})" if notes else ""
    return NoFit(f"waiting for {_describe(request)} on one node{suffix}", ever=True)
