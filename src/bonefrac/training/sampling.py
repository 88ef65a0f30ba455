"""The training sampler: one epoch-seeded order, sharded over DDP ranks, optionally class-weighted.

Hand-written because neither ``WeightedRandomSampler`` nor ``DistributedSampler``
alone does all three things this project needs:

- **class-weighted sampling** (``imbalance.sampler: weighted``: each class drawn
  equally often, with replacement) *and* sharding over DDP ranks;
- **exact resume**: the order is a pure function of (seed, epoch), so a run
  resumed at epoch k sees the same batches as one never interrupted — the
  sampler's whole state is its epoch;
- **DDP ≡ single process**: rank r takes positions r, r+W, r+2W, ... of the one
  global order, so with a per-rank batch of B/W, step s of all ranks together
  covers exactly the samples of step s of a single process with batch B.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def class_balanced_weights(labels: Sequence[int]) -> torch.Tensor:
    """Per-sample weights 1 / count(class): both classes equally likely per draw."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    counts = torch.bincount(y, minlength=2).clamp(min=1).double()
    return (1.0 / counts)[y]


class EpochSampler(Sampler[int]):
    """Indices for one rank; call :meth:`set_epoch` before each epoch."""

    def __init__(
        self,
        n: int,
        seed: int,
        weights: torch.Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if n < 1:
            raise ValueError("the training split is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.n = n
        self.seed = int(seed)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        # Every rank gets the same count (padded by wrapping around, as DistributedSampler does).
        self.num_samples = math.ceil(n / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_order(self) -> list[int]:
        """The epoch's order over all ranks (before sharding)."""
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        out = order.tolist()
        total = self.num_samples * self.world_size
        out += out[: total - len(out)]
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_order()[self.rank :: self.world_size])

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
