"""The evaluate stage end to end on a small synthetic cache: outputs, report, model card, external use."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from bonefrac.config import EvaluateParams
from bonefrac.evaluation.evaluate import EvaluationError, evaluate_external, run_evaluation
from bonefrac.evaluation.report import pct, publish_prefect_artifacts
from bonefrac.inference.predictor import Predictor
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.transforms import PreprocessSpec

S = 32
H, W = 64, 48  # original size: boxes must be mapped through resize + pad
TYPES = ["transverse", "oblique"]


class BlobNet(nn.Module):
    def __init__(self, num_types: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 1 + num_types))
        self.gradcam_layer = "body.3"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.body(x)))


def _make_data(n: int, seed: int) -> tuple[list[np.ndarray], pd.DataFrame]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    arrays, rows = [], []
    for i in range(n):
        y = int(rng.random() < 0.4)
        img = rng.normal(800, 120, size=(H, W))
        boxes = []
        if y:
            cy, cx = rng.integers(8, H - 8), rng.integers(8, W - 8)
            # A faint blob on some fractures: the model misses a few (false negatives for the gallery).
            amp = 900 if rng.random() < 0.8 else 250
            img += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2))
            boxes = [[float(cx - 6), float(cy - 6), 13.0, 13.0]]
        elif rng.random() < 0.1:  # a bright artefact on a few normals (false positives)
            cy, cx = rng.integers(8, H - 8), rng.integers(8, W - 8)
            img += 700 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2))
        arrays.append(img.astype(np.float32))
        rows.append(
            {
                "image_id": f"img{i:04d}",
                "label": y,
                "fracture_type": TYPES[i % 2] if y else "",
                "body_part": ["hand", "leg", "hip"][i % 3],
                "view": ["frontal", "lateral"][(i // 3) % 2],
                "patient_id": f"p{i // 2}",
                "study_id": f"s{i // 2}",
                "boxes": json.dumps(boxes),
                "width": W,
                "height": H,
            }
        )
    return arrays, pd.DataFrame(rows)


def _train(x: torch.Tensor, y: np.ndarray) -> BlobNet:
    torch.manual_seed(0)
    net = BlobNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    t = torch.as_tensor(y, dtype=torch.float32)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(net(x)[:, 0] * 3.0, t).backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluate")
    arrays, index = _make_data(180, seed=0)
    index["split"] = np.where(np.arange(180) < 70, "train", np.where(np.arange(180) < 120, "val", "test"))
    spec = PreprocessSpec(image_size=S, volume_size=(8, 16, 16), lower_percentile=1.0, upper_percentile=99.0)
    cached = np.stack([spec.apply(a).numpy() for a in arrays])
    cache = root / "cache"
    cache.mkdir()
    np.save(cache / "images.npy", cached.astype(np.float16))
    index.assign(cache_row=np.arange(180)).to_csv(cache / "index.csv", index=False)
    train = index["split"] == "train"
    net = _train(torch.from_numpy(cached[train.to_numpy()]), index.loc[train, "label"].to_numpy())
    bundle = ModelBundle(
        arch="blobnet",
        state_dict=net.state_dict(),
        preprocess_spec=spec,
        type_names=TYPES,
        metadata={"git_commit": "0123456789abcdef"},
    )
    model_path = bundle.save(root / "models" / "train" / "best_model.pt")
    validation = root / "validation.json"
    validation.write_text(json.dumps({"n_rows": 180, "quarantined": 3, "checks": {"bit_depth": "passed"}}))
    return {
        "root": root,
        "cache": cache,
        "model_path": model_path,
        "validation": validation,
        "arrays": arrays,
        "index": index,
    }


@pytest.fixture(autouse=True)
def _registry_knows_blobnet(monkeypatch: pytest.MonkeyPatch) -> None:
    import bonefrac.model.networks as models

    real = models.build_model

    def build(
        arch: str, num_types: int, pretrained: str = "none", dropout: float = 0.0, spatial_dims: int = 2
    ):
        return (
            BlobNet(num_types)
            if arch == "blobnet"
            else real(arch, num_types, pretrained, dropout, spatial_dims)
        )

    monkeypatch.setattr(models, "build_model", build)


@pytest.fixture(scope="module")
def evaluated(workspace: dict) -> dict:
    import bonefrac.model.networks as models

    mp = pytest.MonkeyPatch()
    mp.setattr(models, "build_model", lambda arch, num_types, **_: BlobNet(num_types))
    root = workspace["root"]
    out = {
        "out_model": root / "models" / "model.pt",
        "reports": root / "reports" / "evaluation",
        "metrics": root / "metrics" / "evaluate.json",
        "plots": root / "reports" / "plots",
    }
    params = EvaluateParams(bootstrap_samples=100, gradcam_gallery=3)
    report = run_evaluation(
        workspace["model_path"],
        workspace["cache"],
        out["out_model"],
        out["reports"],
        out["metrics"],
        out["plots"],
        params,
        workspace["validation"],
        {"seed": 42, "evaluate": params.model_dump()},
        "v-test-123",
        seed=7,
    )
    mp.undo()
    return {**out, "report": report, "params": params}


def test_outputs_exist_and_bundle_is_calibrated(workspace: dict, evaluated: dict) -> None:
    r = evaluated["report"]
    calibrated = ModelBundle.load(evaluated["out_model"])
    assert calibrated.calibration.method == r["calibration"]["method"] == "platt"  # the params default
    assert calibrated.calibration.slope == pytest.approx(r["calibration"]["slope"])
    assert calibrated.calibration.intercept == pytest.approx(r["calibration"]["intercept"])
    assert set(calibrated.operating_points) == {"high_sensitivity", "high_specificity"}
    assert calibrated.metadata["metrics"]["auroc"] == pytest.approx(r["test"]["auroc"]["value"], abs=1e-6)
    assert calibrated.metadata["git_commit"] == "0123456789abcdef"
    assert ModelBundle.load(workspace["model_path"]).calibration.method == "identity"  # the input is untouched
    # Thresholds meet their targets on validation, on calibrated probabilities.
    for name, achieved in r["val_operating_points"].items():
        key = "sensitivity" if name == "high_sensitivity" else "specificity"
        assert achieved[key] >= r["targets"][name]
    # A model that learnt the blob task: the test numbers say so.
    assert r["test"]["auroc"]["value"] > 0.8
    assert r["test"]["auroc"]["ci_low"] <= r["test"]["auroc"]["value"] <= r["test"]["auroc"]["ci_high"]
    assert set(r["by_body_part"]) == {"hand", "leg", "hip"} and set(r["by_view"]) == {"frontal", "lateral"}
    assert r["study_level"]["n"] == r["test"]["n"] // 2 and r["types"]["n"] == r["test"]["n_positive"]
    assert r["localisation"]["n"] == r["test"]["n_positive"]
    assert (
        r["localisation"]["gradcam"]["pointing_hit_rate"]
        > r["localisation"]["gradcam"]["baseline_centre_hit_rate"]
    )


def test_dvc_metrics_and_plot_files(evaluated: dict) -> None:
    flat = json.loads(evaluated["metrics"].read_text())
    assert all(isinstance(v, int | float) for v in flat.values())
    assert flat["auroc"] == pytest.approx(evaluated["report"]["test"]["auroc"]["value"], abs=1e-6)
    assert "high_sensitivity.sensitivity" in flat and "body_part.hand.auroc" in flat
    plots = evaluated["plots"]
    assert list(pd.read_csv(plots / "roc.csv").columns[:2]) == ["fpr", "tpr"]
    assert {"recall", "precision"} <= set(pd.read_csv(plots / "pr.csv").columns)
    assert set(pd.read_csv(plots / "reliability.csv")["calibration"]) == {"before", "after"}
    conf = pd.read_csv(plots / "confusion.csv")
    assert list(conf.columns) == ["actual", "predicted"] and len(conf) == evaluated["report"]["test"]["n"]
    for png in ("roc", "pr", "reliability", "confusion_high_sensitivity", "confusion_types", "by_body_part"):
        assert (evaluated["reports"] / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((evaluated["reports"] / "gradcam").glob("*.png"))) >= 3


def test_report_is_self_contained_and_shows_the_numbers(evaluated: dict) -> None:
    html = (evaluated["reports"] / "report.html").read_text()
    r = evaluated["report"]
    t = r["test"]
    assert f"{t['auroc']['value']:.3f}" in html and f"{t['auroc']['ci_low']:.3f}" in html
    for op in t["operating_points"].values():
        assert pct(op["sensitivity"]["value"]) in html and pct(op["specificity"]["value"]) in html
    assert r["calibration"]["label"] in html and r["calibration"]["label"].startswith("Platt (a = ")
    assert "v-test-123" in html and "quarantined" in html and "bootstrap_samples" in html
    # The verdict comes first: one row per target, met or missed and by how much.
    assert html.index('<section id="verdict"') < html.index('class="summary"') < html.index('<section id="ops"')
    assert "targets met" in html and ("points below" in html or "points above" in html)
    assert "Model version" in html and "0123456789abcdef" in html
    assert html.count("data:image/png;base64,") >= 8
    assert not re.search(
        r"<script|<link|@import|(src|href)\s*=\s*[\"']?(https?:)?//|url\((https?:)?//", html, re.IGNORECASE
    )


def test_published_report_has_the_numbers_and_no_patient_image(evaluated: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bonefrac.cli import app

    out = tmp_path / "published.html"
    result = CliRunner().invoke(app, ["publish-report", str(evaluated["reports"]), str(out)])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    full = (evaluated["reports"] / "report.html").read_text()
    t = evaluated["report"]["test"]
    assert f"{t['auroc']['value']:.3f}" in html and "v-test-123" in html
    assert "Grad-CAM gallery is left out" in html
    # Every plot is in; no gallery tile (each full-report tile is an <img alt="<category> <id>">).
    n_plots = len(list(evaluated["reports"].glob("*.png")))
    assert html.count("data:image/png;base64,") == n_plots < full.count("data:image/png;base64,")
    assert 'alt="true_positive' in full and 'alt="true_positive' not in html

    missing = CliRunner().invoke(app, ["publish-report", str(tmp_path / "nowhere"), str(tmp_path / "x.html")])
    assert missing.exit_code == 2 and "no report.json" in missing.output
    assert not (tmp_path / "x.html").exists()


def test_model_card(evaluated: dict) -> None:
    card = (evaluated["out_model"].parent / "MODEL_CARD.md").read_text()
    t = evaluated["report"]["test"]
    for heading in (
        "## Model details",
        "## Intended use",
        "## Training data",
        "## Evaluation data",
        "## Metrics",
        "## Operating points",
        "## Quantitative analyses: subgroups",
        "## Ethical considerations",
        "## Caveats and recommendations",
    ):
        assert heading in card
    # Data facts from the actual splits; patient grouping claimed because the index has patient ids.
    assert "| train | 70 |" in card and "Splits are grouped by patient" in card
    assert "](../reports/evaluation/report.html)" in card  # a relative link
    assert "Targets: Sensitivity at the high sensitivity point" in card
    assert "http://" not in card and "https://" not in card
    assert f"{t['auroc']['value']:.3f}" in card and f"{t['auroc']['ci_high']:.3f}" in card
    assert "&lt;" not in card and "&#" not in card  # markdown, not HTML-escaped


def test_external_validation_uses_stored_calibration(
    workspace: dict, evaluated: dict, tmp_path: Path
) -> None:
    arrays, index = _make_data(60, seed=5)
    df = index.assign(array=arrays).drop(columns=["width", "height"])
    calibrated = ModelBundle.load(evaluated["out_model"])
    r = evaluate_external(evaluated["out_model"], df, tmp_path / "ext", n_bootstrap=50, gradcam_gallery=1)
    assert r["external"] and r["calibration"]["slope"] == pytest.approx(calibrated.calibration.slope)
    assert r["calibration"]["intercept"] == pytest.approx(calibrated.calibration.intercept)
    assert r["operating_points"] == pytest.approx(calibrated.operating_points)
    pred = Predictor(calibrated).predict_arrays(arrays)
    assert r["test"]["brier"] == pytest.approx(float(np.mean((pred.prob - index["label"]) ** 2)), abs=1e-6)
    assert (tmp_path / "ext" / "report.html").exists() and (tmp_path / "ext" / "metrics.json").exists()
    with pytest.raises(EvaluationError, match="operating points"):
        evaluate_external(workspace["model_path"], df, tmp_path / "ext2", n_bootstrap=10)


def test_prefect_artifacts_outside_a_run_are_skipped(evaluated: dict) -> None:
    assert publish_prefect_artifacts(evaluated["report"]) == []


@pytest.mark.slow
def test_prefect_artifacts_inside_a_flow(evaluated: dict) -> None:
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    @flow
    def publish() -> list[str]:
        return publish_prefect_artifacts(evaluated["report"], key_prefix="test-eval")

    with prefect_test_harness(server_startup_timeout=120):
        ids = publish()
    assert len(ids) == 3  # headline markdown, operating points, subgroups


def _mini_report() -> dict:
    def est(v, lo, hi):
        return {"value": v, "ci_low": lo, "ci_high": hi}

    def op(sens, spec):
        return {"sensitivity": est(sens, sens - 0.05, sens + 0.03), "specificity": est(spec, spec - 0.04, spec + 0.02)}

    return {
        "targets": {"high_sensitivity": 0.95, "high_specificity": 0.9, "auroc": 0.8, "ece": 0.05},
        "test": {
            "auroc": est(0.85, 0.8, 0.9),
            "ece": 0.08,
            "operating_points": {"high_sensitivity": op(0.96, 0.5), "high_specificity": op(0.6, 0.86)},
        },
        "by_body_part": {
            "hand": {"n": 40, "n_positive": 20, "auroc": est(0.9, 0.8, 0.95),
                     "operating_points": {"high_sensitivity": op(0.95, 0.55), "high_specificity": op(0.6, 0.9)}},
            "hip": {"n": 30, "n_positive": 10, "auroc": est(0.65, 0.5, 0.8),
                    "operating_points": {"high_sensitivity": op(0.8, 0.4), "high_specificity": op(0.5, 0.85)}},
        },
        "by_view": {},
    }


def test_target_verdicts_and_weak_subgroups() -> None:
    from bonefrac.evaluation.report import target_verdicts, weak_subgroups

    v = {row["label"]: row for row in target_verdicts(_mini_report())}
    sens = v["Sensitivity at the high sensitivity point"]
    assert sens["status"] == "met (interval crosses the target)" and sens["by"] == "1.0 points above"
    spec = v["Specificity at the high specificity point"]
    assert spec["status"] == "missed" and spec["by"] == "4.0 points below"
    assert v["AUROC"]["status"] == "met" and v["AUROC"]["target"] == "≥ 0.800"
    assert v["Calibration error (ECE)"]["status"] == "missed" and "over the limit" in v["Calibration error (ECE)"]["by"]
    weak = weak_subgroups(_mini_report())
    assert [w["group"] for w in weak] == ["body part = hip"]
    reasons = " ".join(weak[0]["reasons"])
    assert "AUROC 0.650" in reasons and "sensitivity 80.0%" in reasons


def test_validation_table_lists_failed_checks_first() -> None:
    from bonefrac.evaluation.report import validation_table

    summary = {
        "rows": 10,
        "bit_depth_success": True,
        "bit_depth_failures": 0,
        "label_values_success": False,
        "label_values_failures": 3,
        "min_side_skipped": True,
        "checks_failed": 1,
    }
    rows, facts = validation_table(summary, {"validation": {"severities": {"label_values": "quarantine"}}})
    assert [r["check"] for r in rows] == ["label_values", "min_side", "bit_depth"]
    assert rows[0]["severity"] == "quarantine" and rows[0]["failures"] == 3 and rows[2]["severity"] == "–"
    assert ("rows", "10") in facts and ("checks_failed", "1") in facts
