"""Train a head of :mod:`bonefrac.model.dense` on cached frozen features (in memory).

:func:`train_dense_model` is the train stage for a dense ``model.arch``: the frozen trunk
runs once per image into the train stage's feature cache
(:func:`bonefrac.training.feature_cache.build_trunk_cache`), the head trains on it in
minutes, and the bundle holds the *full* network (trunk + head), so evaluation, ``bonefrac
predict``, the service and the registry score it from pixels like any other model.

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
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from bonefrac.atomic import atomic_write_json
from bonefrac.config import DenseTrainParams, ModelParams, TrainParams
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.dense import HeadEnsemble, dense_loss
from bonefrac.training.loop import BEST_MODEL, SUMMARY, TrainResult, _Curves, seed_everything

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


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
    s8: torch.Tensor | None = None  # (N, C8, 2G, 2G) float16: the stride-8 tap, for heads with an s8 level
    s8_flip: torch.Tensor | None = None


@dataclass
class HeadTrainConfig:
    epochs: int = 12
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-2
    box_weight: float = 1.0
    focal_gamma: float = 0.0
    peak_weight: float = 0.0  # model.dense.peak_loss inside the dense loss
    flip_aug: bool = True
    seed: int = 0
    class_weighted: bool = True  # image BCE weighted by n_neg / n_pos (the logit shift Platt scaling undoes)
    # The weights kept: the epoch of best validation AUROC, or the last epoch (the cosine schedule's end;
    # benchmarks/epoch_selection.py: the best-AUROC pick on ~420 validation images stops early, at a
    # noisy maximum, where the map points worse).
    keep: Literal["best_val_auroc", "last"] = "best_val_auroc"


def _views(
    data: CachedSet, idx: torch.Tensor, flip: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The head's inputs ``(s16, s32[, s8])`` (float32) and dense targets for rows ``idx``, mirrored where ``flip``."""
    levels = [(data.s16, data.s16_flip), (data.s32, data.s32_flip)]
    if data.s8 is not None:
        levels.append((data.s8, data.s8_flip))
    feats = [orig[idx].float() for orig, _ in levels]
    tgt = data.targets[idx].clone()
    if bool(flip.any()):
        f = flip.nonzero().flatten()
        exact = data.flip_ok[idx[f]] if data.flip_ok is not None else torch.zeros(len(f), dtype=torch.bool)
        for k, fi in enumerate(f.tolist()):
            i = int(idx[fi])
            for x, (_, mirrored) in zip(feats, levels, strict=True):
                x[fi] = mirrored[i].float() if bool(exact[k]) else x[fi].flip(-1)
        tgt[f] = tgt[f].flip(-1)
    return tuple(feats), tgt


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
        feats, _ = _views(data, bi, torch.full((len(bi),), flip))
        z, m = head(*feats)
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
    on_epoch: Callable[[int, nn.Module], dict] | None = None,
) -> dict:
    """Train ``head`` in place; returns the history and timing.

    ``cfg.keep``: the best-validation-AUROC epoch's weights are restored, or the last epoch's kept.
    ``best_epoch`` (1-based) and ``best_val_auroc`` in the result are the kept epoch's.

    ``on_epoch(epoch, head)``, when given, is called after each epoch's validation with the head in
    eval mode; the numbers it returns join that epoch's history entry (a benchmark's per-epoch
    scores: it must not change the head)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    y = data.labels
    n_pos = float(y[train_idx].sum())
    pos_weight = torch.tensor((len(train_idx) - n_pos) / max(n_pos, 1.0) if cfg.class_weighted else 1.0)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * int(np.ceil(len(train_idx) / cfg.batch_size))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warm if k < warm else 0.5 * (1 + np.cos(np.pi * (k - warm) / max(1, steps - warm)))
    )
    best_state, history = None, []
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
            feats, tgt = _views(data, bi, flip)
            z, m = head(*feats)
            li = F.binary_cross_entropy_with_logits(z[:, 0], y[bi], pos_weight=pos_weight)
            loss = li
            if cfg.box_weight > 0:
                ld = dense_loss(m, tgt, data.has_map[bi], gamma=cfg.focal_gamma, peak_weight=cfg.peak_weight)
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
        if on_epoch is not None:
            history[-1].update(on_epoch(ep + 1, head))
        progress(
            f"    epoch {ep + 1}/{cfg.epochs}  img {history[-1]['loss_img']:.3f}  dense "
            f"{history[-1]['loss_dense']:.3f}  val AUROC {auc:.3f}  {history[-1]['minutes']:.1f} min"
        )
        # snapshot at a new maximum only (the first of equal maxima, as argmax below picks it)
        if cfg.keep == "best_val_auroc" and auc > max((h["val_auroc"] for h in history[:-1]), default=-1.0):
            best_state = copy.deepcopy(head.state_dict())
    kept = len(history) - 1 if cfg.keep == "last" else int(np.argmax([h["val_auroc"] for h in history]))
    if best_state is not None:
        head.load_state_dict(best_state)
    return {
        "history": history,
        "best_val_auroc": float(history[kept]["val_auroc"]) if history else float("nan"),
        "train_minutes": (time.perf_counter() - t0) / 60,
        "best_epoch": kept + 1,
    }


# ----------------------------------------------------------------- the train stage for dense archs
def _combined(infos: list[dict], val_logits: list[np.ndarray], y_val: np.ndarray) -> dict:
    """One training record for a HeadEnsemble's members.

    The history is the members' mean per epoch (losses, val AUROC); the best validation AUROC is
    the ensemble's own (its mean logit on validation), which is what the bundle holds.
    """
    history = [
        {k: (v if k == "epoch" else float(np.mean([inf["history"][e][k] for inf in infos])))
         for k, v in infos[0]["history"][e].items()}
        for e in range(len(infos[0]["history"]))
    ]
    return {
        "history": history,
        "best_val_auroc": float(roc_auc_score(y_val, np.mean(val_logits, axis=0))),
        "train_minutes": float(sum(inf["train_minutes"] for inf in infos)),
        "best_epoch": infos[0]["best_epoch"],
        "member_best_epochs": [inf["best_epoch"] for inf in infos],
        "member_val_auroc": [float(inf["best_val_auroc"]) for inf in infos],
    }


class _AfterLate(nn.Module):
    """The head with its (frozen) late Lite0 blocks skipped: it trains on their precomputed output."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(
        self, s16: torch.Tensor, late32: torch.Tensor, s8: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head.forward_after_late(s16, late32, s8)


@torch.no_grad()
def _apply_late(head: nn.Module, s16: np.ndarray, s32: np.ndarray, batch: int = 128) -> torch.Tensor:
    """Frozen late blocks (eval mode) on cached features → float16 stride-32 maps."""
    out = []
    for b in range(0, len(s16), batch):
        a = torch.from_numpy(np.array(s16[b : b + batch], dtype=np.float32))
        c = torch.from_numpy(np.array(s32[b : b + batch], dtype=np.float32))
        out.append(head.late(a, c).half())
    return torch.cat(out) if out else torch.zeros(0)


def dense_targets(
    rows: pd.DataFrame, image_size: int, grid: int, dp: DenseTrainParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``(grid, grid)`` dense target (:func:`bonefrac.model.dense.box_target_map` with the
    preset's grow and profile; outlines read only for ``box_profile: outline``) and whether it has boxes."""
    from bonefrac.model.boxes import row_boxes, row_outlines
    from bonefrac.model.dense import box_target_map

    targets, has_boxes = [], []
    for _, r in rows.iterrows():
        boxes = row_boxes(r, image_size)
        outlines = row_outlines(r, image_size) if dp.box_profile == "outline" and boxes else []
        targets.append(box_target_map(
            boxes, image_size, grid, grow=dp.box_grow_cells, profile=dp.box_profile, outlines=outlines or None
        ))  # fmt: skip
        has_boxes.append(bool(boxes))
    return torch.stack(targets), torch.tensor(has_boxes, dtype=torch.bool)


def train_dense_model(
    cache_dir: Path,
    out_dir: Path,
    model_params: ModelParams,
    train_params: TrainParams,
    seed: int,
    features_dir: Path,
    dvclive_dir: Path | None = None,
) -> TrainResult:
    """The train stage for a dense arch: feature cache (built once, reused while its inputs are
    unchanged) → head training (best validation AUROC kept) → ``best_model.pt`` with the full network.

    Box targets come from the cache index's ``boxes`` column (the data layer's, in stored-image
    pixels; mapped onto the input square by :func:`bonefrac.model.boxes.row_boxes`). Fractured
    images without boxes train the image loss only; normal images also train the dense loss
    (all-zero target). ``train.augment`` does not apply: the left-right mirror
    (``train.dense.flip``) is the only augmentation. Epochs always run to ``train.epochs``.
    """
    from bonefrac.model.networks import build_model
    from bonefrac.preprocess.cache import IMAGES_FILE, cache_spec, load_cache
    from bonefrac.training.data import DataError, split_rows
    from bonefrac.training.feature_cache import (
        TRUNK_OUTPUTS,
        build_trunk_cache,
        frozen_modules,
        plan_rows,
        trunk_cache_key,
        trunk_cache_plan,
        trunk_fn,
        trunk_output_shapes,
    )

    tp, mp, dp = train_params, model_params, train_params.dense
    cache_dir, out_dir = Path(cache_dir), Path(out_dir)
    if tp.threads > 0:
        torch.set_num_threads(tp.threads)
    seed_everything(seed, tp.deterministic)
    t_start = time.perf_counter()
    images, index = load_cache(cache_dir)
    spec = cache_spec(cache_dir)
    if spec.spatial_dims != 2 or spec.image_size % 32:
        raise DataError(f"{mp.arch} needs 2D images with preprocess.image_size a multiple of 32, got {spec.image_size}")
    tr_rows, va_rows = split_rows(index, "train"), split_rows(index, "val")
    if len(tr_rows) == 0 or len(va_rows) == 0 or va_rows["label"].astype(int).nunique() < 2:
        raise DataError("the dense head needs train rows and a validation split with both classes")
    rows_df, mirror = trunk_cache_plan(index, dp.flip)  # the cache's rows: train, then val (labels, boxes beside)
    rows = plan_rows(rows_df)
    n_tr = len(tr_rows)
    net = build_model(mp.arch, 0, mp.pretrained).eval()
    size = spec.image_size
    grid = size // (8 if getattr(net.trunk, "tap8", False) else 16)  # the logit map's grid: the dense targets'
    shapes = trunk_output_shapes(net, size)
    key = trunk_cache_key(cache_dir / IMAGES_FILE, rows, mirror, frozen_modules(net), dp.feature_dtype, shapes)
    t_cache = time.perf_counter()
    feats = build_trunk_cache(
        images, rows, mirror, Path(features_dir) / key, trunk_fn(net), shapes, dp.feature_dtype, progress=log.info,
    )  # fmt: skip
    cache_minutes = (time.perf_counter() - t_cache) / 60
    del images  # unmap the preprocessed pixels: their pages count in the stage's peak memory

    # In memory: the stride-16 maps, the stride-32 input the trainable part needs (and the stride-8 tap).
    # Read whole (not through the memmaps): mapped pages and their copies would count twice.
    arrays = {name: np.load(feats.root / f"{name}.npy") for name in TRUNK_OUTPUTS if getattr(feats, name) is not None}
    del feats
    members = list(net.head.members) if isinstance(net.head, HeadEnsemble) else [net.head]
    s16 = torch.from_numpy(arrays["s16"][0])
    s16f = torch.from_numpy(arrays["s16"][1]) if mirror.any() else None
    late_frozen = not dp.train_late_blocks
    if late_frozen:  # precompute the frozen late blocks once (equal in every member); train FPN + logit heads
        s32 = _apply_late(members[0], arrays["s16"][0], arrays["s32"][0])
        s32f = _apply_late(members[0], arrays["s16"][1], arrays["s32"][1]) if mirror.any() else None
        del arrays["s32"]
        trainees: list[nn.Module] = [_AfterLate(m) for m in members]
    else:
        s32 = torch.from_numpy(arrays["s32"][0])
        s32f = torch.from_numpy(arrays["s32"][1]) if mirror.any() else None
        trainees = members
    for name, p in net.head.named_parameters():
        late_block = bool({"blocks5", "blocks6"} & set(name.split(".")))
        p.requires_grad_(dp.train_late_blocks or not late_block)
    labels = torch.tensor(rows_df["label"].astype(int).to_numpy(), dtype=torch.float32)
    targets, has_boxes = dense_targets(rows_df, size, grid, dp)
    has_map = (labels == 0) | has_boxes
    flip_ok = torch.from_numpy(mirror.copy()) if dp.flip == "exact" else torch.zeros(len(rows), dtype=torch.bool)
    data = CachedSet(s16, s32, labels, targets, has_map, s16f, s32f, flip_ok)
    if "s8" in arrays:
        data.s8 = torch.from_numpy(arrays["s8"][0])
        data.s8_flip = torch.from_numpy(arrays["s8"][1]) if mirror.any() else None
    log.info(
        "dense head: %d train (%d fractured, %d with boxes), %d val; feature cache %.1f min",
        n_tr, int(labels[:n_tr].sum()), int(has_boxes[:n_tr].sum()), len(va_rows), cache_minutes,
    )  # fmt: skip
    idx_tr, idx_va = np.arange(n_tr), np.arange(n_tr, len(rows))
    infos = []
    for i, trainee in enumerate(trainees):  # a HeadEnsemble's members: seeds seed, seed + 1, ...
        cfg = HeadTrainConfig(
            epochs=tp.epochs, batch_size=tp.batch_size, lr=tp.lr, weight_decay=tp.weight_decay,
            box_weight=dp.box_weight, focal_gamma=dp.focal_gamma, peak_weight=dp.peak_weight,
            flip_aug=dp.flip != "none", seed=seed + i,
            class_weighted=tp.imbalance.loss != "bce", keep=dp.keep_epoch,
        )  # fmt: skip
        if len(trainees) > 1:
            log.info("dense head: member %d of %d (seed %d)", i + 1, len(trainees), seed + i)
        infos.append(train_head(trainee, data, idx_tr, idx_va, cfg, progress=log.info))
    net.eval()
    info = infos[0] if len(infos) == 1 else _combined(infos, [predict(t, data, idx_va)[0] for t in trainees],
                                                      labels[n_tr:].numpy())

    history = [
        {"epoch": h["epoch"] - 1, "train/loss": h["loss_img"] + dp.box_weight * h["loss_dense"],
         "train/loss_image": h["loss_img"], "train/loss_dense": h["loss_dense"], "val/auroc": h["val_auroc"],
         "seconds": h["minutes"] * 60}
        for h in info["history"]
    ]  # fmt: skip
    curves = _Curves(dvclive_dir)
    for row in history:
        curves.log(row)
    curves.end()
    out_dir.mkdir(parents=True, exist_ok=True)
    best_epoch = info["best_epoch"] - 1
    monitor = "val/auroc" if dp.keep_epoch == "best_val_auroc" else "last epoch"  # what chose the kept epoch
    bundle = ModelBundle(
        arch=mp.arch,
        state_dict={k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        preprocess_spec=spec,
        type_names=[],
        dropout=mp.dropout,
        metadata={
            "best_epoch": best_epoch,
            "val_auroc": float(info["best_val_auroc"]),
            "monitor": monitor,
            "seed": seed,
            **({"member_best_epochs": [e - 1 for e in info["member_best_epochs"]],
                "member_val_auroc": info["member_val_auroc"]} if "member_best_epochs" in info else {}),
            "arch": mp.arch,
            # Where the trunk's outputs on the train and validation images are (the evaluate stage
            # reads its drift/OOD training sample from them: feature_cache.trained_trunk_features).
            "trunk_cache": {"key": key, "flip": dp.flip, "dtype": dp.feature_dtype},
            "epochs_completed": len(history),
            "stopped_early": False,
            "params": {"model": mp.model_dump(mode="json"), "train": tp.model_dump(mode="json")},
        },
    )
    best_path = bundle.save(out_dir / BEST_MODEL)
    total = time.perf_counter() - t_start
    result = TrainResult(
        out_dir=out_dir, best_model_path=best_path, best_epoch=best_epoch, best_val_auroc=float(info["best_val_auroc"]),
        monitor=monitor, epochs_completed=len(history), finished=True, stopped_early=False,
        train_seconds=info["train_minutes"] * 60, history=history,
    )  # fmt: skip
    atomic_write_json(
        out_dir / SUMMARY,
        {
            "arch": mp.arch,
            "best_epoch": best_epoch,
            "best_val_auroc": result.best_val_auroc,
            "epochs_completed": len(history),
            "feature_cache_minutes": cache_minutes,
            "feature_cache_passes": int(len(rows) + mirror.sum()),
            "head_train_minutes": info["train_minutes"],
            "total_minutes": total / 60,
            "n_train": n_tr,
            "n_val": len(va_rows),
            "train_with_boxes": int(has_boxes[:n_tr].sum()),
            "history": history,
        },
    )
    return result
