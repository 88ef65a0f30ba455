"""The drift report of a pipeline run (test split vs its training reference) and ``bonefrac drift`` / ``metrics``.

A small cache of phantom radiographs stands in for the pipeline's: the test split drawn like
the training split gives no drift and a deterministic metrics dict; a test split exposed
differently drifts; a split too small to test is reported, not fatal. The CLI builds the
reference where none exists (from the named model, on the training split), then reuses it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from tests.integration._server import make_tiny_bundle

from bonefrac.config import DriftParams
from bonefrac.data.imageio import read_image
from bonefrac.data.phantom import REGIONS, render_phantom
from bonefrac.model.bundle import ModelBundle
from bonefrac.monitoring.split_drift import split_drift, verdict_line
from bonefrac.preprocess.cache import CACHE_FORMAT

PARAMS = DriftParams(stattest_threshold=0.05, drift_share=0.25, embedding_dims=3)


def _cache(root: Path, splits: dict[str, int], bundle: ModelBundle, exposure: dict[str, float] | None = None) -> Path:
    """Phantoms per split (``exposure`` scales a split's stored values), their cached tensors and index."""
    rng = np.random.default_rng(5)
    raw, cache = root / "raw", root / "cache"
    raw.mkdir(parents=True)
    cache.mkdir()
    rows, tensors = [], []
    for split, n in splits.items():
        for i in range(n):
            arr, _ = render_phantom(rng, 96, None if i % 2 else "transverse", "frontal", 8, region=REGIONS[i % 4])
            arr = np.clip(arr.astype(np.float64) * (exposure or {}).get(split, 1.0), 0, 255).astype(np.uint8)
            path = raw / f"{split}{i:03d}.png"
            Image.fromarray(arr).save(path)
            tensors.append(bundle.preprocess(read_image(path).array).numpy())
            rows.append({"path": str(path), "split": split, "cache_row": len(rows), "label": i % 2})
    np.save(cache / "images.npy", np.stack(tensors).astype(np.float16))
    pd.DataFrame(rows).to_csv(cache / "index.csv", index=False)
    spec = bundle.preprocess_spec.model_dump(mode="json")
    meta = {"format": CACHE_FORMAT, "n": len(rows), "shape": list(tensors[0].shape), "spec": spec}
    (cache / "cache.json").write_text(json.dumps(meta))  # what the preprocess stage writes beside the tensors
    return cache


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("m") / "model.pt", image_size=48)


@pytest.fixture(scope="module")
def same(tmp_path_factory, bundle_path) -> Path:
    return _cache(tmp_path_factory.mktemp("same"), {"train": 40, "test": 24}, ModelBundle.load(bundle_path))


def test_a_test_split_like_the_training_split_does_not_drift_and_the_metric_holds_no_time_or_path(
    same, bundle_path, tmp_path
):
    bundle = ModelBundle.load(bundle_path)
    metrics, result = split_drift(same, bundle, PARAMS, tmp_path / "a")
    assert result is not None and not metrics["dataset_drift"], result.drifted_columns
    assert metrics["n_reference"] == 40 and metrics["n_current"] == 24
    assert metrics["n_features"] >= 8  # image statistics, score and the embedding axes
    assert {c for c in result.to_dict()["drifted_columns"]} <= {f.column for f in result.features}
    assert (tmp_path / "a" / "drift_report.html").stat().st_size > 10_000
    assert (tmp_path / "a" / "reference" / "reference.csv").exists()
    # Verdict and counts only: no time, no path (dvc.lock equality across checkouts is test_pipeline_e2e's).
    assert set(metrics) == {
        "dataset_drift", "drift_share", "drift_share_threshold", "n_features", "n_drifted", "n_reference", "n_current"
    }
    assert verdict_line(metrics).startswith("drift test vs train: no drift (")


def test_a_split_too_small_to_test_is_reported_not_fatal(tmp_path, bundle_path):
    bundle = ModelBundle.load(bundle_path)
    cache = _cache(tmp_path, {"train": 12, "test": 3}, bundle)
    metrics, result = split_drift(cache, bundle, PARAMS, tmp_path / "out")
    assert result is None and "at least 5" in metrics["skipped"]
    assert verdict_line(metrics).startswith("drift test vs train: not tested (")


def _invoke(*args: str):
    from typer.testing import CliRunner

    from bonefrac.cli import app

    return CliRunner().invoke(app, list(args))


def test_drift_command_builds_the_reference_once_then_compares_a_folder(same, bundle_path, tmp_path):
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["paths"] = {"processed": str(same), "models": str(tmp_path / "models"), "reports": str(tmp_path / "reports")}
    params.setdefault("drift", {}).update(embedding_dims=3, drift_share=0.25)
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    folder = same.parent / "raw"
    model = ("--model", str(bundle_path), "--params", str(pfile))
    r = _invoke("drift", "--images", str(folder), *model, "-o", str(tmp_path / "r1"))
    assert r.exit_code == 0, r.output
    assert "no drift reference at" in r.output and "building it from model bonefrac-test:t0" in r.output
    assert f"drift {folder} vs reference: no drift (" in r.output  # train + test phantoms: one distribution
    assert (tmp_path / "models" / "drift_reference" / "reference.csv").exists()
    assert (tmp_path / "r1" / "drift_report.html").exists() and (tmp_path / "r1" / "drift_summary.json").exists()
    # Second run: the stored reference is used; a darker batch drifts and --fail-on-drift says so.
    dark = tmp_path / "dark"
    dark.mkdir()
    for p in sorted(folder.glob("*.png"))[:20]:
        Image.fromarray((np.asarray(Image.open(p)) * 0.5).astype(np.uint8)).save(dark / p.name)
    # a file that does not decode, named as hospitals name files: its name must not reach the console
    (dark / "DOE_JANE_PHI-483920.png").write_bytes(b"not a PNG")
    r = _invoke("drift", "--images", str(dark), *model, "-o", str(tmp_path / "r2"), "--fail-on-drift")
    assert r.exit_code == 3, r.output
    assert "1 images could not be read" in r.output and "image 1 of 21: ImageDecodeError" in r.output
    assert "PHI-483920" not in r.output and "DOE_JANE" not in r.output
    assert "building" not in r.output and "built for bonefrac-test:t0" in r.output
    assert "DRIFT (" in r.output and "intensity_mean" in r.output
    r = _invoke("drift", "--images", str(dark), "--split", "test", "--params", str(pfile))
    assert r.exit_code == 1 and "give one of --images DIR or --split NAME" in r.output


def test_metrics_command_prints_one_value_per_line(tmp_path):
    from bonefrac.cli.monitoring_commands import format_metrics

    data = {
        "auroc": 0.8556, "auroc_ci_low": 0.7478, "auroc_ci_high": 0.9389,
        "high_sensitivity": {"sensitivity": 0.8, "sensitivity_ci_low": 0.63, "sensitivity_ci_high": 0.93, "f1": 0.76},
        "body_part": {"hand": {"auroc": 0.625}},
        "bit_depth_success": True, "bit_depth_failures": 0, "size_range_success": False, "size_range_failures": 3,
        "by_body_part": {"femur": {"0": 22, "1": 16}},
    }
    lines = format_metrics("metrics/x.json", data)
    assert lines[0] == "metrics/x.json" and max(map(len, lines)) <= 88
    text = "\n".join(lines)
    assert re.search(r"\n  auroc +0\.8556  \(0\.7478–0\.9389\)\n", text)
    assert re.search(r"\n  high_sensitivity\n    sensitivity +0\.8  \(0\.63–0\.93\)\n    f1 +0\.76\n", text)
    assert "_ci_" not in text and re.search(r"\n  body_part\.hand\.auroc +0\.625\n", text)
    assert re.search(r"\n  bit_depth +ok\n", text) and re.search(r"\n  size_range +FAILED \(3\)\n", text)
    assert re.search(r"\n  by_body_part\.femur +0: 22 · 1: 16$", text)
    (tmp_path / "m.json").write_text(json.dumps(data))
    r = _invoke("metrics", str(tmp_path / "m.json"), str(tmp_path / "missing.json"))
    assert r.exit_code == 0 and "0.8556  (0.7478–0.9389)" in r.output and "not written yet" in r.output
