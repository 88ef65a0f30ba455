"""Does any map-side change move the pointing game of a trained model? (issue 14, round 13)

The pointing goal (0.50) is the last unmet point of the FracAtlas preset. The cheapest levers
are on the map alone: they need no retraining and leave the image logit, calibration and
operating points untouched. This scores a finished run's bundle on the boxed fractured
images of one of its own splits — **validation by default**, so no choice is made on test —
with the map every user sees (:func:`bonefrac.explain.display.compute_cam`) and with each
variant below, and compares each variant with the preset's map image by image (wins, losses,
and the exact two-sided sign-test p-value on the images where they disagree):

- ``cells16``: the unstitched stride-16 map (the preset before round 12);
- ``stitch8``: the preset's shift-and-stitch map (4 shifts of ±4 px, stride 8);
- ``stitch4``: the same sampling on a grid four times as fine (16 shifts of ±2/±6 px, stride 4);
- ``scale<S>``: the preset's map of the input resized to S px, resized back (S = 448, 576, 640);
- ``stitch8+scale<S>``: the mean of the preset's probability map and the scale-S one.

    python -m benchmarks.map_variants --run /path/to/fracatlas/run [--split val] [--result out.json]

Round 12 ruled out two other map-side changes on the same split with scratch scripts (a
constant offset of the map, Gaussian smoothing before the peak): BENCHMARKS.md, "Round 12".
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import binomtest

from benchmarks._runs import boxed_fractures
from bonefrac.config import load_params
from bonefrac.explain.display import compute_cam
from bonefrac.explain.localisation import pointing_game
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.calibrate import sigmoid
from bonefrac.model.dense import DenseFractureNet, shift_image

SCALES = (448, 576, 640)
PRESET = "stitch8"


def stitch_offsets(stride: int, k: int) -> tuple[int, ...]:
    """Content shifts (px) whose stride-``stride`` maps sample fine-grid position ``j`` of ``k`` per cell.

    Moving the content by ``+s`` lets a cell centred at ``stride·(i + ½)`` see the content at
    ``stride·i + stride/2 − s``; fine position ``j`` is centred at ``stride·i + (stride/k)·(j + ½)``,
    so ``s_j = stride/2 − (stride/k)·(j + ½)``. ``k = 2`` gives (+4, −4) at stride 16, the
    shifts of :func:`bonefrac.model.dense.stitch_shifts`.
    """
    if stride % (2 * k):
        raise ValueError(f"a stride-{stride} map cannot be stitched {k} to a cell on whole pixels")
    return tuple(stride // 2 - (stride // k) * j - stride // (2 * k) for j in range(k))


def stitch_grid(cell_map: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, stride: int, k: int) -> torch.Tensor:
    """``cell_map``'s ``(N, 1, h, w)`` stride-``stride`` map sampled on a grid ``k`` times as fine
    (``k²`` shifted passes, interleaved) → ``(N, 1, k·h, k·w)``."""
    offsets = stitch_offsets(stride, k)
    fine: torch.Tensor | None = None
    for a, dy in enumerate(offsets):
        for b, dx in enumerate(offsets):
            m = cell_map(shift_image(x, dy, dx))
            if fine is None:
                fine = m.new_zeros(*m.shape[:2], k * m.shape[-2], k * m.shape[-1])
            fine[..., a::k, b::k] = m
    assert fine is not None
    return fine


def _probability(logit_map: torch.Tensor, size: int) -> np.ndarray:
    """The displayed map's rule (:func:`bonefrac.explain.heatmaps.evidence_heatmaps`): the project's one
    sigmoid, then bilinear upsampling to the input."""
    p = torch.from_numpy(sigmoid(logit_map.float().numpy()).astype(np.float32))
    return F.interpolate(p, size=(size, size), mode="bilinear", align_corners=False)[0, 0].clamp(0.0, 1.0).numpy()


def variant_maps(net: DenseFractureNet, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Every variant's ``(H, W)`` probability map of one preprocessed image ``x`` ``(1, 1, H, W)``."""
    size = x.shape[-1]

    def cells(inp: torch.Tensor) -> torch.Tensor:  # the unstitched (flip-TTA) logit map
        return net._outputs(inp)[1]

    maps = {
        "cells16": _probability(cells(x), size),
        PRESET: compute_cam(net, x)[0],
        "stitch4": _probability(stitch_grid(cells, x, 16, 4), size),
    }
    for s in SCALES:
        xs = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=s < size)
        maps[f"scale{s}"] = _probability(net.evidence_map(xs), size)
        maps[f"{PRESET}+scale{s}"] = (maps[PRESET] + maps[f"scale{s}"]) / 2
    return maps


def compare(hits: dict[str, list[bool]], base: str = PRESET) -> dict[str, dict[str, float | int]]:
    """Per variant: hits, rate, and against ``base`` image by image: wins, losses, sign-test p."""
    ref = np.asarray(hits[base])
    out = {}
    for name, h in hits.items():
        a = np.asarray(h)
        wins, losses = int((a & ~ref).sum()), int((~a & ref).sum())
        p = binomtest(wins, wins + losses).pvalue if wins + losses else 1.0
        out[name] = {"hits": int(a.sum()), "n": len(a), "rate": round(float(a.mean()), 4),
                     "wins": wins, "losses": losses, "sign_test_p": round(float(p), 4)}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished FracAtlas run (its clone's root)")
    ap.add_argument("--split", default="val", choices=["val", "test", "train"])
    ap.add_argument("--result", type=Path, default=None, help="write the result JSON here")
    args = ap.parse_args()
    params = load_params(args.run / "params.yaml")
    torch.set_num_threads(params.train.threads or torch.get_num_threads())
    bundle = ModelBundle.load(args.run / "models" / "model.pt")
    net = bundle.build_model().eval()
    if not (isinstance(net, DenseFractureNet) and net.stitch):
        raise SystemExit(f"{bundle.arch}: the variants are of a shift-and-stitch dense arch's map")
    size = bundle.preprocess_spec.image_size
    hits: dict[str, list[bool]] = {}
    start = time.perf_counter()
    for x, boxes in boxed_fractures(args.run, args.split, size):
        with torch.no_grad():
            maps = variant_maps(net, x)
        for name, m in maps.items():
            hits.setdefault(name, []).append(bool(pointing_game(m, boxes)))
    result = {
        "run": str(args.run),
        "arch": bundle.arch,
        "split": args.split,
        "seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "variants": compare(hits),
    }
    print(json.dumps(result, indent=2))
    if args.result:
        args.result.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
