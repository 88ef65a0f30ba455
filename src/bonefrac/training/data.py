"""Training data from the preprocessed cache: datasets, loaders and type labels.

Reads the memory-mapped ``images.npy`` lazily in each process (a memmap handed
to a spawned worker would be pickled as a full copy), applies the random
augmentation seeded per (run seed, epoch, sample) so batches do not depend on
worker count or resume point, and pins memory when training on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.transforms import Compose
from torch.utils.data import DataLoader, Dataset, Sampler

from bonefrac.errors import BonefracError
from bonefrac.preprocess.augment import apply_augmentation, sample_seed
from bonefrac.preprocess.cache import CACHE_ROW, IMAGES_FILE
from bonefrac.training.sampling import EpochSampler

TYPE_COLUMN = "fracture_type"


class DataError(BonefracError, ValueError):
    """The cache cannot train a model (missing split or labels); the message says which."""


def type_names_from_index(index: pd.DataFrame) -> list[str]:
    """Sorted non-empty fracture types present in the index (the multi-task classes)."""
    if TYPE_COLUMN not in index.columns:
        return []
    vals = index[TYPE_COLUMN].fillna("").astype(str).str.strip()
    return sorted(v for v in vals.unique() if v)


def type_indices(index: pd.DataFrame, type_names: Sequence[str]) -> np.ndarray:
    """Index of each row's type in ``type_names``; -1 when unknown/none."""
    if TYPE_COLUMN not in index.columns or not type_names:
        return np.full(len(index), -1, dtype=np.int64)
    lookup = {t: i for i, t in enumerate(type_names)}
    vals = index[TYPE_COLUMN].fillna("").astype(str).str.strip()
    return np.array([lookup.get(v, -1) for v in vals], dtype=np.int64)


def split_rows(index: pd.DataFrame, split: str) -> pd.DataFrame:
    if "split" not in index.columns:
        raise DataError("the cache index has no 'split' column: run the preprocess stage with splits")
    if "label" not in index.columns:
        raise DataError("the cache index has no 'label' column")
    rows = index[index["split"].astype(str) == split]
    bad = set(pd.to_numeric(rows["label"], errors="coerce").fillna(-1).astype(int)) - {0, 1}
    if bad:
        raise DataError(f"labels must be 0/1; the {split} split has {sorted(bad)}")
    return rows


class CachedDataset(Dataset):
    """Rows of the cache → ``(image float32 (1, ...), label float32, type_index int64, row int64)``."""

    def __init__(
        self,
        cache_dir: Path,
        cache_rows: np.ndarray,
        labels: np.ndarray,
        type_index: np.ndarray,
        transform: Compose | None = None,
        seed: int = 0,
    ) -> None:
        self.path = Path(cache_dir) / IMAGES_FILE
        self.cache_rows = np.asarray(cache_rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.float32)
        self.type_index = np.asarray(type_index, dtype=np.int64)
        self.transform = transform
        self.seed = seed
        self._images: np.ndarray | None = None

    @classmethod
    def from_index(
        cls,
        cache_dir: Path,
        rows: pd.DataFrame,
        type_names: Sequence[str],
        transform: Compose | None = None,
        seed: int = 0,
    ) -> CachedDataset:
        return cls(
            cache_dir,
            rows[CACHE_ROW].to_numpy(),
            pd.to_numeric(rows["label"]).to_numpy(),
            type_indices(rows, type_names),
            transform,
            seed,
        )

    def _array(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        return self._images

    def __len__(self) -> int:
        return len(self.cache_rows)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        # (epoch, i) from EpochTaggedSampler: the epoch travels with the index because
        # persistent workers hold their own copy of the dataset.
        epoch, i = key if isinstance(key, tuple) else (0, key)
        x = torch.from_numpy(np.asarray(self._array()[self.cache_rows[i]], dtype=np.float32))
        if self.transform is not None:
            x = apply_augmentation(self.transform, x, sample_seed(self.seed, epoch, i))
        return (x, torch.tensor(self.labels[i]), torch.tensor(self.type_index[i]), torch.tensor(i))

    def __getstate__(self) -> dict:
        # Workers reopen the memmap themselves (see module docstring).
        state = self.__dict__.copy()
        state["_images"] = None
        return state


class EpochTaggedSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` from an :class:`~bonefrac.training.sampling.EpochSampler`."""

    def __init__(self, sampler: EpochSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        e = self.sampler.epoch
        return ((e, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler | None,
    num_workers: int,
    pin_memory: bool,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader; workers persist across epochs, and a private generator keeps the
    global torch RNG (dropout) untouched by the loader's worker seeding."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(0),
        prefetch_factor=4 if num_workers > 0 else None,
    )
