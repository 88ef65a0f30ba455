"""The viewer's reading copy of an image (``bonefrac.explain.display.display_pixels``).

What must hold: the codes are the stored values (exactly, for integer data up to 16 bits),
at full resolution up to the pixel budget; a DICOM's VOI window is undone at decoding and
offered as the first preset (flipped for MONOCHROME1); the wire format round-trips.
"""

from __future__ import annotations

import base64
import zlib

import numpy as np
import pytest
from tests._factories import make_dicom

from bonefrac.data.imageio import read_image
from bonefrac.explain.display import display_pixels


def _decode(payload: dict) -> np.ndarray:
    """What viewer.js does: base64 → inflate → little-endian codes → running sum per row."""
    raw = zlib.decompress(base64.b64decode(payload["data"]))
    dtype = np.uint8 if payload["dtype"] == "uint8" else np.dtype("<u2")
    delta = np.frombuffer(raw, dtype=dtype).reshape(payload["height"], payload["width"])
    return np.cumsum(delta, axis=1, dtype=delta.dtype)  # unsigned: wraps like the encoder


def _ramp(h: int = 48, w: int = 64, top: int = 4095) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.round((xx + 3 * yy) / (w - 1 + 3 * (h - 1)) * top).astype(np.uint16)


def test_12bit_dicom_keeps_values_outside_its_window_and_offers_the_window_first(tmp_path):
    arr = _ramp()
    path = make_dicom(tmp_path / "a.dcm", arr, bits_stored=12, window=(1000.0, 800.0))
    img = read_image(path)
    assert img.meta["voi_applied"] == "window" and img.array.max() <= 4095  # decoded through the window
    dp = display_pixels(img, path.read_bytes)
    assert dp is not None and dp.reduction == 1 and dp.codes.dtype == np.uint16
    stored = dp.offset + dp.scale * dp.codes.astype(np.float64)
    np.testing.assert_array_equal(stored, arr)  # every value, including those the window clipped
    assert dp.windows[0] == {"name": "DICOM", "center": 1000.0, "width": 800.0, "source": "dicom"}
    assert [w["name"] for w in dp.windows[1:]] == ["Auto", "Full range"]
    assert dp.windows[2]["center"] == pytest.approx(4095 / 2) and dp.windows[2]["width"] == pytest.approx(4095)
    np.testing.assert_array_equal(_decode(dp.to_json()), dp.codes)
    # Without the file's bytes: the windowed values as decoded, and no DICOM preset to offer.
    assert display_pixels(img).windows[0]["name"] == "Auto"


def test_monochrome1_window_centre_is_flipped_with_the_values(tmp_path):
    arr = _ramp()
    path = make_dicom(tmp_path / "m1.dcm", arr, bits_stored=12, window=(1000.0, 800.0), photometric="MONOCHROME1")
    dp = display_pixels(read_image(path), path.read_bytes)
    stored = dp.offset + dp.scale * dp.codes.astype(np.float64)
    np.testing.assert_array_equal(stored, 4095 - arr.astype(np.float64))  # bone bright, as in MONOCHROME2
    win = dp.windows[0]
    assert win["center"] == pytest.approx(4095 - 1000.0) and win["width"] == 800.0

    def gray(values, c, w):
        return np.clip((values - (c - w / 2)) / w, 0, 1)

    # The flipped window on flipped values = the header's window on the stored values, inverted.
    np.testing.assert_allclose(gray(stored, win["center"], 800), 1 - gray(arr.astype(float), 1000, 800))


def test_non_integer_units_are_quantised_to_16_bits(tmp_path):
    arr = _ramp(top=4000)
    path = make_dicom(tmp_path / "r.dcm", arr, bits_stored=12, rescale=(0.37, -100.0))
    img = read_image(path)
    dp = display_pixels(img, path.read_bytes)
    assert dp.scale != 1.0 and dp.codes.dtype == np.uint16
    back = dp.offset + dp.scale * dp.codes.astype(np.float64)
    assert np.abs(back - img.array).max() <= dp.scale / 2 + 1e-6
    np.testing.assert_array_equal(_decode(dp.to_json()), dp.codes)


def test_8bit_images_travel_as_bytes_and_big_ones_are_reduced_to_the_budget(tmp_path):
    from tests._factories import make_png

    path = make_png(tmp_path / "p.png", size=(90, 120), seed=2)
    img = read_image(path)
    dp = display_pixels(img)
    assert dp.codes.dtype == np.uint8 and dp.codes.shape == (90, 120) and dp.reduction == 1
    np.testing.assert_array_equal(dp.offset + dp.codes, img.array)
    payload = dp.to_json()
    assert payload["dtype"] == "uint8" and payload["windows"][0]["name"] == "Auto"
    np.testing.assert_array_equal(_decode(payload), dp.codes)
    small = display_pixels(img, max_pixels=90 * 120 // 4)  # just fits at 1/2
    assert small.reduction == 2 and small.codes.shape == (45, 60)
    # One code per 2 x 2 block: its mean (8-bit means are quantised to 16-bit steps).
    block = img.array.reshape(45, 2, 60, 2).mean(axis=(1, 3))
    assert np.abs(small.offset + small.scale * small.codes - block).max() <= small.scale
    assert display_pixels(img, max_pixels=90 * 120 // 4 - 1).reduction == 3


def test_volumes_have_no_reading_copy():
    from types import SimpleNamespace

    volume = SimpleNamespace(array=np.zeros((4, 8, 8), np.float32), meta={}, format="nifti")
    assert display_pixels(volume) is None
