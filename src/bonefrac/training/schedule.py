"""Learning-rate schedule: linear warm-up, then cosine decay, stepped once per optimiser step.

Warm-up keeps the first steps of AdamW (whose second-moment estimates are
still noise) from wrecking pretrained features; cosine decay then anneals to
``min_factor`` × lr. A :class:`~torch.optim.lr_scheduler.LambdaLR` with a
picklable callable object keeps the scheduler's ``state_dict`` complete for
exact resume (a closure would not be saved).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """Multiplier of the base lr at optimiser step ``step`` (0-based)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.warmup_steps = max(0, min(int(warmup_steps), int(total_steps) - 1))
        self.total_steps = int(total_steps)
        self.min_factor = float(min_factor)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, min_factor: float = 0.0
) -> LambdaLR:
    """A per-step scheduler for ``optimizer`` (every param group keeps its own base lr)."""
    fn = WarmupCosine(warmup_steps, total_steps, min_factor)
    return LambdaLR(optimizer, lr_lambda=[fn] * len(optimizer.param_groups))
