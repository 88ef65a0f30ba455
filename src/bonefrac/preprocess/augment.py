"""The random half of preprocessing: MONAI augmentation, applied to training samples only.

The deterministic half (windowing, resize) is cached by the preprocess stage;
these transforms run on the cached ``(1, S, S)`` / ``(1, D, H, W)`` tensors every
epoch, so each epoch sees a different variant of each radiograph at almost no
cost. All transforms are MONAI ``Randomizable`` ones: the training loop seeds
the whole chain per sample (:func:`seed_transform`) from (run seed, epoch,
sample index), so an augmentation is a pure function of those three numbers —
independent of DataLoader workers, DDP ranks and of where a run was resumed.
"""

from __future__ import annotations

import math

import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    Lambda,
    RandAdjustContrast,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
)

from bonefrac.config import AugmentParams


def _clip01(x: torch.Tensor) -> torch.Tensor:
    """Keep the [0, 1] contract of the network input after noise/contrast (module-level: picklable)."""
    return x.clamp(0.0, 1.0)


def random_transform(aug: AugmentParams, spatial_dims: int) -> Compose:
    """Build the random augmentation chain for ``(1, ...)`` tensors on [0, 1].

    - flip left-right (the last axis); radiographs of left and right limbs are mirror images
    - affine: in-plane rotation ±``rotate_range_deg`` and zoom in ``zoom_range`` (one resampling)
    - gamma contrast in ``contrast_gamma`` (exposure differences between devices)
    - Gaussian noise with std up to ``noise_std`` (detector noise)

    A transform whose probability or range is zero is left out.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    tfs: list = []
    if aug.flip_prob > 0:
        tfs.append(RandFlip(prob=aug.flip_prob, spatial_axis=spatial_dims - 1))
    rot = math.radians(aug.rotate_range_deg)
    zlo, zhi = aug.zoom_range
    if zlo > zhi:
        raise ValueError(f"augment.zoom_range must be (min, max), got {aug.zoom_range}")
    has_zoom = not (zlo == 1.0 and zhi == 1.0)
    if aug.affine_prob > 0 and (rot > 0 or has_zoom):
        # 2D: one rotation angle; 3D: rotate in the axial (H, W) plane only, i.e. about the D axis.
        rotate_range = (rot,) if spatial_dims == 2 else (rot, 0.0, 0.0)
        # MONAI adds 1.0 to the sampled scale, so the range is (min - 1, max - 1) per axis.
        scale_range = tuple((zlo - 1.0, zhi - 1.0) for _ in range(spatial_dims)) if has_zoom else None
        tfs.append(
            RandAffine(
                prob=aug.affine_prob,
                rotate_range=rotate_range,
                scale_range=scale_range,
                mode="bilinear",
                padding_mode="zeros",
            )
        )
    if aug.contrast_prob > 0 and tuple(aug.contrast_gamma) != (1.0, 1.0):
        tfs.append(RandAdjustContrast(prob=aug.contrast_prob, gamma=tuple(aug.contrast_gamma)))
    if aug.noise_prob > 0 and aug.noise_std > 0:
        tfs.append(RandGaussianNoise(prob=aug.noise_prob, mean=0.0, std=aug.noise_std))
    tfs.append(Lambda(_clip01))
    return Compose(tfs)


def seed_transform(transform: Compose, seed: int) -> Compose:
    """Seed every Randomizable in the chain (MONAI's ``set_random_state``)."""
    transform.set_random_state(seed=int(seed) % (2**32))
    return transform


def sample_seed(run_seed: int, epoch: int, index: int) -> int:
    """A well-mixed 32-bit seed from (run seed, epoch, sample); stable across processes.

    Hand-written because Python's ``hash`` is salted per process and a plain sum
    would make neighbouring samples/epochs collide.
    """
    x = (run_seed * 0x9E3779B1 + epoch * 0x85EBCA77 + index * 0xC2B2AE3D) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 33
    return int(x & 0xFFFFFFFF)


def apply_augmentation(transform: Compose, image: torch.Tensor, seed: int) -> torch.Tensor:
    """Run the chain on one ``(1, ...)`` tensor with a given seed; returns a plain float32 tensor."""
    out = seed_transform(transform, seed)(image)
    if isinstance(out, MetaTensor):
        out = out.as_tensor()
    return torch.as_tensor(out, dtype=torch.float32).contiguous()
