"""DICOM decoding: modality LUT, window, MONOCHROME1 polarity, series order, missing pixels, no PHI."""

from __future__ import annotations

from pathlib import Path

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


# ------------------------------------------------------------------ DICOM as hospitals write it
def _dx(tmp_path, name="dx.dcm", **kw):
    return make_dicom(tmp_path / name, make_array((64, 64), 12), **kw)


def test_dual_personality_dicom_sniffed_as_dicom():
    from pydicom.data import get_testdata_file

    from bonefrac.data.imageio import sniff_format

    path = get_testdata_file("CT_small.dcm", download=False)
    head = Path(path).read_bytes()[:1024]
    assert head[:4] == b"II*\x00" and head[128:132] == b"DICM"  # a TIFF header in the preamble
    assert sniff_format(head) == "dicom"
    img = read_image(path)
    assert (img.format, img.modality, img.array.shape) == ("dicom", "CT", (128, 128))


@pytest.mark.parametrize("implicit, little", [(True, True), (False, True), (False, False)])
def test_preambleless_dicom_decodes(tmp_path, implicit, little):
    import io

    import pydicom

    arr = make_array((64, 64), 12)
    ds = pydicom.dcmread(_dx(tmp_path))
    del ds.file_meta
    ds.preamble = None
    ds.PixelData = arr.astype("<u2" if little else ">u2").tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=implicit, little_endian=little, enforce_file_format=False)
    data = buf.getvalue()
    assert b"DICM" not in data[:200]
    img = read_image(data, expected_dims=2)
    assert img.format == "dicom" and img.modality == "DX"
    np.testing.assert_array_equal(img.array, arr.astype(np.float32))


def test_random_bytes_are_not_taken_for_preambleless_dicom():
    with pytest.raises(ImageDecodeError, match="unrecognised content"):
        read_image(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("syntax", ["JPEGLSLossless", "JPEG2000Lossless", "RLELossless"])
def test_compressed_12bit_radiograph_decodes_exactly(tmp_path, syntax):
    import io

    import pydicom
    import pydicom.uid

    arr = make_array((64, 64), 12)
    ds = pydicom.dcmread(_dx(tmp_path))
    ds.compress(getattr(pydicom.uid, syntax), arr.astype(np.uint16))
    buf = io.BytesIO()
    ds.save_as(buf)
    img = read_image(buf.getvalue(), expected_dims=2)
    assert img.meta["TransferSyntax"] == getattr(pydicom.uid, syntax).name
    np.testing.assert_array_equal(img.array, arr.astype(np.float32))


@pytest.mark.parametrize("modality", ["CR", "DX", "RF", "XA"])
def test_radiograph_modalities_accepted_for_2d(tmp_path, modality):
    assert read_image(_dx(tmp_path, modality=modality), expected_dims=2).modality == modality


@pytest.mark.parametrize("modality", ["US", "RTDOSE", "NM", "MG", "CT", "MR"])
def test_other_modalities_refused_for_2d_with_modality_named(tmp_path, modality):
    with pytest.raises(ImageDecodeError, match=f"DICOM modality {modality} refused"):
        read_image(_dx(tmp_path, modality=modality), expected_dims=2)


def test_accepted_modalities_are_a_parameter(tmp_path):
    mg = _dx(tmp_path, modality="MG")
    assert read_image(mg, expected_dims=2, modalities={"MG", "DX"}).modality == "MG"
    with pytest.raises(ImageDecodeError, match="DICOM modality DX refused: accepted here MG"):
        read_image(_dx(tmp_path, "b.dcm"), modalities=["mg"])
    with pytest.raises(ValueError, match="'any'"):
        read_image(mg, modalities="all")


def test_volume_modalities_for_3d(tmp_path):
    assert read_image(make_dicom_series(tmp_path / "ct"), expected_dims=3).modality == "CT"
    assert read_image(make_dicom_series(tmp_path / "mr", modality="MR"), expected_dims=3).modality == "MR"
    with pytest.raises(ImageDecodeError, match="DICOM modality DX refused: accepted here CT, MR"):
        read_image(make_dicom_series(tmp_path / "dx", modality="DX"), expected_dims=3)
    # without expected_dims (ingest), either kind passes
    assert read_image(_dx(tmp_path, modality="CT")).modality == "CT"


def test_secondary_capture_without_modality(tmp_path):
    import pydicom

    sc = "1.2.840.10008.5.1.4.1.1.7"
    f = _dx(tmp_path, sop_class=sc)
    ds = pydicom.dcmread(f)
    del ds.Modality
    ds.save_as(f)
    assert read_image(f, expected_dims=2).modality == "OT"  # a digitised film: monochrome, accepted
    ot = _dx(tmp_path, "ot.dcm", modality="OT", sop_class=sc)
    assert read_image(ot, expected_dims=2).format == "dicom"
    with pytest.raises(ImageDecodeError, match="DICOM modality OT refused"):  # OT outside secondary capture
        read_image(_dx(tmp_path, "ot2.dcm", modality="OT"), expected_dims=2)


def test_colour_secondary_capture_refused_for_2d(tmp_path):
    import pydicom

    f = _dx(tmp_path, modality="OT", sop_class="1.2.840.10008.5.1.4.1.1.7")
    ds = pydicom.dcmread(f)
    rgb = np.repeat(make_array((64, 64), 8)[..., None], 3, axis=2)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = rgb.tobytes()
    ds.save_as(f)
    with pytest.raises(ImageDecodeError, match="colour DICOM refused: a secondary capture in RGB"):
        read_image(f, expected_dims=2)
    assert read_image(f, modalities="any").channels == 3  # explicitly allowed: reduced to luminance


def _patch_value(path, keyword_tag: bytes, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    i = data.index(keyword_tag)
    j = data.index(old, i)
    path.write_bytes(data[:j] + new + data[j + len(new) :])


@pytest.mark.parametrize(
    "keyword, tag, old, new",
    [
        ("NumberOfFrames", b"\x28\x00\x08\x00IS", b"7 ", b"ab"),
        ("RescaleSlope", b"\x28\x00\x53\x10DS", b"2.0 ", b"x9z "),
    ],
)
def test_malformed_header_is_a_clear_error_without_the_value(tmp_path, keyword, tag, old, new):
    f = _dx(tmp_path, NumberOfFrames=7 if keyword == "NumberOfFrames" else 1, rescale=(2.0, 0.0))
    _patch_value(f, tag, old, new)
    with pytest.raises(ImageDecodeError, match=f"bad DICOM header: {keyword}") as info:
        read_image(f)
    assert new.decode().strip() not in str(info.value)


def test_pydicom_badvr_file_is_a_bad_header():
    from pydicom.data import get_testdata_file

    with pytest.raises(ImageDecodeError, match="bad DICOM header: NumberOfFrames") as info:
        read_image(get_testdata_file("badVR.dcm", download=False))
    assert "1A" not in str(info.value)
