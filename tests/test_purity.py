"""The functional core stays pure: its modules import no I/O, clock or randomness."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parent.parent / "engine"
PURE_MODULES = ["events", "admission", "commands", "faults", "policy", "placement", "supervisor"]
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


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
            if node.module.startswith("gpuwarden.") and node.module.split(".")[1] != "engine":
                roots.add(node.module)  # the core never imports adapters or projections
    return roots


@pytest.mark.parametrize("name", PURE_MODULES)
def test_pure_module_imports_no_io(name: str) -> None:
    path = ENGINE / f"{name}.py"
    if not path.exists():
        pytest.skip(f"engine/{name}.py not written yet")
    roots = imported_roots(path)
    bad = sorted(
        r
        for r in roots
        if r in FORBIDDEN
        or r.startswith("gpuwarden.adapters")
        or r.startswith("gpuwarden.projections")
    )
    assert not bad, f"engine/{name}.py imports {bad}"


def test_the_guard_catches_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nfrom gpuwarden.adapters.jetstream import X\n")
    assert {"time", "gpuwarden.adapters.jetstream"} <= imported_roots(bad)
