"""Where does the evidence map's peak land when it misses the radiologist's box?

The pointing game counts a hit when the map's peak lies inside a box. This scores a finished
run's served bundle (``models/model.pt``) on the boxed fractured images of its own test split
with the map every user sees (:func:`bonefrac.explain.display.compute_cam`: the sigmoid of the
model's logit map, upsampled to the input), and sorts each peak by its distance to the nearest
box: a hit, a near miss (≤ 8 px: half a stride-16 cell at 512 px), 8–24 px, or far. For the
misses it also reports the box's hottest value as a share of the peak: near 1 means the box
sits on the same plateau as the peak (a localisation-precision miss), near 0 a different place.

    python -m benchmarks.pointing_misses --run /path/to/fracatlas/run [--bundle other.pt] [--result out.json]

``--bundle`` scores another bundle of the same preprocessing on that run's test split (e.g. the
previous preset's model, to compare two models on identical images).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._runs import boxed_fractures
from bonefrac.config import load_params
from bonefrac.explain.display import compute_cam
from bonefrac.explain.localisation import box_mask, pointing_game
from bonefrac.model.bundle import ModelBundle

#: Distance classes (px at the model's input), upper bounds inclusive.
CLASSES = (("hit", 0.0), ("within_8px", 8.0), ("8_to_24px", 24.0), ("far", float("inf")))


def peak_distance(cam: np.ndarray, boxes: list[list[float]]) -> float:
    """Distance (px) from the map's peak (pixel centre) to the nearest box; 0 inside a box."""
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    px, py = x + 0.5, y + 0.5
    return min(
        float(np.hypot(max(bx - px, 0.0, px - bx - bw), max(by - py, 0.0, py - by - bh)))
        for bx, by, bw, bh in (b[:4] for b in boxes)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished FracAtlas run (its clone's root)")
    ap.add_argument("--bundle", type=Path, default=None, help="score this bundle instead of the run's own")
    ap.add_argument("--result", type=Path, default=None, help="write the result JSON here")
    args = ap.parse_args()
    params = load_params(args.run / "params.yaml")
    torch.set_num_threads(params.train.threads or torch.get_num_threads())
    bundle = ModelBundle.load(args.bundle or args.run / "models" / "model.pt")
    net = bundle.build_model().eval()
    size = bundle.preprocess_spec.image_size
    start = time.perf_counter()
    rows = []
    for x, boxes in boxed_fractures(args.run, "test", size):
        with torch.no_grad():
            cam = compute_cam(net, x)[0]
        d = peak_distance(cam, boxes)
        assert (d == 0.0) == pointing_game(cam, boxes)  # the same rule as the evaluation's pointing game
        rows.append({"dist": d, "in_box_max_over_peak": float(cam[box_mask(cam.shape, boxes)].max() / cam.max())})
    dist = np.array([r["dist"] for r in rows])
    share = np.array([r["in_box_max_over_peak"] for r in rows])
    counts, lo = {}, -1.0
    for name, hi in CLASSES:
        counts[name] = int(((dist > lo) & (dist <= hi)).sum()) if name != "hit" else int((dist == 0).sum())
        lo = hi
    result = {
        "run": str(args.run),
        "bundle": str(args.bundle or "models/model.pt"),
        "arch": bundle.arch,
        "box_profile": bundle.metadata.get("params", {}).get("train", {}).get("dense", {}).get("box_profile", "area"),
        "seconds": round(time.perf_counter() - start, 1),
        "n_boxed": len(rows),
        "pointing": float(np.mean(dist == 0)) if rows else float("nan"),
        "counts": counts,
        "shares": {k: round(v / max(len(rows), 1), 4) for k, v in counts.items()},
        "misses_in_box_max_over_peak_median": float(np.median(share[dist > 0])) if (dist > 0).any() else None,
    }
    print(json.dumps(result, indent=2))
    if args.result:
        args.result.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
