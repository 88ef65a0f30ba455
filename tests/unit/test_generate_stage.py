"""The `generate` stage makes phantoms only for ``data.source: phantom``.

A FracAtlas or hospital run used to render the whole phantom set first (141 s of a
FracAtlas run, BENCHMARKS.md) that nothing read. Now it writes a note in each DVC
output, and ``data.source`` is a param of the stage, so switching back reruns it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_another_source_writes_only_a_note_and_switching_back_reruns_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sys.path.insert(0, str(ROOT))
    from flows.generate import NOT_GENERATED, _generate

    params = {
        "data": {"source": "fracatlas", "root": str(tmp_path / "fracatlas")},
        "paths": {"raw": str(tmp_path / "raw"), "reports": str(tmp_path / "reports")},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    summary = _generate("params.yaml")
    took = time.perf_counter() - t0
    assert "skipped" in summary and "'fracatlas'" in summary
    for out in (tmp_path / "raw" / "phantom", tmp_path / "reports" / "phantom"):  # dvc.yaml's two outs
        assert [p.name for p in out.iterdir()] == [NOT_GENERATED]
        assert "data.source is 'fracatlas'" in (out / NOT_GENERATED).read_text()
    assert took < 2.0, f"{took:.1f} s: phantoms rendered anyway?"
    # the stage's params name data.source: back to `phantom`, DVC reruns it and the phantoms come back
    generate = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["generate"]
    assert "data.source" in generate["params"]
    assert {"data/raw/phantom", "reports/phantom"} <= set(generate["outs"])
