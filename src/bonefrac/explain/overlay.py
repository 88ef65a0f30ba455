"""Heatmap overlays a reader can look at: grayscale image + coloured CAM + expert boxes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    return np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)


def pick_slice(volume: np.ndarray, cam: np.ndarray) -> int:
    """For a volume (D, H, W): the slice where the heatmap carries the most energy."""
    return int(np.argmax(np.asarray(cam, dtype=np.float64).reshape(cam.shape[0], -1).sum(1)))


def to_rgb(image: np.ndarray) -> np.ndarray:
    """A 2D image (any range) → (H, W, 3) uint8 gray."""
    g = (_unit(image) * 255).round().astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def overlay(
    image: np.ndarray, cam: np.ndarray, alpha: float = 0.55, cmap: str = "jet", floor: float = 0.25
) -> np.ndarray:
    """Blend ``cam`` (same spatial shape, [0, 1]) over ``image`` → (H, W, 3) uint8.

    The heatmap's opacity grows with its value and is zero below ``floor``, so
    cold regions leave the radiograph readable instead of tinting it all blue. Volumes (D, H, W) are
    shown at the slice with the most heatmap energy.
    """
    img = np.asarray(image, dtype=np.float64).squeeze()
    c = np.asarray(cam, dtype=np.float64).squeeze()
    if img.shape != c.shape:
        raise ValueError(f"image {img.shape} and heatmap {c.shape} differ in shape")
    if img.ndim == 3:
        z = pick_slice(img, c)
        img, c = img[z], c[z]
    if img.ndim != 2:
        raise ValueError(f"expected a 2D image or 3D volume, got shape {img.shape}")
    c = np.clip(np.nan_to_num(c), 0.0, 1.0)
    gray = to_rgb(img).astype(np.float64)
    heat = colormaps[cmap](c)[..., :3] * 255.0
    a = (alpha * np.clip((c - floor) / (1.0 - floor), 0.0, 1.0))[..., None]
    return np.clip(gray * (1 - a) + heat * a, 0, 255).round().astype(np.uint8)


def draw_boxes(
    rgb: np.ndarray,
    boxes: Sequence[Sequence[float]],
    color: tuple[int, int, int] = (0, 255, 0),
    width: int = 1,
) -> np.ndarray:
    """Outline ``[x, y, w, h]`` boxes on an RGB image (a copy is returned)."""
    out = np.array(rgb, copy=True)
    h, w = out.shape[:2]
    for box in boxes:
        x0, y0, bw, bh = (float(v) for v in box[:4])
        x1 = int(np.clip(np.floor(x0), 0, w - 1))
        y1 = int(np.clip(np.floor(y0), 0, h - 1))
        x2 = int(np.clip(np.ceil(x0 + bw) - 1, 0, w - 1))
        y2 = int(np.clip(np.ceil(y0 + bh) - 1, 0, h - 1))
        for t in range(width):
            out[min(y1 + t, h - 1), x1 : x2 + 1] = color
            out[max(y2 - t, 0), x1 : x2 + 1] = color
            out[y1 : y2 + 1, min(x1 + t, w - 1)] = color
            out[y1 : y2 + 1, max(x2 - t, 0)] = color
    return out


def draw_outlines(
    rgb: np.ndarray,
    polygons: Sequence[Sequence[float]],
    color: tuple[int, int, int] = (255, 215, 0),
    width: int = 1,
) -> np.ndarray:
    """Trace closed polygons ``[x1, y1, x2, y2, ...]`` (pixel ``i`` spanning ``[i, i + 1)``) on an RGB
    image (a copy is returned): the expert's outline of the fracture, inside its box."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    for p in polygons:
        xy = [(float(x) - 0.5, float(y) - 0.5) for x, y in zip(p[0::2], p[1::2], strict=True)]
        if len(xy) >= 2:
            draw.line([*xy, xy[0]], fill=color, width=width, joint="curve")
    return np.asarray(img)
