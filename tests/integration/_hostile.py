"""A corpus of hostile files (issue 16) for the live service and ``bonefrac predict``.

Every file here must be refused (4xx, never 200 and never 500) by a 2D model's
service and get an ``error`` row from ``bonefrac predict``. Built from
``tests/_factories.py`` and the hostile PNGs of ``tests/unit/test_strict_decode.py``.
"""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from tests._factories import (
    make_array,
    make_decompression_bomb_png,
    make_dicom,
    make_jpeg,
    make_nifti,
    make_png,
    make_text_file,
    make_truncated_jpeg,
)

#: A marker put in file names: it must never appear in a log.
NAME_MARKER = "HOSTILEname7f3a"


def _chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def _png(width: int, height: int, rows: bytes, *, depth: int = 8, colour: int = 0, finish: bool = True) -> bytes:
    comp = zlib.compressobj(9)
    body = comp.compress(rows) + comp.flush(zlib.Z_FINISH if finish else zlib.Z_SYNC_FLUSH)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def _corrupt_png(tmp: Path, patch_crc: bool) -> bytes:
    data = bytearray(make_png(tmp / "ok.png", array=make_array((256, 256), 8)).read_bytes())
    i = data.index(b"IDAT")
    start, length = i + 4, struct.unpack(">I", data[i - 4 : i])[0]
    data[start + length // 2] ^= 0x5A
    if patch_crc:
        crc = zlib.crc32(bytes(data[start - 4 : start + length]))
        data[start + length : start + length + 4] = struct.pack(">I", crc)
    return bytes(data)


def _pil(fmt: str, mode: str = "L", size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    arr = make_array((size[1], size[0]), 8)
    im = Image.fromarray(arr).convert(mode)
    im.save(buf, format=fmt)
    return buf.getvalue()


def _dicom_bytes(tmp: Path, name: str, **kw) -> bytes:
    return make_dicom(tmp / name, **kw).read_bytes()


def _dicom_bad_frames(tmp: Path) -> bytes:
    data = _dicom_bytes(tmp, "nf.dcm", NumberOfFrames="12")
    i = data.find(b"\x28\x00\x08\x00IS")
    return data[: i + 8] + b"ab" + data[i + 10 :]  # NumberOfFrames = "ab"


def hostile_files(tmp: Path) -> dict[str, bytes]:
    """``{file name: content}``: 45 files a 2D radiograph model must refuse."""
    tmp.mkdir(parents=True, exist_ok=True)
    ok_png = make_png(tmp / "okay.png").read_bytes()
    ok_jpg = make_jpeg(tmp / "okay.jpg").read_bytes()
    ok_dcm = _dicom_bytes(tmp, "okay.dcm")
    flat = np.full((256, 256), 117, np.uint8)
    near_flat = (np.random.default_rng(0).random((256, 256)) < 0.5).astype(np.uint8) + 100
    row7000 = b"\x00" + (np.arange(7000) % 251).astype(np.uint8).tobytes()
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("image.png", ok_png)
    files = {
        # not images at all
        "text.jpg": make_text_file(tmp / "t.jpg").read_bytes(),
        "garbage.png": bytes(range(256)) * 16,
        "empty.png": b"",
        "pdf.png": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n",
        "archive.zip": zbuf.getvalue(),
        "utf16.png": "<html>not found</html>".encode("utf-16"),
        "json.jpeg": b'{"file": "http://127.0.0.1:9/x"}',
        "image.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>',
        "elf.dcm": b"\x7fELF\x02\x01\x01" + bytes(200),
        # formats the 2D service does not take
        "image.gif": _pil("GIF"),
        "image.tif": _pil("TIFF"),
        "image.bmp": _pil("BMP"),
        "image.webp": _pil("WEBP"),
        "volume.nii.gz": make_nifti(tmp / "v.nii.gz").read_bytes(),
        "volume.nii": make_nifti(tmp / "v.nii").read_bytes(),
        # truncated / corrupt
        "truncated.jpg": make_truncated_jpeg(tmp / "tr.jpg").read_bytes(),
        "jpeg_head_only.jpg": ok_jpg[:200],
        "jpeg_soi_only.jpg": b"\xff\xd8\xff",
        "png_zero_width.png": _png(0, 64, b"\x00"),
        "png_sig_only.png": ok_png[:8],
        "png_cut_half.png": ok_png[: len(ok_png) // 2],
        "png_bad_crc.png": _corrupt_png(tmp, patch_crc=False),
        "png_patched_crc.png": _corrupt_png(tmp, patch_crc=True),
        "png_10_rows_of_7000.png": _png(7000, 7000, row7000 * 10),
        "png_unfinished_zlib.png": _png(64, 64, (b"\x00" + bytes(range(64))) * 32, finish=False),
        "png_bad_ihdr.png": ok_png[:16] + b"\x00\x00\x00\x00" + ok_png[20:],
        # decompression and decode-budget bombs
        "bomb.png": make_decompression_bomb_png(tmp / "bomb.png").read_bytes(),
        "rgba16_bomb.png": _png(6000, 6000, b"\x00", depth=16, colour=6),  # 288 MB raster, header only
        "gray16_huge.png": _png(60000, 60000, b"\x00", depth=16),
        "dicom_rows_bomb.dcm": _dicom_bytes(tmp, "rb.dcm", Rows=60000, Columns=60000),
        # degenerate sizes and content
        "one_pixel.png": make_png(tmp / "1.png", array=make_array((1, 1), 8)).read_bytes(),
        "two_by_two.png": make_png(tmp / "2.png", array=make_array((2, 2), 8)).read_bytes(),
        "strip_10x10000.png": make_png(tmp / "s1.png", array=make_array((10, 10000), 8)).read_bytes(),
        "strip_40x10000.png": make_png(tmp / "s2.png", array=make_array((40, 10000), 8)).read_bytes(),
        "constant.png": make_png(tmp / "c.png", array=flat).read_bytes(),
        "black.png": make_png(tmp / "b.png", array=np.zeros((512, 512), np.uint8)).read_bytes(),
        "near_constant.png": make_png(tmp / "n.png", array=near_flat).read_bytes(),
        "constant.jpg": make_jpeg(tmp / "c.jpg", array=flat).read_bytes(),
        # DICOM
        "dicom_no_pixels.dcm": _dicom_bytes(tmp, "np.dcm", with_pixels=False),
        "dicom_frames_ab.dcm": _dicom_bad_frames(tmp),
        "dicom_wrong_modality.dcm": _dicom_bytes(tmp, "mr.dcm", modality="MR"),
        "dicom_truncated.dcm": ok_dcm[: len(ok_dcm) - 3000],
        "dicom_marker_only.dcm": bytes(128) + b"DICM",
        "dicom_constant.dcm": _dicom_bytes(tmp, "k.dcm", array=np.full((64, 64), 800, np.uint16)),
        "nifti_header_only.nii": gzip.decompress(make_nifti(tmp / "h.nii.gz").read_bytes())[:348],
    }
    return files


def valid_files(tmp: Path) -> dict[str, bytes]:
    """Files the service must accept (a control group)."""
    return {
        "ok.png": make_png(tmp / "ok1.png").read_bytes(),
        "ok16.png": make_png(tmp / "ok2.png", bit_depth=16).read_bytes(),
        "ok.jpg": make_jpeg(tmp / "ok3.jpg").read_bytes(),
        "ok.dcm": _dicom_bytes(tmp, "ok4.dcm"),
    }
