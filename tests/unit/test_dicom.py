"""DICOM decoding: modality LUT, window, MONOCHROME1 polarity, series order, missing pixels, no PHI."""

from __future__ import annotations

import numpy as np
import pytest
from tests._factories import make_array, make_dicom, make_dicom_series, phi_strings

from bonefrac.data.imageio import ImageDecodeError, read_image

BAR = slice(64 // 3, 64 // 3 + 64 // 6)


def test_dicom_12bit_kept(tmp_path):
    arr = make_array((64, 64), 12)
    img = read_image(make_dicom(tmp_path / "a.dcm", arr))
    assert (img.format, img.modality, img.bit_depth, img.spatial_dims) == ("dicom", "DX", 12, 2)
    np.testing.assert_array_equal(img.array, arr.astype(np.float32))
    assert img.meta["value_range"] == [0.0, 4095.0]


def test_dicom_found_without_extension(tmp_path):
    f = make_dicom(tmp_path / "IM0001")
    assert read_image(f).format == "dicom"


def test_rescale_slope_intercept_applied(tmp_path):
    arr = make_array((64, 64), 12)
    img = read_image(make_dicom(tmp_path / "r.dcm", arr, rescale=(2.0, -100.0)))
    np.testing.assert_allclose(img.array, arr * 2.0 - 100.0)
    assert img.meta["value_range"] == [-100.0, 4095 * 2.0 - 100.0]


def test_window_applied_after_rescale(tmp_path):
    arr = make_array((64, 64), 12)
    centre, width = 1000.0, 400.0
    img = read_image(make_dicom(tmp_path / "w.dcm", arr, window=(centre, width)))
    out = img.array
    # below the window -> bottom of the output range, above -> top
    assert out[arr <= centre - width / 2].max() == pytest.approx(0.0)
    assert out[arr > centre + width / 2].min() == pytest.approx(4095.0)
    assert img.meta["voi_applied"] == "window"


def test_monochrome1_inverted_so_bone_is_bright(tmp_path):
    mono2 = make_array((64, 64), 12)  # bone bar bright
    mono1 = (4095 - mono2).astype(np.uint16)  # MONOCHROME1 stores bone as low values
    a = read_image(make_dicom(tmp_path / "m2.dcm", mono2)).array
    b = read_image(make_dicom(tmp_path / "m1.dcm", mono1, photometric="MONOCHROME1"))
    assert b.meta["inverted_monochrome1"] is True
    assert b.array[:, BAR].mean() > 3000 > b.array[:, :10].mean()  # bright bone, dark background
    np.testing.assert_allclose(b.array, a)


def test_dicom_without_pixel_data(tmp_path):
    with pytest.raises(ImageDecodeError, match="no pixel data"):
        read_image(make_dicom(tmp_path / "np.dcm", with_pixels=False))


def test_dicom_with_short_pixel_data(tmp_path):
    f = make_dicom(tmp_path / "a.dcm")
    data = f.read_bytes()
    with pytest.raises(ImageDecodeError, match="DICOM"):
        read_image(data[: len(data) - 3000])


def test_meta_has_no_phi(tmp_path):
    img = read_image(make_dicom(tmp_path / "a.dcm"))
    text = repr(img.meta)
    for s in phi_strings():
        assert s not in text
    assert "UID" not in text


def test_series_sorted_by_position_not_file_name(tmp_path):
    vol = np.stack([np.full((16, 16), 100 * (z + 1), np.uint16) for z in range(6)])
    folder = make_dicom_series(tmp_path / "s", vol, spacing=3.0, rescale=(1.0, -1024.0))
    img = read_image(folder)
    assert img.format == "dicom_series" and img.modality == "CT" and img.array.shape == (6, 16, 16)
    np.testing.assert_allclose(img.array[:, 0, 0], [100 * (z + 1) - 1024 for z in range(6)])  # HU, in order
    assert img.meta["slice_spacing"] == pytest.approx(3.0)


def test_series_folder_with_two_series_refused(tmp_path):
    make_dicom_series(tmp_path / "mix" / "a")
    make_dicom_series(tmp_path / "mix" / "b")
    with pytest.raises(ImageDecodeError, match="mixes 2 DICOM series"):
        read_image(tmp_path / "mix")


def test_multiframe_dicom_is_a_volume(tmp_path):
    vol = np.stack([make_array((16, 16), 12, seed=i) for i in range(4)])
    f = make_dicom(tmp_path / "mf.dcm", vol[0], NumberOfFrames=4)
    # replace pixel data with 4 frames
    import pydicom

    ds = pydicom.dcmread(f)
    ds.PixelData = vol.astype(np.uint16).tobytes()
    ds.save_as(f)
    img = read_image(f)
    assert img.spatial_dims == 3 and img.array.shape == (4, 16, 16)
    with pytest.raises(ImageDecodeError, match="a 3D volume where a 2D image is expected"):
        read_image(f, expected_dims=2)
