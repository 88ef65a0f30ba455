"""Broken (and tricky but valid) inputs: each gets the right verdict in read_image and in the table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tests._factories import (
    make_array,
    make_cmyk_jpeg,
    make_decompression_bomb_png,
    make_dicom,
    make_jpeg,
    make_nifti,
    make_png,
    make_text_file,
    make_truncated_jpeg,
    make_zero_byte,
)

from bonefrac.data.imageio import ImageDecodeError, read_image
from bonefrac.data.metadata import build_metadata_table
from bonefrac.data.schema import MANIFEST_COLUMNS, RECORD_COLUMNS

MAX_PIXELS = 4_000_000


def _mono1(p: Path) -> Path:
    # MONOCHROME1 radiograph: bone stored LOW; valid, must decode with bone bright
    return make_dicom(p, (4095 - make_array((64, 64), 12)).astype(np.uint16), photometric="MONOCHROME1")


# name -> (factory, expected error substring or None for valid, expected format in the table)
CORPUS: dict[str, tuple[Callable[[Path], Path], str | None, str]] = {
    "truncated.jpg": (make_truncated_jpeg, "truncated JPEG", "jpeg"),
    "zero.jpg": (make_zero_byte, "empty file", "unknown"),
    "text.jpg": (make_text_file, "content is text", "unknown"),
    "cmyk.jpg": (make_cmyk_jpeg, None, "jpeg"),
    "gray16.png": (lambda p: make_png(p, bit_depth=16), None, "png"),
    "rgb.png": (lambda p: make_png(p, mode="RGB"), None, "png"),
    "nopixels.dcm": (lambda p: make_dicom(p, with_pixels=False), "no pixel data", "dicom"),
    "mono1.dcm": (_mono1, None, "dicom"),
    "volume.nii.gz": (make_nifti, "a 3D volume where a 2D image is expected", "nifti"),
    "bomb.png": (lambda p: make_decompression_bomb_png(p, side=8000), "decompression bomb", "png"),
    "ok.jpg": (make_jpeg, None, "jpeg"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("corpus")
    return {name: factory(d / name) for name, (factory, _, _) in CORPUS.items()}


@pytest.mark.parametrize("name", list(CORPUS))
def test_read_image_verdict(corpus, name):
    _, error, _ = CORPUS[name]
    if error is None:
        img = read_image(corpus[name], max_pixels=MAX_PIXELS, expected_dims=2)
        assert img.complete and img.array.ndim == 2 and np.isfinite(img.array).all()
    else:
        with pytest.raises(ImageDecodeError, match=error):
            read_image(corpus[name], max_pixels=MAX_PIXELS, expected_dims=2)


def test_valid_tricky_files_decode_right(corpus):
    assert read_image(corpus["gray16.png"]).bit_depth == 16
    rgb = read_image(corpus["rgb.png"])
    assert rgb.channels == 3 and rgb.array.ndim == 2
    cmyk = read_image(corpus["cmyk.jpg"])
    assert cmyk.channels == 4 and cmyk.array[:, 25].mean() > cmyk.array[:, 2].mean()  # bone bright
    mono1 = read_image(corpus["mono1.dcm"]).array
    assert mono1[:, 25].mean() > 3000 > mono1[:, 2].mean()  # bone bright, background dark


def test_metadata_table_verdicts(corpus, tmp_path):
    records = pd.DataFrame(
        [
            dict(
                image_id=n,
                path=str(p),
                label=0,
                fracture_type="",
                body_part="hand",
                view="",
                patient_id="",
                study_id="",
                boxes="[]",
                hardware=-1,
            )
            for n, p in corpus.items()
        ]
        + [
            dict(
                image_id="missing",
                path=str(tmp_path / "gone.png"),
                label=0,
                fracture_type="",
                body_part="hand",
                view="",
                patient_id="",
                study_id="",
                boxes="[]",
                hardware=-1,
            )
        ],
        columns=RECORD_COLUMNS,
    )
    table = build_metadata_table(records, max_pixels=MAX_PIXELS, expected_dims=2).set_index("image_id")
    assert list(table.reset_index().columns) == MANIFEST_COLUMNS
    for name, (_, error, fmt) in CORPUS.items():
        row = table.loc[name]
        assert row["format"] == fmt, name
        if error is None:
            assert row["decodes_ok"], (name, row["decode_error"])
            assert row["decode_error"] == "" and len(row["phash"]) == 16
            assert 0.0 <= row["intensity_p01"] <= row["intensity_mean"] <= row["intensity_p99"] <= 1.0
            assert row["sha256"] and row["file_size"] > 0
        else:
            assert not row["decodes_ok"], name
            assert error in row["decode_error"], (name, row["decode_error"])
            if name != "volume.nii.gz":
                assert row["phash"] == "" and np.isnan(row["intensity_mean"])
    # the volume is refused for a 2D pipeline but still described (validation can say what it is)
    assert table.loc["volume.nii.gz", "spatial_dims"] == 3 and table.loc["volume.nii.gz", "depth"] == 6
    no_check = build_metadata_table(records.iloc[[list(CORPUS).index("volume.nii.gz")]])
    assert no_check["decodes_ok"].all()
    assert table.loc["gray16.png", "bit_depth"] == 16 and table.loc["mono1.dcm", "bit_depth"] == 12
    assert table.loc["cmyk.jpg", "channels"] == 4 and table.loc["rgb.png", "channels"] == 3
    assert table.loc["zero.jpg", "file_size"] == 0
    assert not table.loc["missing", "decodes_ok"] and "file not found" in table.loc["missing", "decode_error"]
    # the same image in 8 and 16 bits gets the same [0, 1]-scaled statistics
    assert table.loc["gray16.png", "intensity_mean"] == pytest.approx(
        table.loc["ok.jpg", "intensity_mean"], abs=0.02
    )


def test_phash_finds_near_duplicates(tmp_path):
    from bonefrac.data.metadata import describe_image

    def blocks(seed: int) -> np.ndarray:  # textured picture: 8 x 8 random blocks of 16 px
        grid = np.random.default_rng(seed).integers(0, 256, (8, 8))
        return np.kron(grid, np.ones((16, 16))).astype(np.uint8)

    png = describe_image(str(make_png(tmp_path / "a.png", array=blocks(1))))
    jpg = describe_image(str(make_jpeg(tmp_path / "a.jpg", array=blocks(1), quality=70)))  # same, re-encoded
    other = describe_image(str(make_png(tmp_path / "b.png", array=blocks(2))))
    import imagehash

    def dist(a, b):
        return imagehash.hex_to_hash(a["phash"]) - imagehash.hex_to_hash(b["phash"])

    assert png["sha256"] != jpg["sha256"]
    assert dist(png, jpg) <= 4 < dist(png, other)


def test_parallel_table_equals_serial(corpus):
    records = pd.DataFrame(
        [
            dict(
                image_id=n,
                path=str(p),
                label=0,
                fracture_type="",
                body_part="hand",
                view="",
                patient_id="",
                study_id="",
                boxes="[]",
                hardware=-1,
            )
            for n, p in corpus.items()
            if n != "bomb.png"
        ]
        * 2,
        columns=RECORD_COLUMNS,
    )
    serial = build_metadata_table(records, max_pixels=MAX_PIXELS, workers=1)
    parallel = build_metadata_table(records, max_pixels=MAX_PIXELS, workers=2)
    pd.testing.assert_frame_equal(serial, parallel)
