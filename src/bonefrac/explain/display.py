"""Pictures for people: the radiograph, its heatmap (the model's own map or Grad-CAM) and their overlay, as PNG.

The network sees a square, padded, resized copy of the image; a radiologist wants
the image as it was taken. So the heatmap is computed on the network's grid, the
padding is cropped off, and the rest is resized onto the original aspect ratio
(longest side capped for the browser). The heatmap is also given alone, as RGBA
with alpha following the CAM, so the viewer can toggle it and change its opacity.

For reading, the viewer also gets the image's own values at full resolution
(:func:`display_pixels`): integer codes of up to 16 bits that map linearly back to the
stored units, so window/level acts on what the detector recorded, not on an 8-bit copy
already windowed by percentiles. A DICOM's own VOI window is the default preset: the
pixels are decoded again without it (pydicom's windowing clips everything outside it).
"""

from __future__ import annotations

import base64
import io
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

DISPLAY_MAX_SIDE = 1024
#: Native pixels up to this many (a 4096 x 4096 detector); beyond, the smallest integer
#: reduction that fits. 16.8 M pixels cost the browser ~170 MB (codes, RGBA canvas, ImageData).
DISPLAY_MAX_PIXELS = 4096 * 4096
AUTO_PERCENTILES = (0.5, 99.5)


def compute_cam(
    model: nn.Module, x: torch.Tensor, layer: str | None = None, method: str = "gradcam"
) -> np.ndarray:
    """The map shown for a batch ``(N, 1, ...)`` → ``(N, ...)`` on [0, 1].

    A network with its own evidence map (the dense archs) is shown that map
    (:mod:`bonefrac.explain.heatmaps`); any other gets Grad-CAM of the fracture logit
    (column 0), through :func:`bonefrac.explain.gradcam.compute_cams` (the pipeline's own)
    when present, else MONAI's GradCAM directly.
    """
    from bonefrac.explain.heatmaps import evidence_heatmaps, has_evidence_map

    if has_evidence_map(model):
        return evidence_heatmaps(model, x)
    layer = layer or getattr(model, "gradcam_layer", None)
    try:
        from bonefrac.explain.gradcam import compute_cams
    except ImportError:
        compute_cams = None
    if compute_cams is not None:
        cams = compute_cams(model, x, method, layer)
        cams = cams.detach().cpu().numpy() if isinstance(cams, torch.Tensor) else np.asarray(cams)
    else:
        from monai.visualize import GradCAM

        with torch.enable_grad():
            cams = GradCAM(nn_module=model, target_layers=layer)(x.clone().requires_grad_(True), class_idx=0)
        cams = cams.detach().cpu().numpy()
    cams = np.asarray(cams, dtype=np.float32)
    spatial = x.ndim - 2
    while cams.ndim > spatial + 1:  # drop a channel axis
        cams = cams[:, 0]
    cams = np.nan_to_num(cams)
    lo = cams.reshape(len(cams), -1).min(axis=1).reshape((-1,) + (1,) * spatial)
    hi = cams.reshape(len(cams), -1).max(axis=1).reshape((-1,) + (1,) * spatial)
    return np.clip((cams - lo) / np.maximum(hi - lo, 1e-8), 0.0, 1.0)


def content_box(shape: Sequence[int], image_size: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the image inside the padded square, mirroring the preprocessing.

    Resize(longest side → ``image_size``) then SpatialPad(symmetric), as in
    :func:`bonefrac.model.transforms.deterministic_transform`.
    """
    h, w = int(shape[0]), int(shape[1])
    scale = image_size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    y0, x0 = (image_size - nh) // 2, (image_size - nw) // 2
    return y0, y0 + nh, x0, x0 + nw


def display_image(
    array: np.ndarray, max_side: int = DISPLAY_MAX_SIDE, lower: float = 0.5, upper: float = 99.5
) -> np.ndarray:
    """A 2D array in stored units → 8-bit gray for display (percentile window, longest side capped)."""
    arr = np.asarray(array, dtype=np.float32)
    lo, hi = np.percentile(arr, [lower, upper]) if arr.size else (0.0, 1.0)
    g = np.clip((arr - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
    im = Image.fromarray((g * 255.0 + 0.5).astype(np.uint8))
    h, w = g.shape
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    return np.asarray(im)


def _jet(cam: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["jet"](cam)[..., :3] * 255.0).astype(np.uint8)


def resize_cam(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    im = Image.fromarray(np.asarray(cam, dtype=np.float32), mode="F")
    return np.clip(np.asarray(im.resize((width, height), Image.Resampling.BILINEAR)), 0.0, 1.0)


def heatmap_rgba(cam: np.ndarray, max_alpha: float = 0.85) -> np.ndarray:
    """Colour-mapped CAM with alpha rising with the CAM: weak regions stay see-through."""
    rgb = _jet(cam)
    alpha = (np.clip(cam, 0, 1) ** 0.8 * max_alpha * 255.0).astype(np.uint8)
    return np.dstack([rgb, alpha])


def overlay_rgb(gray: np.ndarray, cam: np.ndarray, opacity: float = 0.5, floor: float = 0.0) -> np.ndarray:
    """Alpha-blend the heatmap over the gray image (same size); no tint where the CAM is below ``floor``."""
    base = np.repeat(gray[..., None].astype(np.float32), 3, axis=2)
    rgba = heatmap_rgba(cam).astype(np.float32)
    a = rgba[..., 3:4] / 255.0 * opacity / 0.85
    if floor > 0:
        a = np.where(np.asarray(cam)[..., None] >= floor, a, 0.0)
    return np.clip(base * (1 - a) + rgba[..., :3] * a, 0, 255).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def b64_png(array: np.ndarray) -> str:
    return base64.b64encode(png_bytes(array)).decode("ascii")


def explain_pictures(
    original: np.ndarray, model_input: np.ndarray, cam: np.ndarray, image_size: int, opacity: float = 0.5
) -> dict[str, np.ndarray]:
    """Display image, heatmap (RGBA) and overlay (RGB), all the same size.

    2D: on the original image (padding cropped off the CAM). 3D: on the slice of
    the network's input volume where the CAM is strongest.
    """
    if cam.ndim == 3:  # volume: the most activated axial slice of the model input
        k = int(np.argmax(cam.reshape(cam.shape[0], -1).sum(axis=1)))
        gray = display_image(model_input[k])
        cam2 = resize_cam(cam[k], *gray.shape)
    else:
        y0, y1, x0, x1 = content_box(original.shape, image_size)
        gray = display_image(original)
        cam2 = resize_cam(cam[y0:y1, x0:x1], *gray.shape)
    return {
        "image": gray,
        "heatmap": heatmap_rgba(cam2),
        "overlay": overlay_rgb(gray, cam2, opacity),
        "cam": cam2,
    }


def small_heatmap(cam: np.ndarray, side: int = 32) -> list[list[float]]:
    """A coarse copy of the (2D) CAM for clients that want numbers, not pictures."""
    h, w = cam.shape[-2:]
    s = side / max(h, w)
    small = resize_cam(cam if cam.ndim == 2 else cam.max(axis=0), max(1, round(h * s)), max(1, round(w * s)))
    return np.round(small, 3).tolist()


def gradcam_name(path: str, root: Path | None) -> str:
    """Overlay file name that keeps sub-folders apart (``a/b.png`` → ``a__b.png``)."""
    p = Path(path)
    try:
        rel = p.resolve().relative_to(root.resolve()) if root else Path(p.name)
    except ValueError:
        rel = Path(p.name)
    stem = "__".join(rel.parts)
    for suf in (".nii.gz", ".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".nii", ".tif", ".tiff", ".bmp"):
        if stem.lower().endswith(suf):
            stem = stem[: -len(suf)]
            break
    return f"{stem}.png"


#: The overlay panel's title. Never the file name: an export's names can identify the patient, and
#: text burned into pixels survives every copy of the PNG (the PNG's own file name links it to its input).
OVERLAY_TITLE = "bonefrac: calibrated probability and evidence map"
OVERLAY_FLOOR = 0.2  # CAM below 20 % of its maximum: no tint (the whole image blue said nothing)
_PANEL_MIN_WIDTH = 560


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _op_label(name: str) -> str:
    return name.replace("_", "-")


def annotated_overlay(
    gray: np.ndarray,
    cam: np.ndarray,
    *,
    title: str,
    probability: float,
    decisions: dict[str, bool],
    thresholds: dict[str, float] | None = None,
    floor: float = OVERLAY_FLOOR,
    opacity: float = 0.5,
) -> np.ndarray:
    """The overlay a reader can file: heatmap only above ``floor``, and a panel below the image with
    a ``title``, the calibrated probability, the decision at each operating point and a labelled
    colour bar of the heatmap scale."""
    from PIL import ImageDraw

    over = overlay_rgb(gray, cam, opacity, floor)
    h, w = over.shape[:2]
    width = max(w, _PANEL_MIN_WIDTH)
    panel_h = 112
    canvas = Image.new("RGB", (width, h + panel_h), (16, 20, 26))
    canvas.paste(Image.fromarray(over), ((width - w) // 2, 0))
    draw = ImageDraw.Draw(canvas)
    big, small = _font(16), _font(12)
    y = h + 8
    draw.text((10, y), title, fill=(235, 235, 235), font=big)
    y += 22
    thresholds = thresholds or {}
    parts = []
    for op in sorted(decisions):
        thr = f" (p >= {100 * thresholds[op]:.1f} %)" if op in thresholds else ""
        parts.append(f"{_op_label(op)}: {'POSITIVE' if decisions[op] else 'negative'}{thr}")
    draw.text((10, y), f"fracture probability {100 * probability:.1f} %", fill=(255, 255, 255), font=big)
    y += 22
    draw.text((10, y), " · ".join(parts), fill=(200, 200, 200), font=small)
    y += 22
    bar_w, bar_h = min(256, width - 20), 12
    ramp = np.linspace(0.0, 1.0, bar_w)[None, :].repeat(bar_h, axis=0)
    bar = _jet(ramp)
    bar[:, : round(floor * bar_w)] = (60, 60, 60)  # below the floor: not drawn on the image
    canvas.paste(Image.fromarray(bar), (10, y))
    draw.rectangle((10, y, 10 + bar_w - 1, y + bar_h - 1), outline=(200, 200, 200))
    draw.text(
        (20 + bar_w, y - 1),
        f"Grad-CAM, relative to its maximum (not shown below {100 * floor:.0f} %)",
        fill=(200, 200, 200),
        font=small,
    )
    draw.text((10, y + bar_h + 1), "low", fill=(170, 170, 170), font=small)
    draw.text((10 + bar_w - 24, y + bar_h + 1), "high", fill=(170, 170, 170), font=small)
    return np.asarray(canvas)


def overlay_writer(
    model: nn.Module,
    image_size: int,
    out_dir: str | Path,
    root: Path | None,
    device: str = "cpu",
    thresholds: dict[str, float] | None = None,
) -> Callable[[list, torch.Tensor, list[str], list[dict[str, Any]]], None]:
    """An explainer for ``predict_to_file``: one annotated overlay PNG per image into ``out_dir``
    (the model's own map for a dense arch, else Grad-CAM: :func:`compute_cam`).

    ``rows`` are the images' calibrated answers (``Prediction.row``): probability and decisions.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cam_model = model.to(device).eval()

    def write(images: list, x: torch.Tensor, paths: list[str], rows: list[dict[str, Any]]) -> None:
        cams = compute_cam(cam_model, x.to(device))
        for j, (img, path, row) in enumerate(zip(images, paths, rows, strict=True)):
            pics = explain_pictures(img.array, x[j, 0].numpy(), cams[j], image_size)
            picture = annotated_overlay(
                pics["image"],
                pics["cam"],
                title=OVERLAY_TITLE,
                probability=float(row["probability"]),
                decisions=dict(row["decisions"]),
                thresholds=thresholds,
            )
            (out / gradcam_name(path, root)).write_bytes(png_bytes(picture))

    return write


# ------------------------------------------------------------------ full-resolution values for W/L
@dataclass
class DisplayPixels:
    """The image as integer codes for the viewer: ``stored value = offset + scale * code``.

    ``windows`` are presets in stored units, the first is the default: the DICOM's own VOI
    window(s) when it has them, then the percentile window the pipeline uses, then the full range.
    ``reduction`` is 1 when the codes are the native pixels (else one code per r x r block).
    """

    codes: np.ndarray
    offset: float
    scale: float
    reduction: int = 1
    windows: list[dict[str, Any]] = field(default_factory=list)
    value_range: tuple[float, float] = (0.0, 255.0)

    def to_json(self) -> dict[str, Any]:
        """JSON for the viewer: codes row-differenced (mod 2**bits), zlib'd, base64.

        Differencing along a row is PNG's "Sub" filter: it turns smooth radiographs into small
        numbers that zlib packs ~15 % tighter; the client undoes it with a running sum per row.
        """
        codes = np.ascontiguousarray(self.codes)
        if codes.dtype != np.uint8:
            codes = codes.astype("<u2")  # little-endian on the wire, whatever this machine is
        delta = codes.copy()
        delta[:, 1:] = np.diff(codes, axis=1)  # unsigned: wraps modulo 2**bits, undone the same way
        return {
            "encoding": "zlib+base64,row-delta",
            "dtype": "uint8" if codes.dtype == np.uint8 else "uint16le",
            "width": int(codes.shape[1]),
            "height": int(codes.shape[0]),
            "offset": float(self.offset),
            "scale": float(self.scale),
            "reduction": int(self.reduction),
            "windows": self.windows,
            "value_range": [float(self.value_range[0]), float(self.value_range[1])],
            "data": base64.b64encode(zlib.compress(delta.tobytes(), 1)).decode("ascii"),
        }


def _reduce(arr: np.ndarray, max_pixels: int) -> tuple[np.ndarray, int]:
    """Block-mean by the smallest integer factor that brings ``arr`` under ``max_pixels``."""
    h, w = arr.shape
    r = 1
    while (h // r) * (w // r) > max_pixels:
        r += 1
    if r == 1:
        return arr, 1
    hh, ww = (h // r) * r, (w // r) * r
    return arr[:hh, :ww].reshape(hh // r, r, ww // r, r).mean(axis=(1, 3), dtype=np.float64), r


def _quantise(arr: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Codes, offset, scale: exact for integer data spanning <= 16 bits, else 65,536 even steps."""
    lo, hi = float(arr.min()), float(arr.max())
    span = hi - lo
    if span <= 65535 and np.array_equal(arr, np.round(arr)):
        dtype = np.uint8 if span <= 255 else np.uint16
        return (arr - lo).astype(dtype), lo, 1.0
    scale = max(span, 1e-12) / 65535.0
    return np.round((arr - lo) / scale).astype(np.uint16), lo, scale


def _dicom_windows(meta: dict[str, Any], value_range: tuple[float, float], inverted: bool) -> list[dict[str, Any]]:
    """The header's window centre/width pairs (multi-valued: one preset each), in the array's units."""
    centres, widths = meta.get("WindowCenter"), meta.get("WindowWidth")
    if centres is None or widths is None:
        return []
    centres = centres if isinstance(centres, list) else [centres]
    widths = widths if isinstance(widths, list) else [widths]
    out = []
    for i, (c, w) in enumerate(zip(centres, widths, strict=False)):
        try:
            c, w = float(c), float(w)
        except (TypeError, ValueError):
            continue
        if not (np.isfinite(c) and np.isfinite(w)) or w < 1:
            continue
        if inverted:  # MONOCHROME1 values were flipped within the nominal range: so is the centre
            c = value_range[0] + value_range[1] - c
        out.append({"name": "DICOM" if i == 0 else f"DICOM {i + 1}", "center": c, "width": w, "source": "dicom"})
    return out


def display_pixels(
    img: Any, reread: Callable[[], bytes] | None = None, max_pixels: int = DISPLAY_MAX_PIXELS
) -> DisplayPixels | None:
    """Full-resolution codes of a 2D :class:`~bonefrac.data.imageio.DecodedImage` and its W/L presets.

    ``reread`` returns the file's bytes: a DICOM whose VOI window was applied at decoding is
    read again without it, so values outside the window are not lost. ``None`` for volumes.
    """
    arr = np.asarray(img.array)
    if arr.ndim != 2:
        return None
    meta = dict(img.meta or {})
    windows: list[dict[str, Any]] = []
    nominal = meta.get("value_range")
    if img.format == "dicom" and meta.get("voi_applied") == "window" and reread is not None:
        from bonefrac.data.dicom import DicomError, read_dataset, to_display_array

        try:
            px = to_display_array(read_dataset(reread()), apply_voi=False)
            if px.array.shape == arr.shape:
                arr, nominal = px.array, list(px.value_range)
                windows = _dicom_windows(meta, px.value_range, bool(px.meta.get("inverted_monochrome1")))
        except (DicomError, OSError):  # keep the decoded (windowed) values; no DICOM preset then
            windows = []
    arr, reduction = _reduce(np.asarray(arr, dtype=np.float64), max_pixels)
    step = max(1, int(np.ceil(np.sqrt(arr.size / 1_000_000))))  # percentiles on <= 1 M samples
    p_lo, p_hi = np.percentile(arr[::step, ::step], AUTO_PERCENTILES)
    auto = {"center": float(p_lo + p_hi) / 2, "width": max(float(p_hi - p_lo), 1e-6)}
    windows.append({"name": "Auto", **auto, "source": "percentiles"})
    lo, hi = (float(nominal[0]), float(nominal[1])) if nominal else (float(arr.min()), float(arr.max()))
    windows.append({"name": "Full range", "center": (lo + hi) / 2, "width": max(hi - lo, 1e-6), "source": "range"})
    codes, offset, scale = _quantise(arr)
    return DisplayPixels(codes, offset, scale, reduction, windows, (lo, hi))
