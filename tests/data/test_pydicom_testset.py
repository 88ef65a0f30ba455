"""Every file of pydicom's bundled test set through the decoder: each gets a verdict, none a traceback.

The set (``pydicom.data.get_testdata_files()``, shipped inside the pydicom wheel, no
download) is DICOM as the world writes it: dual-personality files with a TIFF header
in the preamble, files without preamble in either byte order, every transfer syntax,
non-image objects (SR, RT plans, DICOMDIR), colour secondary captures, a truncated
file, a malformed header. A verdict is "decoded" or the reason of an
:class:`ImageDecodeError`; anything else raised fails the test.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file, get_testdata_files

from bonefrac.data.imageio import ImageDecodeError, read_image


def _verdict(path: str, **kw) -> str:
    try:
        img = read_image(path, **kw)
    except ImageDecodeError as err:
        return str(err)
    assert np.isfinite(img.array).all(), path
    return "decoded"


def _reason(verdict: str) -> str:
    """The verdict without its numbers: the kind of refusal, for counting."""
    return re.sub(r"\d+", "N", verdict.split(";")[0].split(" (")[0].split(": accepted")[0])


@pytest.fixture(scope="module")
def verdicts() -> dict[str, str]:
    files = get_testdata_files()
    assert len(files) > 100, "pydicom's bundled test files are missing"
    out = {}
    for f in files:
        key = str(Path(f).relative_to(Path(get_testdata_file("CT_small.dcm", download=False)).parent))
        out[key] = _verdict(f)  # any exception other than ImageDecodeError fails here
    return out


def test_every_file_gets_a_verdict(verdicts):
    counts = collections.Counter(_reason(v) for v in verdicts.values())
    print("\nverdicts on pydicom's test set:")
    for reason, n in counts.most_common():
        print(f"{n:4d}  {reason}")
    assert counts["decoded"] >= 15
    for name, v in verdicts.items():
        assert v == "decoded" or (v[0].isalpha() and "Traceback" not in v), (name, v)


# name -> expected verdict (exact "decoded" or a substring of the refusal)
EXPECTED = {
    # dual personality: TIFF header in the preamble, then DICM
    "CT_small.dcm": "decoded",
    "MR_small.dcm": "decoded",
    "MR_small_padded.dcm": "decoded",
    "MR_small_implicit.dcm": "decoded",
    "MR_small_bigendian.dcm": "decoded",
    "MR_small_RLE.dcm": "decoded",
    # compressed transfer syntaxes
    "MR_small_jpeg_ls_lossless.dcm": "decoded",
    "MR_small_jp2klossless.dcm": "decoded",
    "693_J2KI.dcm": "decoded",
    "J2K_pixelrep_mismatch.dcm": "decoded",
    "image_dfl.dcm": "decoded",  # deflated explicit VR
    # preamble-less in both byte orders: read as DICOM, refused for what they are
    "ExplVR_BigEndNoMeta.dcm": "DICOM modality RTPLAN refused",
    "ExplVR_LitEndNoMeta.dcm": "DICOM modality RTPLAN refused",
    # non-radiograph modalities, named
    "rtdose.dcm": "DICOM modality RTDOSE refused",
    "examples_rgb_color.dcm": "DICOM modality US refused",
    "examples_jpeg2k.dcm": "DICOM modality US refused",
    "liver_1frame.dcm": "DICOM modality SEG refused",
    "JPGExtended.dcm": "DICOM modality NM refused",
    "waveform_ecg.dcm": "DICOM modality ECG refused",
    "test-SR.dcm": "DICOM modality SR refused",
    # colour secondary captures
    "SC_rgb_jpeg_gdcm.dcm": "colour DICOM refused: a secondary capture in RGB",
    "SC_ybr_full_422_uncompressed.dcm": "colour DICOM refused: a secondary capture in YBR_FULL_422",
    # damaged
    "badVR.dcm": "bad DICOM header: NumberOfFrames is not a valid integer",
    "MR_truncated.dcm": "cannot decode DICOM pixel data",
    "JPEGLSNearLossless_08.dcm": "not a radiograph: too small",
    "dicomdirtests/DICOMDIR": "no pixel data",
    "dicomdirtests/98892003": "folder mixes 7 DICOM series",  # folders are read as a series
    "README.txt": "content is text",
    "crayons.icc": "unrecognised content",
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_expected_verdict(verdicts, name):
    v = verdicts[name]
    want = EXPECTED[name]
    assert (v == want) if want == "decoded" else (want in v), v


def test_radiograph_policy_refuses_ct_mr_slices():
    for name in ("CT_small.dcm", "MR_small_jp2klossless.dcm"):
        with pytest.raises(ImageDecodeError, match=r"DICOM modality (CT|MR) refused: accepted here CR, DX, RF, XA"):
            read_image(get_testdata_file(name, download=False), expected_dims=2)


@pytest.mark.parametrize(
    "name, reference",
    [
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS lossless
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000 lossless
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"),  # JPEG Lossless, process 14 (SV1)
    ],
)
def test_lossless_codecs_match_the_uncompressed_file(name, reference):
    try:
        ref_path = get_testdata_file(reference, download=False)
    except (ValueError, OSError):
        ref_path = None
    img = read_image(get_testdata_file(name, download=False), modalities="any", content_limits=None)
    assert img.array.ndim == 2 and img.array.std() > 0
    if ref_path is not None:  # SC_rgb.dcm is not in every pydicom wheel
        ref = read_image(ref_path, modalities="any", content_limits=None)
        np.testing.assert_allclose(img.array, ref.array, atol=1e-3)


@pytest.mark.parametrize(
    "name, bits",
    [
        ("JPGExtended.dcm", 12),  # JPEG Extended (process 2 & 4), 12-bit
        ("JPEG2000.dcm", 16),
        ("JPEGLSNearLossless_16.dcm", 16),  # JPEG-LS near-lossless
        ("SC_rgb_jpeg_gdcm.dcm", 8),  # JPEG Lossless (process 14)
    ],
)
def test_codecs_decode_whatever_the_modality(name, bits):
    img = read_image(get_testdata_file(name, download=False), modalities="any", content_limits=None)
    assert img.bit_depth == bits and img.array.std() > 0 and np.isfinite(img.array).all()


def test_undecodable_codestream_is_a_decode_error():
    # JPEG-lossy.dcm has a 12-bit codestream libjpeg rejects (pydicom's own tests expect
    # pylibjpeg to fail on it): a clear refusal, not a traceback.
    with pytest.raises(ImageDecodeError, match="cannot decode DICOM pixel data"):
        read_image(get_testdata_file("JPEG-lossy.dcm", download=False), modalities="any")
