"""The service's per-upload OOD statistics (``bonefrac.serving.upload_ood``)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bonefrac.inference.upload_policy import SafetyLimits, decode_upload
from bonefrac.serving.upload_ood import decoded_image_ood_features


def test_decoded_upload_features_count_the_stored_pixels_of_a_reduced_decode():
    """A large JPEG decoded at reduced DCT scale (the service's option) must not look like a small image."""
    rng = np.random.default_rng(0)
    arr = (rng.random((1600, 1200)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    full = decode_upload(buf.getvalue(), 2, SafetyLimits())
    reduced = decode_upload(buf.getvalue(), 2, SafetyLimits(), max_side_hint=400)
    assert reduced.array.shape[0] < 1600  # the decode really was reduced
    f_full, f_reduced = decoded_image_ood_features(full), decoded_image_ood_features(reduced)
    assert f_full["log10_pixels"] == pytest.approx(np.log10(1600 * 1200))
    assert f_reduced["log10_pixels"] == pytest.approx(f_full["log10_pixels"])
    volume = type(full)(np.zeros((4, 8, 8), np.float32), 8, 1, "nifti", "CT", 3)
    assert decoded_image_ood_features(volume) is None  # a volume: no 2D statistics check
