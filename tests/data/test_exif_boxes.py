"""Boxes drawn on the EXIF-turned image land on the same stored pixels (checked against PIL)."""

from __future__ import annotations

import pytest
from tests._factories import displayed_box_to_stored_by_pil, make_oriented_jpeg

from bonefrac.data.exif_boxes import annotated_on_display, box_to_stored, displayed_size
from bonefrac.data.sources import _scaled_boxes

STORED = (60, 40)  # width, height: not square, so a 90° turn shows


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_orientation_maps_a_box_back_to_the_pixels_pil_shows_there(orientation):
    dw, dh = displayed_size(STORED, orientation)
    box = [7.0, 5.0, 11.0, 6.0]  # on the displayed image; off-centre and oblong, so any mix-up moves it
    assert box[0] + box[2] <= dw and box[1] + box[3] <= dh
    want = displayed_box_to_stored_by_pil(box, STORED, orientation)
    assert box_to_stored(box, orientation, STORED) == pytest.approx(want, abs=1e-6)


def test_the_recorded_size_tells_which_frame_a_box_was_drawn_on():
    assert annotated_on_display((40, 60), STORED, 8)  # COCO recorded the turned size
    assert annotated_on_display((80, 120), STORED, 6)  # ... or a rescale of it
    assert not annotated_on_display((60, 40), STORED, 8)  # the tool ignored EXIF
    assert not annotated_on_display((40, 60), STORED, None)
    assert annotated_on_display((60, 40), STORED, 3)  # a 180° turn: sides unchanged, taken as shown


def test_coco_boxes_of_a_turned_jpeg_are_turned_back_and_scaled(tmp_path):
    path = make_oriented_jpeg(tmp_path / "turned.jpg", STORED, 8)
    box = [7.0, 5.0, 11.0, 6.0]
    # The tool showed the image turned (40 x 60) and recorded it at twice that size.
    entry = {"size": (80, 120), "bboxes": [[v * 2 for v in box]]}
    want = displayed_box_to_stored_by_pil(box, STORED, 8)
    assert _scaled_boxes(path, entry) == [pytest.approx(want, abs=0.01)]
    # A tool that ignored EXIF recorded the stored size: only scaled, not turned.
    assert _scaled_boxes(path, {"size": (120, 80), "bboxes": [[14.0, 10.0, 22.0, 12.0]]}) == [[7.0, 5.0, 11.0, 6.0]]
    # No recorded size: nothing to go on, the boxes are kept as they are.
    assert _scaled_boxes(path, {"size": (None, None), "bboxes": [box]}) == [box]


def test_an_outline_is_scaled_and_turned_back_with_its_box(tmp_path):
    """The fracture's polygon takes the box's path to stored pixels (a fifth element of the box): traced
    along the box's corners, its stored corners span the stored box PIL finds."""
    path = make_oriented_jpeg(tmp_path / "turned.jpg", STORED, 8)
    box = [7.0, 5.0, 11.0, 6.0]
    x, y, w, h = (v * 2 for v in box)
    corners = [x, y, x + w, y, x + w, y + h, x, y + h]
    (got,) = _scaled_boxes(path, {"size": (80, 120), "bboxes": [[x, y, w, h]], "outlines": [[corners]]})
    want = displayed_box_to_stored_by_pil(box, STORED, 8)
    assert got[:4] == pytest.approx(want, abs=0.01)
    (outline,) = got[4]
    xs, ys = outline[0::2], outline[1::2]
    assert [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)] == pytest.approx(want, abs=0.01)
    # Only scaled when the tool ignored EXIF; kept as recorded without a size; no polygon, no fifth element.
    (scaled,) = _scaled_boxes(path, {"size": (120, 80), "bboxes": [[x, y, w, h]], "outlines": [[corners]]})
    assert scaled[4] == [[v / 2 for v in corners]]
    kept = _scaled_boxes(path, {"size": (None, None), "bboxes": [[x, y, w, h]], "outlines": [[corners]]})
    assert kept == [[x, y, w, h, [corners]]]
    assert _scaled_boxes(path, {"size": (80, 120), "bboxes": [[x, y, w, h]], "outlines": [[]]})[0] == got[:4]


def test_coco_segmentations_that_are_not_finite_polygons_give_no_outline():
    """Run-length masks, short or odd lists, non-numbers and non-finite coordinates never reach the manifest."""
    from bonefrac.data.sources import _coco_polygons

    good = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    hostile = (None, "x", {"counts": "abc", "size": [1, 2]}, [[1, 2, 3]], [[1, 2, 3, 4, 5]], [["a", 1, 2, 3, 4, 5]],
               [[1, 2, 3, 4, 5, float("nan")]], [[1, 2, 3, 4, 5, float("inf")]], [[[1, 2], [3, 4], [5, 6]]])
    for seg in hostile:
        assert _coco_polygons(seg) == [], seg
    assert _coco_polygons([good, [1, 2, 3, 4, 5, float("nan")]]) == [good]
