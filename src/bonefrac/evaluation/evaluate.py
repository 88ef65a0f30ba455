"""The evaluate stage: calibrate on validation, measure on test, explain, report.

Order matters and is the point of this module: the calibration map (Platt
scaling by default: a slope and an intercept) and both operating-point
thresholds are fitted on the *validation* split only (on calibrated
probabilities), frozen into the model bundle, and only then is the *test* split
scored once. External validation (:func:`evaluate_external`) reuses the frozen
values and never refits them.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bonefrac.atomic import atomic_write_text
from bonefrac.config import EvaluateParams
from bonefrac.errors import BonefracError
from bonefrac.evaluation import plots
from bonefrac.evaluation.calibration import expected_calibration_error
from bonefrac.evaluation.metrics import (
    SUBGROUPS,
    MetricsError,
    binary_metrics,
    flat_summary,
    grouped_metrics,
    study_level,
    type_metrics,
)
from bonefrac.evaluation.model_card import write_model_card
from bonefrac.evaluation.operating_points import HIGH_SENSITIVITY, choose_thresholds
from bonefrac.evaluation.report import (
    DEFAULT_LIMITATIONS,
    publish_prefect_artifacts,
    render_report_html,
    summary_text,
)
from bonefrac.explain.gallery import GalleryItem, png_bytes, select_cases, tile
from bonefrac.explain.gradcam import CamError, resolve_layer
from bonefrac.explain.heatmaps import EVIDENCE, LABELS, heatmaps, map_methods
from bonefrac.explain.localisation import localisation_summary, pointing_game
from bonefrac.inference.cache_outputs import CacheOutputs
from bonefrac.inference.predictor import Predictor
from bonefrac.model.boxes import row_boxes, row_outlines
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.calibrate import (
    IDENTITY,
    CalibrationMap,
    CalibrationMethod,
    Prediction,
    binary_nll,
    fit_calibration,
)

__all__ = ["EvaluationError", "evaluate_external", "publish_prefect_artifacts", "run_evaluation"]

log = logging.getLogger(__name__)

MAX_LOCALISATION_CASES = 200  # Grad-CAM on CPU costs ~0.1 s an image; enough for a stable hit rate


class EvaluationError(BonefracError, RuntimeError):
    """The evaluation cannot run on these inputs; the message says what is missing."""


# ------------------------------------------------------------------ helpers
def _jsonable(obj: Any) -> Any:
    """Plain Python types only (numpy scalars → float/int, NaN → None): bundle- and JSON-safe."""
    return json.loads(
        json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)),
        parse_constant=lambda _c: None,
    )


def _rows_tensor(images: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images[np.asarray(rows, dtype=int)], dtype=np.float32))


def predict_rows(outputs: CacheOutputs, rows: np.ndarray, bundle: ModelBundle) -> Prediction:
    """``bundle``'s calibrated predictions of cached rows (each row's forward pass made once, in
    small batches from the memory map: :class:`CacheOutputs`)."""
    return bundle.calibrate(outputs.logits(rows))


def _with_predictions(df: pd.DataFrame, pred: Prediction, type_names: list[str]) -> pd.DataFrame:
    out = df.reset_index(drop=True).copy()
    out["label"] = out["label"].astype(int)
    out["logit"] = pred.logit
    out["raw_prob"] = pred.raw_prob
    out["prob"] = pred.prob
    if pred.type_probs is not None and type_names:
        out["type_pred"] = [type_names[i] for i in pred.type_probs.argmax(1)]
    return out


def _split_counts(df: pd.DataFrame) -> dict[str, int]:
    return {"n": len(df), "n_positive": int(df["label"].astype(int).sum())}


def _data_facts(index: pd.DataFrame, params_snapshot: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the model card says about the data: source, subset filters, per-split counts, patient ids."""
    data = dict((params_snapshot or {}).get("data") or {})
    facts: dict[str, Any] = {
        "source": data.get("source"),
        "include_body_parts": data.get("include_body_parts"),
        "exclude_body_parts": data.get("exclude_body_parts"),
        "use_fracture_types": data.get("use_fracture_types"),
    }
    pid = index["patient_id"].fillna("").astype(str).str.strip() if "patient_id" in index.columns else None
    facts["has_patient_ids"] = bool(pid is not None and (pid != "").any())
    splits: dict[str, Any] = {}
    for name, df in index.groupby("split", sort=False):
        row: dict[str, Any] = _split_counts(df)
        if facts["has_patient_ids"] and pid is not None:
            row["n_patients"] = int(pid.loc[df.index][pid.loc[df.index] != ""].nunique())
        for col in (g.column for g in SUBGROUPS):
            if col in df.columns:
                counts = df[col].fillna("unknown").astype(str).value_counts()
                row[col] = {str(k): int(v) for k, v in counts.items()}
        splits[str(name)] = row
    facts["splits"] = splits
    return facts


def _preprocess_text(pp: Mapping[str, Any], spatial_dims: int) -> str:
    if spatial_dims == 3:
        size = "×".join(str(v) for v in pp["volume_size"])
        shape = f"volume resized to {size} (D×H×W)"
    else:
        s = pp["image_size"]
        shape = f"longest side resized to {s} px, zero-padded to {s}×{s}"
    lo, hi = pp["lower_percentile"], pp["upper_percentile"]
    return f"grayscale, intensities windowed to percentiles {lo}–{hi} → [0, 1], {shape}"


def _calibration_stats(
    logits: np.ndarray, labels: np.ndarray, calibration: CalibrationMap, n_bins: int
) -> dict[str, float]:
    raw, cal = IDENTITY.probability(logits), calibration.probability(logits)
    return {
        "nll_before": binary_nll(logits, labels),
        "nll_after": binary_nll(logits, labels, calibration),
        "ece_before": expected_calibration_error(raw, labels, n_bins),
        "ece_after": expected_calibration_error(cal, labels, n_bins),
        "brier_before": float(np.mean((raw - labels) ** 2)),
        "brier_after": float(np.mean((cal - labels) ** 2)),
    }


def _calibration_label(calibration: CalibrationMap) -> str:
    """How the map reads in a report: ``Platt (a = 0.81, b = -1.42)`` or ``T = 1.20``."""
    if calibration.method == "platt":
        return f"Platt (a = {calibration.slope:.2f}, b = {calibration.intercept:+.2f})"
    if calibration.method == "temperature":
        return f"T = {calibration.temperature:.2f}"
    return "none"


# --------------------------------------------------------------- assessment
def assess(
    test: pd.DataFrame,
    thresholds: Mapping[str, float],
    calibration: CalibrationMap,
    n_bootstrap: int,
    ci_level: float,
    n_bins: int,
    seed: int,
    type_names: list[str],
) -> dict[str, Any]:
    """All test-split numbers: overall, per body part / view, study level, fracture types, calibration."""
    y = test["label"].to_numpy().astype(int)
    kw = {"n_bootstrap": n_bootstrap, "ci_level": ci_level, "seed": seed, "n_bins": n_bins}
    try:
        overall = binary_metrics(y, test["prob"].to_numpy(), thresholds, **kw)
    except MetricsError as err:
        raise EvaluationError(f"test split: {err}") from err
    out: dict[str, Any] = {
        "test": overall,
        **{g.key: grouped_metrics(test, g.column, thresholds, **kw) for g in SUBGROUPS},
        "study_level": None,
        "study_level_note": "No study ids are known for the test images.",
        "types": None,
        "calibration_test": _calibration_stats(test["logit"].to_numpy(), y, calibration, n_bins),
    }
    studies = study_level(test, agg="max")
    if len(studies) and (studies["n_views"] > 1).any():
        try:
            out["study_level"] = binary_metrics(studies["label"], studies["prob"], thresholds, **kw)
        except MetricsError as err:
            out["study_level_note"] = f"Study level not computed: {err}."
    elif len(studies):
        out["study_level_note"] = "Every test study has a single image: study level equals image level."
    if type_names and "type_pred" in test.columns and "fracture_type" in test.columns:
        typed = test[(test["label"] == 1) & test["fracture_type"].astype(str).isin(type_names)]
        if len(typed):
            out["types"] = type_metrics(typed["fracture_type"].astype(str), typed["type_pred"], type_names)
    return out


# -------------------------------------------------------------- explanation
def _cache_boxes(row: pd.Series, image_size: int) -> list[list[float]]:
    return row_boxes(row, image_size)


class _MapsOnce:
    """Each test image's map, computed once per method however many times it is asked for.

    The localisation score and the gallery want maps of overlapping images (a gallery's true
    positives and misses are mostly boxed fractures), and a stitched evidence map costs eight
    trunk passes.
    """

    def __init__(self, model: torch.nn.Module, images: np.ndarray, cache_rows: np.ndarray, layer: str) -> None:
        self.model, self.images, self.cache_rows, self.layer = model, images, cache_rows, layer
        self.done: dict[tuple[str, int], np.ndarray] = {}

    def __call__(self, method: str, test_index: Sequence[int]) -> list[np.ndarray]:
        todo = list(dict.fromkeys(i for i in test_index if (method, i) not in self.done))
        if todo:
            x = _rows_tensor(self.images, self.cache_rows[todo])
            for i, cam in zip(todo, heatmaps(self.model, x, method=method, layer=self.layer), strict=True):
                self.done[(method, i)] = cam
        return [self.done[(method, i)] for i in test_index]


def explain(
    model: torch.nn.Module,
    images: np.ndarray,
    test: pd.DataFrame,
    decisions: np.ndarray,
    n_per_category: int,
    layer: str | None,
    image_size: int,
    spatial_dims: int,
    operating_point: str,
) -> tuple[list[GalleryItem], dict[str, Any]]:
    """Gallery of TP/FP/FN with the model's maps and localisation scores against expert boxes.

    The maps are the network's own evidence map when it has one (dense archs), else
    Grad-CAM and Grad-CAM++ (:func:`bonefrac.explain.heatmaps.map_methods`).
    """
    methods = map_methods(model)
    info: dict[str, Any] = {
        "layer": layer or "",
        "operating_point": operating_point,
        "note": "",
        "methods": [[m, LABELS[m]] for m in methods],
    }
    if EVIDENCE in methods:
        info["layer"] = "the network's own logit map (sigmoid per cell)"
    else:
        try:
            info["layer"] = resolve_layer(model, layer)
        except CamError as err:
            info["note"] = str(err)
            return [], info
    boxes = [_cache_boxes(r, image_size) if spatial_dims == 2 else [] for _, r in test.iterrows()]

    # Localisation: fractured test images with expert boxes.
    with_boxes = [i for i in range(len(test)) if boxes[i] and test["label"].iat[i] == 1][
        :MAX_LOCALISATION_CASES
    ]
    maps = _MapsOnce(model, images, test["cache_row"].to_numpy(), info["layer"])
    loc: dict[str, Any] = {"n": 0}
    if with_boxes:
        for method in methods:
            loc[method] = localisation_summary(maps(method, with_boxes), [boxes[i] for i in with_boxes])
        loc["n"] = loc[methods[0]]["n"]
    info["localisation"] = loc

    items: list[GalleryItem] = []
    if n_per_category <= 0:
        return items, info
    picks = select_cases(test["label"].to_numpy(), test["prob"].to_numpy(), decisions, n_per_category)
    for category, idx in picks.items():
        if idx.size == 0:
            continue
        x = _rows_tensor(images, test["cache_row"].to_numpy()[idx])
        shown = [maps(m, [int(i) for i in idx]) for m in methods]
        for j, i in enumerate(idx):
            row = test.iloc[int(i)]
            bx = boxes[int(i)]
            where = " · ".join(
                str(row[c])
                for c in (g.column for g in SUBGROUPS)
                if c in row.index and str(row[c]) not in ("", "unknown", "nan")
            )
            items.append(
                GalleryItem(
                    category=category,
                    image_id=str(row.get("image_id", i)),
                    prob=float(row["prob"]),
                    png=png_bytes(tile(x[j, 0].numpy(), shown[0][j], shown[1][j] if len(shown) > 1 else None, bx,
                                       outlines=row_outlines(row, image_size) if bx else ())),
                    caption={"where": where},
                    pointing_hit=pointing_game(shown[0][j], bx) if bx else None,
                )
            )
    return items, info


# ------------------------------------------------------------------ figures
def make_figures(report: Mapping[str, Any], test: pd.DataFrame, n_bins: int) -> dict[str, bytes]:
    y = test["label"].to_numpy().astype(int)
    p, raw = test["prob"].to_numpy(), test["raw_prob"].to_numpy()
    t = report["test"]
    cal = report["calibration"]
    figs = {
        "roc": plots.roc_png(y, p, t["auroc"], t["operating_points"]),
        "pr": plots.pr_png(y, p, t["auprc"], t["operating_points"]),
        "reliability": plots.reliability_png(
            y, raw, p, n_bins, cal["test"]["ece_before"], cal["test"]["ece_after"], cal["label"]
        ),
    }
    for name, op in t["operating_points"].items():
        cm = [[op["tn"], op["fp"]], [op["fn"], op["tp"]]]
        figs[f"confusion_{name}"] = plots.confusion_png(
            cm, ["normal", "fracture"], f"{plots.op_label(name)} (t = {op['threshold']:.3f})"
        )
    if report.get("types"):
        figs["confusion_types"] = plots.confusion_png(
            report["types"]["confusion"], report["types"]["names"], "Fracture type"
        )
    op_name = (
        HIGH_SENSITIVITY
        if HIGH_SENSITIVITY in t["operating_points"]
        else next(iter(t["operating_points"]), "")
    )
    for g in SUBGROUPS:
        if report.get(g.key):
            png = plots.group_bars_png(report[g.key], f"By {g.label} (test)", op_name)
            if png:
                figs[g.key] = png
    return figs


# ----------------------------------------------------------------- the core
# The pipeline's own report and bundle carry no wall-clock time: they are DVC outputs,
# and the same seed and data must give the same bytes in any checkout. External
# validation (not a DVC output) records when it ran.
def _evaluate(
    outputs: CacheOutputs,
    test_df: pd.DataFrame,
    val_df: pd.DataFrame | None,
    *,
    n_bootstrap: int,
    ci_level: float,
    n_bins: int,
    targets: Mapping[str, float],
    gallery_size: int,
    gradcam_layer: str | None,
    seed: int,
    title: str,
    calibration_method: CalibrationMethod = "platt",
    generated_at: str | None = None,
    data_version: str,
    params_snapshot: Mapping[str, Any] | None,
    validation_summary: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, bytes], list[GalleryItem], ModelBundle, pd.DataFrame]:
    """Shared by the pipeline stage (refits on val) and external validation (``val_df`` None: no refit).

    ``outputs`` holds the network and the preprocessed rows the frames' ``cache_row`` points at.
    """
    predictor, images = outputs.predictor, outputs.images
    bundle = copy.copy(predictor.bundle)
    names = list(bundle.type_names)
    external = val_df is None
    cal_val = None
    val_ops: dict[str, dict[str, float | None]] = {}
    if not external:
        val = _with_predictions(
            val_df, predict_rows(outputs, val_df["cache_row"].to_numpy(), bundle), names
        )
        yv = val["label"].to_numpy()
        if yv.min() == yv.max():
            raise EvaluationError(
                "the validation split needs both fractured and normal images to fit the "
                f"calibration and thresholds (it has {int(yv.sum())} of {yv.size} fractured)"
            )
        calibration = fit_calibration(val["logit"].to_numpy(), yv, calibration_method)
        pv = calibration.probability(val["logit"].to_numpy())
        thresholds = choose_thresholds(pv, yv, targets[f"{HIGH_SENSITIVITY}"], targets["high_specificity"])
        bundle.calibration = calibration
        bundle.operating_points = thresholds
        cal_val = _calibration_stats(val["logit"].to_numpy(), yv, calibration, n_bins)
        for name, d in bundle.decide(pv).items():
            val_ops[name] = {
                "sensitivity": float(d[yv == 1].mean()),
                "specificity": float((~d[yv == 0]).mean()),
            }
    else:
        calibration, thresholds = bundle.calibration, dict(bundle.operating_points)
        if not thresholds:
            raise EvaluationError(
                "the model bundle has no operating points: evaluate it with the pipeline "
                "(run_evaluation) before external validation"
            )
        val_ops = {name: {"sensitivity": None, "specificity": None} for name in thresholds}

    test = _with_predictions(test_df, predict_rows(outputs, test_df["cache_row"].to_numpy(), bundle), names)
    numbers = assess(test, thresholds, calibration, n_bootstrap, ci_level, n_bins, seed, names)
    pp = bundle.preprocess_spec.model_dump(mode="json")
    report: dict[str, Any] = {
        "title": title,
        "generated_at": generated_at,
        "external": external,
        "seed": seed,
        "ci_level": ci_level,
        "data_version": data_version,
        "params": dict(params_snapshot or {}),
        "model": {
            "arch": bundle.arch,
            "spatial_dims": bundle.spatial_dims,
            "type_names": names,
            "image_size": pp["image_size"],
            "preprocess": pp,
            "preprocess_text": _preprocess_text(pp, bundle.spatial_dims),
            "git_commit": str(bundle.metadata.get("git_commit", "") or ""),
            "name": str(bundle.metadata.get("model_name") or bundle.metadata.get("name") or ""),
            "version": str(bundle.metadata.get("version") or bundle.metadata.get("model_version") or ""),
        },
        "splits": ({"val": _split_counts(val_df)} if val_df is not None else {})
        | {("external" if external else "test"): _split_counts(test_df)},
        "targets": dict(targets),
        "operating_points": dict(thresholds),
        "val_operating_points": val_ops,
        "calibration": {
            **calibration.describe(),
            "label": _calibration_label(calibration),
            "n_bins": n_bins,
            "val": cal_val,
            "test": numbers.pop("calibration_test"),
        },
        **numbers,
        "validation_summary": dict(validation_summary or {}),
        "limitations": DEFAULT_LIMITATIONS,
    }
    op_for_gallery = HIGH_SENSITIVITY if HIGH_SENSITIVITY in thresholds else next(iter(thresholds))
    decisions = bundle.decide(test["prob"].to_numpy())[op_for_gallery]
    gallery, info = explain(
        predictor.model,
        images,
        test,
        decisions,
        gallery_size,
        gradcam_layer,
        int(pp["image_size"]),
        bundle.spatial_dims,
        op_for_gallery,
    )
    report["localisation"] = info.pop("localisation", {"n": 0})
    report["explain"] = info
    report["summary_text"] = summary_text(report)
    report = _jsonable(report)
    figures = make_figures(report, test, n_bins)
    return report, figures, gallery, bundle, test


def headline_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Flat numbers for ``dvc metrics show`` and the bundle's ``metadata.metrics``."""
    t = report["test"]
    flat: dict[str, float] = {
        "n_test": t["n"],
        "prevalence": t["prevalence"],
        "brier": t["brier"],
        "ece": t["ece"],
        "temperature": report["calibration"]["temperature"],
        "calibration_intercept": report["calibration"]["intercept"],
        "ece_before_calibration": report["calibration"]["test"]["ece_before"],
    }
    for m in ("auroc", "auprc"):
        flat[m] = t[m]["value"]
        flat[f"{m}_ci_low"], flat[f"{m}_ci_high"] = t[m]["ci_low"], t[m]["ci_high"]
    for name, op in t["operating_points"].items():
        flat[f"{name}.threshold"] = op["threshold"]
        for k in ("sensitivity", "specificity", "ppv", "npv", "f1", "kappa", "balanced_accuracy"):
            flat[f"{name}.{k}"] = op[k]["value"]
        for k in ("sensitivity", "specificity"):
            flat[f"{name}.{k}_ci_low"], flat[f"{name}.{k}_ci_high"] = op[k]["ci_low"], op[k]["ci_high"]
    if report.get("study_level"):
        flat["study_auroc"] = report["study_level"]["auroc"]["value"]
    if report.get("types"):
        flat["type_macro_f1"] = report["types"]["macro_f1"]
    for sg in SUBGROUPS:
        for g, m in (report.get(sg.key) or {}).items():
            if m.get("auroc"):
                flat[f"{sg.column}.{g}.auroc"] = m["auroc"]["value"]
    loc = report.get("localisation") or {}
    if loc.get("n"):
        # gradcam_* for Grad-CAM, evidence_map_* for a network's own map (dense archs)
        main = next(m for m in (EVIDENCE, "gradcam") if m in loc)
        flat[f"{main}_pointing_hit_rate"] = loc[main]["pointing_hit_rate"]
        flat[f"{main}_energy_in_box"] = loc[main]["energy_in_box"]
        base = loc[main]["baseline_box_area_share"]
        if base:
            flat[f"{main}_energy_vs_uniform"] = loc[main]["energy_in_box"] / base
    return flat_summary(flat)


def _write_outputs(
    report: dict[str, Any],
    figures: Mapping[str, bytes],
    gallery: list[GalleryItem],
    test_df: pd.DataFrame,
    reports_dir: Path,
    plots_dir: Path,
    metrics_json: Path,
    n_bins: int,
) -> None:
    reports_dir, plots_dir = Path(reports_dir), Path(plots_dir)
    for name, png in figures.items():
        plots.save_png(png, reports_dir / f"{name}.png")
    for k, item in enumerate(gallery):
        plots.save_png(item.png, reports_dir / "gradcam" / f"{item.category}_{k:02d}.png")
    plots.write_dvc_plot_data(
        plots_dir,
        test_df["label"].to_numpy(),
        test_df["prob"].to_numpy(),
        test_df["raw_prob"].to_numpy(),
        report["operating_points"],
        n_bins,
    )
    atomic_write_text(
        Path(metrics_json), json.dumps(headline_metrics(report), indent=2, sort_keys=True) + "\n"
    )
    atomic_write_text(reports_dir / "report.html", render_report_html(report, figures, gallery))
    atomic_write_text(reports_dir / "report.json", json.dumps(report, indent=1, default=str) + "\n")


# ----------------------------------------------------------- entry points
def run_evaluation(
    model_path: Path,
    cache_dir: Path,
    out_model_path: Path,
    reports_dir: Path,
    metrics_json: Path,
    plots_dir: Path,
    params: EvaluateParams,
    validation_summary: Path | None,
    params_snapshot: dict[str, Any],
    data_version: str,
    seed: int,
    model_card_path: Path | None = None,
    outputs: CacheOutputs | None = None,
) -> dict[str, Any]:
    """The evaluate stage (see module docstring). Returns the report dict.

    ``outputs``: the network's outputs on the cache's rows, shared with the stage's drift and
    OOD references so no row is passed through the network twice (made here when not given;
    it must hold the model at ``model_path``'s network and the cache at ``cache_dir``).

    Writes the calibrated bundle (``out_model_path``), the flat metrics JSON, the
    DVC plot CSVs (``plots_dir``), PNGs + ``report.html`` + ``report.json``
    (``reports_dir``) and the model card (``model_card_path``, default
    ``MODEL_CARD.md`` next to the model).
    """
    from bonefrac.preprocess.cache import load_cache

    bundle = ModelBundle.load(model_path)
    images, index = load_cache(Path(cache_dir))
    if "split" not in index.columns:
        raise EvaluationError(f"{cache_dir}: the cache index has no 'split' column")
    val_df, test_df = index[index["split"] == "val"], index[index["split"] == "test"]
    for name, df in (("val", val_df), ("test", test_df)):
        if df.empty:
            raise EvaluationError(f"{cache_dir}: the {name} split is empty")
    summary = None
    if validation_summary is not None and Path(validation_summary).exists():
        summary = json.loads(Path(validation_summary).read_text())
    torch.manual_seed(seed)
    if outputs is None:
        outputs = CacheOutputs(Predictor(bundle), images)
    outputs.check_network(bundle)
    op = params.operating_points
    report, figures, gallery, calibrated, test = _evaluate(
        outputs,
        test_df,
        val_df,
        n_bootstrap=params.bootstrap_samples,
        ci_level=params.ci_level,
        n_bins=params.ece_bins,
        targets={
            "high_sensitivity": op.high_sensitivity_target,
            "high_specificity": op.high_specificity_target,
        },
        gallery_size=params.gradcam_gallery,
        gradcam_layer=params.gradcam_layer,
        seed=seed,
        title="Fracture detection: evaluation report",
        calibration_method=params.calibration,
        data_version=data_version,
        params_snapshot=params_snapshot,
        validation_summary=summary,
    )
    report["data"] = _data_facts(index, params_snapshot)
    calibrated.metadata = {
        **dict(calibrated.metadata),
        "data_version": data_version,
        "metrics": headline_metrics(report),
        "evaluation": {
            "data_version": data_version,
            "targets": report["targets"],
        },
    }
    _write_outputs(
        report,
        figures,
        gallery,
        test,
        Path(reports_dir),
        Path(plots_dir),
        Path(metrics_json),
        params.ece_bins,
    )
    calibrated.save(out_model_path)
    card = Path(model_card_path) if model_card_path else Path(out_model_path).parent / "MODEL_CARD.md"
    # A relative link: the card must read the same (and hash the same) in any checkout.
    write_model_card(card, report, report_path=os.path.relpath(Path(reports_dir) / "report.html", card.parent))
    t = report["test"]
    log.info(
        "evaluate: test AUROC %.3f (%.3f–%.3f), calibration %s, thresholds %s",
        t["auroc"]["value"],
        t["auroc"]["ci_low"],
        t["auroc"]["ci_high"],
        report["calibration"]["label"],
        {k: round(v, 4) for k, v in report["operating_points"].items()},
    )
    return report


def evaluate_external(
    model_path: Path,
    data: Path | pd.DataFrame,
    out_dir: Path,
    *,
    split: str | None = None,
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    n_bins: int = 10,
    gradcam_gallery: int = 6,
    gradcam_layer: str | None = None,
    seed: int = 0,
    data_version: str = "",
    title: str = "Fracture detection: external validation",
) -> dict[str, Any]:
    """Score a model on data it never saw, with its *stored* calibration and thresholds (no refit).

    ``data`` is a preprocessed cache folder (all rows, or those of ``split``) or
    a DataFrame with an ``array`` column of decoded images (stored units) plus
    ``label`` (and optionally ``body_part``, ``view``, ``study_id``, ``boxes``,
    ``width``, ``height``, ``fracture_type``, ``image_id``), which goes through
    the Predictor's own preprocessing. Writes ``report.html``, ``report.json``,
    ``metrics.json``, PNGs and ``plots/*.csv`` under ``out_dir``.
    """
    bundle = ModelBundle.load(model_path)
    predictor = Predictor(bundle)
    if isinstance(data, pd.DataFrame):
        for col in ("array", "label"):
            if col not in data.columns:
                raise EvaluationError(f"external data frame needs an {col!r} column")
        images = torch.stack([predictor.preprocess(a) for a in data["array"]]).numpy()
        index = data.drop(columns=["array"]).reset_index(drop=True).assign(cache_row=np.arange(len(data)))
        if "height" not in index.columns:  # boxes are in the decoded array's pixels
            index["height"] = [np.asarray(a).shape[-2] for a in data["array"]]
            index["width"] = [np.asarray(a).shape[-1] for a in data["array"]]
    else:
        from bonefrac.preprocess.cache import load_cache

        images, index = load_cache(Path(data))
        if split is not None:
            index = index[index["split"] == split]
    if index.empty:
        raise EvaluationError("no external images to evaluate")
    report, figures, gallery, _, test = _evaluate(
        CacheOutputs(predictor, images),
        index,
        None,
        n_bootstrap=n_bootstrap,
        ci_level=ci_level,
        n_bins=n_bins,
        targets=dict(bundle.metadata.get("evaluation", {}).get("targets", {})),
        gallery_size=gradcam_gallery,
        gradcam_layer=gradcam_layer,
        seed=seed,
        title=title,
        data_version=data_version,
        generated_at=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        params_snapshot=None,
        validation_summary=None,
    )
    out_dir = Path(out_dir)
    _write_outputs(
        report, figures, gallery, test, out_dir, out_dir / "plots", out_dir / "metrics.json", n_bins
    )
    return report
