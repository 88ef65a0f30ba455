"""Functions that make small test files: rasters, broken files, DICOM with made-up PHI, volumes.

Import from any test (run pytest from the project root: ``python -m pytest``)::

    from tests._factories import make_png, make_dicom, FAKE_PHI

Every function writes one file (or folder) and returns its path. Arrays are made
deterministically (gradient plus a bright "bone" bar), so tests can check that
bright stays bright through decoding. Nothing here touches the network.

All identifiers in :data:`FAKE_PHI` are invented; tests assert that none of them
survives de-identification.
"""

from __future__ import annotations

import gzip
import io
import random
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Made-up patient identifiers written into test DICOM files (never real people).
FAKE_PHI: dict[str, str] = {
    "PatientName": "DOE^JANE",
    "PatientID": "PHI-123456",
    "PatientBirthDate": "19610415",
    "PatientAddress": "1 Imaginary Road, Nowhere",
    "OtherPatientIDs": "MRN-555000",
    "InstitutionName": "Saint Fictional Hospital",
    "InstitutionAddress": "99 Make Believe Avenue",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "PerformingPhysicianName": "QUINN^MICHAELA",
    "OperatorsName": "TECH^TERRY",
    "AccessionNumber": "ACC-998877",
    "StudyID": "STUDY-4242",
    "StationName": "XRAY-ROOM-7",
    "StudyDate": "20230102",
    "SeriesDate": "20230103",
    "AcquisitionDate": "20230104",
    "ContentDate": "20230105",
    "StudyTime": "101112",
    "StudyDescription": "WRIST LEFT for DOE^JANE",
    "ImageComments": "seen by HOUSE^GREGORY",
}
# A value written into a private tag; it must be removed with the private tags.
FAKE_PRIVATE_VALUE = "PRIVATE-SECRET-778899"


def phi_strings() -> list[str]:
    """Every made-up identifier a test should never find after de-identification."""
    return [*FAKE_PHI.values(), FAKE_PRIVATE_VALUE]


def contains_identifier(needle: str | bytes, haystack: str | bytes, digit: bytes = b"[0-9]") -> bool:
    """``needle`` in ``haystack``; an all-digit identifier (a DICOM date or time) only as a whole number.

    Logs, databases and manifests are full of timestamps and floats: "101112" (the made-up
    StudyTime) occurs inside ``12:51:38.210111`` + ``2026-…`` by chance, once in a few runs (a CI
    failure, 2026-12-01). Digit boundaries keep such chance matches out; a leaked date or time is
    still found, alone or run together with its neighbour (StudyDate + StudyTime is a needle of
    its own where a test needs it). ``digit`` is the pattern of one digit in ``haystack``'s
    encoding (``b"[0-9]\\x00"`` for UTF-16-LE).
    """
    b = needle.encode() if isinstance(needle, str) else needle
    data = haystack.encode("utf-8", "backslashreplace") if isinstance(haystack, str) else haystack
    if not b.replace(b"\x00", b"").isdigit():
        return b in data
    return re.search(b"(?<!" + digit + b")" + re.escape(b) + b"(?!" + digit + b")", data) is not None


# ------------------------------------------------------------------ arrays
def make_array(size: tuple[int, int] = (64, 64), bit_depth: int = 8, seed: int = 0) -> np.ndarray:
    """A (H, W) test image: dark gradient background plus a bright vertical bar ("bone").

    The bar occupies columns W//3 .. W//3 + W//6 and is near the top of the range,
    the background stays in the lower third, so orientation checks are easy.
    """
    h, w = size
    top = 2**bit_depth - 1
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = (xx + yy) / max(h + w - 2, 1) * top * 0.3
    arr += rng.normal(0, top * 0.01, size=(h, w))
    arr[:, w // 3 : w // 3 + max(w // 6, 1)] = top * 0.9
    dtype = np.uint8 if bit_depth <= 8 else np.uint16
    return np.clip(arr, 0, top).astype(dtype)


# ------------------------------------------------------------------ rasters
def make_png(
    path: str | Path,
    size: tuple[int, int] = (64, 64),
    bit_depth: int = 8,
    mode: str = "L",
    array: np.ndarray | None = None,
    seed: int = 0,
) -> Path:
    """Write a PNG. ``mode``: "L" (gray, 8 or 16 bits), "RGB", "RGBA", "LA", "P" (palette).

    ``size`` is (H, W). 16-bit is only for gray ("L"); the stored values then span 0..65535.
    """
    path = Path(path)
    arr = make_array(size, bit_depth, seed) if array is None else np.asarray(array)
    if mode == "L":
        im = Image.fromarray(arr.astype(np.uint16 if bit_depth > 8 else np.uint8))
    else:
        g = arr.astype(np.uint8) if arr.dtype == np.uint8 else (arr >> 8).astype(np.uint8)
        im = Image.fromarray(g).convert(mode)
    im.save(path, format="PNG")
    return path


def make_jpeg(
    path: str | Path,
    size: tuple[int, int] = (64, 64),
    mode: str = "L",
    quality: int = 92,
    array: np.ndarray | None = None,
    seed: int = 0,
) -> Path:
    """Write an 8-bit JPEG ("L", "RGB" or "CMYK" mode), (H, W) = ``size``."""
    path = Path(path)
    arr = make_array(size, 8, seed) if array is None else np.asarray(array, dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode == "CMYK":
        # Gray stored in the K channel (C = M = Y = 0), as prepress tools do.
        k = 255 - arr
        zeros = np.zeros_like(arr)
        im = Image.fromarray(np.stack([zeros, zeros, zeros, k], axis=-1), mode="CMYK")
    elif mode != "L":
        im = im.convert(mode)
    im.save(path, format="JPEG", quality=quality)
    return path


def make_cmyk_jpeg(path: str | Path, size: tuple[int, int] = (64, 64)) -> Path:
    """A CMYK JPEG whose gray content lives in the K channel."""
    return make_jpeg(path, size, mode="CMYK")


def make_truncated_jpeg(
    path: str | Path, size: tuple[int, int] = (64, 64), keep_fraction: float = 0.6
) -> Path:
    """A JPEG cut after ``keep_fraction`` of its bytes (no end-of-image marker)."""
    path = Path(path)
    buf = io.BytesIO()
    Image.fromarray(make_array(size, 8)).save(buf, format="JPEG", quality=92)
    data = buf.getvalue()
    path.write_bytes(data[: max(int(len(data) * keep_fraction), 200)])
    return path


def make_zero_byte(path: str | Path) -> Path:
    """An empty file (0 bytes), e.g. an interrupted download."""
    path = Path(path)
    path.write_bytes(b"")
    return path


def make_text_file(path: str | Path, text: str = "<html><body>404 Not Found</body></html>\n") -> Path:
    """A text file, typically given an image name (``scan.jpg``) to test content sniffing."""
    path = Path(path)
    path.write_text(text)
    return path


def make_decompression_bomb_png(path: str | Path, side: int = 20000) -> Path:
    """A valid 1-bit PNG of ``side`` × ``side`` pixels that compresses to a few hundred KB.

    Written row by row with zlib so the test never holds the full image in memory.
    """
    path = Path(path)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    comp = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    parts = [comp.compress(row) for _ in range(side)]
    parts.append(comp.flush())
    with path.open("wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.write(chunk(b"IHDR", ihdr))
        fh.write(chunk(b"IDAT", b"".join(parts)))
        fh.write(chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------ DICOM
def _uid() -> str:
    from pydicom.uid import generate_uid

    return generate_uid()


def make_dicom(
    path: str | Path,
    array: np.ndarray | None = None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    modality: str = "DX",
    with_pixels: bool = True,
    phi: bool = True,
    private_tags: bool = True,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    sop_class: str = "1.2.840.10008.5.1.4.1.1.1.1",
    **tags: Any,
) -> Path:
    """Write a 2D DICOM (explicit VR little endian, uncompressed) and return its path.

    ``array``: (H, W) unsigned ints (default: :func:`make_array` at ``bits_stored``).
    ``phi``: fill the :data:`FAKE_PHI` identifiers; ``private_tags``: add a private block
    holding :data:`FAKE_PRIVATE_VALUE`. ``rescale`` = (slope, intercept),
    ``window`` = (centre, width). Extra keyword arguments set any DICOM keyword
    (e.g. ``StudyInstanceUID="1.2.3"``, ``BodyPartExamined="HAND"``), overriding the defaults.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    path = Path(path)
    ds = Dataset()
    sop_uid = tags.pop("SOPInstanceUID", None) or _uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid()
    ds.SeriesInstanceUID = _uid()
    ds.FrameOfReferenceUID = _uid()
    ds.Modality = modality
    ds.BodyPartExamined = "HAND"
    ds.ViewPosition = "PA"
    ds.Manufacturer = "Acme Imaging"
    if phi:
        for kw, val in FAKE_PHI.items():
            setattr(ds, kw, val)
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = ds.StudyInstanceUID
        ref.PatientName = FAKE_PHI["PatientName"]  # PHI nested in a sequence
        ds.ReferencedImageSequence = [ref]
    if private_tags:
        block = ds.private_block(0x0009, "ACME FAKE PACS", create=True)
        block.add_new(0x01, "LO", FAKE_PRIVATE_VALUE)
        block.add_new(0x02, "LO", FAKE_PHI["PatientID"])
    if with_pixels:
        arr = make_array((64, 64), bits_stored) if array is None else np.asarray(array)
        if arr.ndim != 2:
            raise ValueError("make_dicom writes 2D images; use make_dicom_series for volumes")
        ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16 if bits_stored > 8 else 8
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = arr.astype(np.uint16 if bits_stored > 8 else np.uint8).tobytes()
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = rescale
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
    for kw, val in tags.items():
        setattr(ds, kw, val)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_dicom_series(
    folder: str | Path,
    volume: np.ndarray | None = None,
    *,
    spacing: float = 2.5,
    shuffle_files: bool = True,
    phi: bool = True,
    modality: str = "CT",
    rescale: tuple[float, float] = (1.0, -1024.0),
    **tags: Any,
) -> Path:
    """Write a (D, H, W) volume as one DICOM series (one file per slice) in ``folder``.

    Slices share Study/Series/FrameOfReference UIDs and the :data:`FAKE_PHI` identifiers;
    ImagePositionPatient z = index × ``spacing``. File names are shuffled (and InstanceNumber
    reversed) so a reader must sort by position, not by name.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if volume is None:
        volume = np.stack([make_array((32, 32), 12, seed=i) for i in range(6)])
        volume[np.arange(6), 0, 0] = np.arange(6) * 100  # slice index readable in a corner
    d = volume.shape[0]
    study, series, frame = _uid(), _uid(), _uid()
    order = list(range(d))
    if shuffle_files:
        random.Random(0).shuffle(order)
    for file_no, z in enumerate(order):
        make_dicom(
            folder / f"slice_{file_no:03d}.dcm",
            volume[z],
            modality=modality,
            phi=phi,
            rescale=rescale,
            sop_class="1.2.840.10008.5.1.4.1.1.2",
            StudyInstanceUID=study,
            SeriesInstanceUID=series,
            FrameOfReferenceUID=frame,
            ImagePositionPatient=[0.0, 0.0, z * spacing],
            ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            InstanceNumber=d - z,
            SliceThickness=spacing,
            **tags,
        )
    return folder


def make_nifti(
    path: str | Path, volume: np.ndarray | None = None, spacing: tuple[float, float, float] = (1, 1, 2)
) -> Path:
    """Write a NIfTI-1 volume; ``volume`` is (D, H, W) as the pipeline uses it (stored as x, y, z).

    A ``.nii.gz`` name writes a gzip-compressed file.
    """
    import nibabel as nib

    path = Path(path)
    if volume is None:
        volume = np.stack([make_array((32, 32), 12, seed=i) for i in range(6)]).astype(np.int16)
    data = np.asarray(volume).transpose(2, 1, 0)  # (D, H, W) -> (x, y, z)
    affine = np.diag([*spacing, 1.0])
    img = nib.Nifti1Image(data, affine)
    raw = img.to_bytes()
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def displayed_box_to_stored_by_pil(box: list[float], stored_wh: tuple[int, int], orientation: int) -> list[float]:
    """Where a box drawn on the EXIF-turned image lies in stored pixels, worked out by PIL itself.

    An image whose pixel values are their own stored index is turned by
    ``ImageOps.exif_transpose``; the indices under the box (whole pixels it covers) give the
    stored pixels. Independent of :mod:`bonefrac.data.exif_boxes`, so tests can check it.
    """
    from PIL import ImageOps

    w, h = stored_wh
    index = Image.fromarray(np.arange(w * h, dtype=np.int32).reshape(h, w))
    index.getexif()[0x0112] = orientation
    shown = np.asarray(ImageOps.exif_transpose(index))
    x, y, bw, bh = (round(v) for v in box)
    ys, xs = np.divmod(shown[y : y + bh, x : x + bw], w)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def make_oriented_jpeg(path: str | Path, stored_wh: tuple[int, int], orientation: int) -> Path:
    """A gray JPEG of ``stored_wh`` pixels whose EXIF says to show it turned by ``orientation``."""
    path = Path(path)
    img = Image.fromarray(make_array((stored_wh[1], stored_wh[0])).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, format="JPEG", quality=90, exif=exif)
    return path
