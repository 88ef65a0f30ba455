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

Memory: rows are read from the (memory-mapped) array a small batch at a time, never all at
once. The batch is small because of activations, not inputs: a batch of 32 at 512 px with the
mirror view peaked at 6.3 GiB, a batch of 8 at 2.4 GiB, at the same speed per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bonefrac.inference.predictor import PredictionError, Predictor
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.networks import forward_with_embedding

#: Images per forward pass (see the module docstring for why small).
BATCH_SIZE = 8


class CacheOutputs:
    """Raw logits ``(N, 1 + T)`` and embeddings ``(N, F)`` of ``predictor``'s network on rows of ``images``."""

    def __init__(self, predictor: Predictor, images: np.ndarray, batch_size: int = BATCH_SIZE) -> None:
        """``images``: preprocessed rows ``(R, 1, ...)``, typically the cache's memory map."""
        self.predictor = predictor
        self.images = images
        self.batch_size = int(batch_size)
        self._logits: dict[int, np.ndarray] = {}
        self._embeddings: dict[int, np.ndarray] = {}
        self.n_computed = 0  # forward passes made, one per distinct row (tests and logs read it)

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
        model = self.predictor.model
        with torch.inference_mode():
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                x = torch.from_numpy(np.asarray(self.images[chunk], dtype=np.float32))
                logits, emb = forward_with_embedding(model, self.predictor.check_input(x).to(self.predictor.device))
                logits = logits.float().cpu().numpy()
                logits = logits[:, None] if logits.ndim == 1 else logits
                emb = emb.flatten(1).float().cpu().numpy()
                for i, r in enumerate(chunk):
                    self._logits[r], self._embeddings[r] = logits[i], emb[i]
        self.n_computed += len(todo)
        return wanted
