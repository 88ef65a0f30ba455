"""The per-image OOD statistics of one decoded upload: one function for the service and its benchmark.

It lives in ``serving`` (not ``monitoring``) because it reads the upload policy's stored size:
the pipeline's evaluate stage, which fits the detector on training images, never needs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bonefrac.inference.upload_policy import stored_size
from bonefrac.monitoring.ood import image_ood_features


def decoded_image_ood_features(img: Any) -> dict[str, float] | None:
    """:func:`image_ood_features` of a decoded upload (a 2D ``DecodedImage``), ``None`` for a volume.

    The pixel count is the stored one: a JPEG decoded at reduced scale must not look like a
    smaller image than the training references.
    """
    if img.array.ndim != 2:
        return None
    feats = image_ood_features(img.array, int(img.bit_depth), (img.meta or {}).get("value_range"))
    h, w = stored_size(img)
    feats["log10_pixels"] = float(np.log10(max(1, h * w)))
    return feats
