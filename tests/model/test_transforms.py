"""The model contract's deterministic preprocessing.

- the fast percentile window is MONAI's, only quicker;
- golden outputs on fixed inputs (8/16-bit, odd shapes, DICOM, a volume) pin the
  transform's definition: a changed interpolation, padding or window fails here,
  and whoever changes it on purpose must bump ``PREPROCESS_VERSION`` and
  regenerate the goldens (``python tests/model/test_transforms.py``);
- every field of the spec changes the output (none is silently dropped);
- a bundle trained under another preprocessing version is refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import ScaleIntensityRangePercentiles

from bonefrac.model.transforms import (
    PREPROCESS_VERSION,
    SUPPORTED_PREPROCESS_VERSIONS,
    BlockMeanReduce,
    FastPercentileWindow,
    PreprocessError,
    PreprocessSpec,
    reduction_factor,
)

GOLDEN = Path(__file__).with_name("golden_preprocess.json")


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
    out = PreprocessSpec(image_size=32).apply(a)
    assert out.shape == (1, 32, 32) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.all(out[0, :, :5] == 0) and torch.all(out[0, :, -5:] == 0)  # width 60→21, padded both sides


# ------------------------------------------------------------------ golden outputs
def _golden_inputs(tmp: Path) -> dict[str, tuple[PreprocessSpec, np.ndarray]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _factories import make_array, make_dicom
    from bonefrac.data.imageio import read_image

    dcm = make_dicom(tmp / "golden.dcm", make_array((90, 70), bit_depth=12, seed=3), bits_stored=12)
    rng = np.random.default_rng(11)
    zz, yy, xx = np.mgrid[0:20, 0:30, 0:26]
    volume = (zz * 3 + yy * 2 + xx + rng.normal(0, 2, zz.shape)).astype(np.float32)
    return {
        "8bit_odd_wide": (PreprocessSpec(image_size=32), make_array((61, 97), 8, seed=1).astype(np.float32)),
        "16bit_tall": (
            PreprocessSpec(image_size=40, lower_percentile=2.0, upper_percentile=97.0),
            make_array((130, 47), 16, seed=2).astype(np.float32),
        ),
        "dicom_12bit": (PreprocessSpec(image_size=36), read_image(dcm).array.astype(np.float32)),
        # over twice the input side: version 3 block-averages it (1/4) before the resize
        "8bit_large": (PreprocessSpec(image_size=32), make_array((300, 233), 8, seed=4).astype(np.float32)),
        "volume": (PreprocessSpec(spatial_dims=3, volume_size=(8, 12, 10)), volume),
    }


def _summary(out: torch.Tensor) -> dict[str, list[float] | list[int]]:
    a = out.numpy().astype(np.float64)
    flat = a.reshape(-1)
    picks = np.linspace(0, flat.size - 1, 24).round().astype(int)
    return {
        "shape": list(a.shape),
        "stats": [float(flat.mean()), float(flat.std()), float((flat > 0.5).mean())],
        "row_means": a.reshape(a.shape[0] * a.shape[1], -1).mean(1)[:: max(1, a.shape[1] // 8)].tolist(),
        "pixels": flat[picks].tolist(),
    }


def _regenerate(tmp: Path) -> None:
    data: dict[str, dict] = {}
    for version in SUPPORTED_PREPROCESS_VERSIONS:
        data[version] = {
            name: _summary(spec.model_copy(update={"version": version}).apply(arr))
            for name, (spec, arr) in _golden_inputs(tmp).items()
        }
    GOLDEN.write_text(json.dumps({"versions": data}, indent=1) + "\n")


@pytest.mark.parametrize("version", SUPPORTED_PREPROCESS_VERSIONS)
def test_golden_outputs_pin_the_transform(tmp_path: Path, version: str) -> None:
    goldens = json.loads(GOLDEN.read_text())["versions"]
    assert sorted(goldens) == sorted(SUPPORTED_PREPROCESS_VERSIONS), (
        "a preprocessing version was added: generate its goldens with python tests/model/test_transforms.py"
    )
    for name, (spec, arr) in _golden_inputs(tmp_path).items():
        got, want = _summary(spec.model_copy(update={"version": version}).apply(arr)), goldens[version][name]
        assert got["shape"] == want["shape"], name
        for key in ("stats", "row_means", "pixels"):
            np.testing.assert_allclose(got[key], want[key], atol=2e-5, err_msg=f"{name}: {key}")


@pytest.mark.parametrize(
    "change",
    [
        {"image_size": 48},
        {"lower_percentile": 5.0},
        {"upper_percentile": 90.0},
    ],
)
def test_every_2d_field_changes_the_output(change: dict) -> None:
    a = np.random.default_rng(5).gamma(2.0, 400.0, (70, 50)).astype(np.float32)
    base = PreprocessSpec(image_size=40)
    other = base.model_copy(update=change)
    x, y = base.apply(a), other.apply(a)
    assert x.shape != y.shape or not torch.allclose(x, y, atol=1e-4)


def test_volume_size_changes_the_output() -> None:
    v = np.random.default_rng(6).random((10, 20, 20)).astype(np.float32)
    assert PreprocessSpec(spatial_dims=3, volume_size=(4, 8, 8)).apply(v).shape == (1, 4, 8, 8)
    assert PreprocessSpec(spatial_dims=3, volume_size=(6, 8, 10)).apply(v).shape == (1, 6, 8, 10)


def test_decode_scale_is_part_of_the_definition() -> None:
    assert PreprocessSpec(image_size=96).decode_side_hint == 96  # versions 2-3: a JPEG decoded down to the input side
    assert PreprocessSpec(image_size=96, version="2").decode_side_hint == 96
    assert PreprocessSpec(image_size=96, version="1").decode_side_hint is None  # version 1: every pixel
    assert PreprocessSpec(spatial_dims=3).decode_side_hint is None


def _radiograph_jpeg_with_hardware() -> bytes:
    """1400 x 1100 px: smooth anatomy, noise, and two thin bright bars (wire, a marker) that
    hold the 99.5th percentile at full resolution but are averaged away by a 1/8-scale decode."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1400, 0:1100]
    arr = 90 + 60 * np.sin(xx / 60.0) * np.cos(yy / 90.0) + rng.normal(0, 12, yy.shape)
    arr[200:206, 300:360] = 255
    arr[900:904, 100:700] = 250
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_version_2_windows_after_the_resize_so_a_reduced_decode_gives_nearly_the_same_input() -> None:
    """Why version 2 exists: windowing the working-resolution image makes the model's input nearly
    independent of the JPEG's decode scale; version 1's window moved with it (the 1/8 decode averages
    the bright hardware out of the 99.5th percentile). Fails if version 2 windows before resizing."""
    from bonefrac.data.imageio import read_image

    data = _radiograph_jpeg_with_hardware()
    full = read_image(data).array
    reduced = read_image(data, max_side_hint=128)
    assert reduced.meta["decode_scale"] > 7  # libjpeg's 1/8 path: 138 x 175 px
    gap = {}
    for version in SUPPORTED_PREPROCESS_VERSIONS:
        spec = PreprocessSpec(image_size=128, version=version)
        gap[version] = float((spec.apply(full) - spec.apply(reduced.array)).abs().mean())
    assert gap["2"] <= 0.015, gap  # measured 0.009
    assert gap["1"] >= 2.5 * gap["2"], gap  # measured 0.033


def test_version_3_reduces_every_format_as_the_reduced_jpeg_decode_does() -> None:
    """Why version 3 exists: the same radiograph decoded at every pixel (a PNG or DICOM export, the
    viewer's full decode) must reach the model as the DCT-scaled JPEG decode does. Version 2 resized
    the full array straight to the input side (measured gap 0.009); version 3 block-averages it to
    the decoder's scale first (measured 0.0007). Fails if the block mean is dropped or its factor
    differs from libjpeg's."""
    from bonefrac.data.imageio import read_image

    data = _radiograph_jpeg_with_hardware()
    full = read_image(data).array
    reduced = read_image(data, max_side_hint=128)
    assert reduced.meta["decode_scale"] > 7
    gap = {}
    for version in ("2", "3"):
        spec = PreprocessSpec(image_size=128, version=version)
        gap[version] = float((spec.apply(full) - spec.apply(reduced.array)).abs().mean())
    assert gap["3"] <= 0.002, gap
    assert gap["2"] >= 5 * gap["3"], gap


@pytest.mark.parametrize("shape", [(256, 200), (256, 257), (90, 61)])
def test_version_3_equals_version_2_within_twice_the_input_side(shape: tuple[int, int]) -> None:
    """A reduced JPEG decode is already within twice the input side, so version 3 must give version
    2's tensors exactly there: models retrained under 3 on JPEG data see the same inputs."""
    a = np.random.default_rng(7).gamma(2.0, 300.0, shape).astype(np.float32)
    v2, v3 = (PreprocessSpec(image_size=128, version=v).apply(a) for v in ("2", "3"))
    assert torch.equal(v2, v3)


def test_block_mean_reduce_is_libjpegs_scale_and_edge_rule() -> None:
    """Factor and output size as Pillow's draft decodes a JPEG (ceil(side / s)); partial edge blocks
    average only the pixels they hold; repeated until within twice the side (1/8 is libjpeg's last)."""
    a = np.random.default_rng(3).random((1, 37, 50)).astype(np.float32)
    out = BlockMeanReduce(8)(a)
    assert reduction_factor(37, 50, 8) == 4 and out.shape == (1, 10, 13)
    assert out[0, 0, 0] == pytest.approx(a[0, :4, :4].mean(), rel=1e-5)
    assert out[0, -1, -1] == pytest.approx(a[0, 36:, 48:].mean(), rel=1e-5)
    big = np.ones((1, 2100, 2100), dtype=np.float32)
    assert BlockMeanReduce(64)(big).shape == (1, 66, 66)  # 1/8 then 1/4: 2100 -> 263 -> 66
    assert BlockMeanReduce(64)(a) is a  # nothing to reduce: the array itself
    assert [reduction_factor(h, 1000, 100) for h in (200, 201, 399, 400, 799, 800, 5000)] == [1, 2, 2, 4, 4, 8, 8]


def test_spec_validation_and_version() -> None:
    with pytest.raises(ValueError, match="lower_percentile"):
        PreprocessSpec(lower_percentile=60.0)
    with pytest.raises(ValueError):
        PreprocessSpec(image_size=16)
    assert PreprocessSpec().version == PREPROCESS_VERSION == SUPPORTED_PREPROCESS_VERSIONS[-1]
    with pytest.raises(PreprocessError, match="version '0'"):
        PreprocessSpec(version="0").apply(np.zeros((8, 8), dtype=np.float32))
    with pytest.raises(PreprocessError, match="2D image"):
        PreprocessSpec().apply(np.zeros((2, 8, 8), dtype=np.float32))


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        _regenerate(Path(d))
    print(f"wrote {GOLDEN}")
