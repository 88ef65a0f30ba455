"""``dvc.yaml`` and ``Params.paths`` name the same folders (one source of truth, checked).

The flows write under ``Params.paths``; DVC tracks what ``dvc.yaml`` declares. If
either changes alone, DVC would track folders nobody writes (or miss outputs).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from bonefrac.config import load_params

ROOT = Path(__file__).resolve().parents[2]
# Written by DVCLive itself (its own convention), not by a Params path.
OUTSIDE_PATHS = ("dvclive",)


def _declared(stages: dict) -> list[str]:
    paths = []
    for stage in stages.values():
        for key in ("outs", "metrics", "plots"):
            for item in stage.get(key) or []:
                paths.append(next(iter(item)) if isinstance(item, dict) else str(item))
    return paths


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def test_every_dvc_output_lies_under_a_params_path() -> None:
    paths = load_params(ROOT / "params.yaml").paths
    # Written but deliberately not tracked: the service's prediction log, the ingest cache, and the
    # train stage's content-hashed feature cache of the dense archs (rebuilt from data/processed).
    untracked = ("predictions_log", "cache", "features")
    folders = {name: value for name, value in paths.model_dump().items() if name not in untracked}
    declared = _declared(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert declared
    stray = [p for p in declared if not any(_under(p, f) for f in (*folders.values(), *OUTSIDE_PATHS))]
    assert stray == [], f"dvc.yaml outputs outside Params.paths {folders}: {stray}"
    # and every Params path that stages write is used by dvc.yaml
    unused = [n for n, f in folders.items() if n != "raw" and not any(_under(p, f) for p in declared)]
    assert unused == [], f"Params.paths not tracked by dvc.yaml: {unused}"


def test_the_check_catches_a_renamed_folder() -> None:
    stages = {"s": {"outs": ["results/model.pt"], "metrics": [{"metrics/x.json": {"cache": False}}]}}
    declared = _declared(stages)
    assert declared == ["results/model.pt", "metrics/x.json"]
    assert not _under("results/model.pt", "models") and _under("metrics/x.json", "metrics")
