"""Does the heatmap point at the fracture? Scores against expert boxes.

Two standard measures: the pointing game (Zhang et al. 2018: is the heatmap's
maximum inside a box?) and the share of heatmap energy inside the boxes
(Score-CAM's "energy-based pointing game"). Each comes with the score a
know-nothing heatmap would get (pointing at the image centre; a uniform map's
energy share = the boxes' area share), so a reader can tell skill from luck.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The box format and its mapping onto the network's input live with the model contract (training uses them too).
from bonefrac.model.boxes import Box, BoxError, map_boxes_to_cache, parse_boxes

__all__ = [
    "Box", "BoxError", "box_mask", "energy_in_boxes", "localisation_summary", "map_boxes_to_cache",
    "parse_boxes", "pointing_game",
]


def box_mask(shape: tuple[int, int], boxes: Sequence[Box]) -> np.ndarray:
    """Boolean (H, W) mask of the union of the boxes (pixel centres inside a box)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = yy + 0.5, xx + 0.5
    mask = np.zeros(shape, dtype=bool)
    for x, y, bw, bh in (b[:4] for b in boxes):
        mask |= (cx >= x) & (cx <= x + bw) & (cy >= y) & (cy <= y + bh)
    return mask


def _as_2d(cam: np.ndarray) -> np.ndarray:
    c = np.asarray(cam, dtype=np.float64).squeeze()
    if c.ndim != 2:
        raise BoxError(f"box scores are defined for 2D heatmaps, got shape {c.shape}")
    return c


def pointing_game(cam: np.ndarray, boxes: Sequence[Box], tolerance: float = 0.0) -> bool:
    """True when the heatmap's maximum lies inside a box (grown by ``tolerance`` pixels)."""
    c = _as_2d(cam)
    if not boxes:
        raise BoxError("the pointing game needs at least one box")
    y, x = np.unravel_index(int(np.argmax(c)), c.shape)
    px, py = x + 0.5, y + 0.5
    return any(
        bx - tolerance <= px <= bx + bw + tolerance and by - tolerance <= py <= by + bh + tolerance
        for bx, by, bw, bh in (b[:4] for b in boxes)
    )


def energy_in_boxes(cam: np.ndarray, boxes: Sequence[Box]) -> float:
    """Share of the (non-negative) heatmap's total inside the union of the boxes; NaN for an empty map."""
    c = np.clip(_as_2d(cam), 0.0, None)
    total = c.sum()
    if total <= 0:
        return float("nan")
    return float(c[box_mask(c.shape, boxes)].sum() / total)


def localisation_summary(
    cams: Sequence[np.ndarray], boxes: Sequence[Sequence[Box]], tolerance: float = 0.0
) -> dict[str, float | int]:
    """Pointing-game hit rate and mean energy-in-box over images that have boxes, with baselines."""
    hits, energy, centre_hits, area = [], [], [], []
    for cam, bxs in zip(cams, boxes, strict=True):
        if not bxs:
            continue
        c = _as_2d(cam)
        hits.append(pointing_game(c, bxs, tolerance))
        e = energy_in_boxes(c, bxs)
        if np.isfinite(e):
            energy.append(e)
        centre = np.zeros_like(c)
        centre[c.shape[0] // 2, c.shape[1] // 2] = 1.0
        centre_hits.append(pointing_game(centre, bxs, tolerance))
        area.append(float(box_mask(c.shape, bxs).mean()))
    n = len(hits)
    nan = float("nan")
    return {
        "n": n,
        "pointing_hit_rate": float(np.mean(hits)) if n else nan,
        "energy_in_box": float(np.mean(energy)) if energy else nan,
        "baseline_centre_hit_rate": float(np.mean(centre_hits)) if n else nan,
        "baseline_box_area_share": float(np.mean(area)) if n else nan,
    }
