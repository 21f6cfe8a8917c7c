"""The package's shape, checked: each layer imports only the layers below it, and no module-level import cycle.

Only imports that run when a module is imported count (module and class bodies, not function bodies
or ``if TYPE_CHECKING:`` blocks): those are what ties layers together and what a cycle breaks.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import axis_stream

PACKAGE = Path(axis_stream.__file__).parent
LAYERS = (
    ("foundation", ("axis_stream", "axis_stream.errors", "axis_stream.config", "axis_stream.cluster",
                    "axis_stream.testing", "axis_stream.text")),
    ("core", ("axis_stream.core",)),
    ("store", ("axis_stream.store",)),
    ("adapt", ("axis_stream.adapt",)),
    ("experiments", ("axis_stream.experiments",)),
    ("service", ("axis_stream.service",)),
    ("cli", ("axis_stream.cli", "axis_stream.render")),
)
MAX_LINES = 600   # one concern per module; the larger ones (basis, daemon, ingest) are each one


def modules() -> list[str]:
    return ["axis_stream"] + [m.name for m in pkgutil.walk_packages([str(PACKAGE)], "axis_stream.")]


def layer_of(module: str) -> int:
    """Index in LAYERS of the most specific prefix that names ``module``."""
    best, depth = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and p.count(".") > depth and (
                    p != "axis_stream" or module == "axis_stream"):
                best, depth = i, p.count(".")
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best


def module_level_imports(module: str) -> set[str]:
    """The package modules ``module`` imports when it is imported."""
    path = Path(importlib.util.find_spec(module).origin)
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("axis_stream"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("axis_stream"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if importlib.util.find_spec(node.module).submodule_search_locations
                              and importlib.util.find_spec(sub) else node.module)
            visit([c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)])

    visit(tree.body)
    found.discard(module)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a higher layer, as a readable line."""
    return [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
            for m in sorted(graph) for d in sorted(graph[m]) if layer_of(d) > layer_of(m)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def walk(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (cycle := walk(d)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := walk(m)):
            return cycle
    return None


GRAPH = {m: module_level_imports(m) for m in modules()}


def test_every_layer_imports_only_layers_below_it():
    wrong = upward_imports(GRAPH)
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_there_is_no_module_level_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_see_an_upward_import_and_a_cycle():
    """The checks fail on a store module importing the service layer, and on a cycle; and they see real edges."""
    assert upward_imports({"axis_stream.store.basis": {"axis_stream.service.daemon"}})
    assert not upward_imports({"axis_stream.service.daemon": {"axis_stream.store.basis"}})
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "axis_stream.store.ingest" in GRAPH["axis_stream.store.basis"]
    assert "axis_stream.core.svd" in GRAPH["axis_stream.core.stage1"]


def test_no_module_is_over_the_size_limit():
    big = {m: n for m in modules()
           if (n := len(Path(importlib.util.find_spec(m).origin).read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"
