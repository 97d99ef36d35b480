"""The layering contract: dependencies point inward, and nothing imports in a circle.

- `engine/core/` is the pure core: it imports no I/O, clock or randomness, and nothing
  of gpuwarden outside the core.
- The engine's shell (`engine/*.py`) imports the core and the ports, never an adapter,
  a projection or the CLI: the composition root is the CLI (`engine/cli/`).
- Adapters and projections never import the CLI; projections never import the engine's
  runtime.
- No two modules import each other, directly or through others, even from inside a
  function (a function-local import hides a cycle; it does not remove it).

Every import counts, wherever it is written; only those under `if TYPE_CHECKING:` are
left out, since they never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"engine": "gpuwarden.engine", "adapters": "gpuwarden.adapters",
            "projections": "gpuwarden.projections"}  # fmt: skip
FORBIDDEN = {
    "anyio",
    "asyncio",
    "nats",
    "docker",
    "pynvml",
    "aiosqlite",
    "time",
    "random",
    "os",
    "socket",
    "subprocess",
    "threading",
    "sqlite3",
    "pathlib",
    "uuid",
    "secrets",
    "io",
    "shutil",
    "signal",
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    name = ".".join(parts)
    return name.removesuffix(".__init__")


def all_modules() -> dict[str, Path]:
    found = {}
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            found[module_name(path)] = path
    return found


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[str]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking_only(node):
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:  # `from gpuwarden.engine import cli` names a module
                yield f"{node.module}.{alias.name}"
        yield from _imports(node)


def imports_of(path: Path) -> set[str]:
    """Every module (and `package.name` pair) the file imports, at any depth."""
    return set(_imports(ast.parse(path.read_text(), filename=str(path))))


def imported_roots(path: Path) -> set[str]:
    """Top-level packages a file imports, plus the gpuwarden modules by full name."""
    roots: set[str] = set()
    for name in imports_of(path):
        roots.add(name.split(".")[0])
        if name.startswith("gpuwarden."):
            roots.add(name)
    return roots


def gpuwarden_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    return {name for name in imports_of(path) if name in modules}


MODULES = all_modules()
CORE = sorted(name for name in MODULES if name.startswith("gpuwarden.engine.core"))
SHELL = sorted(
    name
    for name in MODULES
    if name.startswith("gpuwarden.engine.")
    and not name.startswith(("gpuwarden.engine.core", "gpuwarden.engine.cli"))
)


def test_the_core_is_where_the_design_says() -> None:
    names = {name.rsplit(".", 1)[-1] for name in CORE}
    assert {"events", "admission", "faults", "policy", "placement", "state", "fold",
            "decide", "commands", "wire"} <= names  # fmt: skip


@pytest.mark.parametrize("name", CORE)
def test_the_core_imports_no_io_and_nothing_outside_itself(name: str) -> None:
    roots = imported_roots(MODULES[name])
    bad = sorted(
        r
        for r in roots
        if r in FORBIDDEN
        or (r.startswith("gpuwarden.") and not r.startswith("gpuwarden.engine.core"))
    )
    assert not bad, f"{MODULES[name].relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("name", SHELL)
def test_the_engine_shell_imports_no_adapter_projection_or_cli(name: str) -> None:
    bad = sorted(
        n
        for n in gpuwarden_imports(MODULES[name], MODULES)
        if n.startswith(("gpuwarden.adapters", "gpuwarden.projections", "gpuwarden.engine.cli"))
    )
    assert not bad, f"{MODULES[name].relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize(
    "name",
    sorted(n for n in MODULES if n.startswith(("gpuwarden.adapters", "gpuwarden.projections"))),
)
def test_adapters_and_projections_never_import_the_cli(name: str) -> None:
    imported = gpuwarden_imports(MODULES[name], MODULES)
    bad = sorted(n for n in imported if n.startswith("gpuwarden.engine.cli"))
    if name.startswith("gpuwarden.projections"):
        bad += sorted(n for n in imported if n == "gpuwarden.engine.runtime")
    assert not bad, f"{MODULES[name].relative_to(ROOT)} imports {bad}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in the graph, if there is any (iterative DFS, three colours)."""
    colour = dict.fromkeys(graph, 0)
    for start in sorted(graph):
        if colour[start]:
            continue
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        colour[start] = 1
        while stack:
            node, edges = stack[-1]
            nxt = next(edges, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
            elif colour[nxt] == 1:
                path = [n for n, _ in stack]
                return [*path[path.index(nxt) :], nxt]
            elif colour[nxt] == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
    return None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        # A package's own __init__ importing its submodules is how a package is made.
        graph[name] = {
            n
            for n in gpuwarden_imports(path, MODULES)
            if n != name and not n.startswith(name + ".")
        }
    return graph


def test_no_module_imports_itself_through_others() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_guards_catch_what_they_guard(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import time\nfrom gpuwarden.adapters.jetstream import X\n"
        "def f():\n    from gpuwarden.engine import cli\n"
        "if TYPE_CHECKING:\n    import docker\n"
    )
    roots = imported_roots(bad)
    assert {"time", "gpuwarden.adapters.jetstream", "gpuwarden.engine.cli"} <= roots
    assert "docker" not in roots
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


MAX_LINES = 600


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_long_module_says_why_at_its_top(name: str) -> None:
    """No module over about 600 lines without a reason written at its top."""
    path = MODULES[name]
    text = path.read_text()
    if text.count("\n") <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert "\nSize: " in f"\n{doc}", f"{path.relative_to(ROOT)}: over {MAX_LINES} lines, no 'Size:'"
