"""Annotation boxes drawn on the EXIF-oriented image, mapped back to the stored pixels.

The pipeline never applies a JPEG/PNG's EXIF orientation (:mod:`bonefrac.data.imageio`
records it as ``exif_orientation``): every box, mask and map lives in stored pixels. An
annotation tool, however, usually shows the image the way a browser does, turned by its
EXIF tag, and records the box — and the image size — in that displayed frame. FracAtlas
has one such file (``IMG0002628``, orientation 8): its COCO entry gives the displayed
454 × 373 instead of the stored 373 × 454, and scaling that box to the stored size put
it on the ribs instead of the humerus.

So: when a file carries an orientation and the annotation's recorded size is the
*displayed* size, the box is rotated/mirrored back with the inverse of the EXIF
operation (the eight cases PIL's ``ImageOps.exif_transpose`` implements; the tests
check each against it). Written here because no library maps boxes through EXIF.
"""

from __future__ import annotations

from collections.abc import Sequence

#: The orientations that turn the image by 90° (displayed width = stored height).
TRANSPOSING = (5, 6, 7, 8)


def displayed_size(stored_wh: tuple[int, int], orientation: int | None) -> tuple[int, int]:
    """(width, height) of the image as a viewer that honours EXIF shows it."""
    w, h = stored_wh
    return (h, w) if orientation in TRANSPOSING else (w, h)


def _to_stored(u: float, v: float, orientation: int, w: int, h: int) -> tuple[float, float]:
    """A point of the displayed frame → the stored frame (continuous pixel coordinates)."""
    if orientation == 2:  # mirrored left-right
        return w - u, v
    if orientation == 3:  # turned 180°
        return w - u, h - v
    if orientation == 4:  # mirrored top-bottom
        return u, h - v
    if orientation == 5:  # transposed
        return v, u
    if orientation == 6:  # displayed = stored turned 90° clockwise
        return v, h - u
    if orientation == 7:  # transversed
        return w - v, h - u
    if orientation == 8:  # displayed = stored turned 90° counter-clockwise
        return w - v, u
    return u, v


def box_to_stored(
    box: Sequence[float], orientation: int | None, stored_wh: tuple[int, int]
) -> list[float]:
    """``[x, y, w, h]`` in displayed pixels → ``[x, y, w, h]`` in stored pixels."""
    if orientation in (None, 1):
        return [float(v) for v in box[:4]]
    if orientation not in range(2, 9):
        raise ValueError(f"EXIF orientation must be 1-8, got {orientation}")
    x, y, bw, bh = (float(v) for v in box[:4])
    w, h = stored_wh
    corners = [_to_stored(u, v, orientation, w, h) for u, v in ((x, y), (x + bw, y + bh))]
    xs, ys = sorted(c[0] for c in corners), sorted(c[1] for c in corners)
    return [xs[0], ys[0], xs[1] - xs[0], ys[1] - ys[0]]


def annotated_on_display(
    recorded_wh: tuple[float, float], stored_wh: tuple[int, int], orientation: int | None
) -> bool:
    """True when an annotation's recorded size says it was drawn on the EXIF-turned image.

    Decided by the aspect ratio (the recorded size may be a rescale of either frame): the
    turned frame must fit at least as well as the stored one. For orientations that do not
    swap the sides (mirrors, 180°), and for square images, both frames fit equally and the
    tool's behaviour cannot be read from the size; they count as displayed, as mainstream
    annotation tools (and browsers, since CSS ``image-orientation: from-image`` became the
    default) show them so.
    """
    if orientation in (None, 1) or not recorded_wh[0] or not recorded_wh[1]:
        return False
    if orientation not in TRANSPOSING:
        return True
    aspect = recorded_wh[0] / recorded_wh[1]
    w, h = stored_wh
    return abs(aspect - h / w) <= abs(aspect - w / h)
