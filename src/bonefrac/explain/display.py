"""Pictures for people: the radiograph, its heatmap (the model's own map or Grad-CAM) and their overlay, as PNG.

The network sees a square, padded, resized copy of the image; a radiologist wants
the image as it was taken. So the heatmap is computed on the network's grid, the
padding is cropped off, and the rest is resized onto the original aspect ratio
(longest side capped for the browser). The heatmap is also given alone, as RGBA
with alpha following the CAM, so the viewer can toggle it and change its opacity.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

DISPLAY_MAX_SIDE = 1024


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


def overlay_rgb(gray: np.ndarray, cam: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """Alpha-blend the heatmap over the gray image (same size)."""
    base = np.repeat(gray[..., None].astype(np.float32), 3, axis=2)
    rgba = heatmap_rgba(cam).astype(np.float32)
    a = rgba[..., 3:4] / 255.0 * opacity / 0.85
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


def overlay_writer(
    model: nn.Module, image_size: int, out_dir: str | Path, root: Path | None, device: str = "cpu"
) -> Callable[[list, torch.Tensor, list[str]], None]:
    """An explainer for ``predict_to_file``: one overlay PNG per image into ``out_dir`` (the model's
    own map for a dense arch, else Grad-CAM: :func:`compute_cam`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cam_model = model.to(device).eval()

    def write(images: list, x: torch.Tensor, paths: list[str]) -> None:
        cams = compute_cam(cam_model, x.to(device))
        for j, (img, path) in enumerate(zip(images, paths, strict=True)):
            pics = explain_pictures(img.array, x[j, 0].numpy(), cams[j], image_size)
            (out / gradcam_name(path, root)).write_bytes(png_bytes(pics["overlay"]))

    return write
