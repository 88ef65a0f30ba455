"""The deterministic half of preprocessing, and the typed spec that names it.

MONAI bundles split preprocessing into deterministic transforms (cacheable) and
random ones (augmentation), and keep the deterministic half with the model. So
does bonefrac: a :class:`PreprocessSpec` travels in every model bundle, the
preprocess stage caches :meth:`PreprocessSpec.apply`'s output, and evaluation,
``bonefrac predict``, the service and drift monitoring call the very same
method, so a model sees identical tensors in training and in the clinic.

``PREPROCESS_VERSION`` names the transform's *definition* (windowing rule, resize
mode, padding, the scale a JPEG is decoded at). Golden outputs in the tests pin
every supported version: whoever changes the definition must add a version, and
bundles trained under a version this release does not implement are refused at
load time instead of silently receiving shifted inputs.

Version 2 (2D) resizes first and windows the percentiles on the working-resolution
image, and asks the decoder for a JPEG at the smallest DCT scale that keeps both
sides >= ``image_size`` (:attr:`PreprocessSpec.decode_side_hint`). Why: version 1
windowed the full-resolution array, so every request paid a percentile partition
and a float copy of up to 6.6 MP before the resize, and a JPEG could not be decoded
at reduced scale without moving the window (reduced decoding averages away the
0.5/99.5 % extremes). Windowing the resized image makes the window nearly
independent of the decode scale, so training, evaluation, ``bonefrac predict`` and
the service all decode the same reduced JPEG. Version 1 stays supported for
bundles trained with it.

Version 3 (2D) makes that reduced scale part of the transform for every format: an
image whose shortest side exceeds twice ``image_size`` is first averaged over s × s
blocks, s the 8, 4 or 2 libjpeg would decode it at (:func:`reduction_factor`), then
resized and windowed as in version 2. Why: under version 2 only a JPEG was reduced,
so the same radiograph exported as PNG or DICOM, or a JPEG decoded at full
resolution (the viewer, another tool), reached the resize at 2-4x the size and the
model answered differently (FracAtlas test split, 512 px: max |Δp| 0.36 over the 57
images a reduced decode touches; with the block mean 0.019,
``benchmarks.draft_decode``). The libjpeg DCT-scaled decode is a fast path to
(nearly) the same array: the block mean finds it already reduced. On JPEGs whose
reduced decode is already within twice ``image_size`` (every FracAtlas image at 192-512
px) version 3 gives version 2's tensors exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from monai.transforms import (
    Compose,
    Resize,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    SpatialPad,
    Transform,
)
from pydantic import ConfigDict

from bonefrac.config import PreprocessParams
from bonefrac.errors import BonefracError

#: Version of the transform's definition new models are trained with; add one (and its golden test
#: outputs) on any change.
PREPROCESS_VERSION = "3"
#: Every definition this release can apply (older bundles keep theirs).
SUPPORTED_PREPROCESS_VERSIONS = ("1", "2", "3")
#: Interpolation of the 2D resize (area: an average over source pixels, no aliasing on downscale).
RESIZE_MODE_2D = "area"
RESIZE_MODE_3D = "trilinear"
#: The integer factors libjpeg decodes a JPEG at in the DCT domain, largest first.
DCT_SCALES = (8, 4, 2)


def reduction_factor(height: int, width: int, min_side: int) -> int:
    """The 1, 2, 4 or 8 an image of this size is reduced by first, keeping both sides >= ``min_side``.

    libjpeg's (and Pillow's ``draft``) rule: the largest DCT scale that keeps both sides at
    least ``min_side``; images within twice ``min_side`` stay as they are.
    """
    if min_side <= 0 or min(height, width) <= 2 * min_side:
        return 1
    fit = min(height // min_side, width // min_side)
    return next(s for s in DCT_SCALES if s <= fit)


class BlockMeanReduce(Transform):
    """Average over s × s blocks, s = :func:`reduction_factor`, until the image is within twice ``min_side``.

    What libjpeg's DCT-scaled decode computes (the 1/8 scale is exactly the block mean; 1/2
    and 1/4 a close low-pass), done to the decoded pixels of any format, so that a PNG,
    a DICOM and a reduced or full JPEG decode of one radiograph reach the model alike.
    Partial blocks at the right and bottom edge average the pixels they hold, as libjpeg's
    ``ceil(side / s)`` output does. Hand-written because no MONAI transform reduces by an
    integer block mean with libjpeg's edge rule; ``avg_pool2d`` does the arithmetic.
    """

    def __init__(self, min_side: int) -> None:
        self.min_side = int(min_side)

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        height, width = img.shape[-2:]
        if reduction_factor(height, width, self.min_side) == 1:
            return img
        out = torch.as_tensor(np.asarray(img) if not isinstance(img, torch.Tensor) else img, dtype=torch.float32)
        while (s := reduction_factor(*out.shape[-2:], self.min_side)) > 1:
            out = torch.nn.functional.avg_pool2d(out[None], s, s, ceil_mode=True, count_include_pad=False)[0]
        return out.numpy() if isinstance(img, np.ndarray) else out


class PreprocessError(BonefracError, ValueError):
    """An array the transform cannot take, or a spec this version of bonefrac cannot apply."""


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
    version: str = PREPROCESS_VERSION,
) -> Compose:
    """Channel-first array in stored units → float32 tensor on [0, 1] of a fixed shape.

    2D: a large image block-averaged to within twice ``image_size`` (version 3,
    :class:`BlockMeanReduce`), longest side resized to ``image_size`` (aspect kept,
    area interpolation), robust percentile windowing of that image, then zero-padding
    to a square (version 1: windowing before the resize; versions 1-2: no block mean). 3D: percentile windowing, then
    trilinear resize to ``volume_size`` (D, H, W).
    """
    if version not in SUPPORTED_PREPROCESS_VERSIONS:
        raise PreprocessError(f"unknown preprocessing version {version!r}")
    scale = FastPercentileWindow(
        lower=lower_percentile, upper=upper_percentile, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32
    )
    if spatial_dims == 2:
        resize = Resize(spatial_size=image_size, size_mode="longest", mode=RESIZE_MODE_2D)
        pad = SpatialPad(spatial_size=(image_size, image_size), mode="constant")
        if version == "1":
            return Compose([scale, resize, pad])
        if version == "2":
            return Compose([resize, scale, pad])
        return Compose([BlockMeanReduce(image_size), resize, scale, pad])
    if spatial_dims == 3:
        return Compose([scale, Resize(spatial_size=tuple(volume_size), mode=RESIZE_MODE_3D)])
    raise PreprocessError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


class PreprocessSpec(PreprocessParams):
    """Everything the deterministic transform needs, validated when a bundle is loaded.

    The fields and defaults of ``params.yaml``'s ``preprocess`` section (one
    definition, :class:`bonefrac.config.PreprocessParams`), plus the data's
    ``spatial_dims`` and ``version``, the transform definition the numbers refer to.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    spatial_dims: Literal[2, 3] = 2
    version: str = PREPROCESS_VERSION

    @classmethod
    def from_params(cls, preprocess: PreprocessParams, spatial_dims: int) -> PreprocessSpec:
        """The spec ``params.yaml`` asks for (its ``preprocess`` section and the data's dims)."""
        return cls(spatial_dims=spatial_dims, **preprocess.model_dump())

    def check_version(self) -> None:
        """Refuse a spec written for a definition of the transform this release does not implement."""
        if self.version not in SUPPORTED_PREPROCESS_VERSIONS:
            raise PreprocessError(
                f"the model was trained with preprocessing version {self.version!r}, but this bonefrac "
                f"implements versions {', '.join(SUPPORTED_PREPROCESS_VERSIONS)}: its inputs would differ "
                "from training. "
                "Retrain the model with this version (dvc repro), or install the bonefrac release it was "
                "trained with."
            )

    @property
    def decode_side_hint(self) -> int | None:
        """The shortest side a JPEG is decoded to (DCT-domain 1/2..1/8 scaling); ``None``: full resolution.

        Part of the definition: every path that feeds this model (preprocess cache, feature
        cache, ``bonefrac predict``, the service) passes it to the decoder, so all of them see
        the same pixels. Version 1 decoded at full resolution; version 3 reduces every
        format to this scale in the transform itself, the decoder's reduction being a fast path.
        """
        if self.spatial_dims != 2 or self.version == "1":
            return None
        return int(self.image_size)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The model's input shape for one sample, channel first."""
        if self.spatial_dims == 2:
            return (1, self.image_size, self.image_size)
        return (1, *self.volume_size)

    def transform(self) -> Compose:
        """The MONAI transform (channel-first array in stored units → float32 on [0, 1])."""
        self.check_version()
        return deterministic_transform(
            self.spatial_dims,
            self.image_size,
            self.volume_size,
            self.lower_percentile,
            self.upper_percentile,
            self.version,
        )

    def apply(self, array: np.ndarray) -> torch.Tensor:
        """One image (H, W) or volume (D, H, W) → a ``(1, ...)`` float32 tensor on [0, 1]."""
        arr = np.asarray(array, dtype=np.float32)
        if arr.ndim != self.spatial_dims:
            kind = "2D image (H, W)" if self.spatial_dims == 2 else "3D volume (D, H, W)"
            raise PreprocessError(f"expected a {kind}, got an array of shape {arr.shape}")
        out = self.transform()(arr[None])
        return torch.as_tensor(out, dtype=torch.float32).contiguous()
