"""read_image: format by content, full bit depth, colour reduction, and clear errors for broken files."""

from __future__ import annotations

import numpy as np
import pytest
from tests._factories import (
    make_array,
    make_cmyk_jpeg,
    make_decompression_bomb_png,
    make_dicom_series,
    make_jpeg,
    make_nifti,
    make_png,
    make_text_file,
    make_truncated_jpeg,
    make_zero_byte,
)

from bonefrac.data.imageio import DecodedImage, ImageDecodeError, read_image, sniff_format

BAR = slice(64 // 3, 64 // 3 + 64 // 6)  # the bright "bone" bar of make_array (64 px wide)


def test_png_8bit_values_kept(tmp_path):
    arr = make_array((64, 64), 8)
    img = read_image(make_png(tmp_path / "a.png", array=arr))
    assert isinstance(img, DecodedImage)
    assert img.array.dtype == np.float32 and img.array.shape == (64, 64)
    np.testing.assert_array_equal(img.array, arr.astype(np.float32))
    assert (img.bit_depth, img.channels, img.format, img.modality, img.spatial_dims) == (8, 1, "png", "XR", 2)
    assert img.complete and img.meta["value_range"] == [0.0, 255.0]


def test_png_16bit_full_depth_kept(tmp_path):
    arr = make_array((48, 40), 16)
    assert arr.max() > 255
    img = read_image(make_png(tmp_path / "b.png", size=(48, 40), bit_depth=16, array=arr))
    assert img.bit_depth == 16 and img.array.shape == (48, 40)
    np.testing.assert_array_equal(img.array, arr.astype(np.float32))  # no squash to 8 bits
    assert img.meta["value_range"] == [0.0, 65535.0]


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("RGBA", 4), ("P", 3), ("LA", 2)])
def test_colour_modes_become_gray_luminance(tmp_path, mode, channels):
    arr = make_array((64, 64), 8)
    img = read_image(make_png(tmp_path / f"{mode}.png", mode=mode, array=arr))
    assert img.array.ndim == 2 and img.channels == channels
    # a gray picture saved in colour decodes to (almost) the same gray values
    assert np.abs(img.array - arr).max() <= 1.0


def test_rgb_uses_luminance_weights(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 200  # pure green
    from PIL import Image

    Image.fromarray(rgb).save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png", content_limits=None)  # a flat 8x8 swatch: no content check
    assert img.array.mean() == pytest.approx(0.587 * 200, abs=0.01)
    assert img.meta["rgb_is_gray"] is False


def test_jpeg_gray(tmp_path):
    img = read_image(make_jpeg(tmp_path / "a.jpg"))
    assert (img.format, img.bit_depth, img.channels) == ("jpeg", 8, 1)
    assert img.array[:, BAR].mean() > 200 > img.array[:, :10].mean()


def test_cmyk_jpeg_handled_with_right_polarity(tmp_path):
    img = read_image(make_cmyk_jpeg(tmp_path / "k.jpg"))
    assert img.channels == 4 and img.meta["converted_from"] == "CMYK"
    ref = make_array((64, 64), 8).astype(np.float32)
    assert np.abs(img.array - ref).mean() < 6  # bone stays bright after CMYK -> gray


def test_format_from_content_not_extension(tmp_path):
    png_named_jpg = make_png(tmp_path / "actually_png.jpg")
    assert read_image(png_named_jpg).format == "png"
    assert read_image(png_named_jpg.read_bytes()).format == "png"  # bytes input too


def test_truncated_jpeg_refused(tmp_path):
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        read_image(make_truncated_jpeg(tmp_path / "t.jpg"))


def test_jpeg_cut_just_before_end_marker_refused(tmp_path):
    data = make_jpeg(tmp_path / "a.jpg").read_bytes()
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        read_image(data[:-2])


def test_truncated_png_refused(tmp_path):
    data = make_png(tmp_path / "a.png", size=(128, 128)).read_bytes()
    with pytest.raises(ImageDecodeError, match="truncated PNG"):
        read_image(data[: len(data) // 2])


def test_zero_bytes_and_text_and_missing(tmp_path):
    with pytest.raises(ImageDecodeError, match="empty file"):
        read_image(make_zero_byte(tmp_path / "z.jpg"))
    with pytest.raises(ImageDecodeError, match="content is text"):
        read_image(make_text_file(tmp_path / "x.jpg"))
    with pytest.raises(ImageDecodeError, match="file not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageDecodeError, match="unrecognised"):
        read_image(bytes(range(256)) * 4)


def test_decompression_bomb_guard(tmp_path):
    bomb = make_decompression_bomb_png(tmp_path / "bomb.png", side=12000)  # 144 Mpx, ~30 KB
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(ImageDecodeError, match=r"decompression bomb.*max_pixels=1000000"):
        read_image(bomb, max_pixels=1_000_000)
    # within the limit it decodes
    small = make_png(tmp_path / "small.png")
    assert read_image(small, max_pixels=64 * 64).array.shape == (64, 64)


def test_decompression_bomb_pillow_default_limit(tmp_path):
    bomb = make_decompression_bomb_png(tmp_path / "huge.png", side=20000)  # 400 Mpx > Pillow's hard limit
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        read_image(bomb)


def test_volumes_and_expected_dims(tmp_path):
    vol = np.stack([make_array((32, 32), 12, seed=i) for i in range(5)]).astype(np.int16)
    nii = make_nifti(tmp_path / "v.nii.gz", vol)
    img = read_image(nii)
    assert img.array.shape == (5, 32, 32) and img.spatial_dims == 3 and img.format == "nifti"
    np.testing.assert_array_equal(img.array, vol.astype(np.float32))
    with pytest.raises(ImageDecodeError, match="a 3D volume where a 2D image is expected"):
        read_image(nii, expected_dims=2)
    with pytest.raises(ImageDecodeError, match="a 3D volume where a 2D image is expected"):
        read_image(make_dicom_series(tmp_path / "series"), expected_dims=2)
    with pytest.raises(ImageDecodeError, match="a 2D image where a 3D volume is expected"):
        read_image(make_png(tmp_path / "a.png"), expected_dims=3)


def test_truncated_nifti_refused(tmp_path):
    data = make_nifti(tmp_path / "v.nii.gz").read_bytes()
    with pytest.raises(ImageDecodeError, match="NIfTI"):
        read_image(data[: len(data) // 2])


@pytest.mark.parametrize(
    "head, fmt",
    [
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "png"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, "jpeg"),
        (b"\x00" * 128 + b"DICM" + b"\x00" * 10, "dicom"),
        (b"", "empty"),
        (b"hello, this is plain text\n" * 4, "text"),
        (b"\x00\x01\x02\xfe\xfd" * 20, "unknown"),
    ],
)
def test_sniff_format(head, fmt):
    assert sniff_format(head) == fmt
