"""The flip-TTA lever on a pipeline run's own split: its trained network scored without the mirror.

A TTA arch (``*_dense_tta``) has the same weights as its plain dense arch; only the forward pass
differs (image and mirror averaged). This rescoring loads the run's trained bundle
(``models/train/best_model.pt``), swaps the arch for the plain one, and runs the evaluate stage's
own :func:`bonefrac.evaluation.evaluate.run_evaluation` on the run's cache (Platt scaling and
operating points refitted on the same validation split), so the two rows of BENCHMARKS.md's
pipeline-split lever table differ by the mirror alone. Outputs go to ``--out`` (report, metrics).

    python -m benchmarks.score_without_tta --run /path/to/fracatlas/run --out /tmp/notta
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bonefrac.config import load_params
from bonefrac.evaluation.evaluate import run_evaluation
from bonefrac.model.bundle import ModelBundle

TTA_SUFFIX = "_tta"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished FracAtlas run (its clone's root)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--result", type=Path, default=None, help="also write the metrics JSON here")
    args = ap.parse_args()
    params = load_params(args.run / "params.yaml")
    torch.set_num_threads(params.train.threads or torch.get_num_threads())
    bundle = ModelBundle.load(args.run / "models" / "train" / "best_model.pt")
    if not bundle.arch.endswith(TTA_SUFFIX):
        raise SystemExit(f"{bundle.arch} has no flip TTA to take away")
    bundle.arch = bundle.arch.removesuffix(TTA_SUFFIX)
    args.out.mkdir(parents=True, exist_ok=True)
    bundle.save(args.out / "best_model.pt")
    start = time.perf_counter()
    run_evaluation(
        model_path=args.out / "best_model.pt",
        cache_dir=args.run / "data" / "processed",
        out_model_path=args.out / "model.pt",
        reports_dir=args.out / "reports",
        metrics_json=args.out / "evaluate.json",
        plots_dir=args.out / "plots",
        params=params.evaluate,
        validation_summary=None,
        params_snapshot=params.model_dump(mode="json"),
        data_version="",
        seed=params.seed,
    )
    metrics = json.loads((args.out / "evaluate.json").read_text())
    result = {"arch": bundle.arch, "run": str(args.run), "seconds": round(time.perf_counter() - start, 1), **metrics}
    if args.result is not None:
        args.result.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(json.dumps({k: result[k] for k in ("arch", "seconds", "auroc", "ece", "evidence_map_pointing_hit_rate")}))


if __name__ == "__main__":
    main()
