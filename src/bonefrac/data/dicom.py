"""DICOM pixels to arrays in stored units, and PHI-free technical metadata.

Why this module exists: a DICOM radiograph is not "just pixels". The stored
values must go through the modality LUT (rescale slope/intercept), then the VOI
LUT or the window centre/width the modality chose for display, and MONOCHROME1
images must be inverted so that bone is bright in every image the model sees.
pydicom implements those transforms (:func:`pydicom.pixels.apply_modality_lut`,
:func:`pydicom.pixels.apply_voi_lut`); this module only decides the order, keeps
the full bit depth (no 8-bit squash) and reports the nominal value range so
later stages can scale to [0, 1] without guessing.

Nothing returned from here carries patient identifiers: :func:`technical_meta`
copies an allow-list of acquisition attributes, never names, ids, dates or UIDs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from bonefrac.errors import BonefracError

# Attributes that describe the acquisition, not the patient. Allow-list on purpose:
# anything not listed here never leaves this module (PS3.15 basic profile spirit).
_TECHNICAL_KEYWORDS: tuple[str, ...] = (
    "Modality",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SliceThickness",
    "BodyPartExamined",
    "ViewPosition",
    "Laterality",
    "ImageLaterality",
    "NumberOfFrames",
    "BurnedInAnnotation",
    "PatientIdentityRemoved",
)


class DicomError(BonefracError, ValueError):
    """A DICOM file or series that cannot give an image; the message says why (never PHI)."""


@dataclass
class DicomPixels:
    """Pixels of one DICOM object after the display pipeline, plus the facts needed to scale them."""

    array: np.ndarray  # float32, (H, W) or (frames, H, W)
    bit_depth: int  # BitsStored
    channels: int  # SamplesPerPixel of the stored object
    value_range: tuple[float, float]  # nominal [min, max] of `array` (not data min/max)
    meta: dict[str, Any]


def looks_like_dicom(head: bytes) -> bool:
    """True for a Part-10 file ("DICM" at byte 128) or a preamble-less dataset starting with group 0002/0008.

    Content sniffing, not extensions: hospital exports often have no extension.
    The preamble-less case (old ACR-NEMA style) starts directly with a little-endian
    tag of group 0x0002 or 0x0008 whose element number is small.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) >= 8:
        group = int.from_bytes(head[0:2], "little")
        elem = int.from_bytes(head[2:4], "little")
        if group in (0x0002, 0x0008) and elem < 0x0100:
            vr = head[4:6]
            # explicit VR: two upper-case letters; implicit VR: a 4-byte length
            return (vr.isalpha() and vr.isupper()) or int.from_bytes(head[4:8], "little") < 0x10000
    return False


def read_dataset(source: str | Path | bytes, stop_before_pixels: bool = False) -> Dataset:
    """Read a DICOM dataset from a path or bytes; :class:`DicomError` when it is not DICOM."""
    fp: Any = io.BytesIO(source) if isinstance(source, bytes | bytearray) else str(source)
    try:
        return pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass
    except Exception as err:  # pydicom raises many types for damaged files
        raise DicomError(f"unreadable DICOM: {type(err).__name__}: {err}") from None
    # No preamble: accept only when the content sniffs as DICOM, so random bytes are refused.
    if isinstance(source, bytes | bytearray):
        head = bytes(source[:132])
    else:
        with Path(source).open("rb") as fh:
            head = fh.read(132)
    if not looks_like_dicom(head):
        raise DicomError("not a DICOM file (no 'DICM' marker and no DICOM header)")
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else str(source)
        return pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, force=True)
    except Exception as err:
        raise DicomError(f"unreadable DICOM: {type(err).__name__}: {err}") from None


def technical_meta(ds: Dataset) -> dict[str, Any]:
    """Allow-listed acquisition attributes as plain Python values (no PHI by construction)."""
    out: dict[str, Any] = {}
    for kw in _TECHNICAL_KEYWORDS:
        val = ds.get(kw)
        if val is None or val == "":
            continue
        if isinstance(val, pydicom.multival.MultiValue):
            val = [float(v) if isinstance(v, int | float) else str(v) for v in val]
        elif isinstance(val, int | float):
            val = float(val) if not isinstance(val, int) else int(val)
        else:
            val = str(val)
        out[kw] = val
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None:
        out["TransferSyntax"] = ts.name  # a registered name, not an instance UID
    return out


def pixel_count(ds: Dataset) -> int:
    """Pixels the dataset declares (rows × columns × frames), read before decoding for the bomb guard."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * frames


def _stored_range(ds: Dataset) -> tuple[float, float]:
    """Range of stored values from BitsStored and PixelRepresentation."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _output_range(ds: Dataset, voi_applied: str) -> tuple[float, float]:
    """Nominal range after the transforms applied, mirroring pydicom's own rule.

    pydicom maps a window to [y_min, y_max] = the stored range passed through the
    rescale; a VOI LUT sequence maps to [0, 2**bits - 1] of its descriptor.
    """
    if voi_applied == "lut":
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    lo, hi = _stored_range(ds)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    a, b = lo * slope + intercept, hi * slope + intercept
    return (min(a, b), max(a, b))


def to_display_array(ds: Dataset, apply_voi: bool = True) -> DicomPixels:
    """Decode pixel data and apply modality LUT → VOI LUT/window → MONOCHROME1 inversion.

    ``apply_voi=False`` keeps physical units (e.g. Hounsfield units for CT), which
    is what volumes want: per-slice windows could differ, and preprocessing windows
    by percentiles anyway. Colour objects (RGB/YBR) are converted to luminance.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomError(
            "DICOM has no pixel data (no PixelData element: a report, SR or presentation state?)"
        )
    try:
        raw = ds.pixel_array
    except Exception as err:  # missing codec, wrong length, truncated fragments
        raise DicomError(f"cannot decode DICOM pixel data: {type(err).__name__}: {err}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    meta = technical_meta(ds)
    if samples > 1:
        # pydicom returns RGB (YBR converted); ITU-R 601 luminance keeps one gray channel.
        rgb = raw.astype(np.float32)
        arr = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        meta["converted_from"] = photometric
        return DicomPixels(arr.astype(np.float32), bits, samples, (0.0, float(2**bits - 1)), meta)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(f"unsupported DICOM photometric interpretation {photometric!r}")
    try:
        arr = apply_modality_lut(raw, ds)
        voi_applied = "none"
        if apply_voi:
            if ds.get("VOILUTSequence"):
                voi_applied = "lut"
            elif "WindowCenter" in ds and "WindowWidth" in ds:
                voi_applied = "window"
            if voi_applied != "none":
                arr = apply_voi_lut(arr, ds, prefer_lut=True)
    except Exception as err:
        raise DicomError(f"cannot apply DICOM LUTs: {type(err).__name__}: {err}") from None
    lo, hi = _output_range(ds, voi_applied)
    arr = np.asarray(arr, dtype=np.float32)
    if photometric == "MONOCHROME1":
        # MONOCHROME1: low values are white. Invert within the nominal range so
        # bone is bright, as in MONOCHROME2, and values stay in [lo, hi].
        arr = np.float32(lo + hi) - arr
        meta["inverted_monochrome1"] = True
    meta["voi_applied"] = voi_applied
    return DicomPixels(arr, bits, samples, (lo, hi), meta)


def _slice_position(ds: Dataset) -> float | None:
    """Position along the slice normal (cross product of the orientation rows/cols)."""
    pos = ds.get("ImagePositionPatient")
    ori = ds.get("ImageOrientationPatient")
    if pos is None:
        return None
    if ori is None or len(ori) != 6:
        return float(pos[2])
    normal = np.cross(np.asarray(ori[:3], float), np.asarray(ori[3:], float))
    return float(np.dot(normal, np.asarray(pos, float)))


def read_series(folder: Path, max_pixels: int | None = None) -> tuple[DicomPixels, int]:
    """Read a folder holding one DICOM series into a (D, H, W) float32 volume.

    Slices are sorted by ImagePositionPatient along the slice normal (InstanceNumber
    as a fallback); non-DICOM files and objects without pixels (DICOMDIR, SR) are
    skipped. Returns the pixels and the number of slice files used. Modality LUT only
    (physical units, e.g. HU), see :func:`to_display_array`.
    """
    headers: list[tuple[Path, Dataset]] = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        with f.open("rb") as fh:
            head = fh.read(132)
        if not looks_like_dicom(head):
            continue
        try:
            ds = read_dataset(f, stop_before_pixels=True)
        except DicomError:
            continue
        if "Rows" in ds and "Columns" in ds:
            headers.append((f, ds))
    if not headers:
        raise DicomError("folder holds no DICOM slices with pixel data")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
    if len(series) > 1:
        raise DicomError(f"folder mixes {len(series)} DICOM series; give one series per folder")
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in headers}
    if len(shapes) > 1:
        raise DicomError(f"slices of different sizes in one series: {sorted(shapes)}")
    total = sum(pixel_count(ds) for _, ds in headers)
    if max_pixels is not None and total > max_pixels:
        raise DicomError(f"decompression bomb guard: series has {total} voxels > max_pixels={max_pixels}")

    def key(item: tuple[Path, Dataset]) -> tuple[float, float]:
        pos = _slice_position(item[1])
        inst = float(item[1].get("InstanceNumber", 0) or 0)
        return (pos if pos is not None else inst, inst)

    headers.sort(key=key)
    slices: list[np.ndarray] = []
    ranges: list[tuple[float, float]] = []
    first: DicomPixels | None = None
    for f, _ in headers:
        px = to_display_array(read_dataset(f), apply_voi=False)
        if px.array.ndim != 2:
            raise DicomError("multi-frame object inside a series folder; give it as a single file")
        slices.append(px.array)
        ranges.append(px.value_range)
        first = first or px
    assert first is not None
    vol = np.stack(slices).astype(np.float32)
    positions = [p for p in (_slice_position(ds) for _, ds in headers) if p is not None]
    meta = dict(first.meta)
    meta["n_slices"] = len(slices)
    if len(positions) > 1:
        meta["slice_spacing"] = float(np.median(np.diff(positions)))
    # Per-slice rescale may differ: report the union of nominal ranges.
    value_range = (min(r[0] for r in ranges), max(r[1] for r in ranges))
    return DicomPixels(vol, first.bit_depth, first.channels, value_range, meta), len(slices)
