"""Decode any supported image file (or upload) into one float32 array, or say exactly why not.

Every consumer (ingest, preprocessing, ``bonefrac predict``, the service) decodes
through :func:`read_image`, so a file gets the same verdict everywhere:

* the format is detected from the content (magic bytes), never from the extension,
  so a text file named ``.jpg`` or a DICOM without extension get the right reader;
* incomplete files are refused, not silently padded: Pillow's
  ``LOAD_TRUNCATED_IMAGES`` is never turned on here, and a JPEG must carry its
  end-of-image marker after the last scan (Pillow alone can miss a file cut
  exactly at the end), a PNG its ``IEND`` chunk;
* the pixel count is checked from the header before decoding (decompression bombs);
* radiographs come out as 2D ``(H, W)`` in stored units (16-bit kept, RGB/CMYK/palette
  reduced to luminance), DICOM after modality LUT → VOI LUT/window → MONOCHROME1
  inversion (:mod:`bonefrac.data.dicom`), volumes (DICOM series folder, NIfTI,
  multi-frame DICOM) as ``(D, H, W)``.

``DecodedImage.meta`` holds technical facts only (never names, ids, dates, UIDs).
Its ``value_range`` entry is the nominal ``[min, max]`` of the array (e.g. ``[0, 65535]``
for a 16-bit PNG) or ``None`` when only the data can tell (float images, NIfTI).
"""

from __future__ import annotations

import gzip
import io
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from bonefrac.data import dicom as _dicom
from bonefrac.errors import BonefracError


class ImageDecodeError(BonefracError, ValueError):
    """A file that cannot be used as an image; the message names the problem (never PHI)."""


@dataclass
class DecodedImage:
    """One decoded image or volume in stored units.

    ``array`` is float32, ``(H, W)`` for 2D or ``(D, H, W)`` for 3D. ``bit_depth`` is the
    stored bits per sample of the values in ``array`` (8, 12, 16, 32 for float), ``channels``
    the samples per pixel of the stored file (1 gray, 3 RGB/palette, 4 CMYK/RGBA) before
    reduction to gray. ``complete`` is True for every returned image: an incomplete file
    raises instead (the field lets a future lenient reader say otherwise).
    """

    array: np.ndarray
    bit_depth: int
    channels: int
    format: str
    modality: str
    spatial_dims: int
    complete: bool = True
    meta: dict[str, Any] = field(default_factory=dict)


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_RASTER_FORMATS = {"png", "jpeg", "tiff", "bmp", "gif", "webp"}


# ------------------------------------------------------------------ sniffing
def _is_nifti_header(head: bytes) -> bool:
    if len(head) < 348:
        return False
    size_le = int.from_bytes(head[0:4], "little")
    size_be = int.from_bytes(head[0:4], "big")
    if 348 in (size_le, size_be) and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return True
    return 540 in (size_le, size_be) and head[4:8] in (b"n+2\x00", b"ni2\x00")


def sniff_format(head: bytes) -> str:
    """Name the format of a file from its first bytes (≥ 540 bytes recommended).

    Returns ``png``, ``jpeg``, ``dicom``, ``nifti``, ``tiff``, ``bmp``, ``gif``, ``webp``,
    ``empty``, ``text`` (printable content, e.g. an HTML error page saved as .jpg),
    or ``unknown``.
    """
    if not head:
        return "empty"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith(b"GIF8"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if _dicom.looks_like_dicom(head):
        return "dicom"
    if _is_nifti_header(head):
        return "nifti"
    if head.startswith(b"\x1f\x8b"):
        try:
            inner = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 600)
        except zlib.error:
            inner = b""
        return "nifti" if _is_nifti_header(inner) else "unknown"
    sample = head[:512]
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in sample)
    if printable / len(sample) > 0.95:
        return "text"
    return "unknown"


# ------------------------------------------------------------------ rasters
def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, the weights Pillow's ``convert("L")`` uses, kept in float (no rounding)."""
    rgb = rgb.astype(np.float32)
    return rgb[..., 0] * np.float32(0.299) + rgb[..., 1] * np.float32(0.587) + rgb[..., 2] * np.float32(0.114)


def _over_black(arr: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite on black: transparent pixels carry no signal (the film background is dark)."""
    return arr * (alpha.astype(np.float32) / np.float32(255.0))


def _check_jpeg_complete(data: bytes) -> None:
    # Why by hand: libjpeg (and so Pillow) can decode a file cut right before its
    # end marker without complaint. Markers cannot occur inside entropy-coded data
    # (0xFF is byte-stuffed), so the last SOS found is the main image's last scan,
    # even when an EXIF thumbnail (with its own SOS/EOI) precedes it.
    last_sos = data.rfind(b"\xff\xda")
    if last_sos < 0:
        raise ImageDecodeError("truncated JPEG: no scan data (SOS marker missing)")
    if data.find(b"\xff\xd9", last_sos) < 0:
        raise ImageDecodeError(
            f"truncated JPEG: no end-of-image marker after the last scan ({len(data)} bytes present)"
        )


def _check_png_complete(data: bytes) -> None:
    if data.rfind(b"IEND") < 0:
        raise ImageDecodeError(f"truncated PNG: no IEND chunk ({len(data)} bytes present)")


def _png_ihdr(data: bytes) -> tuple[int, int]:
    """(bit depth, colour type) from the IHDR chunk; Pillow does not expose the stored depth."""
    if len(data) >= 26 and data[12:16] == b"IHDR":
        return data[24], data[25]
    return 0, -1


def _bomb_message(pixels: int, max_pixels: int | None) -> str:
    limit = f"max_pixels={max_pixels}" if max_pixels is not None else "Pillow's limit"
    return f"decompression bomb guard: image declares {pixels} pixels, more than {limit}"


def _decode_raster(data: bytes, fmt: str, max_pixels: int | None) -> DecodedImage:
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # never pad a truncated file with gray
    name = fmt.upper()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        limit = f" (max_pixels={max_pixels})" if max_pixels is not None else ""
        raise ImageDecodeError(f"decompression bomb guard: {err}{limit}") from None
    except Exception as err:
        raise ImageDecodeError(
            f"corrupt {name}: cannot read the header ({type(err).__name__}: {err})"
        ) from None
    width, height = im.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(_bomb_message(width * height, max_pixels))
    if fmt == "jpeg":
        _check_jpeg_complete(data)
    elif fmt == "png":
        _check_png_complete(data)
    meta: dict[str, Any] = {"mode": im.mode}
    n_frames = int(getattr(im, "n_frames", 1) or 1)
    if n_frames > 1:
        meta["n_frames"] = n_frames  # multi-page TIFF / animated GIF: first frame used
    try:
        orientation = im.getexif().get(0x0112)
    except Exception:
        orientation = None
    if orientation not in (None, 1):
        # Not applied: annotation boxes are in stored pixel coordinates.
        meta["exif_orientation"] = int(orientation)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"decompression bomb guard: {err}") from None
    except OSError as err:
        msg = str(err)
        kind = "truncated" if "truncat" in msg.lower() else "corrupt"
        raise ImageDecodeError(f"{kind} {name}: {msg}") from None
    except Exception as err:
        raise ImageDecodeError(f"corrupt {name}: {type(err).__name__}: {err}") from None

    mode = im.mode
    value_range: tuple[float, float] | None = (0.0, 255.0)
    bit_depth = 8
    channels = len(im.getbands())
    if mode == "1":
        arr = np.asarray(im, dtype=np.float32)
        bit_depth, value_range = 1, (0.0, 1.0)
    elif mode == "L":
        arr = np.asarray(im, dtype=np.float32)
    elif mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.float32)
        bit_depth, value_range = 16, (0.0, 65535.0)
    elif mode == "I":
        arr = np.asarray(im).astype(np.float32)
        png_bits, _ = _png_ihdr(data) if fmt == "png" else (0, -1)
        bit_depth = png_bits if png_bits else 32
        value_range = (0.0, float(2**bit_depth - 1)) if png_bits else None
    elif mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        bit_depth, value_range = 32, None
    elif mode in ("LA", "La"):
        la = np.asarray(im.convert("LA"))
        arr = _over_black(la[..., 0].astype(np.float32), la[..., 1])
    elif mode in ("RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "P", "PA", "LAB", "HSV"):
        if mode == "P":
            channels = 4 if "transparency" in im.info else 3
        elif mode == "PA":
            channels = 4
        target = "RGBA" if channels == 4 and mode not in ("CMYK",) else "RGB"
        if mode == "CMYK":
            # Pillow's CMYK→RGB is the naive formula (no ICC profile). For a gray
            # radiograph stored in the K channel it gives 255 − K, i.e. the right gray.
            meta["converted_from"] = "CMYK"
        elif mode not in ("RGB", "RGBA", "RGBX"):
            meta["converted_from"] = mode
        rgb = np.asarray(im.convert(target))
        arr = _luminance(rgb)
        if target == "RGBA":
            arr = _over_black(arr, rgb[..., 3])
        sub = rgb[::4, ::4, :3].astype(np.int16)
        meta["rgb_is_gray"] = bool(
            np.abs(sub[..., 0] - sub[..., 1]).max(initial=0) <= 2
            and np.abs(sub[..., 1] - sub[..., 2]).max(initial=0) <= 2
        )
        if fmt == "png":
            png_bits, _ = _png_ihdr(data)
            if png_bits == 16:
                meta["stored_bit_depth"] = 16  # Pillow reduces 16-bit colour PNG to 8 bits
    else:
        raise ImageDecodeError(f"unsupported {name} pixel mode {mode!r}")
    meta["value_range"] = list(value_range) if value_range is not None else None
    return DecodedImage(
        array=np.ascontiguousarray(arr, dtype=np.float32),
        bit_depth=bit_depth,
        channels=channels,
        format=fmt,
        modality="XR",
        spatial_dims=2,
        meta=meta,
    )


# ------------------------------------------------------------------ DICOM / NIfTI
def _decode_dicom(data: bytes, max_pixels: int | None) -> DecodedImage:
    try:
        ds = _dicom.read_dataset(data)
        declared = _dicom.pixel_count(ds)
        if max_pixels is not None and declared > max_pixels:
            raise ImageDecodeError(_bomb_message(declared, max_pixels))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        px = _dicom.to_display_array(ds, apply_voi=frames == 1)
    except _dicom.DicomError as err:
        raise ImageDecodeError(str(err)) from None
    arr = px.array
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    meta = dict(px.meta)
    meta["value_range"] = list(px.value_range)
    return DecodedImage(
        array=np.ascontiguousarray(arr, dtype=np.float32),
        bit_depth=px.bit_depth,
        channels=px.channels,
        format="dicom",
        modality=str(ds.get("Modality", "") or "OT"),
        spatial_dims=arr.ndim,
        meta=meta,
    )


def _decode_series(folder: Path, max_pixels: int | None) -> DecodedImage:
    try:
        px, _n_slices = _dicom.read_series(folder, max_pixels=max_pixels)
    except _dicom.DicomError as err:
        raise ImageDecodeError(str(err)) from None
    meta = dict(px.meta)
    meta["value_range"] = list(px.value_range)
    return DecodedImage(
        array=px.array,
        bit_depth=px.bit_depth,
        channels=px.channels,
        format="dicom_series",
        modality=str(meta.get("Modality", "OT")),
        spatial_dims=3,
        meta=meta,
    )


def _decode_nifti(data: bytes, max_pixels: int | None) -> DecodedImage:
    import nibabel as nib  # imported lazily: only volume users pay for it

    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (EOFError, OSError, zlib.error) as err:
        raise ImageDecodeError(f"truncated NIfTI (gzip stream): {err}") from None
    cls = nib.Nifti2Image if int.from_bytes(raw[0:4], "little") == 540 else nib.Nifti1Image
    try:
        img = cls.from_bytes(raw)
        shape = tuple(int(s) for s in img.header.get_data_shape())
        voxels = int(np.prod(shape)) if shape else 0
        if max_pixels is not None and voxels > max_pixels:
            raise ImageDecodeError(_bomb_message(voxels, max_pixels))
        # Canonical (RAS+) orientation so every volume's axes mean the same thing.
        img = nib.as_closest_canonical(img)
        arr = np.asarray(img.get_fdata(dtype=np.float32))
        bitpix = int(img.header["bitpix"])
    except ImageDecodeError:
        raise
    except Exception as err:
        raise ImageDecodeError(f"truncated or corrupt NIfTI: {type(err).__name__}: {err}") from None
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 4:
        raise ImageDecodeError(f"4D NIfTI (time series, shape {arr.shape}) is not supported; give one volume")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    # nibabel gives (x, y, z); the pipeline uses (D, H, W) = (z, y, x).
    arr = arr.transpose(2, 1, 0) if arr.ndim == 3 else arr.T
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    return DecodedImage(
        array=np.ascontiguousarray(arr, dtype=np.float32),
        bit_depth=bitpix,
        channels=1,
        format="nifti",
        modality="unknown",
        spatial_dims=arr.ndim,
        meta={"value_range": None, "voxel_size_xyz": zooms},
    )


# ------------------------------------------------------------------ entry point
def read_image(
    source: str | Path | bytes,
    *,
    max_pixels: int | None = None,
    expected_dims: int | None = None,
) -> DecodedImage:
    """Decode a file path, a DICOM series folder or raw bytes into a :class:`DecodedImage`.

    Raises :class:`ImageDecodeError` naming the problem: missing or empty file, unknown
    content, truncated/corrupt data, no DICOM pixel data, too many pixels
    (``max_pixels``, checked from the header before decoding), or a 3D volume where a
    2D image is expected (``expected_dims``) and vice versa.
    """
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
        img = _decode_bytes(data, max_pixels)
    else:
        path = Path(source)
        if path.is_dir():
            img = _decode_series(path, max_pixels)
        else:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise ImageDecodeError(f"file not found: {path}") from None
            except OSError as err:
                raise ImageDecodeError(f"cannot read file {path}: {err.strerror or err}") from None
            img = _decode_bytes(data, max_pixels)
    if expected_dims is not None and img.spatial_dims != expected_dims:
        shape = tuple(img.array.shape)
        if img.spatial_dims == 3:
            raise ImageDecodeError(f"a 3D volume where a 2D image is expected (shape {shape})")
        raise ImageDecodeError(f"a 2D image where a 3D volume is expected (shape {shape})")
    return img


def _decode_bytes(data: bytes, max_pixels: int | None) -> DecodedImage:
    fmt = sniff_format(data[:1024])
    if fmt == "empty":
        raise ImageDecodeError("empty file (0 bytes)")
    if fmt == "text":
        # The content is not echoed: it could be anything, including identifiers.
        raise ImageDecodeError(
            "not an image: the content is text (e.g. an error page saved with an image name)"
        )
    if fmt == "unknown":
        raise ImageDecodeError("unrecognised content: not PNG, JPEG, TIFF, BMP, DICOM or NIfTI")
    if fmt == "dicom":
        return _decode_dicom(data, max_pixels)
    if fmt == "nifti":
        return _decode_nifti(data, max_pixels)
    assert fmt in _RASTER_FORMATS
    return _decode_raster(data, fmt, max_pixels)
