"""Expert fracture boxes in the coordinates the network sees.

The manifest stores boxes as JSON ``[[x, y, w, h], ...]`` in pixels of the stored image
(``bonefrac.data.schema``: column ``boxes``, beside ``width``/``height``); a 2D box may carry
its fracture's outline (a list of polygons ``[x1, y1, x2, y2, ...]``) as a fifth element. Training (box
targets for the dense head) and evaluation (localisation scores) both need them on the
preprocessed square, so the mapping lives here, next to the preprocessing it mirrors
(:class:`~bonefrac.model.transforms.PreprocessSpec`), at the bottom of the layers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from bonefrac.errors import BonefracError

Box = Sequence[float]  # [x, y, w, h] in pixels, x to the right, y down
Outline = list[list[float]]  # one box's polygons, each [x1, y1, x2, y2, ...] in the box's pixels


class BoxError(BonefracError, ValueError):
    """A box list that cannot be parsed or used."""


def parse_boxes(value: Any) -> list[list[float]]:
    """The manifest's ``boxes`` cell (JSON text or a list) → ``[[x, y, w, h], ...]``."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise BoxError(f"boxes is not valid JSON: {text[:60]!r}") from err
    boxes = []
    for b in value:
        if len(b) < 4:
            raise BoxError(f"a box needs [x, y, w, h], got {b!r}")
        boxes.append([float(v) for v in b[:4]])
    return boxes


def map_boxes_to_cache(boxes: Sequence[Box], orig_hw: tuple[int, int], image_size: int) -> list[list[float]]:
    """Boxes in original pixels → the preprocessed (cached) image's pixels.

    Mirrors :class:`~bonefrac.model.transforms.PreprocessSpec` (2D): MONAI ``Resize(size_mode="longest")``
    scales each side to ``round(side * image_size / longest)``, then
    ``SpatialPad`` pads symmetrically (``pad // 2`` before) to a square.
    """
    h, w = int(orig_hw[0]), int(orig_hw[1])
    if h <= 0 or w <= 0:
        raise BoxError(f"original size must be positive, got {orig_hw}")
    scale = image_size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)  # Python's round, as MONAI's Resize
    sy, sx = new_h / h, new_w / w
    pad_y, pad_x = (image_size - new_h) // 2, (image_size - new_w) // 2
    return [[x * sx + pad_x, y * sy + pad_y, bw * sx, bh * sy] for x, y, bw, bh in (b[:4] for b in boxes)]


def row_boxes(row: Mapping[str, Any], image_size: int) -> list[list[float]]:
    """A manifest/cache-index row's boxes on the ``image_size`` input square; ``[]`` when it has
    none, or when they or the stored size (``height``, ``width``) cannot be read."""
    return _on_input(row, parse_boxes, map_boxes_to_cache, image_size)


def _on_input(row: Mapping[str, Any], parse: Callable[[Any], list], to_input: Callable, image_size: int) -> list:
    """``parse`` the row's ``boxes`` cell and map the result onto the input square with the row's stored
    size; ``[]`` when there is nothing, or the cell or the size cannot be read."""
    try:
        parsed = parse(row.get("boxes"))
        h, w = int(float(row.get("height"))), int(float(row.get("width")))
    except (BoxError, TypeError, ValueError):
        return []
    if not parsed or h <= 0 or w <= 0:
        return []
    return to_input(parsed, (h, w), image_size)


def parse_outlines(value: Any) -> list[Outline]:
    """The ``boxes`` cell → each box's outline (its polygons; ``[]`` where the box has none), in the
    order of :func:`parse_boxes`. Only a list in a box's fifth place is an outline (a 3D box's fifth
    number is its height); polygons with fewer than three points are dropped. An outline that is
    not finite numbers raises :class:`BoxError` (the row then trains on its boxes)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as err:
            raise BoxError(f"boxes is not valid JSON: {value[:60]!r}") from err
    if not isinstance(value, list):
        return []
    outlines: list[Outline] = []
    for b in value:
        polygons = b[4] if isinstance(b, list) and len(b) > 4 and isinstance(b[4], list) else []
        outlines.append([xy for p in polygons if (xy := polygon_coordinates(p)) is not None])
    return outlines


def polygon_coordinates(polygon: Any) -> list[float] | None:
    """One polygon ``[x1, y1, x2, y2, ...]`` as floats; ``None`` when it is not a list of at least
    three (x, y) points (a shape to skip); :class:`BoxError` when its coordinates are not finite
    numbers (a broken value). The one rule for outlines, at intake (COCO) and in the model."""
    if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
        return None
    try:
        xy = [float(v) for v in polygon]
    except (TypeError, ValueError) as err:
        raise BoxError(f"an outline needs [x1, y1, x2, y2, ...] numbers: {err}") from err
    if not all(np.isfinite(xy)):
        raise BoxError("an outline has a coordinate that is not finite")
    return xy


def map_outlines_to_cache(outlines: Sequence[Outline], orig_hw: tuple[int, int], image_size: int) -> list[Outline]:
    """Outlines in original pixels → the preprocessed image's pixels: each vertex moves as a
    zero-size box through :func:`map_boxes_to_cache`, so boxes and outlines share one mapping."""
    out = []
    for polygons in outlines:
        mapped = []
        for p in polygons:
            points = map_boxes_to_cache([[x, y, 0.0, 0.0] for x, y in zip(p[0::2], p[1::2], strict=True)],
                                        orig_hw, image_size)  # fmt: skip
            mapped.append([c for q in points for c in q[:2]])
        out.append(mapped)
    return out


def row_outlines(row: Mapping[str, Any], image_size: int) -> list[Outline]:
    """A row's outlines on the ``image_size`` input square, one per box of :func:`row_boxes`
    (``[]`` for a box without one); ``[]`` when :func:`row_boxes` has no boxes."""
    return _on_input(row, parse_outlines, map_outlines_to_cache, image_size)
