"""The package's import graph: no cycles between modules, and `kernels/` a leaf.

Every module under src/actsparse is parsed with `ast`; every `actsparse.*` import (absolute or relative, at
module level or inside a function) becomes an edge to the module it names: `from pkg import name` points at
`pkg.name` when that is a module, else at `pkg` itself.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import actsparse

ROOT = Path(actsparse.__file__).resolve().parent
PACKAGE = "actsparse"


def module_names() -> dict[str, Path]:
    """Dotted module name → source file, for every module of the package."""
    names = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules that module `name` (source `path`) imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.add(child if child in modules else source)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imports_of(name, path, set(names)) for name, path in names.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module that `start` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a closed path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_sees_relative_and_function_level_imports() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    edges = import_graph()
    assert (
        "actsparse.speed.kernels.cbuild" in edges["actsparse.speed.kernels.topp_cpu"]
    )  # from actsparse.speed.kernels import x
    assert "actsparse.sparsity.rules" in edges["actsparse"]


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_kernels_import_nothing_outside_kernels() -> None:
    inside = f"{PACKAGE}.kernels"
    outside = {
        name: sorted(m for m in imported if m != inside and not m.startswith(inside + "."))
        for name, imported in import_graph().items()
        if name == inside or name.startswith(inside + ".")
    }
    assert {name: deps for name, deps in outside.items() if deps} == {}


CAUSAL_SCORER = {f"{PACKAGE}.evaluate.{name}" for name in ("scorer", "packed", "cached", "generate")}


def test_the_causal_and_the_diffusion_scorer_do_not_import_each_other() -> None:
    """They meet only in `actsparse.evaluate.evaluate_task`, which picks one; both may use the shared
    leaves of `actsparse.evaluate` (encode, metrics, kl, reference, results)."""
    graph = import_graph()
    diffusion = {name for name in graph if name == f"{PACKAGE}.diffusion" or name.startswith(f"{PACKAGE}.diffusion.")}
    assert {name: sorted(reachable(graph, name) & diffusion) for name in CAUSAL_SCORER} == {
        name: [] for name in CAUSAL_SCORER
    }
    assert {name: sorted(reachable(graph, name) & CAUSAL_SCORER) for name in diffusion} == {
        name: [] for name in diffusion
    }


@pytest.mark.parametrize("module", ["actsparse.diffusion.scoring", "actsparse.models.llada"])
def test_a_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    """No cycle through package `__init__`s either, which the graph above does not see: the dispatcher
    in `actsparse.evaluate` imports the diffusion scorer, which imports modules of `actsparse.evaluate`."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
