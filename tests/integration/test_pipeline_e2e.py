"""The whole DVC pipeline, end to end, on a small phantom set in a copy of the repo.

Proves: `dvc repro` runs every stage through its Prefect flow; outputs, metrics
and plots exist; `dvc metrics show` / `dvc plots show --json` work; and a second
`dvc repro` reruns nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration

SMALL = {
    "data": {"phantom": {"n_patients": 14, "size": 128}},
    "preprocess": {"image_size": 64},
    "model": {"arch": "custom_cnn", "pretrained": "none"},
    "train": {"epochs": 2, "batch_size": 16, "threads": 1},
    "evaluate": {"bootstrap_samples": 50, "gradcam_gallery": 2},
}


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def _copy_project(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _env(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = f"{project / 'src'}{os.pathsep}{project}"
    env["PREFECT_HOME"] = str(project / ".prefect")
    env["BENTOML_HOME"] = str(project / ".bentoml")
    env.pop("PREFECT_API_URL", None)
    return env


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dvc"), *args], cwd=project, env=_env(project), capture_output=True, text=True, timeout=1200
    )


def test_dvc_repro_end_to_end_then_nothing_changes(tmp_path: Path) -> None:
    project = tmp_path / "bonefrac"
    project.mkdir()
    _copy_project(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(_merge(params, SMALL), sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=project, check=True)

    first = _dvc(project, "repro")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    for stage in ("generate", "ingest", "validate", "preprocess", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout

    for out in (
        "data/raw/phantom/manifest.csv",
        "data/interim/ingest/manifest.csv",
        "data/interim/validated/clean.csv",
        "data/processed/images.npy",
        "models/train/best_model.pt",
        "models/model.pt",
        "models/MODEL_CARD.md",
        "reports/evaluation/report.html",
        "reports/plots/roc.csv",
        "metrics/evaluate.json",
        "metrics/validation.json",
    ):
        assert (project / out).exists(), out

    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    auroc = metrics["auroc"]
    assert 0.0 <= auroc <= 1.0

    shown = _dvc(project, "metrics", "show", "--json")
    assert shown.returncode == 0 and "auroc" in shown.stdout
    plots = _dvc(project, "plots", "show", "--json")
    assert plots.returncode == 0 and "roc.csv" in plots.stdout

    second = _dvc(project, "repro")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout.lower()

    # The configured local DVC remote round-trips the pipeline's data and models.
    remote = tmp_path / "dvc-remote"
    assert _dvc(project, "remote", "modify", "--local", "local", "url", str(remote)).returncode == 0
    pushed = _dvc(project, "push")
    assert pushed.returncode == 0, pushed.stderr[-2000:]
    model = project / "models" / "model.pt"
    original = model.read_bytes()
    shutil.rmtree(project / "models")
    shutil.rmtree(project / ".dvc" / "cache")
    pulled = _dvc(project, "pull")
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    assert model.read_bytes() == original
