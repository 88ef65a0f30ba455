"""Builders of small manifest tables (MANIFEST_COLUMNS) for the validation and split tests."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from bonefrac.data.schema import MANIFEST_COLUMNS


def random_phashes(n: int, seed: int = 0, min_distance: int = 12) -> list[str]:
    """n 64-bit hashes, pairwise at least ``min_distance`` bits apart (so none are near duplicates)."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while len(out) < n:
        h = int(rng.integers(0, 2**63, dtype=np.int64)) * 2 + int(rng.integers(0, 2))
        if all(bin(h ^ o).count("1") >= min_distance for o in out):
            out.append(h)
    return [f"{h:016x}" for h in out]


def flip_bits(phash: str, bits: int) -> str:
    """A hash ``bits`` Hamming distance away from ``phash``."""
    h = int(phash, 16)
    for b in range(bits):
        h ^= 1 << (b * 7 % 64)
    return f"{h:016x}"


def make_manifest(
    n: int = 40,
    positive_every: int = 3,
    seed: int = 0,
    body_parts: tuple[str, ...] = ("hand", "leg"),
    patients: int | None = None,
) -> pd.DataFrame:
    """A clean manifest: every check passes on it."""
    rows = []
    hashes = random_phashes(n, seed)
    for i in range(n):
        label = int(i % positive_every == 0)
        rows.append(
            {
                "image_id": f"img{i:04d}.png",
                "path": f"/data/raw/img{i:04d}.png",
                "label": label,
                "fracture_type": "transverse" if label else "",
                "body_part": body_parts[i % len(body_parts)],
                "view": "frontal",
                "patient_id": f"P{i % patients:03d}" if patients else "",
                "study_id": "",
                "boxes": "[[10, 12, 30, 20]]" if label else "[]",
                "hardware": 0,
                "sha256": hashlib.sha256(f"{seed}-{i}".encode()).hexdigest(),
                "phash": hashes[i],
                "width": 256 + i,
                "height": 300,
                "depth": 1,
                "spatial_dims": 2,
                "channels": 1,
                "bit_depth": 8 if i % 2 else 16,
                "format": "png",
                "modality": "XR",
                "file_size": 5000 + i,
                "intensity_mean": 0.3 + 0.005 * (i % 20),
                "intensity_std": 0.2,
                "intensity_p01": 0.05,
                "intensity_p99": 0.9,
                "decodes_ok": True,
                "decode_error": "",
            }
        )
    df = pd.DataFrame(rows)
    assert list(df.columns) == MANIFEST_COLUMNS
    return df
