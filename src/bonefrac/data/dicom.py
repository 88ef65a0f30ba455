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
import re
import struct
import warnings
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

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


#: Modalities of projection radiographs the 2D fracture model may score: computed and
#: digital radiography, and the fluoroscopy/angiography spot images (RF, XA) that
#: orthopaedic C-arms write. Not mammography (MG: breast, no skeleton to read), not
#: dental (IO, PX): projection X-rays, but of anatomy the model never saw.
RADIOGRAPH_MODALITIES: frozenset[str] = frozenset({"CR", "DX", "RF", "XA"})
#: Modalities of the volumes the 3D path reads (a series folder or a multi-frame file).
VOLUME_MODALITIES: frozenset[str] = frozenset({"CT", "MR"})
#: Secondary Capture SOP classes (single- and multi-frame), PS3.4 B.5.
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_CS_VALUE = re.compile(r"^[A-Z0-9_ ]{1,16}$")  # a well-formed Code String: safe to name in a message

#: What pydicom raises on a damaged file or a malformed element (it has no common base
#: class): listed rather than ``except Exception`` so a programming error still surfaces.
PYDICOM_ERRORS: tuple[type[BaseException], ...] = (
    InvalidDicomError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    EOFError,
    OSError,
    NotImplementedError,
    RuntimeError,
    OverflowError,
    struct.error,
    zlib.error,
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


def has_dicm_marker(head: bytes) -> bool:
    """True for a Part-10 file: "DICM" at byte 128, whatever the 128-byte preamble holds.

    The preamble may itself be a TIFF header (dual-personality files, e.g. pydicom's
    ``CT_small.dcm``), so this must be tested before any other magic number.
    """
    return len(head) >= 132 and head[128:132] == b"DICM"


def looks_like_dicom(head: bytes) -> bool:
    """True for a Part-10 file ("DICM" at byte 128) or a preamble-less dataset starting with group 0002/0008.

    Content sniffing, not extensions: hospital exports often have no extension.
    The preamble-less case (old ACR-NEMA style) starts directly with a little-endian
    tag of group 0x0002 or 0x0008 whose element number is small.
    """
    if has_dicm_marker(head):
        return True
    if len(head) >= 8:
        group = int.from_bytes(head[0:2], "little")
        elem = int.from_bytes(head[2:4], "little")
        if group in (0x0002, 0x0008) and elem < 0x0100:
            vr = head[4:6]
            # explicit VR: two upper-case letters; implicit VR: a 4-byte length
            return (vr.isalpha() and vr.isupper()) or int.from_bytes(head[4:8], "little") < 0x10000
    return False


def _infer_transfer_syntax(ds: Dataset) -> Dataset:
    """Give a dataset without file meta (no preamble, old exports) the transfer syntax it was read in.

    pydicom parses such a file (``force=True``) by guessing the VR style and byte order,
    but will not decode its pixels without ``file_meta.TransferSyntaxUID``. A file
    without meta cannot hold compressed pixels, so the encoding it was read in is
    the whole answer.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return ds
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        return ds
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    return ds


def read_dataset(source: str | Path | bytes, stop_before_pixels: bool = False) -> Dataset:
    """Read a DICOM dataset from a path or bytes; :class:`DicomError` when it is not DICOM."""
    fp: Any = io.BytesIO(source) if isinstance(source, bytes | bytearray) else str(source)
    try:
        return _infer_transfer_syntax(pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels))
    except InvalidDicomError:
        pass
    except PYDICOM_ERRORS as err:
        # pydicom's message may quote element values: name the error type only.
        raise DicomError(f"unreadable DICOM (damaged or truncated file: {type(err).__name__})") from None
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
        return _infer_transfer_syntax(pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, force=True))
    except PYDICOM_ERRORS as err:
        raise DicomError(f"unreadable DICOM (damaged or truncated file: {type(err).__name__})") from None


def read_preambleless(data: bytes) -> Dataset | None:
    """Last resort for content no magic number matched: a DICOM dataset without preamble.

    Old ACR-NEMA style exports and some PACS dumps start directly with the first
    element, in any byte order (e.g. pydicom's ``ExplVR_BigEndNoMeta.dcm``). pydicom
    parses them with ``force=True``; the result counts as DICOM only when it holds
    pixel data with positive Rows and Columns, so arbitrary bytes are not taken for an
    image, or when it names a well-formed SOP Class UID (a DICOM object without
    pixels: the caller then says so, or names its modality). Returns ``None`` when the
    content is not such a dataset.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            if "PixelData" in ds:
                rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
                return _infer_transfer_syntax(ds) if rows > 0 and cols > 0 else None
            sop_class = ds.get("SOPClassUID")
            return ds if sop_class and pydicom.uid.UID(str(sop_class)).is_valid else None
    except PYDICOM_ERRORS:
        return None


def header_int(ds: Dataset, keyword: str, default: int) -> int:
    """An integer header attribute, or :class:`DicomError` "bad DICOM header" (never its raw value)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            val = ds.get(keyword)
    except PYDICOM_ERRORS:
        raise DicomError(f"bad DICOM header: {keyword} cannot be read") from None
    if val is None or val == "":
        return default
    try:
        return int(val)
    except (TypeError, ValueError, OverflowError):
        raise DicomError(f"bad DICOM header: {keyword} is not a valid integer") from None


def header_float(ds: Dataset, keyword: str) -> None:
    """Check that a numeric (DS) attribute, single or multi-valued, parses; raise "bad DICOM header"."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            val = ds.get(keyword)
            if val is None or val == "":
                return
            values = val if isinstance(val, pydicom.multival.MultiValue | list | tuple) else [val]
            finite = all(np.isfinite(float(v)) for v in values)
    except PYDICOM_ERRORS:
        raise DicomError(f"bad DICOM header: {keyword} is not a valid number") from None
    if not finite:
        raise DicomError(f"bad DICOM header: {keyword} is not a finite number")


def check_header(ds: Dataset) -> None:
    """Validate the attributes the pixel pipeline reads, before decoding anything.

    A malformed header (``NumberOfFrames = "ab"``, a rescale slope that is not a
    number, zero rows) gives a :class:`DicomError` starting "bad DICOM header" that
    names the attribute, never its value (values can hold anything, PHI included).
    """
    rows = header_int(ds, "Rows", 0)
    cols = header_int(ds, "Columns", 0)
    if rows <= 0 or cols <= 0:
        raise DicomError("bad DICOM header: Rows and Columns must be positive")
    if header_int(ds, "NumberOfFrames", 1) < 1:
        raise DicomError("bad DICOM header: NumberOfFrames must be at least 1")
    if header_int(ds, "SamplesPerPixel", 1) not in (1, 3):
        raise DicomError("bad DICOM header: SamplesPerPixel must be 1 or 3")
    allocated = header_int(ds, "BitsAllocated", 16)
    stored = header_int(ds, "BitsStored", allocated)
    if allocated not in (1, 8, 16, 32, 64) or not 1 <= stored <= allocated:
        raise DicomError("bad DICOM header: BitsAllocated/BitsStored out of range")
    if header_int(ds, "PixelRepresentation", 0) not in (0, 1):
        raise DicomError("bad DICOM header: PixelRepresentation must be 0 or 1")
    for kw in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        header_float(ds, kw)


def is_colour(ds: Dataset) -> bool:
    """RGB, YBR or palette colour (anything but MONOCHROME1/2 with one sample per pixel)."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").upper()
    return header_int(ds, "SamplesPerPixel", 1) > 1 or not photometric.startswith("MONOCHROME")


def modality_of(ds: Dataset) -> str:
    """The Modality (0008,0060) code, upper case; ``""`` when absent or empty."""
    try:
        return str(ds.get("Modality", "") or "").strip().upper()
    except PYDICOM_ERRORS:
        raise DicomError("bad DICOM header: Modality cannot be read") from None


def check_modality(ds: Dataset, accepted: Collection[str]) -> None:
    """Refuse a dataset whose modality is not in ``accepted`` or that is colour.

    Rules: a modality in ``accepted`` passes if monochrome; a secondary capture without
    modality (absent, or ``OT`` in a Secondary Capture SOP class) passes if monochrome
    (a digitised film); colour objects (RGB, YBR, palette: photographs, screenshots,
    ultrasound) are refused, since radiographs are grayscale; anything else is refused
    with its modality named (RTDOSE, US, SEG...).
    """
    modality = modality_of(ds)
    accepted = {m.upper() for m in accepted}
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    shown = modality if _CS_VALUE.match(modality) else "(invalid code)"
    photometric = photometric if _CS_VALUE.match(photometric) else ""
    sop_class = str(ds.get("SOPClassUID", "") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", ""))
    secondary = modality == "" or (modality == "OT" and sop_class.startswith(_SECONDARY_CAPTURE_PREFIX))
    if modality not in accepted and not secondary:
        raise DicomError(
            f"DICOM modality {shown} refused: accepted here {', '.join(sorted(accepted))}"
            " (or a grayscale secondary capture without modality)"
        )
    if is_colour(ds):
        kind = "secondary capture" if secondary else f"{shown} image"
        raise DicomError(
            f"colour DICOM refused: a {kind} in {photometric or 'colour'}; radiographs are grayscale"
        )


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
    frames = header_int(ds, "NumberOfFrames", 1)
    return header_int(ds, "Rows", 0) * header_int(ds, "Columns", 0) * frames


def _stored_range(ds: Dataset) -> tuple[float, float]:
    """Range of stored values from BitsStored and PixelRepresentation."""
    bits = header_int(ds, "BitsStored", header_int(ds, "BitsAllocated", 16))
    if header_int(ds, "PixelRepresentation", 0) == 1:
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
    check_header(ds)
    try:
        raw = ds.pixel_array
    except PYDICOM_ERRORS as err:  # missing codec, wrong length, truncated fragments
        # The header was validated above, so pydicom's message is about the codec or
        # the data length, not an element value.
        raise DicomError(f"cannot decode DICOM pixel data: {type(err).__name__}: {err}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = header_int(ds, "SamplesPerPixel", 1)
    bits = header_int(ds, "BitsStored", header_int(ds, "BitsAllocated", 8))
    meta = technical_meta(ds)
    if samples > 1:
        # pydicom returns RGB (YBR converted); ITU-R 601 luminance keeps one gray channel.
        rgb = raw.astype(np.float32)
        arr = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        meta["converted_from"] = photometric
        return DicomPixels(arr.astype(np.float32), bits, samples, (0.0, float(2**bits - 1)), meta)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        shown = photometric if _CS_VALUE.match(photometric) else "(invalid code)"
        raise DicomError(f"unsupported DICOM photometric interpretation {shown}")
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
        lo, hi = _output_range(ds, voi_applied)
    except PYDICOM_ERRORS as err:  # a malformed LUT: its message could quote values
        raise DicomError(f"bad DICOM header: cannot apply the modality/VOI LUT ({type(err).__name__})") from None
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


def read_series(
    folder: Path, max_pixels: int | None = None, modalities: Collection[str] | None = None
) -> tuple[DicomPixels, int]:
    """Read a folder holding one DICOM series into a (D, H, W) float32 volume.

    Slices are sorted by ImagePositionPatient along the slice normal (InstanceNumber
    as a fallback); non-DICOM files and objects without pixels (DICOMDIR, SR) are
    skipped. Returns the pixels and the number of slice files used. Modality LUT only
    (physical units, e.g. HU), see :func:`to_display_array`. ``modalities``: when
    given, the series is refused unless :func:`check_modality` accepts it.
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
    for _, ds in headers:
        check_header(ds)
    if modalities is not None:
        check_modality(headers[0][1], modalities)
    shapes = {(header_int(ds, "Rows", 0), header_int(ds, "Columns", 0)) for _, ds in headers}
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
