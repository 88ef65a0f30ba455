"""Which epoch should the FracAtlas head keep? Checkpoint-selection rules scored from a per-epoch CV.

The head keeps the epoch with the best validation AUROC (``train_head``). That choice is made on
~420 validation images and looks at the image score only; the evidence map may be better (or worse)
at another epoch. This reads a ``fracatlas_dense.py --stage cv --per-epoch`` result (each fold's
per-epoch validation AUROC, flip-TTA pointing on validation and test, and test AUROC) and scores
each rule by what it would have picked on each fold: no retraining, no look at the test split in
the choice (the rules read validation numbers only; the test numbers are what they are scored by).

    python -m benchmarks.epoch_selection --cv /tmp/fd/per_epoch_cv.json [--variant NAME] [--result out.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

Rule = Callable[[list[dict]], int]


def _argmax(values: list[float]) -> int:
    """Index of the first maximum (ties keep the earlier epoch, as ``train_head`` does)."""
    return int(np.argmax(values))


#: Each rule maps a fold's history (one dict per epoch) to the index of the epoch it keeps.
RULES: dict[str, Rule] = {
    "best_val_auroc (the preset)": lambda h: _argmax([e["val_auroc"] for e in h]),
    "last_epoch": lambda h: len(h) - 1,
    "best_val_pointing": lambda h: _argmax([e["val_pointing_tta"] for e in h]),
    "best_val_auroc_plus_pointing": lambda h: _argmax([e["val_auroc"] + e["val_pointing_tta"] for e in h]),
    "best_val_auroc_second_half": lambda h: len(h) // 2 + _argmax([e["val_auroc"] for e in h[len(h) // 2 :]]),
}


def score_rules(histories: list[list[dict]]) -> dict[str, dict]:
    """Per rule: the epoch it keeps on each fold, and that epoch's test pointing and AUROC (mean ± sd)."""
    out = {}
    for name, rule in RULES.items():
        picks = [rule(h) for h in histories]
        pointing = [h[i]["test_pointing_tta"] for h, i in zip(histories, picks, strict=True)]
        auroc = [h[i]["test_auroc"] for h, i in zip(histories, picks, strict=True)]
        out[name] = {
            "epochs": [i + 1 for i in picks],
            "test_pointing_tta": [round(p, 3) for p in pointing],
            "test_auroc": [round(a, 3) for a in auroc],
            "pointing_mean_sd": [round(float(np.mean(pointing)), 3), round(float(np.std(pointing)), 3)],
            "auroc_mean_sd": [round(float(np.mean(auroc)), 3), round(float(np.std(auroc)), 3)],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cv", type=Path, required=True, help="a --per-epoch CV result (fracatlas_dense.py)")
    ap.add_argument("--variant", default="dense_lse_box_b6_bw3_grow0")
    ap.add_argument("--result", type=Path, default=None)
    args = ap.parse_args()
    cv = json.loads(args.cv.read_text())
    rows = [r for r in cv["rows"] if r["variant"] == args.variant]
    if not rows and cv.get("in_progress", {}).get("variant") == args.variant:
        rows = [cv["in_progress"]]  # a run stopped mid-variant: the folds it finished
    if not rows:
        raise SystemExit(f"{args.cv}: no per-fold results for {args.variant}")
    histories = [f["history"] for f in rows[0]["folds"]]
    result = {"cv": args.cv.name, "variant": args.variant, "folds": len(histories), "rules": score_rules(histories)}
    for name, r in result["rules"].items():
        print(f"{name:32s} epochs {r['epochs']}  pointing {r['pointing_mean_sd']} {r['test_pointing_tta']}  "
              f"AUROC {r['auroc_mean_sd']}")
    if args.result:
        args.result.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
