"""The shared deterministic preprocessing: the fast percentile window is MONAI's, only quicker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import ScaleIntensityRangePercentiles

from bonefrac.preprocess.transforms import FastPercentileWindow, preprocess_array


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(0).integers(0, 256, (1, 97, 131)).astype(np.float32),  # 8-bit radiograph
        np.random.default_rng(1).integers(0, 65536, (1, 64, 80)).astype(np.float32),  # 16-bit
        np.random.default_rng(2).normal(300.0, 80.0, (1, 50, 40)).astype(np.float32),  # CT-like floats
        np.full((1, 16, 16), 7.0, dtype=np.float32),  # constant: MONAI's degenerate-window path
    ],
)
def test_fast_window_matches_monai(array: np.ndarray) -> None:
    kwargs = {"lower": 0.5, "upper": 99.5, "b_min": 0.0, "b_max": 1.0, "clip": True, "dtype": np.float32}
    ref = ScaleIntensityRangePercentiles(**kwargs)(array)
    got = FastPercentileWindow(**kwargs)(array)
    assert type(got) is type(ref) and got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(ref), atol=1e-6, rtol=0)


def test_relative_mode_falls_back_to_monai() -> None:
    a = np.random.default_rng(3).integers(0, 256, (1, 20, 20)).astype(np.float32)
    kwargs = {"lower": 5, "upper": 95, "b_min": 0.0, "b_max": 1.0, "relative": True, "dtype": np.float32}
    torch.testing.assert_close(
        torch.as_tensor(FastPercentileWindow(**kwargs)(a)),
        torch.as_tensor(ScaleIntensityRangePercentiles(**kwargs)(a)),
    )


def test_preprocess_output_is_a_padded_unit_square() -> None:
    a = np.random.default_rng(4).integers(0, 4096, (90, 60)).astype(np.float32)
    out = preprocess_array(a, 2, 32)
    assert out.shape == (1, 32, 32) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.all(out[0, :, :5] == 0) and torch.all(out[0, :, -5:] == 0)  # width 60→21, padded both sides
