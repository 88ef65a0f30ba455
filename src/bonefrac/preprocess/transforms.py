"""The deterministic half of preprocessing: the one path every consumer shares.

MONAI bundles split preprocessing into deterministic transforms (cacheable) and
random ones (augmentation). This module holds the deterministic half. The
preprocess stage caches its output, and evaluation, ``bonefrac predict`` and the
BentoML service call the very same :func:`preprocess_array`, so a model sees
identical tensors in training and in the clinic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import Compose, Resize, ScaleIntensityRange, ScaleIntensityRangePercentiles, SpatialPad


class FastPercentileWindow(ScaleIntensityRangePercentiles):
    """MONAI's ``ScaleIntensityRangePercentiles`` with both percentiles from one numpy call.

    Same definition (linear interpolation, then MONAI's ``ScaleIntensityRange``),
    but MONAI computes each percentile with ``torch.quantile`` (a full sort of a
    tensor copy, twice); ``np.percentile`` partitions once for both. Measured on
    a 454×373 FracAtlas JPEG: 13 ms → 2.4 ms, the largest cost of a served request
    after the network. Kept as a subclass so every other behaviour stays MONAI's.
    """

    def _normalize(self, img: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        if self.relative:  # not used by bonefrac; keep MONAI's own path for it
            return super()._normalize(img)
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        a_min, a_max = (float(v) for v in np.percentile(arr, [self.lower, self.upper]))
        scaled = ScaleIntensityRange(
            a_min=a_min, a_max=a_max, b_min=self.b_min, b_max=self.b_max, clip=self.clip, dtype=self.dtype
        )(img)
        return scaled


def deterministic_transform(
    spatial_dims: int,
    image_size: int,
    volume_size: Sequence[int],
    lower_percentile: float,
    upper_percentile: float,
) -> Compose:
    """Channel-first array in stored units → float32 tensor on [0, 1] of a fixed shape.

    2D: robust percentile windowing, longest side resized to ``image_size`` (aspect
    kept, area interpolation), then zero-padded to a square. 3D: the same
    windowing, then trilinear resize to ``volume_size`` (D, H, W).
    """
    scale = FastPercentileWindow(
        lower=lower_percentile, upper=upper_percentile, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32
    )
    if spatial_dims == 2:
        return Compose([
            scale,
            Resize(spatial_size=image_size, size_mode="longest", mode="area"),
            SpatialPad(spatial_size=(image_size, image_size), mode="constant"),
        ])
    if spatial_dims == 3:
        return Compose([scale, Resize(spatial_size=tuple(volume_size), mode="trilinear")])
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


def preprocess_array(
    array: np.ndarray,
    spatial_dims: int,
    image_size: int,
    volume_size: Sequence[int] = (32, 64, 64),
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
) -> torch.Tensor:
    """Preprocess one image (H, W) or volume (D, H, W) to a (1, ...) float32 tensor on [0, 1]."""
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim != spatial_dims:
        kind = "2D image (H, W)" if spatial_dims == 2 else "3D volume (D, H, W)"
        raise ValueError(f"expected a {kind}, got an array of shape {arr.shape}")
    tf = deterministic_transform(spatial_dims, image_size, volume_size, lower_percentile, upper_percentile)
    out = tf(arr[None])
    return torch.as_tensor(out, dtype=torch.float32).contiguous()
