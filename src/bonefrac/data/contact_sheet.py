"""A contact sheet: a grid of dataset images with their labels and boxes.

Why: a person has to look at the data before trusting a model trained on it
(do phantoms look like radiographs, do boxes sit on the fractures, are 16-bit
files windowed sensibly). PIL is enough for a grid and keeps the output
deterministic; matplotlib would add fonts and timestamps for nothing.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from bonefrac.atomic import atomic_write_bytes
from bonefrac.errors import BonefracError


class ContactSheetError(BonefracError, ValueError):
    """The manifest cannot be turned into a contact sheet."""


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale any grey array to 8 bits with a robust window (16-bit files use part of their range)."""
    a = arr.astype(np.float32)
    lo, hi = np.percentile(a, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


Box2D = tuple[float, float, float, float]


def _load_tile(path: Path, boxes: list[list[float]]) -> tuple[np.ndarray, list[Box2D]]:
    """Grey uint8 image and 2D boxes (x, y, w, h) to draw on it.

    For a NIfTI volume the tile is the coronal slice through the (first) box
    centre, or the middle slice, showing the bone along its length.
    """
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        vol = np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0)  # (x, y, z) -> (D, H, W)
        y = int(boxes[0][1] + boxes[0][4] / 2) if boxes else vol.shape[1] // 2
        sl = vol[:, min(max(y, 0), vol.shape[1] - 1), :]  # (D, W)
        return _to_uint8(sl), [(b[0], b[2], b[3], b[5]) for b in boxes]
    with Image.open(path) as im:
        arr = np.asarray(im.convert("I") if im.mode not in ("L", "I;16", "I") else im)
    if arr.ndim == 3:
        arr = arr.mean(axis=2)
    return _to_uint8(arr), [tuple(b[:4]) for b in boxes]  # type: ignore[misc]


def make_contact_sheet(
    manifest: pd.DataFrame,
    root: Path,
    out_png: Path,
    n: int = 24,
    draw_boxes: bool = True,
    tile: int = 192,
    columns: int = 6,
) -> Path:
    """Draw up to ``n`` rows of ``manifest`` (paths relative to ``root``) into one PNG grid.

    Rows are taken evenly across the table so both classes show. Each tile has
    a caption (label, fracture type, body part, view, bit depth) and, when
    ``draw_boxes``, the fracture boxes in red. Written atomically.
    """
    missing = {"path", "label"} - set(manifest.columns)
    if missing:
        raise ContactSheetError(f"manifest lacks column(s) {sorted(missing)}")
    if len(manifest) == 0:
        raise ContactSheetError("manifest is empty: nothing to draw")
    root = Path(root)
    idx = np.unique(np.linspace(0, len(manifest) - 1, min(n, len(manifest))).round().astype(int))
    rows = manifest.iloc[idx]
    cols = min(columns, len(rows))
    nrows = -(-len(rows) // cols)
    cap = 28
    sheet = Image.new("RGB", (cols * tile, nrows * (tile + cap)), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (_, r) in enumerate(rows.iterrows()):
        p = Path(str(r["path"]))
        p = p if p.is_absolute() else root / p
        boxes = json.loads(r["boxes"]) if draw_boxes and isinstance(r.get("boxes"), str) else []
        try:
            arr, b2 = _load_tile(p, boxes)
            bits = ""
            if p.suffix.lower() == ".png":
                with Image.open(p) as im:
                    bits = "16b" if im.mode.startswith("I") else "8b"
        except (OSError, ValueError) as err:
            raise ContactSheetError(f"cannot read {p}: {err}") from err
        h, w = arr.shape
        scale = tile / max(h, w)
        im = Image.fromarray(arr).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        x0, y0 = (i % cols) * tile, (i // cols) * (tile + cap)
        ox, oy = x0 + (tile - im.width) // 2, y0 + (tile - im.height) // 2
        sheet.paste(im.convert("RGB"), (ox, oy))
        for bx, by, bw, bh in b2:
            draw.rectangle([ox + bx * scale, oy + by * scale, ox + (bx + bw) * scale, oy + (by + bh) * scale],
                           outline=(255, 40, 40), width=2)
        label = int(r["label"])
        ftype = str(r.get("fracture_type", "") or "")
        if ftype == "nan":
            ftype = ""
        line1 = f"{'FRACTURE' if label == 1 else 'normal'} {ftype}".strip()
        parts = (str(r.get(c, "")) for c in ("body_part", "view"))
        line2 = " ".join(v for v in parts if v not in ("", "nan"))
        color = (255, 120, 120) if label == 1 else (150, 220, 150)
        draw.text((x0 + 3, y0 + tile + 2), line1, fill=color, font=font)
        draw.text((x0 + 3, y0 + tile + 14), f"{line2} {bits}".strip(), fill=(200, 200, 200), font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return atomic_write_bytes(out_png, buf.getvalue())
