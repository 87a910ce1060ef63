"""Imports go one way, ground first (ARCHITECTURE.md "Layers"), with no cycle: checked on the source with `ast`.

Every import counts, also those inside functions and under TYPE_CHECKING: a lazy import still ties the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support import ROOT

PACKAGE = ROOT / "src" / "mimkit"
LAYERS: list[tuple[str, ...]] = [
    (
        "mimkit",
        "mimkit.cache",
        "mimkit.config",
        "mimkit.recipes",
        "mimkit.registry",
        "mimkit.schedules",
        "mimkit.distributed",
        "mimkit.health",
    ),
    ("mimkit.data",),
    ("mimkit.models", "mimkit.losses", "mimkit.morphing", "mimkit.corruption"),
    ("mimkit.methods", "mimkit.procedures"),
    ("mimkit.engine", "mimkit.runs"),
    ("mimkit.eval", "mimkit.viz", "mimkit.export", "mimkit.run_summary"),
    ("mimkit.commands", "mimkit.cli", "mimkit.__main__"),
]
"""Each layer may import from itself and the layers above it in this list, never from one below."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The layer of the longest prefix that names `module` or one of its packages."""
    best, found = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or (prefix != "mimkit" and module.startswith(prefix + "."))
            if inside and len(prefix) > best:
                best, found = len(prefix), index
    if found is None:
        raise AssertionError(f"{module} is in no layer of tests/test_imports.py: add it to LAYERS")
    return found


def imported_modules(module: str) -> set[str]:
    """mimkit modules that `module` imports (`from a import b` counts as a.b when that is a module)."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imported_modules(module) for module in MODULES}


def test_the_walk_sees_the_package() -> None:
    assert {"mimkit.config", "mimkit.methods.ibot", "mimkit.engine.train", "mimkit.cli"} <= set(MODULES)
    assert "mimkit.methods.base" in GRAPH["mimkit.methods.ibot"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module: str) -> None:
    upward = sorted(name for name in GRAPH[module] if layer_of(name) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports higher layers: {upward}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_cycle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checker_catches_a_cycle_and_an_upward_import() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("mimkit.losses.ibot") < layer_of("mimkit.engine.train")
    assert layer_of("mimkit.morphing") == layer_of("mimkit.models.families.vit")
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("mimkit.somewhere_new")
