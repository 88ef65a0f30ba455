"""Shortcut check: does the FracAtlas model score metal hardware instead of fractures?

FracAtlas marks every image showing orthopaedic hardware (plates, screws, nails: the index's
``hardware`` column). Hardware is far more common on fractured images, so a model could rank
"has metal" above "normal" and look skilled. This scores a finished run's served bundle
(``models/model.pt``: its calibration and operating points) on its own test split and reports
the AUROC of the hardware flag alone, and the model's metrics within each hardware group
(:func:`bonefrac.evaluation.metrics.grouped_metrics`, the evaluation's own subgroup code, with
bootstrap CIs). A model that only read hardware would fall to ~0.5 within the groups.

    python -m benchmarks.hardware_shortcut --run /path/to/fracatlas/run [--result out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

from bonefrac.config import load_params
from bonefrac.evaluation.metrics import grouped_metrics
from bonefrac.inference.cache_outputs import CacheOutputs
from bonefrac.inference.predictor import Predictor
from bonefrac.model.bundle import ModelBundle
from bonefrac.preprocess.cache import load_cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished FracAtlas run (its clone's root)")
    ap.add_argument("--result", type=Path, default=None, help="write the result JSON here")
    args = ap.parse_args()
    params = load_params(args.run / "params.yaml")
    torch.set_num_threads(params.train.threads or torch.get_num_threads())
    bundle = ModelBundle.load(args.run / "models" / "model.pt")
    images, index = load_cache(args.run / "data" / "processed")
    test = index[(index["split"] == "test") & index["label"].isin([0, 1])].reset_index(drop=True)
    start = time.perf_counter()
    logits = CacheOutputs(Predictor(bundle), images).logits(test["cache_row"].to_numpy())
    df = test.assign(prob=bundle.calibrate(logits).prob, label=test["label"].astype(int))
    df["hardware"] = df["hardware"].astype(int).map({0: "no hardware", 1: "hardware"})
    result = {
        "run": str(args.run),
        "arch": bundle.arch,
        "seconds": round(time.perf_counter() - start, 1),
        "n_test": len(df),
        "auroc_model": float(roc_auc_score(df["label"], df["prob"])),
        "auroc_hardware_flag_alone": float(roc_auc_score(df["label"], df["hardware"] == "hardware")),
        "fracture_rate_by_group": df.groupby("hardware")["label"].mean().round(4).to_dict(),
        "by_hardware": grouped_metrics(df, "hardware", bundle.operating_points, seed=params.seed),
        # a group of one class has no AUROC: how many of its images each operating point flags
        "flagged_by_group": {
            group: {name: round(float((sub["prob"] >= t).mean()), 4) for name, t in bundle.operating_points.items()}
            for group, sub in df[df["label"] == 1].groupby("hardware")
        },
    }
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    if args.result is not None:
        args.result.write_text(text)
    summary = {g: (m.get("n"), m.get("n_positive"), m.get("auroc")) for g, m in result["by_hardware"].items()}
    print(json.dumps({k: result[k] for k in ("auroc_model", "auroc_hardware_flag_alone", "fracture_rate_by_group")}))
    print(json.dumps(summary))
    print("fractured images flagged, by group:", json.dumps(result["flagged_by_group"]))


if __name__ == "__main__":
    main()
