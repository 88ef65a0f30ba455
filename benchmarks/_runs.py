"""A finished pipeline run's boxed fractures, read as its evaluation reads them (for map benchmarks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from bonefrac.model.boxes import row_boxes
from bonefrac.preprocess.cache import load_cache


def boxed_fractures(run: Path, split: str, image_size: int) -> Iterator[tuple[torch.Tensor, list[list[float]]]]:
    """Each fractured image of ``split`` that has radiologists' boxes: its preprocessed tensor
    ``(1, 1, H, W)`` from the run's cache and its boxes on the ``image_size`` input square."""
    images, index = load_cache(run / "data" / "processed")
    rows = index[(index["split"] == split) & (index["label"].astype(str) == "1")]
    for _, r in rows.iterrows():
        boxes = row_boxes(r, image_size)
        if boxes:
            yield torch.from_numpy(np.array(images[int(r["cache_row"])], dtype=np.float32))[None], boxes
