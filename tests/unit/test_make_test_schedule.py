"""How `make test` fits two workers on two cores: long files first, and OpenMP threads that sleep."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tests.conftest import long_first

ROOT = Path(__file__).resolve().parents[2]


class _Item:
    def __init__(self, name: str, long: bool) -> None:
        self.name, self._long = name, long

    def get_closest_marker(self, name: str) -> object | None:
        return object() if name == "long" and self._long else None


def test_long_files_go_first_in_collection_order() -> None:
    items = [_Item("a", False), _Item("e2e", True), _Item("b", False), _Item("gradcam", True), _Item("c", False)]
    long_first(items)
    assert [i.name for i in items] == ["e2e", "gradcam", "a", "b", "c"]


def test_the_make_recipe_keeps_that_order_and_lets_idle_threads_sleep() -> None:
    recipe = re.search(r"^test: install\n((?:\t.*\n?)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, "no test recipe in the Makefile"
    body = recipe.group(1)
    assert "--no-loadscope-reorder" in body and "--dist loadfile" in body
    assert "OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE}" in body


@pytest.mark.parametrize(
    "path",
    ["tests/integration/test_pipeline_e2e.py", "tests/model/test_gradcam_phantom.py",
     "tests/model/test_type_head_phantom.py"],
)  # fmt: skip
def test_the_files_that_take_minutes_are_marked_long(path: str) -> None:
    assert "pytest.mark.long" in (ROOT / path).read_text()


def test_readme_quotes_the_wait_policy_benchmark() -> None:
    """PASSIVE only for `make test`: the committed benchmark must show why (pairs gain, a run alone loses)."""
    rows = {r["case"]: r for r in json.loads((ROOT / "benchmarks/results/omp_wait.json").read_text())["rows"]}
    pair, alone = rows["pair_2_threads"]["passive_over_default"], rows["alone_2_threads"]["passive_over_default"]
    assert pair > 1.5, "PASSIVE should pay where two 2-thread trainings share two cores"
    assert alone < 1.0, "if PASSIVE no longer costs a run alone, `make run` could use it too"
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"two such trainings at once ran {pair:.1f}× faster, one alone {1 / alone:.2f}× slower" in readme
