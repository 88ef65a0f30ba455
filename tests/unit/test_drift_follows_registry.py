"""Monitoring follows the registry: promote/rollback rebuild the drift reference, an empty window
is "no traffic", and a drift alarm retrains only when there is new labelled data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from bonefrac.config import DriftParams
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.networks import build_model
from bonefrac.model.transforms import PreprocessSpec
from bonefrac.monitoring.drift import has_traffic, record_no_traffic, summarize
from bonefrac.monitoring.trigger import retrain_decision
from bonefrac.registry import store

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _image(rng: np.random.Generator, bright: bool) -> np.ndarray:
    arr = rng.integers(0, 120, size=(40, 36)).astype(np.uint8)
    arr[:, 10:14] = 230 if bright else 150
    return arr


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 32-px cache of 16 PNGs (train/test), a params file pointing at it, an empty registry."""
    from bonefrac.preprocess.cache import build_cache

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = []
    for i in range(16):
        Image.fromarray(_image(rng, i % 2 == 1)).save(raw / f"img{i}.png")
        rows.append({"image_id": f"i{i}", "path": str(raw / f"img{i}.png"), "label": i % 2,
                     "split": "train" if i < 10 else "test"})
    build_cache(pd.DataFrame(rows), tmp_path / "processed", PreprocessSpec(image_size=32))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"] = {"processed": str(tmp_path / "processed"), "models": str(tmp_path / "models"),
                       "reports": str(tmp_path / "reports")}
    params["drift"]["embedding_dims"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    new = tmp_path / "new"
    new.mkdir()
    for i in range(6):
        Image.fromarray(_image(rng, True)).save(new / f"n{i}.png")
    return tmp_path


def _register(path: Path, arch: str, image_size: int, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = build_model(arch, num_types=0, spatial_dims=2, pretrained="none")
    ModelBundle(
        arch=arch,
        state_dict=model.state_dict(),
        preprocess_spec=PreprocessSpec(image_size=image_size),
        operating_points={"high_sensitivity": 0.3, "high_specificity": 0.7},
        metadata={"metrics": {"auroc": 0.5}},
    ).save(path)
    return store.register_model(path, name="bonefrac")


def _drift_check_on_folder(project: Path, evidently: bool = False) -> pd.DataFrame:
    """What flows/drift.py does for an image folder, through its tasks' bare functions (no Prefect run).

    The champion's embeddings of the new images are projected on the reference's PCA in
    ``load_current``: where a stale reference failed. Evidently itself runs once (slow to start).
    """
    from flows.drift import compare, follow_champion, load_current

    ref_dir = str(project / "models" / "drift_reference")
    follow_champion.fn(str(project / "params.yaml"), ref_dir)
    table, skipped = load_current.fn(str(project / "new"), "", None, ref_dir, "bonefrac")
    assert not skipped and len(table) == 6 and table[["emb_0", "emb_1", "score"]].notna().all().all()
    if evidently:
        result = compare.fn(ref_dir, table, str(project / "out"), DriftParams(embedding_dims=2))
        assert {"emb_0", "emb_1", "score"} <= {f.column for f in result.features}
    return table


def test_promote_and_rollback_rebuild_the_reference_for_another_embedding_width(project: Path) -> None:
    from bonefrac.cli import app

    small = _register(project / "a.pt", "custom_cnn", 32)  # 512 features, the cache's preprocessing
    wide = _register(project / "b.pt", "efficientnet_lite0", 48)  # 1280 features, another input size
    cli = CliRunner()
    params = ["--params", str(project / "params.yaml")]
    ref = project / "models" / "drift_reference"

    def reference() -> tuple[str, int]:
        meta = json.loads((ref / "reference.json").read_text())
        return meta["model_tag"], len(json.loads((ref / "pca.json").read_text())["mean"])

    r = cli.invoke(app, ["promote", small, "--force", *params])
    assert r.exit_code == 0, r.output
    assert "drift reference rebuilt for" in r.output and reference() == (small, 512)

    r = cli.invoke(app, ["promote", wide, "--force", *params])
    assert r.exit_code == 0, r.output
    assert reference() == (wide, 1280)
    _drift_check_on_folder(project, evidently=True)  # used to fail: 1280 features vs a 512 PCA

    r = cli.invoke(app, ["rollback", *params])
    assert r.exit_code == 0, r.output
    assert reference() == (small, 512)
    _drift_check_on_folder(project)

    # A promotion that did not rebuild (an older tool, a direct store call): the drift check heals it.
    other = _register(project / "c.pt", "custom_cnn", 40, seed=3)
    store.promote(other)
    assert reference() == (small, 512)
    _drift_check_on_folder(project)
    assert reference()[0] == other


def test_an_empty_window_is_recorded_as_no_traffic(tmp_path: Path) -> None:
    from bonefrac.monitoring.features import features_from_prediction_log
    from bonefrac.monitoring.prediction_log import read_prediction_log

    empty = features_from_prediction_log(read_prediction_log(tmp_path / "no-log-yet"))
    assert not has_traffic(empty)
    result = record_no_traffic(40, empty, DriftParams(), tmp_path / "out", "the last 1 h")
    saved = json.loads((tmp_path / "out" / "drift_summary.json").read_text())
    assert saved["status"] == "no_traffic" and saved["n_current"] == 0 and saved["dataset_drift"] is False
    assert "No traffic" in summarize(result) and "the last 1 h" in summarize(result)
    assert has_traffic(pd.DataFrame({"intensity_mean": np.linspace(0, 1, 5)}))


def test_drift_alarm_retrains_only_with_new_labelled_data() -> None:
    base = {"dataset_drift": True, "trigger_enabled": True, "champion_data_version": "aaa"}
    assert retrain_decision(**{**base, "dataset_drift": False}, data_version="bbb").action == "none"
    off = retrain_decision(**{**base, "trigger_enabled": False}, data_version="bbb")
    assert off.action == "none" and "trigger_retrain is off" in off.reason
    # the champion was trained on the current data: nothing new to learn from
    same = retrain_decision(**base, data_version="aaa")
    assert same.action == "cannot_act" and "no new labelled data" in same.reason
    # new data version, never trained on
    assert retrain_decision(**base, data_version="bbb").action == "retrain"
    # ... but a challenger was already trained (and rejected) on it: a retrain would rebuild that model
    judged = retrain_decision(**base, data_version="bbb", judged_data_versions=["aaa", "bbb"])
    assert judged.action == "cannot_act"
    # DVC sees changed data inputs not yet run through the pipeline: retrain whatever dvc.lock says
    assert retrain_decision(**base, data_version="aaa", pending_data_change=True).action == "retrain"
    assert retrain_decision(**base, data_version="unknown").action == "cannot_act"


def test_dvc_reports_new_data_but_not_new_code(tmp_path: Path) -> None:
    """``pending_data_change`` reads DVC's status: changed data deps or params count, ``.py`` deps do not."""
    from dvc.repo import Repo

    from bonefrac.monitoring.trigger import pending_data_change

    assert pending_data_change(tmp_path) is None  # not a DVC project: cannot tell
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(b"one")
    (tmp_path / "ingest.py").write_text("x = 1\n")
    (tmp_path / "params.yaml").write_text("data:\n  root: data\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  ingest:\n    cmd: 'true'\n    deps: [ingest.py, data]\n    params: [data.root]\n"
    )
    Repo.init(str(tmp_path), no_scm=True).close()
    with Repo(str(tmp_path)) as repo:
        repo.reproduce(targets=[f"{tmp_path / 'dvc.yaml'}:ingest"])
    assert pending_data_change(tmp_path, ["ingest"]) is False
    (tmp_path / "ingest.py").write_text("x = 2\n")  # new code is not new data
    assert pending_data_change(tmp_path, ["ingest"]) is False
    (tmp_path / "data" / "b.png").write_bytes(b"two")  # a labelled image added
    assert pending_data_change(tmp_path, ["ingest"]) is True
