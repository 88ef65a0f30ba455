"""Every DVC stage lists the code it runs as a dependency, so editing that code reruns the stage.

For each stage whose ``cmd`` is ``python -m <module>``, the module's imports are
followed transitively (``ast``: every ``import``/``from ... import`` in the file,
lazy ones inside functions included) through the project's own packages
(``bonefrac`` under ``src/``, ``flows`` at the root). Each project file reached
must be covered by one of the stage's ``deps``: the file itself or a folder
above it (``src/bonefrac/model`` covers everything moved there).

Parent packages' ``__init__.py`` are not required: they only hold docstrings
(and, for ``bonefrac``, analytics-off environment defaults), nothing that
changes a stage's outputs. Non-Python files (templates) are covered by listing
their folder, which this test cannot see.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_ROOTS = {"bonefrac": ROOT / "src", "flows": ROOT}


def _module_file(name: str) -> Path | None:
    """The file of a project module (``bonefrac.data.phantom`` → ``src/bonefrac/data/phantom.py``)."""
    top = name.split(".")[0]
    if top not in PACKAGE_ROOTS:
        return None
    base = PACKAGE_ROOTS[top].joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _package_of(path: Path) -> str:
    """The package a relative import in ``path`` starts from (for ``__init__.py``: its own)."""
    root = ROOT / "src" if path.is_relative_to(ROOT / "src") else ROOT
    return ".".join(path.relative_to(root).with_suffix("").parts[:-1])


def _imports(path: Path) -> set[Path]:
    """Project files named by the imports of ``path`` (a ``from pkg import sub`` may name a submodule)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = _package_of(path).split(".")
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, node.module] if node.module else pkg)
            else:
                base = node.module or ""
            # ``from pkg import sub`` names the submodule; ``from mod import obj`` the module.
            names = [f"{base}.{a.name}" if _module_file(f"{base}.{a.name}") else base for a in node.names]
        for name in names:
            f = _module_file(name)
            if f is not None:
                found.add(f)
    return found


def _closure(start: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [start]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(_imports(f) - seen)
    return seen


def _stages() -> list[tuple[str, str, list[str]]]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    out = []
    for name, stage in spec["stages"].items():
        m = re.fullmatch(r"python -m ([\w.]+)(?:\s.*)?", str(stage["cmd"]).strip())
        if m:
            out.append((name, m.group(1), [str(d) for d in stage.get("deps", [])]))
    return out


def test_every_python_stage_is_checked() -> None:
    assert {name for name, _, _ in _stages()} >= {"generate", "ingest", "validate", "preprocess", "train", "evaluate"}


@pytest.mark.parametrize(("stage", "module", "deps"), _stages(), ids=[s[0] for s in _stages()])
def test_stage_deps_cover_its_code(stage: str, module: str, deps: list[str]) -> None:
    entry = _module_file(module)
    assert entry is not None, f"stage {stage}: cannot find module {module}"
    dep_paths = [ROOT / d for d in deps if "${" not in d]
    uncovered = sorted(
        f.relative_to(ROOT).as_posix()
        for f in _closure(entry)
        if not any(f == d or f.is_relative_to(d) for d in dep_paths)
    )
    assert not uncovered, f"dvc.yaml stage {stage!r} runs code it does not list in deps: {uncovered}"


def test_listed_code_deps_exist() -> None:
    """DVC refuses a stage whose dependency is missing: every listed code path must exist."""
    missing = [
        (name, d) for name, _, deps in _stages() for d in deps
        if "${" not in d and d.startswith(("src/", "flows/")) and not (ROOT / d).exists()
    ]
    assert not missing, missing
