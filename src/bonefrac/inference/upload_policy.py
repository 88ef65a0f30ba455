"""Intake of one untrusted image: a decoded image, or a verdict (HTTP-style status + message).

The one policy for files a user hands the model, shared by the service
(:mod:`bonefrac.serving.input_safety`) and ``bonefrac predict``
(:mod:`bonefrac.inference.batch_predict`), so both give the same verdict per file.

The service must never answer 500 to a bad file and must stay healthy afterwards.
Every check that can be done cheaply is done before decoding: the body size (an
ASGI middleware rejects an oversized upload before it is parsed), the format from
the magic bytes, and the declared pixel count from the header (decompression
bombs; :func:`bonefrac.data.imageio.read_image` checks it before decoding). What
remains (truncated or corrupt data, DICOM without pixels, a volume sent to a 2D
model) comes back from the decoder as an :class:`ImageDecodeError` whose message
is safe to return: it names the problem, never a patient identifier.

Status codes: 413 too large (bytes, pixels or decoded bytes), 415 not a supported
format, 422 a supported format that cannot be used, 400 an empty or missing upload.

Memory per upload is bounded before any pixel is decoded: the body by
``max_upload_mb``, the pixel count by ``max_pixels`` (the decoder checks it from the
header) and the working memory of decoding and preprocessing by ``max_decoded_mb``
(:func:`decode_memory_estimate`: pixels × (stored bytes + float32 copies), read
from the PNG/JPEG/TIFF/BMP or DICOM header), so a small 16-bit RGBA, colour or
multi-frame bomb is refused without being decoded (:func:`check_upload`, which the
service runs before queueing for a decode). The bound, per front-end process: the
decodes in flight together need at most max_decoded_mb
(:class:`bonefrac.serving.decode_gate.DecodeGate`), plus about 3 × the body for each
request in flight (the body, the parsed part, BentoML's canonical copy).
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from http import HTTPStatus

from bonefrac.config import ServingParams
from bonefrac.data import dicom as _dicom
from bonefrac.data.imageio import DecodedImage, ImageDecodeError, content_format, read_image
from bonefrac.model.transforms import PreprocessSpec, reduction_factor

#: Formats the service accepts, by spatial dims of the model. TIFF/BMP/GIF/WebP decode
#: fine but are not clinical exchange formats; refusing them keeps the contract small.
ACCEPTED_FORMATS: dict[int, frozenset[str]] = {
    2: frozenset({"png", "jpeg", "dicom"}),
    3: frozenset({"dicom", "nifti"}),
}


class InputRejected(Exception):
    """An upload the service refuses; ``status`` is the HTTP status, the message is for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message

    def to_json(self) -> dict[str, str | int]:
        return {"error": self.message, "status": self.status}


logger = logging.getLogger(__name__)

_DEFAULTS = ServingParams()


@dataclass(frozen=True)
class SafetyLimits:
    """Upload limits; the service builds them from ``Params.serving``
    (``max_upload_mb``, ``max_pixels``, ``max_decoded_mb``); the defaults are its defaults."""

    max_upload_bytes: int = int(_DEFAULTS.max_upload_mb * 1024 * 1024)
    max_pixels: int = _DEFAULTS.max_pixels
    max_decoded_bytes: int = int(_DEFAULTS.max_decoded_mb * 1024 * 1024)

    @classmethod
    def from_params(cls, serving: ServingParams) -> SafetyLimits:
        return cls(
            max_upload_bytes=int(serving.max_upload_mb * 1024 * 1024),
            max_pixels=serving.max_pixels,
            max_decoded_bytes=int(serving.max_decoded_mb * 1024 * 1024),
        )


def _fmt_mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def classify_decode_error(message: str) -> int:
    """HTTP status for an :class:`ImageDecodeError` message from the decoder."""
    m = message.lower()
    if "decompression bomb" in m or "more than max_pixels" in m:
        return HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    if m.startswith(("unrecognised content", "not an image", "unsupported")):
        return HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    if m.startswith("empty file"):
        return HTTPStatus.BAD_REQUEST
    return HTTPStatus.UNPROCESSABLE_ENTITY


#: Bits per pixel of Pillow modes, as stored (before any conversion the decoder makes).
_MODE_BITS = {
    "1": 1, "L": 8, "P": 8, "PA": 16, "LA": 16, "La": 16, "I;16": 16, "I;16B": 16, "I;16L": 16,
    "I;16N": 16, "I": 32, "F": 32, "RGB": 24, "YCbCr": 24, "LAB": 24, "HSV": 24, "RGBA": 32,
    "RGBa": 32, "RGBX": 32, "CMYK": 32,
}  # fmt: skip


def jpeg_draft_scale(width: int, height: int, max_side_hint: int | None) -> int:
    """The 1, 2, 4 or 8 that :func:`bonefrac.data.imageio.read_image` (Pillow's ``draft``) decodes a JPEG at."""
    return reduction_factor(height, width, max_side_hint) if max_side_hint else 1


def decode_memory_estimate(data: bytes, fmt: str, max_side_hint: int | None = None) -> int | None:
    """Peak bytes decoding and preprocessing this file will need, from the header alone; ``None`` if unknown.

    pixels × (stored bytes per pixel + float32 working copies): the stored raster twice
    (Pillow's image and NumPy's copy of it; PNG: channels × IHDR bit depth, 16-bit colour
    included, which Pillow's mode hides; other rasters: Pillow's mode after a lazy open;
    DICOM: samples × BitsAllocated, once), a float32 copy per channel (colour → luminance),
    and 16 bytes: the float32 image, its windowed copy, and the scaled and partitioned
    copies the image statistics (prediction log, OOD check) take (DICOM: 8 more for
    pydicom's float64 LUT output). Measured peaks (3000×3000 px PNG, decode + preprocess +
    statistics, ``/proc`` high-water mark): gray 8-bit 20.6 B/px (estimate 22), 16-bit 23.6
    (24), RGB 32.2 (34), RGBA 35.3 (40); 12-bit DICOM 21.0 (30).
    A header that cannot be read returns ``None``: the decoder then names the problem.
    ``max_side_hint``: a JPEG decoded at reduced scale needs 1/scale² of that.
    """
    try:
        if fmt == "dicom":
            ds = _dicom.read_dataset(data, stop_before_pixels=True)
            pixels = _dicom.pixel_count(ds)
            samples = max(1, _dicom.header_int(ds, "SamplesPerPixel", 1))
            stored = samples * max(8, _dicom.header_int(ds, "BitsAllocated", 16)) // 8
            return pixels * (stored + 4 * samples + 16 + 8)
        if fmt in ("png", "jpeg", "tiff", "bmp", "gif", "webp"):
            from PIL import Image

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im = Image.open(io.BytesIO(data))  # lazy: reads the header only
            width, height = im.size
            if fmt == "png" and len(data) >= 26 and data[12:16] == b"IHDR":
                depth, colour = data[24], data[25]
                channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour, 4)
                stored = max(1, channels * depth // 8)
            else:
                channels = len(im.getbands())
                stored = max(1, _MODE_BITS.get(im.mode, 32) // 8)
            scale = jpeg_draft_scale(width, height, max_side_hint) if fmt == "jpeg" else 1
            return width * height * (2 * stored + 4 * channels + 16) // (scale * scale)
    except Exception:  # unreadable header: the decoder reports it precisely
        return None
    return None


#: A JPEG is decoded at reduced scale keeping at least this many times the model's input side
#: (``benchmarks.draft_decode``: at 1× the DCT scaling plus the area resize move probabilities
#: measurably; at 2× they match the full-resolution path within the stated tolerance).
DRAFT_MARGIN = 2


def decode_side_hint(spatial_dims: int, image_size: int, display_side: int = 0) -> int | None:
    """The shortest side a JPEG upload must keep when decoded at reduced scale; ``None``: full resolution.

    The model sees the image with its longest side resized to ``image_size``; a display
    image (``/explain``) needs ``display_side``. libjpeg decodes at 1/2, 1/4 or 1/8 scale
    in the DCT domain (:func:`bonefrac.data.imageio.read_image`'s ``max_side_hint``), far
    faster than decoding every pixel and then throwing most of them away.
    """
    if spatial_dims != 2 or image_size <= 0:
        return None
    return max(DRAFT_MARGIN * int(image_size), int(display_side))


def upload_decode_hints(
    spec: PreprocessSpec, reduced_jpeg_decode: bool, display_side: int = 0
) -> tuple[int | None, int | None]:
    """(the model's decode hint, the display picture's) for an upload scored by a model of ``spec``.

    A spec that defines its own decode scale (preprocessing version 2) is decoded exactly so, in
    the service as in training, whatever ``reduced_jpeg_decode`` says; the picture /explain draws
    then needs its own full-resolution decode (``None``). A version-1 model decodes at full
    resolution unless the opt-in ``reduced_jpeg_decode`` asks for a reduced scale that keeps both
    the model's margin and ``display_side`` (one decode then serves both).
    """
    if spec.decode_side_hint is not None:
        return spec.decode_side_hint, None
    if not reduced_jpeg_decode:
        return None, None
    hint = decode_side_hint(spec.spatial_dims, spec.image_size, display_side)
    return hint, hint


def stored_size(img: DecodedImage) -> tuple[int, int]:
    """(height, width) of the image as stored, also when it was decoded at reduced scale."""
    full = (img.meta or {}).get("full_size")
    if full:
        return int(full[0]), int(full[1])
    return int(img.array.shape[-2]), int(img.array.shape[-1])


def check_upload(data: bytes, spatial_dims: int, limits: SafetyLimits, max_side_hint: int | None = None) -> int:
    """Every check that needs no decoding; returns the decode's working memory in bytes (0 if unknown).

    Raises :class:`InputRejected` for an empty or oversized upload, a format this model
    does not take, or a header that declares more than ``max_decoded_mb``. The service
    runs it before waiting for a decode slot, so a bomb is refused without queueing.
    """
    if not data:
        raise InputRejected(HTTPStatus.BAD_REQUEST, "empty upload: the file has 0 bytes")
    if len(data) > limits.max_upload_bytes:
        raise InputRejected(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"upload too large: {_fmt_mb(len(data))}, the limit is {_fmt_mb(limits.max_upload_bytes)}",
        )
    fmt = content_format(data)
    accepted = ACCEPTED_FORMATS[spatial_dims]
    if fmt in ("text", "unknown"):
        what = "text" if fmt == "text" else "not a recognised image"
        raise InputRejected(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"unsupported file: {what}; send {', '.join(sorted(f.upper() for f in accepted))}",
        )
    if fmt not in accepted:
        if spatial_dims == 2 and fmt == "nifti":
            raise InputRejected(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                "a NIfTI volume was sent to a 2D radiograph model; send a 2D PNG, JPEG or DICOM image",
            )
        raise InputRejected(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"unsupported format {fmt.upper()}: this model accepts "
            f"{', '.join(sorted(f.upper() for f in accepted))}",
        )
    needed = decode_memory_estimate(data, fmt, max_side_hint)
    if needed is not None and needed > limits.max_decoded_bytes:
        raise InputRejected(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"decode budget: decoding this image needs about {_fmt_mb(needed)} (from its header), more than "
            f"max_decoded_mb ({_fmt_mb(limits.max_decoded_bytes)}; set BONEFRAC_MAX_DECODED_MB to change it)",
        )
    return int(needed or 0)


def decode_upload(
    data: bytes, spatial_dims: int, limits: SafetyLimits, max_side_hint: int | None = None
) -> DecodedImage:
    """Decode an uploaded file for a model of ``spatial_dims``; raise :class:`InputRejected` if unusable.

    ``max_side_hint`` (see :func:`decode_side_hint`): a large JPEG is decoded at reduced scale.
    """
    check_upload(data, spatial_dims, limits, max_side_hint)
    try:
        img = read_image(data, max_pixels=limits.max_pixels, expected_dims=spatial_dims, max_side_hint=max_side_hint)
    except ImageDecodeError as err:
        raise InputRejected(classify_decode_error(str(err)), str(err)) from None
    except MemoryError:
        raise InputRejected(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "image too large to decode") from None
    except Exception as err:  # any decoder failure is the file's, never a 500
        # The message may quote header values or names from the file: log and return the type only.
        fmt = content_format(data)  # only here: the gate above already sniffed it (a parse for preamble-less DICOM)
        logger.warning("decoder raised %s on a %s upload", type(err).__name__, fmt)
        raise InputRejected(
            HTTPStatus.UNPROCESSABLE_ENTITY, f"corrupt {fmt.upper()}: the decoder failed ({type(err).__name__})"
        ) from None
    if img.array.size == 0 or min(img.array.shape) < 2:
        raise InputRejected(
            HTTPStatus.UNPROCESSABLE_ENTITY, f"image too small: shape {tuple(img.array.shape)}"
        )
    return img
