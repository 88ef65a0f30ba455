"""The training loop: cache → trained network → ``best_model.pt`` bundle.

One function, :func:`train_model`, used alike by the DVC ``train`` stage, by
tests and (under ``torchrun``) by :mod:`bonefrac.training.distributed`:

- AdamW with per-block param groups (fine-tuning strategy), linear warm-up then
  cosine decay stepped per optimiser step, gradient clipping;
- AMP (fp16 + GradScaler on CUDA; off on CPU unless ``amp: bf16``) and
  channels_last where they help (``auto`` = on CUDA for 2D nets);
- early stopping on validation AUROC (scikit-learn), or on its mean with the
  fracture-type macro-F1 (``train.monitor``), DVCLive metrics per epoch;
- a checkpoint every epoch (``last.ckpt``) from which ``resume=True`` continues
  *exactly*: the batches, augmentations and dropout masks of epoch k depend only
  on (seed, k) and the RNG states saved at the end of epoch k − 1, so a run killed
  with SIGKILL and resumed ends with the same weights as one never interrupted;
- DDP when a process group is initialised (rank 0 writes every output).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.utils import set_determinism
from sklearn.metrics import f1_score, roc_auc_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm.auto import tqdm

from bonefrac.atomic import atomic_write_json
from bonefrac.config import ModelParams, TrainParams, project_relative
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.calibrate import sigmoid
from bonefrac.model.dense import DENSE_ARCHS
from bonefrac.model.networks import FractureNet, ModelError, build_model
from bonefrac.model.transforms import PreprocessSpec
from bonefrac.preprocess.augment import random_transform
from bonefrac.preprocess.cache import cache_spec, cache_version, load_cache
from bonefrac.training.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from bonefrac.training.data import CachedDataset, DataError, EpochTaggedSampler, make_loader, split_rows
from bonefrac.training.finetune import apply_freezing, freeze_norm_stats, param_groups
from bonefrac.training.losses import FractureLoss, build_loss
from bonefrac.training.sampling import EpochSampler, class_balanced_weights
from bonefrac.training.schedule import warmup_cosine

log = logging.getLogger(__name__)

LAST_CKPT = "last.ckpt"
BEST_MODEL = "best_model.pt"
SUMMARY = "train_summary.json"
MIN_DELTA = 1e-4  # an AUROC gain smaller than this is noise, not improvement


@dataclass
class TrainResult:
    """What a call to :func:`train_model` achieved (the same on every DDP rank)."""

    out_dir: Path
    best_model_path: Path | None  # None until training has finished
    best_epoch: int
    best_val_auroc: float
    monitor: str
    epochs_completed: int
    finished: bool
    stopped_early: bool
    train_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def detect(cls) -> _Dist:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return cls()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


# ------------------------------------------------------------------ settings
def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy, torch (MONAI's ``set_determinism``); optionally deterministic kernels."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    set_determinism(seed=seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32. ``auto``: fp16 on CUDA (tensor cores); off on CPU,
    where bf16 autocast only pays on CPUs with AMX/AVX512-BF16 (ask for it with ``bf16``)."""
    if amp == "off":
        return None
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("train.amp: fp16 needs a CUDA device; on CPU use bf16 or off")
        return torch.float16
    raise ValueError(f"train.amp must be auto | off | bf16 | fp16, got {amp!r}")


def resolve_channels_last(setting: bool | str, device: torch.device) -> bool:
    """channels_last pays off with cuDNN (tensor cores); on CPU it is left off by ``auto``."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def _memory_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def _fingerprint(
    model_params: ModelParams,
    train_params: TrainParams,
    seed: int,
    spatial_dims: int,
    type_names: list[str],
    n_train: int,
    n_val: int,
    data_version: str,
    compute: str = "",
) -> dict[str, str]:
    """What a checkpoint must share with this call to be resumed: params hash, data and code versions,
    and ``compute``: torch threads, DDP processes and device (:func:`_compute`).

    The pipeline promises the same bytes for the same commit (docs/reproducibility.md), and
    a resumed run equals an uninterrupted one only on the same compute: CPU training changes
    with the thread count (float sums split per thread), DDP's gradient all-reduce sums in
    another order than one process (close, not equal), and CUDA is not CPU. So a run
    interrupted with 2 threads is not finished with 1 (it starts again, with a warning that
    names the change), and a finished ``last.ckpt`` cannot hand back a 2-thread model after
    ``train.threads`` became 1. DataLoader workers do not matter (augmentation is seeded
    per sample), so ``num_workers`` is left out.
    """
    tp = train_params.model_dump(mode="json", exclude={"num_workers", "threads", "distributed"})
    settings = json.dumps(
        {
            "model": model_params.model_dump(mode="json"),
            "train": tp,
            "seed": seed,
            "dims": spatial_dims,
            "types": type_names,
            "n": [n_train, n_val],
        },
        sort_keys=True,
    )
    return {
        "params_hash": hashlib.sha256(settings.encode()).hexdigest()[:16],
        "data_version": data_version,
        "code_version": _code_version(),
        "compute": compute,
    }


def _compute(ctx: _Dist, device: torch.device) -> str:
    """The compute a run's bytes depend on: effective torch threads, DDP world size, device type.

    The effective thread count (not ``train.threads``): ``0`` means all cores, which
    differ between machines.
    """
    return f"threads={torch.get_num_threads()} processes={ctx.world} device={device.type}"


def _code_version() -> str:
    """Hash of the code a checkpoint's weights depend on (network, loop, losses, cached tensors' reader).

    DVC reruns the train stage after such a change; resuming the old run's checkpoint
    would then hand back a model of the old code.
    """
    pkg = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for area in ("model", "training", "preprocess"):
        for f in sorted((pkg / area).rglob("*.py")):
            h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ evaluation
def _auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, probs))


@torch.no_grad()
def evaluate_split(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    loss_fn: FractureLoss,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    ctx: _Dist,
) -> dict[str, float]:
    """Loss, AUROC and accuracy on a (sharded) split, gathered over ranks."""
    model.eval()
    chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for x, y, t, i in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=_memory_format(x.ndim - 2))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        chunks.append((logits.float().cpu().numpy(), y.numpy(), t.numpy(), i.numpy()))
    gathered = [c for part in ctx.gather(chunks) for c in part]
    if not gathered:
        raise DataError("the validation split is empty")
    logits = np.concatenate([c[0] for c in gathered])
    labels = np.concatenate([c[1] for c in gathered])
    types = np.concatenate([c[2] for c in gathered])
    order = np.argsort(np.concatenate([c[3] for c in gathered]), kind="stable")
    logits, labels, types = logits[order], labels[order], types[order]
    lt = torch.from_numpy(logits)
    parts = loss_fn.cpu()(lt, torch.from_numpy(labels), torch.from_numpy(types))
    loss_fn.to(device)
    probs = sigmoid(logits[:, 0])
    out = {
        "loss": float(parts.total),
        "fracture_loss": float(parts.fracture),
        "auroc": _auroc(labels, probs),
        "accuracy": float(((probs >= 0.5) == (labels >= 0.5)).mean()),
    }
    mask = (labels > 0.5) & (types >= 0)
    if logits.shape[1] > 1 and mask.any():
        pred = logits[mask, 1:].argmax(1)
        out["type_accuracy"] = float((pred == types[mask]).mean())
        out["type_macro_f1"] = float(
            f1_score(types[mask], pred, labels=list(range(logits.shape[1] - 1)), average="macro", zero_division=0.0)
        )
    return out


# ------------------------------------------------------------------ one epoch
def _train_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    loss_fn: FractureLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    grad_clip: float,
    ctx: _Dist,
    desc: str,
) -> dict[str, float]:
    loss_sum = torch.zeros(2, dtype=torch.float64)
    wait = compute = 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(
        loader,
        desc=desc,
        disable=not ctx.is_main,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )
    t0 = time.perf_counter()
    for x, y, t, _ in bar:
        t1 = time.perf_counter()
        wait += t1 - t0
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        t = t.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=_memory_format(x.ndim - 2))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        parts = loss_fn(logits, y, t)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(parts.total).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += torch.tensor([float(parts.total.detach()) * len(y), len(y)], dtype=torch.float64)
        bar.set_postfix(loss=f"{float(parts.total.detach()):.4f}", refresh=False)
        t0 = time.perf_counter()
        compute += t0 - t1
    if ctx.active:  # NCCL reduces device tensors only
        buf = loss_sum.to(device)
        dist.all_reduce(buf)
        loss_sum = buf.cpu()
    return {"loss": float(loss_sum[0] / max(loss_sum[1], 1.0)), "data_wait_s": wait, "compute_s": compute}


# ------------------------------------------------------------------ DVCLive
class _Curves:
    """DVCLive writer that can replay the history, so the curves are whole after a resume."""

    def __init__(self, directory: Path | None) -> None:
        self.live = None
        if directory is not None:
            from dvclive import Live

            # resume=False clears the folder: the history from the checkpoint is replayed instead,
            # so an epoch logged just before a SIGKILL never appears twice.
            self.live = Live(dir=str(directory), save_dvc_exp=False, dvcyaml=None, resume=False)

    def log(self, row: dict[str, float]) -> None:
        if self.live is None:
            return
        for name in ("train/loss", "val/loss", "val/auroc", "val/accuracy", "val/type_macro_f1", "lr"):
            v = row.get(name)
            if v is not None and math.isfinite(v):
                self.live.log_metric(name, v)
        self.live.next_step()

    def end(self) -> None:
        if self.live is not None:
            self.live.end()


# ------------------------------------------------------------------ setup
@dataclass
class _Data:
    """The splits of the cache and their loaders."""

    spec: PreprocessSpec
    train_rows: Any
    val_rows: Any
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    sampler: EpochSampler
    monitor: str


@dataclass
class _Optimisation:
    loss_fn: FractureLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


@dataclass
class _Progress:
    """Everything that changes epoch by epoch and goes into the checkpoint."""

    start_epoch: int = 0
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    spent: float = 0.0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


def _device(ctx: _Dist) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


def _load_data(
    cache_dir: Path, spatial_dims: int, tnames: list[str], tp: TrainParams, seed: int, ctx: _Dist, pin: bool
) -> _Data:
    """Train/val rows of the cache → loaders (augmentation on train, a rank's shard of val)."""
    _, index = load_cache(cache_dir)
    spec = cache_spec(cache_dir)
    if spec.spatial_dims != spatial_dims:
        raise DataError(f"the cache holds {spec.spatial_dims}D data but spatial_dims={spatial_dims}")
    train_rows, val_rows = split_rows(index, "train"), split_rows(index, "val")
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise DataError(f"need train and val rows; the cache has {len(train_rows)} train, {len(val_rows)} val")
    augment = random_transform(tp.augment, spatial_dims)
    train_ds = CachedDataset.from_index(cache_dir, train_rows, tnames, augment, seed)
    val_ds = CachedDataset.from_index(cache_dir, val_rows, tnames, None, seed)
    labels = train_rows["label"].astype(int).tolist()
    weights = class_balanced_weights(labels) if tp.imbalance.sampler == "weighted" else None
    sampler = EpochSampler(len(train_ds), seed, weights, ctx.rank, ctx.world)
    if tp.batch_size % ctx.world:
        log.warning(
            "batch_size %d is not divisible by %d ranks; per-rank batch %d",
            tp.batch_size,
            ctx.world,
            tp.batch_size // ctx.world,
        )
    per_rank = max(1, tp.batch_size // ctx.world)
    train_loader = make_loader(train_ds, per_rank, EpochTaggedSampler(sampler), tp.num_workers, pin)
    val_shard = Subset(val_ds, list(range(ctx.rank, len(val_ds), ctx.world)))
    val_loader = make_loader(val_shard, per_rank * 2, None, tp.num_workers, pin)
    monitor = _monitor_name(tp.monitor, val_rows, tnames)
    if monitor == "val/neg_loss":
        log.warning("the val split has one class only: early stopping on validation loss instead of AUROC")
    return _Data(spec, train_rows, val_rows, train_loader, val_loader, sampler, monitor)


def _monitor_name(setting: str, val_rows: Any, tnames: list[str]) -> str:
    """The history key that picks the best epoch: AUROC (with type macro-F1 when asked and typed)."""
    if len(set(val_rows["label"].astype(int))) < 2:
        return "val/neg_loss"
    if setting == "val_auroc_type_f1" and tnames:
        return "val/auroc_type_f1"
    return "val/auroc"


def _monitored(monitor: str, va: dict[str, float]) -> float:
    """This epoch's value of ``monitor`` (higher is better) from :func:`evaluate_split`'s numbers."""
    if monitor == "val/auroc":
        return va["auroc"]
    if monitor == "val/auroc_type_f1":
        # No typed fractured image in val: the type term is unknown, so rank on AUROC alone.
        return 0.5 * (va["auroc"] + va["type_macro_f1"]) if "type_macro_f1" in va else va["auroc"]
    return -va["loss"]


def _optimisation(
    model: nn.Module, tp: TrainParams, train_labels: list[int], steps: int, device: torch.device, amp_fp16: bool
) -> _Optimisation:
    """Loss (class weight from the training labels), AdamW with per-block groups, warm-up + cosine."""
    loss_fn = build_loss(tp.imbalance, train_labels, tp.type_loss_weight).to(device)
    optimizer = torch.optim.AdamW(
        param_groups(model, tp.finetune, tp.lr, tp.weight_decay), lr=tp.lr, weight_decay=tp.weight_decay
    )
    scheduler = warmup_cosine(optimizer, round(tp.warmup_epochs * steps), tp.epochs * steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_fp16)
    return _Optimisation(loss_fn, optimizer, scheduler, scaler)


# ------------------------------------------------------------------ checkpoint
def _resume(
    ckpt_path: Path, fingerprint: dict[str, str], model: nn.Module, opt: _Optimisation, sampler: EpochSampler,
    ctx: _Dist,
) -> _Progress:  # fmt: skip
    """Restore everything from ``last.ckpt`` when it was written by the same settings and data version."""
    ck = load_checkpoint(ckpt_path)
    differ = [k for k in fingerprint if ck.get(k) != fingerprint[k]]
    if differ:
        what = ", ".join(f"{k} {ck.get(k)!r} -> {fingerprint[k]!r}" for k in differ)
        log.warning("%s belongs to another run (%s): not resuming, starting at epoch 1", ckpt_path, what)
        return _Progress()
    model.load_state_dict(ck["model"])
    opt.optimizer.load_state_dict(ck["optimizer"])
    opt.scheduler.load_state_dict(ck["scheduler"])
    opt.scaler.load_state_dict(ck["scaler"])
    sampler.load_state_dict(ck["sampler"])
    rng = ck["rng"]
    restore_rng_state(rng[ctx.rank] if ctx.rank < len(rng) else rng[0])
    progress = _Progress(
        start_epoch=ck["epoch"] + 1,
        best=ck["best_metric"],
        best_epoch=ck["best_epoch"],
        bad_epochs=ck["bad_epochs"],
        spent=ck["train_seconds"],
        best_state=ck["best_state"],
        history=list(ck["history"]),
        stopped_early=ck["stopped_early"],
    )
    log.info("resuming from epoch %d (best %.4f at epoch %d)", progress.start_epoch, progress.best, progress.best_epoch)
    return progress


def _save(
    ckpt_path: Path, fingerprint: dict[str, str], epoch: int, model: nn.Module, opt: _Optimisation,
    sampler: EpochSampler,
    progress: _Progress, rng_all: list[Any],
) -> None:  # fmt: skip
    save_checkpoint(
        ckpt_path,
        {
            **fingerprint,  # params_hash, data_version, code_version: what a resume must match
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": opt.optimizer.state_dict(),
            "scheduler": opt.scheduler.state_dict(),
            "scaler": opt.scaler.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": rng_all,
            "best_metric": progress.best,
            "best_epoch": progress.best_epoch,
            "bad_epochs": progress.bad_epochs,
            "best_state": progress.best_state,
            "history": progress.history,
            "train_seconds": progress.spent,
            "stopped_early": progress.stopped_early,
        },
    )


# ------------------------------------------------------------------ outputs
def _bundle(
    model: nn.Module, mp: ModelParams, tp: TrainParams, spec: PreprocessSpec, tnames: list[str],
    progress: _Progress, monitor: str, seed: int,
) -> ModelBundle:  # fmt: skip
    """The best epoch's weights with the contract they were trained under (calibrated later by evaluate).

    Only deterministic facts go into the bundle (no wall-clock times), so the same
    seed and data give the same file byte for byte; timings live in the summary.
    """
    if progress.best_state is None:  # no epoch improved on -inf (e.g. NaN metrics): keep the last weights
        progress.best_state = {n: v.detach().cpu().clone() for n, v in model.state_dict().items()}
        progress.best_epoch = len(progress.history) - 1
    return ModelBundle(
        arch=mp.arch,
        state_dict=progress.best_state,
        preprocess_spec=spec,
        type_names=tnames,
        dropout=mp.dropout,
        metadata={
            "best_epoch": progress.best_epoch,
            "val_auroc": _best_auroc(progress),
            "monitor": monitor,
            "seed": seed,
            "arch": mp.arch,
            "epochs_completed": len(progress.history),
            "stopped_early": progress.stopped_early,
            "params": {"model": mp.model_dump(mode="json"), "train": tp.model_dump(mode="json")},
        },
    )


def _best_auroc(progress: _Progress) -> float:
    if 0 <= progress.best_epoch < len(progress.history):
        return float(progress.history[progress.best_epoch]["val/auroc"])
    return float("nan")


# ------------------------------------------------------------------ main entry
def train_model(
    cache_dir: Path,
    out_dir: Path,
    model_params: ModelParams,
    train_params: TrainParams,
    spatial_dims: int,
    type_names: list[str],
    seed: int,
    dvclive_dir: Path | None = None,
    resume: bool = True,
    max_epochs_this_run: int | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train on the ``train`` split of the cache, early-stop on ``val`` AUROC, write the best bundle.

    For the registry's :class:`FractureNet` archs; a dense arch (:data:`bonefrac.model.dense.DENSE_ARCHS`)
    trains through :func:`bonefrac.training.stage.run_training`.

    ``resume=True`` continues from ``out_dir/last.ckpt`` when it was written with
    the same settings (otherwise a fresh run starts, with a warning).
    ``max_epochs_this_run`` stops this call after that many epochs (the run stays
    resumable; ``best_model.pt`` is written only when training has finished).
    ``on_epoch_end(epoch)`` is called after each epoch's checkpoint is on disk.
    """
    tp, mp = train_params, model_params
    cache_dir, out_dir = Path(cache_dir), Path(out_dir)
    if mp.arch in DENSE_ARCHS:
        raise ModelError(
            f"{mp.arch} trains on cached trunk features: use bonefrac.training.stage.run_training "
            "(the train stage) or bonefrac.training.dense.train_dense_model"
        )
    ctx = _Dist.detect()
    device = _device(ctx)
    if tp.threads > 0:
        torch.set_num_threads(tp.threads)
    seed_everything(seed, tp.deterministic)

    tnames = list(type_names) if mp.multitask else []
    data = _load_data(cache_dir, spatial_dims, tnames, tp, seed, ctx, pin=device.type == "cuda")
    model: FractureNet = build_model(mp.arch, len(tnames), mp.pretrained, mp.dropout, spatial_dims)
    amp_dtype = resolve_amp(tp.amp, device)
    channels_last = resolve_channels_last(tp.channels_last, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=_memory_format(spatial_dims))
    train_labels = data.train_rows["label"].astype(int).tolist()
    opt = _optimisation(model, tp, train_labels, len(data.train_loader), device, amp_dtype == torch.float16)

    fp = _fingerprint(
        mp, tp, seed, spatial_dims, tnames, len(data.train_rows), len(data.val_rows), cache_version(cache_dir),
        _compute(ctx, device),
    )
    ckpt_path = out_dir / LAST_CKPT
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    resumable = resume and ckpt_path.exists()
    progress = _resume(ckpt_path, fp, model, opt, data.sampler, ctx) if resumable else _Progress()

    curves = _Curves(dvclive_dir) if ctx.is_main else _Curves(None)
    for row in progress.history:
        curves.log(row)
    try:
        _run_epochs(
            model, data, opt, progress, ctx, device, amp_dtype, channels_last, tp, fp, ckpt_path, curves,
            max_epochs_this_run, on_epoch_end,
        )  # fmt: skip
    finally:
        curves.end()

    finished = progress.stopped_early or len(progress.history) >= tp.epochs
    best_path = None
    if finished and ctx.is_main:
        bundle = _bundle(model, mp, tp, data.spec, tnames, progress, data.monitor, seed)
        best_path = bundle.save(out_dir / BEST_MODEL)
    result = TrainResult(
        out_dir=out_dir,
        best_model_path=best_path if finished else None,
        best_epoch=progress.best_epoch,
        best_val_auroc=_best_auroc(progress),
        monitor=data.monitor,
        epochs_completed=len(progress.history),
        finished=finished,
        stopped_early=progress.stopped_early,
        train_seconds=progress.spent,
        history=progress.history,
    )
    if ctx.is_main:
        _write_summary(out_dir, result, device, ctx, amp_dtype, channels_last, mp, tp)
    ctx.barrier()
    if finished and not ctx.is_main:
        result.best_model_path = out_dir / BEST_MODEL
    return result


def _run_epochs(
    model: nn.Module, data: _Data, opt: _Optimisation, progress: _Progress, ctx: _Dist, device: torch.device,
    amp_dtype: torch.dtype | None, channels_last: bool, tp: TrainParams, fingerprint: dict[str, str], ckpt_path: Path,
    curves: _Curves, max_epochs_this_run: int | None, on_epoch_end: Callable[[int], None] | None,
) -> None:  # fmt: skip
    """Epochs from ``progress.start_epoch``: train, validate, keep the best, checkpoint, early-stop."""
    ddp_model: nn.Module = model
    wrapped_for = -1
    for ran, epoch in enumerate(range(progress.start_epoch, tp.epochs)):
        if progress.stopped_early or (max_epochs_this_run is not None and ran >= max_epochs_this_run):
            break
        t_epoch = time.perf_counter()
        k = apply_freezing(model, tp.finetune.strategy, epoch, tp.finetune.unfreeze_every)
        if ctx.active and k != wrapped_for:
            # DDP registers the parameters that require grad when it is built: rebuild it
            # whenever gradual unfreezing changes that set.
            ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            wrapped_for = k
        data.sampler.set_epoch(epoch)
        ddp_model.train()
        freeze_norm_stats(model)
        tr = _train_epoch(
            ddp_model, data.train_loader, opt.loss_fn, opt.optimizer, opt.scheduler, opt.scaler, device,
            amp_dtype, channels_last, tp.grad_clip, ctx, f"epoch {epoch + 1}/{tp.epochs}",
        )  # fmt: skip
        va = evaluate_split(model, data.val_loader, opt.loss_fn, device, amp_dtype, channels_last, ctx)
        progress.spent += time.perf_counter() - t_epoch
        row = _history_row(epoch, tr, va, opt.optimizer, k, progress.spent)
        progress.history.append(row)
        metric = _monitored(data.monitor, va)
        if math.isfinite(metric) and metric > progress.best + MIN_DELTA:
            progress.best, progress.best_epoch, progress.bad_epochs = metric, epoch, 0
            progress.best_state = {n: v.detach().cpu().clone() for n, v in model.state_dict().items()}
        else:
            progress.bad_epochs += 1
        progress.stopped_early = progress.bad_epochs >= tp.early_stopping_patience
        rng_all = ctx.gather(capture_rng_state())
        if ctx.is_main:
            _save(ckpt_path, fingerprint, epoch, model, opt, data.sampler, progress, rng_all)
            curves.log(row)
            log.info(
                "epoch %d/%d: train loss %.4f, val loss %.4f, val AUROC %.4f, lr %.2e, %.1fs (data wait %.1fs)",
                epoch + 1, tp.epochs, tr["loss"], va["loss"], va["auroc"], row["lr"],
                time.perf_counter() - t_epoch, tr["data_wait_s"],
            )  # fmt: skip
        ctx.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch)


def _history_row(
    epoch: int, tr: dict[str, float], va: dict[str, float], optimizer: torch.optim.Optimizer, k: int, spent: float
) -> dict[str, float]:
    row = {
        "epoch": epoch,
        "train/loss": tr["loss"],
        "val/loss": va["loss"],
        "val/auroc": va["auroc"],
        "val/accuracy": va["accuracy"],
        "lr": optimizer.param_groups[-1]["lr"],
        "trainable_blocks": k,
        "data_wait_s": tr["data_wait_s"],
        "compute_s": tr["compute_s"],
        "seconds": spent,
    }
    if "type_accuracy" in va:
        row["val/type_accuracy"] = va["type_accuracy"]
        row["val/type_macro_f1"] = va["type_macro_f1"]
    return row


def _write_summary(
    out_dir: Path, result: TrainResult, device: torch.device, ctx: _Dist, amp_dtype: torch.dtype | None,
    channels_last: bool, mp: ModelParams, tp: TrainParams,
) -> None:  # fmt: skip
    wait = sum(r["data_wait_s"] for r in result.history)
    busy = wait + sum(r["compute_s"] for r in result.history)
    summary = {
        **asdict(result),
        "out_dir": project_relative(out_dir),
        "best_model_path": project_relative(result.best_model_path or ""),
        "device": str(device),
        "world_size": ctx.world,
        "amp": str(amp_dtype),
        "channels_last": channels_last,
        "data_wait_share": wait / busy if busy else 0.0,
        "arch": mp.arch,
        "pretrained": mp.pretrained,
        "strategy": tp.finetune.strategy,
    }
    atomic_write_json(out_dir / SUMMARY, summary)
