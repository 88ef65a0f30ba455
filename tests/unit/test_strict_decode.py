"""Strict decoding: hostile files built here are refused with the reason, never scored as black images.

Issue 15: a PNG with one corrupt byte in its image data, or a 7000x7000 PNG holding
10 rows of data, used to come back as an all-black image. Every decode error must
now be an :class:`ImageDecodeError`, and what no radiograph looks like (tiny, a strip,
a flat image) is refused after decoding.
"""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from tests._factories import make_array, make_jpeg, make_png

from bonefrac.data import imageio
from bonefrac.data.imageio import (
    MAX_ASPECT_RATIO,
    MIN_SIDE_PX,
    ContentLimits,
    ImageDecodeError,
    check_content,
    read_image,
)


def _chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def _png(width: int, height: int, rows: bytes, *, finish: bool = True) -> bytes:
    """An 8-bit gray PNG whose IHDR says width x height and whose IDAT holds ``rows`` (filtered scanlines)."""
    comp = zlib.compressobj(9)
    body = comp.compress(rows) + comp.flush(zlib.Z_FINISH if finish else zlib.Z_SYNC_FLUSH)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def _idat_span(data: bytes) -> tuple[int, int]:
    """(start of IDAT payload, payload length)."""
    i = data.index(b"IDAT")
    return i + 4, struct.unpack(">I", data[i - 4 : i])[0]


def _corrupt_png(tmp_path, patch_crc: bool) -> bytes:
    arr = make_array((256, 256), 8)
    data = bytearray(make_png(tmp_path / "ok.png", array=arr).read_bytes())
    start, length = _idat_span(bytes(data))
    data[start + length // 2] ^= 0x5A  # one byte in the middle of the compressed data
    if patch_crc:  # a careful attacker (or a buggy writer) keeps the chunk CRC valid
        crc = zlib.crc32(bytes(data[start - 4 : start + length]))
        data[start + length : start + length + 4] = struct.pack(">I", crc)
    assert bytes(data).endswith(_chunk(b"IEND", b""))  # IEND intact: only the data is wrong
    return bytes(data)


def test_truncated_images_flag_stays_off():
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # some other library turned it on
    try:
        with pytest.raises(ImageDecodeError, match="truncated PNG"):
            read_image(_png(7000, 7000, (b"\x00" + bytes(range(256)) * 27 + bytes(88)) * 10))
        assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_corrupt_byte_with_bad_crc_refused(tmp_path):
    with pytest.raises(ImageDecodeError, match="corrupt PNG: CRC mismatch in the IDAT chunk"):
        read_image(_corrupt_png(tmp_path, patch_crc=False))


def test_corrupt_byte_with_patched_crc_refused(tmp_path):
    # the CRC is right, so only the zlib stream itself (Huffman codes, Adler-32) can tell:
    # Pillow's decoder raises, and so does the decoder-independent row count
    data = _corrupt_png(tmp_path, patch_crc=True)
    with pytest.raises(ImageDecodeError, match="corrupt PNG"):
        read_image(data)
    with pytest.raises(ImageDecodeError, match="corrupt PNG: the image data does not decompress"):
        imageio._check_png_rows(data, imageio._check_png_chunks(data))


def test_black_bottom_edge_takes_the_full_row_check(tmp_path, monkeypatch):
    arr = make_array((128, 128), 8)
    arr[-5:] = 0  # collimated radiograph: black bottom rows
    calls = []
    monkeypatch.setattr(imageio, "_check_png_rows", lambda *a: calls.append(a))
    read_image(make_png(tmp_path / "b.png", array=arr))
    assert len(calls) == 1  # proven complete only by counting the rows
    read_image(make_png(tmp_path / "c.png", array=make_array((128, 128), 8)))
    assert len(calls) == 1  # last rows non-zero: the decoder reached the end


@pytest.mark.parametrize("finish", [True, False], ids=["stream-ends-early", "stream-cut"])
def test_7000px_png_with_10_rows_refused(finish):
    row = b"\x00" + (np.arange(7000) % 251).astype(np.uint8).tobytes()
    data = _png(7000, 7000, row * 10, finish=finish)
    assert len(data) < 100_000 and data.endswith(_chunk(b"IEND", b""))
    with pytest.raises(ImageDecodeError, match="truncated PNG"):
        read_image(data)


def test_png_cut_in_the_middle_refused(tmp_path):
    data = make_png(tmp_path / "a.png", size=(256, 256)).read_bytes()
    with pytest.raises(ImageDecodeError, match="truncated PNG"):
        read_image(data[: len(data) - 100])


def test_interlaced_and_16bit_png_still_decode(tmp_path):
    arr = make_array((70, 90), 16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    img = read_image(buf.getvalue())
    np.testing.assert_array_equal(img.array, arr.astype(np.float32))
    # Adam7: the expected data length is the sum over the 7 passes
    gray = make_array((67, 93), 8)
    raw = imageio._png_raw_size(93, 67, 8, 0, 1)
    assert raw == sum(
        h * (1 + w)
        for h, w in (
            ((67 + 7) // 8, (93 + 7) // 8),
            ((67 + 7) // 8, (93 + 3) // 8),
            ((67 + 3) // 8, (93 + 3) // 4),
            ((67 + 3) // 4, (93 + 1) // 4),
            ((67 + 1) // 4, (93 + 1) // 2),
            ((67 + 1) // 2, 93 // 2),
            (67 // 2, 93),
        )
    )
    assert read_image(make_png(tmp_path / "g.png", array=gray)).array.shape == (67, 93)


# ------------------------------------------------------------------ content check
@pytest.mark.parametrize(
    "array, reason",
    [
        (make_array((2, 2), 8), "too small"),
        (make_array((10, 10000), 8), "too small"),
        (make_array((40, 10000), 8), "extreme aspect ratio 250.0:1"),
        (np.full((256, 256), 117, np.uint8), "constant image"),
        (np.zeros((512, 512), np.uint8), "constant image"),
        # a flat gray frame with faint sensor noise: 98 % of pixels within 1 gray level
        ((np.random.default_rng(0).random((256, 256)) < 0.5).astype(np.uint8) + 100, "near-constant image"),
    ],
    ids=["2x2", "10x10000", "40x10000", "constant", "black", "near-constant"],
)
def test_what_no_radiograph_looks_like_is_refused(tmp_path, array, reason):
    f = make_png(tmp_path / "x.png", array=array)
    with pytest.raises(ImageDecodeError, match=re.escape(f"not a radiograph: {reason}")):
        read_image(f)
    read_image(f, content_limits=None)  # it is a valid PNG: only the content check refuses it


def test_content_limits_are_named_and_configurable(tmp_path):
    assert (MIN_SIDE_PX, MAX_ASPECT_RATIO) == (32, 10.0)
    strip = make_png(tmp_path / "s.png", array=make_array((40, 300), 8))  # 7.5:1
    read_image(strip)
    with pytest.raises(ImageDecodeError, match=r"extreme aspect ratio 7\.5:1"):
        read_image(strip, content_limits=ContentLimits(max_aspect=5.0))
    img = read_image(make_png(tmp_path / "t.png", array=make_array((20, 20), 8)), content_limits=None)
    check_content(img, ContentLimits(min_side=16))
    with pytest.raises(ImageDecodeError, match="too small"):
        check_content(img)


def test_dark_16bit_radiograph_is_not_near_constant(tmp_path):
    # 10-bit detector data in a 16-bit PNG spans < 2 % of the nominal range: still content
    arr = (make_array((128, 128), 10)).astype(np.uint16)
    img = read_image(make_png(tmp_path / "d.png", bit_depth=16, array=arr))
    assert img.bit_depth == 16


def test_volumes_skip_the_2d_content_check(tmp_path):
    from tests._factories import make_dicom_series

    vol = np.stack([np.full((16, 16), 100 * (z + 1), np.uint16) for z in range(4)])
    assert read_image(make_dicom_series(tmp_path / "s", vol)).array.shape == (4, 16, 16)


# ------------------------------------------------------------------ reduced-scale JPEG (issue 16)
def _radiograph_like(h: int, w: int) -> np.ndarray:
    """Smooth anatomy-like content (no pixel-level noise, which a downscale must average away)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    arr = 60 + 50 * np.sin(6 * xx) * np.cos(4 * yy) + 120 * (np.abs(xx - 0.45) < 0.06)
    return np.clip(arr, 0, 255).astype(np.uint8)


def test_jpeg_reduced_scale_decode_matches_full_decode(tmp_path):
    h, w = 2880, 2304
    f = make_jpeg(tmp_path / "big.jpg", array=_radiograph_like(h, w), quality=90)
    full = read_image(f)
    small = read_image(f, max_side_hint=512)
    assert full.array.shape == (h, w) and "decode_scale" not in full.meta
    assert small.array.shape == (h // 4, w // 4)  # 1/4 scale keeps both sides >= 512
    assert small.meta["decode_scale"] == 4.0 and small.meta["full_size"] == [h, w]
    # the full decode, box-averaged to the same grid, matches the DCT-domain downscale
    ref = full.array.reshape(h // 4, 4, w // 4, 4).mean(axis=(1, 3))
    assert np.abs(small.array - ref).mean() < 1.5
    assert np.corrcoef(small.array.ravel(), ref.ravel())[0, 1] > 0.995
    # a hint the image is already close to: full resolution
    assert read_image(f, max_side_hint=2000).array.shape == (h, w)


def test_reduced_scale_decode_of_colour_jpeg_gives_luminance(tmp_path):
    f = make_jpeg(tmp_path / "c.jpg", array=_radiograph_like(1024, 768), mode="RGB")
    full, small = read_image(f), read_image(f, max_side_hint=128)
    assert small.array.shape == (256, 192)  # 1/8 would make the short side 96 < 128
    assert small.channels == full.channels == 3 and small.meta["decode_scale"] == 4.0
    ref = full.array.reshape(256, 4, 192, 4).mean(axis=(1, 3))
    assert np.abs(small.array - ref).mean() < 2.0


def test_max_side_hint_leaves_other_formats_alone(tmp_path):
    f = make_png(tmp_path / "p.png", size=(300, 300))
    assert read_image(f, max_side_hint=64).array.shape == (300, 300)


# ------------------------------------------------------------------ the service sees the same verdicts
@pytest.mark.parametrize("hostile", ["corrupt-patched-crc", "10-rows-of-7000", "constant"])
def test_service_refuses_hostile_pngs_with_422(tmp_path, hostile):
    from bonefrac.serving.input_safety import InputRejected, SafetyLimits, decode_upload

    if hostile == "corrupt-patched-crc":
        data = _corrupt_png(tmp_path, patch_crc=True)
    elif hostile == "10-rows-of-7000":
        data = _png(7000, 7000, (b"\x00" + (np.arange(7000) % 251).astype(np.uint8).tobytes()) * 10)
    else:
        data = make_png(tmp_path / "c.png", array=np.full((256, 256), 40, np.uint8)).read_bytes()
    with pytest.raises(InputRejected) as info:
        # A decode budget large enough that the decoder, not the header estimate, gives the verdict.
        limits = SafetyLimits(max_upload_bytes=32 * 2**20, max_pixels=60_000_000, max_decoded_bytes=2**31)
        decode_upload(data, 2, limits)
    assert info.value.status == 422  # was 200 and a score for an all-black image (issue 15)
