"""One training of a sweep on an already preprocessed cache: test fracture AUROC and type macro-F1.

Why: a lever of the fracture-type head (issue 14) costs one training; running the whole
`dvc repro` per lever would regenerate and re-validate the same images each time. So the
data are prepared once (`dvc repro preprocess` in a scratch clone with the preset's params)
and each lever is one call of the library's ``train_model`` with params overrides, scored on
the cache's test split (plain forward pass, no TTA; the type is the argmax of the type logits
of the fractured test images, as the evaluate stage reports it).

    python benchmarks/phantom_types_sweep.py NAME CACHE_DIR '{"train": {"epochs": 12}}' \\
        --params params.yaml --out /tmp/sweep

One line of JSON per run is appended to ``OUT/results.jsonl`` (per-epoch val AUROC and
val type macro-F1 included, so "would more epochs help" can be read off).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

from bonefrac.config import Params, load_params
from bonefrac.data.schema import FRACTURE_TYPES_PHANTOM
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.calibrate import sigmoid
from bonefrac.preprocess.cache import load_cache
from bonefrac.training.loop import train_model


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def run(name: str, cache: Path, overrides: dict[str, Any], params: Path, out: Path) -> dict[str, Any]:
    p = load_params(params)
    p = Params.model_validate(_merge(p.model_dump(), overrides))
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    names = sorted(FRACTURE_TYPES_PHANTOM)
    torch.set_num_threads(1)
    t0 = time.time()
    res = train_model(cache, run_dir, p.model, p.train.model_copy(update={"threads": 1}), 2, names, seed=p.seed,
                      resume=False)
    wall = time.time() - t0
    images, index = load_cache(cache)
    test = index[index["split"] == "test"]
    model = ModelBundle.load(res.best_model_path).build_model().eval()
    rows = test["cache_row"].to_numpy()
    with torch.no_grad():
        logits = np.concatenate([
            model(torch.from_numpy(np.asarray(images[rows[i : i + 64]], dtype=np.float32))).numpy()
            for i in range(0, len(rows), 64)
        ])
    y = test["label"].to_numpy().astype(int)
    fx = y == 1
    truth = test["fracture_type"].to_numpy()[fx]
    result: dict[str, Any] = {
        "name": name, "over": overrides, "wall_s": round(wall), "best_epoch": res.best_epoch,
        "test_auroc": round(float(roc_auc_score(y, sigmoid(logits[:, 0]))), 4), "n_test": len(y),
    }
    if logits.shape[1] > 1:
        pred = np.array(names)[logits[fx, 1:].argmax(1)]
        result.update({
            "test_type_f1": round(float(f1_score(truth, pred, labels=names, average="macro", zero_division=0.0)), 4),
            "per_type": {n: int((truth == n).sum()) for n in names},
            "confusion": confusion_matrix(truth, pred, labels=names).tolist(),
        })
    result["history"] = [
        (h["epoch"], round(h["val/auroc"], 3), round(h.get("val/type_macro_f1", float("nan")), 3)) for h in res.history
    ]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("cache", type=Path, help="a preprocessed cache (images.npy + index.csv)")
    ap.add_argument("overrides", nargs="?", default="{}", help="params overrides as JSON")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/phantom_types_sweep"))
    a = ap.parse_args()
    print(json.dumps(run(a.name, a.cache, json.loads(a.overrides), a.params, a.out)))


if __name__ == "__main__":
    main()
