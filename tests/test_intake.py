"""Task-create validation: every bad field is refused by name, good requests normalised."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.errors import TaskRequestError
from gpuwarden.engine.core.intake import (
    ClusterShape,
    ValidTask,
    fold_shape,
    shape_of,
    task_id_for_request,
    validate_create,
)

from tests.test_layering import FORBIDDEN, imported_roots

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def node(name: str, gpus: int, model: str = "H100", memory_mb: int = 81920) -> ev.NodeRegistered:
    infos = tuple(
        ev.GpuInfo(uuid=f"{name}/{i}", index=i, model=model, memory_mb=memory_mb)
        for i in range(gpus)
    )
    return ev.NodeRegistered(
        id=f"reg-{name}", at=T0, actor="test", node=name, runtime="sim", gpus=infos
    )


CLUSTER = shape_of([node("a", 8), node("b", 4, model="A100", memory_mb=40960)])
GOOD: dict[str, Any] = {"image": "pytorch/pytorch:2.3", "command": ["python", "train.py"]}


def refused(request: Any, cluster: ClusterShape = CLUSTER) -> TaskRequestError:
    with pytest.raises(TaskRequestError) as info:
        validate_create(request, cluster)
    return info.value


def test_intake_is_pure() -> None:
    path = Path(__file__).resolve().parent.parent / "engine" / "core" / "intake.py"
    roots = imported_roots(path)
    assert not (roots & FORBIDDEN), roots & FORBIDDEN
    assert not any(r.startswith(("gpuwarden.adapters", "gpuwarden.projections")) for r in roots)


def test_a_minimal_request_gets_defaults() -> None:
    task = validate_create(GOOD, CLUSTER)
    assert task == ValidTask(image="pytorch/pytorch:2.3", command=("python", "train.py"))


def test_a_full_request_is_kept_and_the_model_spelled_as_the_nodes_do() -> None:
    request = {
        **GOOD,
        "gpus": 8,
        "gpu_model": "h100",
        "min_gpu_memory_mb": 81920,
        "memory_mb": 4096,
        "env": {"SEED": "1", "_X": ""},
        "name": "train",
        "owner": "ada",
        "request_id": "ada/run-7",
    }
    task = validate_create(request, CLUSTER)
    assert (task.gpus, task.gpu_model, task.min_gpu_memory_mb) == (8, "H100", 81920)
    assert (task.memory_mb, dict(task.env), task.name, task.owner) == (
        4096,
        {"SEED": "1", "_X": ""},
        "train",
        "ada",
    )
    event = task.to_event("t1", "e1", T0, "api")
    assert (event.task_id, event.request_id, event.command, event.actor) == (
        "t1",
        "ada/run-7",
        ("python", "train.py"),
        "api",
    )
    assert task.same_request(event)
    assert not validate_create({**GOOD, "gpus": 2}, CLUSTER).same_request(event)


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"command": "python train.py --lr 0.1"}, "command", "argv list"),
        ({"command": []}, "command", "non-empty"),
        ({"command": ["python", 3]}, "command", "command[1]"),
        ({"command": [""]}, "command", "program"),
        ({"command": ["a\0b"]}, "command", "NUL"),
        ({"command": None}, "command", "required"),
        ({"image": ""}, "image", "non-empty"),
        ({"image": None}, "image", "required"),
        ({"image": "Bad Image"}, "image", "valid image reference"),
        ({"image": "-rm"}, "image", "valid image reference"),
        ({"image": "x" * 600}, "image", "longer"),
        ({"gpus": 0}, "gpus", ">= 1"),
        ({"gpus": -1}, "gpus", ">= 1"),
        ({"gpus": 1.5}, "gpus", "integer"),
        ({"gpus": True}, "gpus", "integer"),
        ({"gpus": "2"}, "gpus", "integer"),
        ({"gpus": 9}, "gpus", "largest node has 8"),
        ({"gpus": 5, "gpu_model": "A100"}, "gpus", "no node has more than 4 GPUs of model A100"),
        ({"gpu_model": "V100"}, "gpu_model", "known models: A100, H100"),
        ({"gpu_model": ""}, "gpu_model", "non-empty"),
        ({"min_gpu_memory_mb": -1}, "min_gpu_memory_mb", ">= 0"),
        ({"min_gpu_memory_mb": 90000}, "min_gpu_memory_mb", "largest GPU has 81920"),
        ({"min_gpu_memory_mb": 50000, "gpu_model": "A100"}, "gpus", "with >= 50000 MiB"),
        ({"memory_mb": 3}, "memory_mb", ">= 4"),
        ({"memory_mb": "1g"}, "memory_mb", "integer"),
        ({"env": ["A=1"]}, "env", "map"),
        ({"env": {"1A": "x"}}, "env.1A", "valid variable name"),
        ({"env": {"A-B": "x"}}, "env.A-B", "valid variable name"),
        ({"env": {"A": 1}}, "env.A", "string"),
        ({"name": 7}, "name", "string"),
        ({"name": "n" * 200}, "name", "longer"),
        ({"owner": "a\nb"}, "owner", "printable"),
        ({"request_id": ""}, "request_id", "non-empty"),
        ({"request_id": "has space"}, "request_id", "letters"),
        ({"priority": 3}, "priority", "unknown field"),
    ],
)
def test_a_bad_field_is_refused_by_name(change: dict[str, Any], field: str, words: str) -> None:
    error = refused({**GOOD, **change})
    assert error.field == field
    assert words in str(error)


def test_a_shell_string_gets_the_argv_it_should_have_been() -> None:
    error = refused({**GOOD, "command": "python train.py"})
    assert '["python", "train.py"]' in str(error)


def test_not_an_object_is_refused() -> None:
    error = refused(["image", "command"])
    assert error.field is None and "JSON object" in str(error)


def test_without_nodes_cluster_checks_wait_for_placement() -> None:
    task = validate_create({**GOOD, "gpus": 64, "gpu_model": "B200"}, ClusterShape())
    assert (task.gpus, task.gpu_model) == (64, "B200")
    assert refused({**GOOD, "gpus": 0}, ClusterShape()).field == "gpus"
    assert refused({**GOOD, "gpus": 100_000}, ClusterShape()).field == "gpus"


def test_the_shape_folds_registrations_and_a_reregistration_replaces_a_node() -> None:
    shape = fold_shape(CLUSTER, node("a", 2))
    assert (shape.max_gpus, shape.models) == (4, {"h100": "H100", "a100": "A100"})
    assert fold_shape(shape, GOOD_EVENT) is shape
    assert shape_of([]).known is False


GOOD_EVENT = ev.TaskSubmitted(
    id="s1", at=T0, actor="api", task_id="t", name="t", image="i", command=("x",)
)


def test_request_ids_map_to_one_task_id_per_owner() -> None:
    first = task_id_for_request("ada", "r1")
    assert first == task_id_for_request("ada", "r1")
    assert first != task_id_for_request("bob", "r1")
    assert first != task_id_for_request("ada", "r2")
    assert ev.subject_token(first) == first and len(first) == 26
