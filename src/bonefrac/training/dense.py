"""Train a head of :mod:`bonefrac.model.dense` on cached frozen features (in memory).

Loss = weighted image-level BCE on every image + ``box_weight`` × dense BCE on the logit
map (:func:`bonefrac.model.dense.dense_loss`) for images with a map target: fractured
images with boxes (soft box targets) and non-fractured images (all-zero targets);
fractured images without boxes get the image loss only.

Augmentation is the left-right mirror: the exact mirrored view where the cache holds it,
else the feature maps mirrored (an approximation: the frozen convolutions are not exactly
mirror-symmetric). The model of the epoch with the best validation AUROC is kept.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from bonefrac.model.dense import dense_loss


@dataclass
class CachedSet:
    """Features of all images in memory (float16), targets and labels, row-aligned."""

    s16: torch.Tensor  # (N, C16, G, G) float16
    s32: torch.Tensor  # (N, C32, g, g) float16
    labels: torch.Tensor  # (N,) float
    targets: torch.Tensor  # (N, G, G) soft box targets (zeros for normals)
    has_map: torch.Tensor  # (N,) bool: a dense target exists (boxed fracture or normal)
    s16_flip: torch.Tensor | None = None  # exact mirrored view where available
    s32_flip: torch.Tensor | None = None
    flip_ok: torch.Tensor | None = None  # (N,) bool


@dataclass
class HeadTrainConfig:
    epochs: int = 12
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-2
    box_weight: float = 1.0
    focal_gamma: float = 0.0
    flip_aug: bool = True
    seed: int = 0


def _views(data: CachedSet, idx: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s16 = data.s16[idx].float()
    s32 = data.s32[idx].float()
    tgt = data.targets[idx].clone()
    if bool(flip.any()):
        f = flip.nonzero().flatten()
        exact = data.flip_ok[idx[f]] if data.flip_ok is not None else torch.zeros(len(f), dtype=torch.bool)
        for k, fi in enumerate(f.tolist()):
            i = int(idx[fi])
            if bool(exact[k]):
                s16[fi] = data.s16_flip[i].float()
                s32[fi] = data.s32_flip[i].float()
            else:
                s16[fi] = s16[fi].flip(-1)
                s32[fi] = s32[fi].flip(-1)
        tgt[f] = tgt[f].flip(-1)
    return s16, s32, tgt


@torch.no_grad()
def predict(
    head: nn.Module, data: CachedSet, idx: np.ndarray, flip: bool = False, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Image logits ``(n,)`` and evidence maps ``(n, H, W)`` (mirrored back when ``flip``)."""
    head.eval()
    logits, maps = [], []
    t = torch.as_tensor(np.asarray(idx))
    for b in range(0, len(t), batch_size):
        bi = t[b : b + batch_size]
        s16, s32, _ = _views(data, bi, torch.full((len(bi),), flip))
        z, m = head(s16, s32)
        if flip:
            m = m.flip(-1)
        logits.append(z[:, 0])
        maps.append(m[:, 0])
    return torch.cat(logits).numpy(), torch.cat(maps).numpy()


def train_head(
    head: nn.Module,
    data: CachedSet,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    cfg: HeadTrainConfig,
    progress: Callable[[str], None] = print,
) -> dict:
    """Train ``head`` in place (best-val-AUROC weights restored); returns the history and timing."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    y = data.labels
    n_pos = float(y[train_idx].sum())
    pos_weight = torch.tensor((len(train_idx) - n_pos) / max(n_pos, 1.0))
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * int(np.ceil(len(train_idx) / cfg.batch_size))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warm if k < warm else 0.5 * (1 + np.cos(np.pi * (k - warm) / max(1, steps - warm)))
    )
    best, best_state, history = -1.0, None, []
    t0 = time.perf_counter()
    for ep in range(cfg.epochs):
        head.train()
        order = rng.permutation(train_idx)
        tot = {"img": 0.0, "dense": 0.0}
        for b in range(0, len(order), cfg.batch_size):
            bi = torch.as_tensor(order[b : b + cfg.batch_size])
            flip = (
                torch.as_tensor(rng.random(len(bi)) < 0.5) if cfg.flip_aug else torch.zeros(len(bi), dtype=torch.bool)
            )
            s16, s32, tgt = _views(data, bi, flip)
            z, m = head(s16, s32)
            li = F.binary_cross_entropy_with_logits(z[:, 0], y[bi], pos_weight=pos_weight)
            loss = li
            if cfg.box_weight > 0:
                ld = dense_loss(m, tgt, data.has_map[bi], gamma=cfg.focal_gamma)
                loss = loss + cfg.box_weight * ld
                tot["dense"] += float(ld.detach()) * len(bi)
            tot["img"] += float(li.detach()) * len(bi)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        vz, _ = predict(head, data, val_idx)
        auc = float(roc_auc_score(y[val_idx].numpy(), vz))
        history.append(
            {
                "epoch": ep + 1,
                "loss_img": tot["img"] / len(order),
                "loss_dense": tot["dense"] / len(order),
                "val_auroc": auc,
                "minutes": (time.perf_counter() - t0) / 60,
            }
        )
        progress(
            f"    epoch {ep + 1}/{cfg.epochs}  img {history[-1]['loss_img']:.3f}  dense "
            f"{history[-1]['loss_dense']:.3f}  val AUROC {auc:.3f}  {history[-1]['minutes']:.1f} min"
        )
        if auc > best:
            best, best_state = auc, copy.deepcopy(head.state_dict())
    if best_state is not None:
        head.load_state_dict(best_state)
    return {
        "history": history,
        "best_val_auroc": best,
        "train_minutes": (time.perf_counter() - t0) / 60,
        "best_epoch": int(np.argmax([h["val_auroc"] for h in history]) + 1),
    }
