"""Fine-tuning strategies: which backbone blocks train, and at which learning rate.

- ``full``: everything trains at ``lr``.
- ``frozen``: only the head trains; the backbone is a fixed feature extractor
  (its BatchNorm statistics frozen too).
- ``discriminative``: everything trains, blocks near the input slower (they hold
  generic edges/textures worth keeping; ULMFiT, Howard & Ruder 2018): block j of
  K gets ``lr × mult^((K − j) / K)``, i.e. the stem ``lr × mult`` rising
  geometrically towards the head's ``lr``.
- ``gradual``: starts frozen, then unfreezes one more block (from the head
  down) every ``unfreeze_every`` epochs, with discriminative rates.

All parameters are always in the optimiser (frozen ones simply get no
gradient and AdamW skips them), so the optimiser's state_dict has the same
layout at every epoch and resume is exact. Norm/bias parameters get no weight decay.
"""

from __future__ import annotations

from torch import nn

from bonefrac.config import FinetuneParams
from bonefrac.model.networks import FractureNet


def _block_params(model: FractureNet) -> list[list[nn.Parameter]]:
    """Backbone parameters per block (input → output); leftovers join the last block."""
    groups: list[list[nn.Parameter]] = []
    seen: set[int] = set()
    for block in model.blocks():
        ps = [p for m in block for p in m.parameters() if id(p) not in seen]
        seen.update(id(p) for p in ps)
        groups.append(ps)
    rest = [p for p in model.backbone_parameters() if id(p) not in seen]
    if rest:
        if groups:
            groups[-1].extend(rest)
        else:
            groups.append(rest)
    return groups


def lr_multipliers(strategy: str, n_blocks: int, backbone_lr_mult: float) -> list[float]:
    """Multiplier of the base lr for each backbone block (input → output)."""
    if strategy in ("discriminative", "gradual"):
        return [backbone_lr_mult ** ((n_blocks - j) / n_blocks) for j in range(n_blocks)]
    return [1.0] * n_blocks


def param_groups(model: FractureNet, ft: FinetuneParams, lr: float, weight_decay: float) -> list[dict]:
    """AdamW param groups: per backbone block (with its lr) then the head; decay/no-decay split."""
    blocks = _block_params(model)
    mults = lr_multipliers(ft.strategy, len(blocks), ft.backbone_lr_mult)
    named = [(f"block{j}", ps, m) for j, (ps, m) in enumerate(zip(blocks, mults, strict=True))]
    named.append(("head", model.head_parameters(), 1.0))
    groups = []
    for name, ps, mult in named:
        decay = [p for p in ps if p.ndim > 1]
        no_decay = [p for p in ps if p.ndim <= 1]
        for suffix, sel, wd in (("", decay, weight_decay), ("_nodecay", no_decay, 0.0)):
            if sel:
                groups.append({"params": sel, "lr": lr * mult, "weight_decay": wd, "name": name + suffix})
    return groups


def trainable_blocks(strategy: str, n_blocks: int, epoch: int, unfreeze_every: int) -> int:
    """How many backbone blocks (counted from the head) train in ``epoch`` (0-based)."""
    if strategy in ("full", "discriminative"):
        return n_blocks
    if strategy == "frozen":
        return 0
    if strategy == "gradual":
        return min(n_blocks, epoch // unfreeze_every)
    raise ValueError(f"finetune.strategy must be full | frozen | discriminative | gradual, got {strategy!r}")


def apply_freezing(model: FractureNet, strategy: str, epoch: int, unfreeze_every: int) -> int:
    """Set ``requires_grad`` for ``epoch``; returns the number of trainable backbone blocks."""
    blocks = _block_params(model)
    k = trainable_blocks(strategy, len(blocks), epoch, unfreeze_every)
    for j, ps in enumerate(blocks):
        trainable = j >= len(blocks) - k
        for p in ps:
            p.requires_grad_(trainable)
    for p in model.head_parameters():
        p.requires_grad_(True)
    return k


def freeze_norm_stats(model: nn.Module) -> None:
    """Put norm layers whose parameters are all frozen in eval mode (call after ``model.train()``).

    A frozen backbone must not keep updating BatchNorm running statistics from
    small, augmented batches: that would silently change the "fixed" features.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            ps = list(m.parameters(recurse=False))
            if ps and not any(p.requires_grad for p in ps):
                m.eval()
