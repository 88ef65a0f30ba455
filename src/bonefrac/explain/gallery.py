"""The Grad-CAM gallery: where the model looked on its most telling hits and misses.

Per category (true positives, false positives, false negatives) the most
confident cases are shown: the highest-scored fractures found, the
highest-scored normal images flagged, and the lowest-scored fractures missed.
Each tile shows the image, its Grad-CAM and its Grad-CAM++ side by side, with
the expert boxes (when known) outlined in green, and the fracture outlines traced inside them in gold.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from bonefrac.explain.overlay import draw_boxes, draw_outlines, overlay, pick_slice, to_rgb

CATEGORIES = {
    "true_positive": "True positives: fractures found",
    "false_positive": "False positives: normal images flagged",
    "false_negative": "False negatives: fractures missed",
}


@dataclass
class GalleryItem:
    category: str
    image_id: str
    prob: float
    png: bytes
    caption: dict[str, str] = field(default_factory=dict)
    pointing_hit: bool | None = None
    energy_in_box: float | None = None


def select_cases(
    labels: np.ndarray, probs: np.ndarray, decisions: np.ndarray, k: int
) -> dict[str, np.ndarray]:
    """Indices of the ``k`` most telling TP, FP and FN cases (see module docstring)."""
    y = np.asarray(labels).astype(bool)
    p = np.asarray(probs, dtype=np.float64)
    d = np.asarray(decisions).astype(bool)
    tp, fp, fn = np.flatnonzero(y & d), np.flatnonzero(~y & d), np.flatnonzero(y & ~d)
    return {
        "true_positive": tp[np.argsort(-p[tp], kind="stable")][:k],
        "false_positive": fp[np.argsort(-p[fp], kind="stable")][:k],
        "false_negative": fn[np.argsort(p[fn], kind="stable")][:k],
    }


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def tile(
    image: np.ndarray,
    cam: np.ndarray,
    cam_pp: np.ndarray | None = None,
    boxes: Sequence[Sequence[float]] = (),
    panel_px: int = 192,
    outlines: Sequence[Sequence[Sequence[float]]] = (),
) -> np.ndarray:
    """(image | Grad-CAM | Grad-CAM++) as one RGB strip; volumes at the slice of peak heatmap energy.

    ``boxes`` (green) and each box's ``outlines`` (its polygons, gold; :func:`bonefrac.model.boxes.row_outlines`)
    are the expert's, in the image's pixels: the map is read against the traced fracture, not only its box."""
    img = np.asarray(image, dtype=np.float64).squeeze()
    c = np.asarray(cam, dtype=np.float64).squeeze()
    cpp = None if cam_pp is None else np.asarray(cam_pp, dtype=np.float64).squeeze()
    if img.ndim == 3:
        z = pick_slice(img, c)
        img, c = img[z], c[z]
        cpp = None if cpp is None else cpp[z]
        boxes, outlines = (), ()  # expert boxes are 2D
    panels = [to_rgb(img), overlay(img, c)] + ([overlay(img, cpp)] if cpp is not None else [])
    scale = panel_px / max(img.shape)
    size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
    big = [np.asarray(Image.fromarray(p).resize(size, Image.Resampling.BILINEAR)) for p in panels]
    if boxes:  # drawn after upscaling so the outline stays a crisp 2 px
        scaled = [[v * scale for v in b[:4]] for b in boxes]
        big = [draw_boxes(p, scaled, width=2) for p in big]
    polygons = [[v * scale for v in poly] for outline in outlines for poly in outline]
    if polygons:
        big = [draw_outlines(p, polygons, width=2) for p in big]
    gap = np.full((size[1], 4, 3), 255, dtype=np.uint8)
    strip: list[np.ndarray] = []
    for i, p in enumerate(big):
        strip += ([gap] if i else []) + [p]
    return np.concatenate(strip, axis=1)
