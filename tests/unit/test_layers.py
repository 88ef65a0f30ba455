"""Imports run only downward through the pipeline's layers, and no two modules import each other.

Bottom to top (a module may import its own area, any area of a lower layer, or
an area listed before it in its own layer):

    errors, atomic, provenance, proc, npy_rows < config < presets < model    the contract
    data < validation < preprocess < training < inference
    evaluation, explain, monitoring                 measure the model
    registry < ops                                  store, gate, resolve the champion; run the schedules
    serving, cli                                    thin faces (flows/ sit on top too)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "bonefrac"

# (layer, rank within the layer); an import is allowed when the target's tuple is <= the importer's,
# except that areas of equal layer and rank must be the same area.
ORDER: dict[str, tuple[int, int]] = {
    "errors": (0, 0),
    "atomic": (0, 0),
    "provenance": (0, 0),
    "proc": (0, 0),
    "npy_rows": (0, 0),
    "config": (0, 1),
    "presets": (0, 2),
    "model": (0, 3),
    "data": (1, 0),
    "validation": (1, 1),
    "preprocess": (1, 2),
    "training": (1, 3),
    "inference": (1, 3),
    "evaluation": (2, 1),
    "explain": (2, 0),
    "monitoring": (2, 1),
    "registry": (3, 0),
    "ops": (3, 1),
    "serving": (4, 0),
    "cli": (4, 0),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # ``from bonefrac.model import bundle`` imports the submodule too
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(n, m) for n, m in found if m.startswith("bonefrac.")]


def _area(module: str) -> str:
    return module.split(".")[1]


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def upward_imports(modules: dict[str, Path]) -> list[str]:
    bad = []
    for name, path in modules.items():
        if name == "bonefrac":
            continue
        me = _area(name)
        for line, target in _imports(path):
            other = _area(target)
            if other == me or other not in ORDER:
                continue
            if me not in ORDER:
                bad.append(f"{path.name}: area {me!r} has no layer (add it to ORDER)")
            elif ORDER[other] >= ORDER[me]:
                bad.append(f"{name}:{line} imports {target} ({other} {ORDER[other]} >= {me} {ORDER[me]})")
    return bad


def import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {
        name: sorted({t for _, t in _imports(path) if t in modules and t != name})
        for name, path in modules.items()
    }
    # a package's __init__ re-exporting its submodules is not a cycle worth reporting
    for name in graph:
        graph[name] = [t for t in graph[name] if not name.startswith(t + ".") and not t.startswith(name + ".")]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_every_area_has_a_layer() -> None:
    areas = {_area(n) for n in _all_modules() if n != "bonefrac"}
    assert areas <= set(ORDER), f"areas without a layer: {sorted(areas - set(ORDER))}"


def test_imports_run_only_downward() -> None:
    assert upward_imports(_all_modules()) == []


def test_no_module_import_cycles() -> None:
    assert import_cycles(_all_modules()) == []


@pytest.mark.parametrize(
    ("importer", "target"),
    [("inference/x.py", "bonefrac.evaluation.metrics"), ("model/x.py", "bonefrac.training.loop")],
)
def test_checker_catches_an_upward_import(tmp_path: Path, importer: str, target: str) -> None:
    """The checker itself: a planted upward import is reported."""
    modules = dict(_all_modules())
    planted = SRC / importer
    fake = tmp_path / "planted.py"
    fake.write_text(f"import {target}\n")
    modules[_module_name(planted)] = fake
    assert any(target in line for line in upward_imports(modules))


def test_checker_catches_a_cycle(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from bonefrac.data import b\n")
    b.write_text("import bonefrac.data.a\n")
    modules = {"bonefrac.data.a": a, "bonefrac.data.b": b}
    assert import_cycles(modules) == [["bonefrac.data.a", "bonefrac.data.b"]]
