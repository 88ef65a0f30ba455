"""The network's raw outputs on rows of a preprocessed image array, each row computed once.

Why: the evaluate stage shows the same cached images to one network several times: the
validation and test splits for the metrics, a training sample and the test split for the
drift reference, the same training sample and the validation split for the out-of-distribution
detector. At 512 px with flip TTA one image costs ~0.46 s on 2 cores, and the FracAtlas run
made 5,244 image passes where 2,122 were distinct (24 of the stage's ~58 minutes). This class
keeps each row's raw logits and embedding (a few KB a row) the first time any caller asks,
so every later caller gets the same numbers without a forward pass.

The logits are raw: each caller applies its own bundle's calibration (the evaluation fits one
on the validation logits; the drift reference uses the calibrated bundle the evaluation
wrote; both run the same weights, which :meth:`CacheOutputs.check_network` verifies).

Where the train stage cached the frozen trunk's outputs on a row (a dense network: every
training image and, with exact flips, its mirror), the row's outputs come from those maps
through the head alone (``trunk``): the drift reference's and the OOD detector's training
sample then costs no trunk pass. Rows the cache lacks a needed view of (the validation split
has no mirror) and rows outside it (the test split) take the full forward pass, so the
evaluation's calibration, operating points and test scores are the served network's own.
The cached maps are float16: the head's outputs on them differ from the float32 pass by
rounding (up to 4e-4 in a logit, measured at 384 px), which drift and OOD statistics do not notice.

Memory: rows are read a small batch at a time, never all at once, by positional reads
(:mod:`bonefrac.npy_rows`: pages touched through the memory map would stay in the stage's RSS).
The batch is small because of activations, not inputs: a batch of 32 at 512 px with the
mirror view peaked at 6.3 GiB, a batch of 8 at 2.4 GiB, at the same speed per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from bonefrac.inference.predictor import PredictionError, Predictor
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.networks import forward_with_embedding
from bonefrac.npy_rows import read_rows

#: Images per forward pass (see the module docstring for why small).
BATCH_SIZE = 8


class TrunkMaps(Protocol):
    """The train stage's cached trunk outputs (``training.feature_cache.TrunkFeatures``): view
    ``v`` (0 the image, 1 its mirror) of ``rows[k]`` in ``s16[v, k]``, ``s32[v, k]`` (``s8``)."""

    rows: np.ndarray
    mirrored: np.ndarray
    s16: np.ndarray
    s32: np.ndarray
    s8: np.ndarray | None


class CacheOutputs:
    """Raw logits ``(N, 1 + T)`` and embeddings ``(N, F)`` of ``predictor``'s network on rows of ``images``."""

    def __init__(
        self, predictor: Predictor, images: np.ndarray, batch_size: int = BATCH_SIZE, trunk: TrunkMaps | None = None
    ) -> None:
        """``images``: preprocessed rows ``(R, 1, ...)``, typically the cache's memory map; ``trunk``:
        the trunk's cached outputs on some of those rows (see the module docstring)."""
        self.predictor = predictor
        self.images = images
        self.batch_size = int(batch_size)
        self._logits: dict[int, np.ndarray] = {}
        self._embeddings: dict[int, np.ndarray] = {}
        self.n_computed = 0  # rows computed, one per distinct row (tests and logs read it)
        self.n_from_trunk = 0  # of those, rows computed from the cached trunk maps (the head alone)
        self.trunk = trunk
        self._trunk_pos = self._usable_trunk_rows(trunk)

    def _usable_trunk_rows(self, trunk: TrunkMaps | None) -> dict[int, int]:
        """Image row → position in ``trunk`` for rows with every view the network needs cached."""
        model = self.predictor.model
        if trunk is None or not callable(getattr(model, "outputs_from_trunk", None)):
            return {}
        need_mirror = bool(getattr(model, "flip_tta", False))
        return {int(r): k for k, r in enumerate(trunk.rows) if trunk.mirrored[k] or not need_mirror}

    def check_network(self, bundle: ModelBundle) -> None:
        """Raise unless ``bundle`` runs the same network (architecture and weights) as these outputs."""
        own = self.predictor.bundle
        same = own.arch == bundle.arch and own.state_dict.keys() == bundle.state_dict.keys()
        same = same and all(torch.equal(own.state_dict[k], bundle.state_dict[k]) for k in own.state_dict)
        if not same:
            raise PredictionError(
                f"cached outputs of a {own.arch} network were offered for another network ({bundle.arch}, "
                "other weights): compute them with this bundle's own network"
            )

    def logits(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Raw network output of each row, in the order given (repeats allowed)."""
        rows = self._fill(rows)
        if not rows:
            return np.zeros((0, 1 + self.predictor.bundle.num_types), dtype=np.float32)
        return np.stack([self._logits[r] for r in rows])

    def embeddings(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The embedding of each row (:func:`bonefrac.model.networks.forward_with_embedding`'s)."""
        rows = self._fill(rows)
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self._embeddings[r] for r in rows])

    def _fill(self, rows: Sequence[int] | np.ndarray) -> list[int]:
        """Compute the rows not seen yet (in ascending order, a small batch at a time); return ``rows`` as ints."""
        wanted = [int(r) for r in np.asarray(rows, dtype=np.int64).ravel()]
        todo = sorted(set(wanted) - self._logits.keys())
        from_trunk = [r for r in todo if r in self._trunk_pos]
        direct = [r for r in todo if r not in self._trunk_pos]
        with torch.inference_mode():
            for todo_part, compute in ((direct, self._forward), (from_trunk, self._from_trunk)):
                for start in range(0, len(todo_part), self.batch_size):
                    chunk = todo_part[start : start + self.batch_size]
                    self._store(chunk, *compute(chunk))
        self.n_computed += len(todo)
        self.n_from_trunk += len(from_trunk)
        return wanted

    def _forward(self, chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's full forward pass on the preprocessed pixels of ``chunk``."""
        x = torch.from_numpy(read_rows(self.images, chunk).astype(np.float32))
        return forward_with_embedding(self.predictor.model, self.predictor.check_input(x).to(self.predictor.device))

    def _from_trunk(self, chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's outputs on the cached trunk maps of ``chunk`` (and of their mirrors, for a flip-TTA net)."""
        assert self.trunk is not None
        pos = [self._trunk_pos[r] for r in chunk]
        maps = [m for m in (self.trunk.s16, self.trunk.s32, self.trunk.s8) if m is not None]
        device = self.predictor.device

        def view(v: int) -> tuple[torch.Tensor, ...]:
            picked = [(v, k) for k in pos]
            return tuple(torch.from_numpy(read_rows(m, picked, lead=2).astype(np.float32)).to(device) for m in maps)

        model = self.predictor.model
        z, _, emb = model.outputs_from_trunk(view(0), view(1) if getattr(model, "flip_tta", False) else None)
        return z, emb

    def _store(self, chunk: list[int], logits: torch.Tensor, emb: torch.Tensor) -> None:
        out = logits.float().cpu().numpy()
        out = out[:, None] if out.ndim == 1 else out
        flat = emb.flatten(1).float().cpu().numpy()
        for i, r in enumerate(chunk):
            self._logits[r], self._embeddings[r] = out[i], flat[i]
