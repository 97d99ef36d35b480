"""Scenario files: fault drills in TOML, read into frozen structs (format: SCENARIOS.md).

Outside users write these files by hand, so every mistake is refused at load time with
a message that names the file, the place (`steps[3].submit.gpus`, `expect[1].state`)
and the problem: a drill that silently ignores a misspelt key would pass for the
wrong reason. The runner gets typed steps, already in timeline order, whose task,
node and GPU names are known to exist.

Size: one module, past 600 lines, on purpose: the format of SCENARIOS.md is one
contract, and every step kind's checks sit next to each other with its messages.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, NoReturn, TypeAlias, TypeVar

import msgspec
from gpuwarden.engine.core.errors import GpuwardenError, PolicyError
from gpuwarden.engine.core.events import (
    FAILURE_REASONS,
    FAULT_TYPES,
    TASK_STATUSES,
    FailureReason,
    Fault,
    TaskStatus,
)
from gpuwarden.engine.core.policy import MAX_SECONDS, Policy, policy_from_mapping


class ScenarioError(GpuwardenError):
    """A scenario file is malformed; the message names the file, the step or key."""


# The states an `expect.state` may name: the shared vocabulary (events.TaskStatus) but
# `scheduled`, which a drill never observes (it says `running` from task.scheduled on).
TASK_STATES: Final[tuple[TaskStatus, ...]] = tuple(s for s in TASK_STATUSES if s != "scheduled")
STEP_KINDS: Final[tuple[str, ...]] = (
    "submit",
    "exit",
    "signal",
    "oom",
    "xid",
    "node_down",
    "node_up",
    "runtime_error",
    "start_error",
    "preempt",
    "cancel",
    "run_for",
)

# --- the parsed scenario ------------------------------------------------------------


class NodeSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A simulated node; its GPUs are named `<name>/<i>`."""

    name: str
    gpus: int
    model: str | None = None
    memory_mb: int | None = None

    @property
    def gpu_names(self) -> tuple[str, ...]:
        return tuple(f"{self.name}/{i}" for i in range(self.gpus))


class _Step(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Common fields: `at` (virtual seconds from the start), `index` (place in the file)."""

    at: float
    index: int

    @property
    def kind(self) -> str:
        tag: str = self.__struct_config__.tag  # type: ignore[assignment]
        return tag

    @property
    def where(self) -> str:
        return f"steps[{self.index}]"


class SubmitStep(_Step, frozen=True, tag="submit"):
    task: str
    gpus: int
    image: str
    command: tuple[str, ...]
    gpu_model: str | None = None
    min_gpu_memory_mb: int | None = None


class ExitStep(_Step, frozen=True, tag="exit"):
    task: str
    code: int
    attempt: int | None = None  # which attempt's container; default: the latest


class SignalStep(_Step, frozen=True, tag="signal"):
    task: str
    signal: int
    attempt: int | None = None  # which attempt's container; default: the latest

    @property
    def exit_code(self) -> int:
        return 128 + self.signal


class OomStep(_Step, frozen=True, tag="oom"):
    task: str
    attempt: int | None = None  # which attempt's container; default: the latest


class XidStep(_Step, frozen=True, tag="xid"):
    """An Xid on the GPU(s) of `task`'s current attempt, or on the one GPU `gpu`."""

    code: int
    task: str | None = None
    gpu: str | None = None


class NodeDownStep(_Step, frozen=True, tag="node_down"):
    node: str


class NodeUpStep(_Step, frozen=True, tag="node_up"):
    node: str


class RuntimeErrorStep(_Step, frozen=True, tag="runtime_error"):
    task: str
    message: str
    attempt: int | None = None  # which attempt's container; default: the latest


class StartErrorStep(_Step, frozen=True, tag="start_error"):
    task: str
    message: str


class PreemptStep(_Step, frozen=True, tag="preempt"):
    task: str
    attempt: int | None = None  # which attempt's container; default: the latest


class CancelStep(_Step, frozen=True, tag="cancel"):
    task: str


class RunForStep(_Step, frozen=True, tag="run_for"):
    seconds: float


Step: TypeAlias = (
    SubmitStep
    | ExitStep
    | SignalStep
    | OomStep
    | XidStep
    | NodeDownStep
    | NodeUpStep
    | RuntimeErrorStep
    | StartErrorStep
    | PreemptStep
    | CancelStep
    | RunForStep
)


class TaskExpectation(msgspec.Struct, frozen=True, kw_only=True):
    """What must hold for one task after the drill; None means "not checked"."""

    index: int
    task: str
    state: TaskStatus | None = None
    attempts: int | None = None
    faults: tuple[Fault, ...] | None = None
    reason: FailureReason | None = None
    not_on_gpus_of_attempt: int | None = None
    not_on_node_of_attempt: int | None = None
    rebuilds: int | None = None
    counted_rebuilds: int | None = None


class GpuExpectation(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    gpu: str
    quarantined: bool


Expectation: TypeAlias = TaskExpectation | GpuExpectation


class Scenario(msgspec.Struct, frozen=True, kw_only=True):
    """One drill. `steps` are in timeline order (stable by `at`, ties in file order).

    `policy` is the raw `[policy]` table (empty when absent: engine defaults), already
    checked by `policy_from_mapping`; `rebuild_policy` is it parsed.
    """

    source: str
    name: str
    description: str = ""
    policy: dict[str, Any] = msgspec.field(default_factory=dict)
    nodes: tuple[NodeSpec, ...] = ()
    steps: tuple[Step, ...] = ()
    expectations: tuple[Expectation, ...] = ()

    @property
    def gpu_names(self) -> tuple[str, ...]:
        return tuple(name for node in self.nodes for name in node.gpu_names)

    @property
    def task_ids(self) -> tuple[str, ...]:
        return tuple(step.task for step in self.steps if isinstance(step, SubmitStep))

    @property
    def rebuild_policy(self) -> Policy:
        return policy_from_mapping(self.policy, self.source)

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


# --- loading -------------------------------------------------------------------------


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Read and check one scenario file; every problem is a ScenarioError naming it."""
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except OSError as exc:
        raise ScenarioError(f"{source}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{source}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    return parse_scenario(text, source)


def scenario_paths(args: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files named on a command line, a folder standing for its `*.toml` files, sorted."""
    paths: list[Path] = []
    for arg in args:
        path = Path(arg)
        paths.extend(sorted(path.glob("*.toml")) if path.is_dir() else [path])
    return paths


_TOML_LINE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_TOML_END = re.compile(r"\s*\(at end of document\)$")


def parse_scenario(text: str, source: str) -> Scenario:
    """A scenario from TOML text; `source` names it in error messages (usually the path)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(_toml_error(source, str(exc), text)) from None
    return _Parser(source).scenario(data)


def _toml_error(source: str, message: str, text: str) -> str:
    match = _TOML_LINE.search(message)
    if match:
        problem = message[: match.start()]
        return f"{source}: line {match.group(1)}, column {match.group(2)}: TOML syntax: {problem}"
    match = _TOML_END.search(message)
    if match:
        line = text.count("\n") + 1
        return f"{source}: line {line} (end of file): TOML syntax: {message[: match.start()]}"
    return f"{source}: TOML syntax: {message}"


# --- checking ------------------------------------------------------------------------

_TOP_KEYS: Final = ("name", "description", "policy", "nodes", "steps", "expect")
_NODE_KEYS: Final = ("name", "gpus", "model", "memory_mb")
_TASK_EXPECT_KEYS: Final = (
    "task",
    "state",
    "attempts",
    "faults",
    "reason",
    "not_on_gpus_of_attempt",
    "not_on_node_of_attempt",
    "rebuilds",
    "counted_rebuilds",
)
_GPU_EXPECT_KEYS: Final = ("gpu", "quarantined")
_STEP_FIELDS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    # kind: (required keys, optional keys)
    "submit": (("task", "gpus", "image", "command"), ("gpu_model", "min_gpu_memory_mb")),
    "exit": (("task", "code"), ("attempt",)),
    "signal": (("task", "signal"), ("attempt",)),
    "oom": (("task",), ("attempt",)),
    "xid": (("code",), ("task", "gpu")),
    "node_down": (("node",), ()),
    "node_up": (("node",), ()),
    "runtime_error": (("task", "message"), ("attempt",)),
    "start_error": (("task", "message"), ()),
    "preempt": (("task",), ("attempt",)),
    "cancel": (("task",), ()),
    "run_for": (("seconds",), ()),
}
_MAX_SIGNAL: Final = 64
_Word = TypeVar("_Word", bound=str)  # one of a closed vocabulary (a Literal)


def _describe(value: Any) -> str:
    kinds = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    kind = kinds.get(type(value), type(value).__name__)
    shown = repr(value) if isinstance(value, bool | int | float | str) else ""
    return f"{kind} {shown}".strip()


class _Parser:
    """One pass over the TOML data; `fail` raises with the file and the place."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> NoReturn:
        place = f"{self.source}: {where}: " if where else f"{self.source}: "
        raise ScenarioError(place + problem)

    # -- typed values --

    def keys(self, table: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
        allowed = tuple(allowed)
        for key in table:
            if key not in allowed:
                label = f"unknown key {key!r}" if where else f"unknown top-level key {key!r}"
                self.fail(where, f"{label} (allowed: {', '.join(allowed)})")

    def required(self, table: Mapping[str, Any], key: str, where: str) -> Any:
        if key not in table:
            self.fail(where, f"missing key {key!r}")
        return table[key]

    def table(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(where, f"must be a table, got {_describe(value)}")
        return value

    def array_of_tables(self, value: Any, where: str) -> list[dict[str, Any]]:
        if not isinstance(value, list):
            self.fail(where, f"must be an array of tables ([[{where}]]), got {_describe(value)}")
        return [self.table(item, f"{where}[{i}]") for i, item in enumerate(value)]

    def string(self, value: Any, where: str, *, empty: bool = False) -> str:
        if not isinstance(value, str):
            self.fail(where, f"must be a string, got {_describe(value)}")
        if not empty and not value.strip():
            self.fail(where, "must not be empty")
        return value

    def integer(
        self, value: Any, where: str, low: int | None = None, high: int | None = None
    ) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, f"must be an integer, got {_describe(value)}")
        if low is not None and value < low:
            self.fail(where, f"must be at least {low}, got {value}")
        if high is not None and value > high:
            self.fail(where, f"must be at most {high}, got {value}")
        return value

    def seconds(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(where, f"must be a number of seconds, got {_describe(value)}")
        if not math.isfinite(value):
            self.fail(where, f"must be a finite number, got {value}")
        if value < 0:
            self.fail(where, f"must not be negative, got {value}")
        if value > MAX_SECONDS:  # the virtual clock must stay a datetime
            self.fail(where, f"must be at most {MAX_SECONDS:g} seconds, got {value}")
        return float(value)

    def boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            self.fail(where, f"must be true or false, got {_describe(value)}")
        return value

    def choice(self, value: Any, where: str, allowed: tuple[_Word, ...], what: str) -> _Word:
        text = self.string(value, where)
        for word in allowed:
            if word == text:
                return word
        self.fail(where, f"unknown {what} {text!r} (one of: {', '.join(allowed)})")

    # -- the document --

    def scenario(self, data: dict[str, Any]) -> Scenario:
        self.keys(data, _TOP_KEYS, "")
        name = self.string(self.required(data, "name", ""), "name")
        description = self.string(data.get("description", ""), "description", empty=True)
        policy = self.policy(data["policy"]) if "policy" in data else {}
        nodes = self.nodes(data.get("nodes", []))
        steps = self.steps(data.get("steps", []), nodes)
        expectations = self.expectations(data.get("expect", []), nodes, steps)
        return Scenario(
            source=self.source,
            name=name,
            description=description,
            policy=policy,
            nodes=nodes,
            steps=steps,
            expectations=expectations,
        )

    def policy(self, value: Any) -> dict[str, Any]:
        policy = self.table(value, "policy")
        try:
            policy_from_mapping(policy, self.source)
        except PolicyError as exc:
            raise ScenarioError(str(exc)) from None
        return policy

    def nodes(self, value: Any) -> tuple[NodeSpec, ...]:
        nodes: list[NodeSpec] = []
        seen: dict[str, int] = {}
        for i, table in enumerate(self.array_of_tables(value, "nodes")):
            where = f"nodes[{i}]"
            self.keys(table, _NODE_KEYS, where)
            name = self.string(self.required(table, "name", where), f"{where}.name")
            if "/" in name or name != name.strip():
                self.fail(f"{where}.name", f"node name {name!r} may not contain '/' or spaces")
            if name in seen:
                self.fail(f"{where}.name", f"duplicate node {name!r} (also nodes[{seen[name]}])")
            seen[name] = i
            model = table.get("model")
            memory = table.get("memory_mb")
            nodes.append(
                NodeSpec(
                    name=name,
                    gpus=self.integer(self.required(table, "gpus", where), f"{where}.gpus", 0),
                    model=None if model is None else self.string(model, f"{where}.model"),
                    memory_mb=None
                    if memory is None
                    else self.integer(memory, f"{where}.memory_mb", 0),
                )
            )
        return tuple(nodes)

    # -- steps --

    def steps(self, value: Any, nodes: tuple[NodeSpec, ...]) -> tuple[Step, ...]:
        parsed = [
            self.step(i, table) for i, table in enumerate(self.array_of_tables(value, "steps"))
        ]
        ordered = tuple(sorted(parsed, key=lambda step: step.at))
        self.check_names(ordered, nodes)
        return ordered

    def step(self, index: int, table: dict[str, Any]) -> Step:
        where = f"steps[{index}]"
        self.keys(table, ("at", *STEP_KINDS), where)
        at = self.seconds(self.required(table, "at", where), f"{where}.at")
        kinds = [key for key in table if key in STEP_KINDS]
        if not kinds:
            self.fail(where, f"no step kind (a step has exactly one of: {', '.join(STEP_KINDS)})")
        if len(kinds) > 1:
            self.fail(
                where, f"{len(kinds)} step kinds ({', '.join(kinds)}); a step has exactly one"
            )
        kind = kinds[0]
        fields = self.table(table[kind], f"{where}.{kind}")
        required, optional = _STEP_FIELDS[kind]
        self.keys(fields, required + optional, f"{where}.{kind}")
        for key in required:
            self.required(fields, key, f"{where}.{kind}")
        return self.build_step(kind, fields, at=at, index=index, where=f"{where}.{kind}")

    def build_step(
        self, kind: str, fields: dict[str, Any], *, at: float, index: int, where: str
    ) -> Step:
        def text(key: str) -> str:
            return self.string(fields[key], f"{where}.{key}")

        common: dict[str, Any] = {"at": at, "index": index}
        if "attempt" in fields:  # an earlier attempt's container (one on a cut-off node)
            common["attempt"] = self.integer(fields["attempt"], f"{where}.attempt", 1)
        if kind == "submit":
            return self.submit(fields, common, where)
        if kind == "exit":
            code = self.integer(fields["code"], f"{where}.code", 0, 255)
            return ExitStep(task=text("task"), code=code, **common)
        if kind == "signal":
            signal = self.integer(fields["signal"], f"{where}.signal", 1, _MAX_SIGNAL)
            return SignalStep(task=text("task"), signal=signal, **common)
        if kind == "xid":
            return self.xid(fields, common, where)
        if kind in ("node_down", "node_up"):
            cls = NodeDownStep if kind == "node_down" else NodeUpStep
            return cls(node=text("node"), **common)
        if kind in ("runtime_error", "start_error"):
            message = self.string(fields["message"], f"{where}.message")
            if kind == "runtime_error":
                return RuntimeErrorStep(task=text("task"), message=message, **common)
            return StartErrorStep(task=text("task"), message=message, **common)
        if kind == "run_for":
            return RunForStep(seconds=self.seconds(fields["seconds"], f"{where}.seconds"), **common)
        if kind == "oom":
            return OomStep(task=text("task"), **common)
        if kind == "preempt":
            return PreemptStep(task=text("task"), **common)
        return CancelStep(task=text("task"), **common)

    def submit(self, fields: dict[str, Any], common: dict[str, Any], where: str) -> SubmitStep:
        command = fields["command"]
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(arg, str) for arg in command)
        ):
            self.fail(
                f"{where}.command",
                f"must be a non-empty argv list of strings, got {_describe(command)}",
            )
        model = fields.get("gpu_model")
        memory = fields.get("min_gpu_memory_mb")
        return SubmitStep(
            task=self.string(fields["task"], f"{where}.task"),
            gpus=self.integer(fields["gpus"], f"{where}.gpus", 1),
            image=self.string(fields["image"], f"{where}.image"),
            command=tuple(command),
            gpu_model=None if model is None else self.string(model, f"{where}.gpu_model"),
            min_gpu_memory_mb=None
            if memory is None
            else self.integer(memory, f"{where}.min_gpu_memory_mb", 0),
            **common,
        )

    def xid(self, fields: dict[str, Any], common: dict[str, Any], where: str) -> XidStep:
        if ("task" in fields) == ("gpu" in fields):
            self.fail(where, "names exactly one of 'task' or 'gpu'")
        code = self.integer(fields["code"], f"{where}.code", 0)
        if "task" in fields:
            return XidStep(task=self.string(fields["task"], f"{where}.task"), code=code, **common)
        return XidStep(gpu=self.string(fields["gpu"], f"{where}.gpu"), code=code, **common)

    def check_names(self, steps: tuple[Step, ...], nodes: tuple[NodeSpec, ...]) -> None:
        """Names must exist; a task exists from the submit before it on the timeline."""
        node_names = {node.name for node in nodes}
        gpu_names = {gpu for node in nodes for gpu in node.gpu_names}
        all_submits = {s.task: s.index for s in steps if isinstance(s, SubmitStep)}
        submitted: dict[str, int] = {}
        for step in steps:
            where = f"{step.where}.{step.kind}"
            if isinstance(step, SubmitStep):
                if step.task in submitted:
                    first = submitted[step.task]
                    self.fail(
                        f"{where}.task", f"duplicate task {step.task!r} (also steps[{first}])"
                    )
                submitted[step.task] = step.index
                continue
            task = getattr(step, "task", None)
            if task is not None and task not in submitted:
                later = all_submits.get(task)
                hint = (
                    f"submitted only later, at steps[{later}]"
                    if later is not None
                    else "never submitted"
                )
                self.fail(f"{where}.task", f"unknown task {task!r} ({hint})")
            if isinstance(step, NodeDownStep | NodeUpStep) and step.node not in node_names:
                self.fail(f"{where}.node", f"unknown node {step.node!r}")
            if isinstance(step, XidStep) and step.gpu is not None and step.gpu not in gpu_names:
                self.fail(f"{where}.gpu", f"unknown GPU {step.gpu!r}")

    # -- expectations --

    def expectations(
        self, value: Any, nodes: tuple[NodeSpec, ...], steps: tuple[Step, ...]
    ) -> tuple[Expectation, ...]:
        tasks = {step.task for step in steps if isinstance(step, SubmitStep)}
        gpus = {gpu for node in nodes for gpu in node.gpu_names}
        result: list[Expectation] = []
        for i, table in enumerate(self.array_of_tables(value, "expect")):
            where = f"expect[{i}]"
            if "task" not in table and "gpu" not in table:
                self.keys(table, dict.fromkeys(_TASK_EXPECT_KEYS + _GPU_EXPECT_KEYS), where)
            if ("task" in table) == ("gpu" in table):
                self.fail(where, "names exactly one of 'task' or 'gpu'")
            if "task" in table:
                result.append(self.task_expectation(i, table, tasks))
            else:
                result.append(self.gpu_expectation(i, table, gpus))
        return tuple(result)

    def task_expectation(self, i: int, table: dict[str, Any], tasks: set[str]) -> TaskExpectation:
        where = f"expect[{i}]"
        self.keys(table, _TASK_EXPECT_KEYS, where)
        task = self.string(table["task"], f"{where}.task")
        if task not in tasks:
            self.fail(f"{where}.task", f"unknown task {task!r} (never submitted)")
        if len(table) == 1:
            self.fail(where, "expects nothing of the task (add state, attempts, faults, ...)")

        def count(key: str, low: int) -> int | None:
            return None if key not in table else self.integer(table[key], f"{where}.{key}", low)

        state = table.get("state")
        reason = table.get("reason")
        return TaskExpectation(
            index=i,
            task=task,
            state=None
            if state is None
            else self.choice(state, f"{where}.state", TASK_STATES, "state"),
            attempts=count("attempts", 0),
            faults=self.faults(table["faults"], f"{where}.faults") if "faults" in table else None,
            reason=None
            if reason is None
            else self.choice(reason, f"{where}.reason", FAILURE_REASONS, "reason"),
            not_on_gpus_of_attempt=count("not_on_gpus_of_attempt", 1),
            not_on_node_of_attempt=count("not_on_node_of_attempt", 1),
            rebuilds=count("rebuilds", 0),
            counted_rebuilds=count("counted_rebuilds", 0),
        )

    def faults(self, value: Any, where: str) -> tuple[Fault, ...]:
        if not isinstance(value, list):
            self.fail(where, f"must be an array of fault types, got {_describe(value)}")
        faults = tuple(
            self.choice(item, f"{where}[{j}]", FAULT_TYPES, "fault type")
            for j, item in enumerate(value)
        )
        if "completed" in faults:
            self.fail(where, "'completed' is never listed: faults are failures only")
        return faults

    def gpu_expectation(self, i: int, table: dict[str, Any], gpus: set[str]) -> GpuExpectation:
        where = f"expect[{i}]"
        self.keys(table, _GPU_EXPECT_KEYS, where)
        gpu = self.string(table["gpu"], f"{where}.gpu")
        if gpu not in gpus:
            self.fail(f"{where}.gpu", f"unknown GPU {gpu!r} (GPUs are named <node>/<index>)")
        quarantined = self.required(table, "quarantined", where)
        return GpuExpectation(
            index=i, gpu=gpu, quarantined=self.boolean(quarantined, f"{where}.quarantined")
        )
