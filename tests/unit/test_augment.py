"""MONAI augmentation: configured by params, reproducible by seed, keeps shape and [0, 1]."""

from __future__ import annotations

import torch
from monai.transforms import RandAdjustContrast, RandAffine, RandFlip, RandGaussianNoise

from bonefrac.config import AugmentParams
from bonefrac.preprocess.augment import apply_augmentation, random_transform, sample_seed


def _img(shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(shape, generator=g)


def test_chain_follows_params() -> None:
    full = random_transform(AugmentParams(), 2)
    kinds = [type(t) for t in full.transforms]
    assert {RandFlip, RandAffine, RandAdjustContrast, RandGaussianNoise} <= set(kinds)
    off = random_transform(AugmentParams(flip_prob=0, affine_prob=0, contrast_prob=0, noise_prob=0), 2)
    assert not any(
        k in (RandFlip, RandAffine, RandAdjustContrast, RandGaussianNoise) for k in map(type, off.transforms)
    )
    x = _img((1, 32, 32))
    assert torch.equal(apply_augmentation(off, x, 1), x)  # only the [0, 1] clip remains


def test_same_seed_same_output_and_different_seed_differs() -> None:
    aug = AugmentParams(flip_prob=0.5, affine_prob=1.0, contrast_prob=1.0, noise_prob=1.0)
    x = _img((1, 32, 32))
    a = apply_augmentation(random_transform(aug, 2), x, 123)
    b = apply_augmentation(random_transform(aug, 2), x, 123)  # a fresh chain, same seed
    c = apply_augmentation(random_transform(aug, 2), x, 124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_3d_and_flip_axis() -> None:
    aug = AugmentParams(flip_prob=1.0, affine_prob=0.0, contrast_prob=0.0, noise_prob=0.0)
    v = _img((1, 8, 12, 16))
    out = apply_augmentation(random_transform(aug, 3), v, 0)
    assert torch.equal(out, v.flip(-1))  # left-right = last axis
    x = _img((1, 16, 16))
    assert torch.equal(apply_augmentation(random_transform(aug, 2), x, 0), x.flip(-1))


def test_sample_seed_mixes() -> None:
    seeds = {sample_seed(42, e, i) for e in range(5) for i in range(200)}
    assert len(seeds) == 1000  # no collisions between neighbouring epochs/samples
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3)
