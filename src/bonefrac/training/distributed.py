"""Distributed (DDP) training: the ``torchrun`` entry point and the launcher the train stage uses.

``train.distributed.nproc_per_node: 2`` in params makes the DVC ``train`` stage
(``flows/train.py``) call :func:`launch`, i.e.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m bonefrac.training.distributed \\
        --params params.yaml --cache-dir data/processed --out-dir models/train --dvclive-dir dvclive

Each process joins the process group (NCCL on GPUs, gloo on CPU) and calls the
very same :func:`bonefrac.training.loop.train_model`, which notices the group:
the sampler shards one global order over the ranks, ``train.batch_size`` stays
the *global* batch (each rank takes ``batch_size / world_size``), gradients are
averaged by DDP, validation predictions are gathered, and rank 0 alone writes
checkpoints, DVCLive metrics and the bundle. The result therefore matches
single-process training on the same data, up to floating-point summation order.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from bonefrac.config import load_params
from bonefrac.errors import BonefracError
from bonefrac.model.dense import DENSE_ARCHS
from bonefrac.preprocess.cache import cache_spec, load_cache
from bonefrac.proc import exit_with_parent, run_tool, tool_cmd
from bonefrac.training.data import type_names_from_index
from bonefrac.training.loop import SUMMARY, TrainResult, train_model

log = logging.getLogger("bonefrac.training.distributed")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bonefrac.training.distributed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--params", default="params.yaml", help="params file (model, train and seed sections are used)"
    )
    p.add_argument(
        "--cache-dir", required=True, type=Path, help="preprocessed cache (images.npy + index.csv)"
    )
    p.add_argument(
        "--out-dir", required=True, type=Path, help="checkpoints, best_model.pt, train_summary.json"
    )
    p.add_argument("--dvclive-dir", type=Path, default=None)
    p.add_argument(
        "--type-names",
        default=None,
        help="comma-separated fracture types (default: those in the cache when data.use_fracture_types)",
    )
    p.add_argument("--no-resume", action="store_true", help="ignore an existing last.ckpt")
    p.add_argument("--max-epochs-this-run", type=int, default=None)
    return p.parse_args(argv)


class DistributedLaunchError(BonefracError, RuntimeError):
    """``torchrun`` ended with an error; the message carries the end of its output."""


def launch(
    params_path: str | Path,
    cache_dir: Path,
    out_dir: Path,
    nproc_per_node: int,
    type_names: list[str],
    dvclive_dir: Path | None = None,
    cwd: Path | None = None,
) -> dict[str, object]:
    """Run :func:`main` on ``nproc_per_node`` local processes with ``torch.distributed.run``.

    Same interpreter and environment as the caller (``bonefrac.proc``), and the
    launcher dies with its caller, taking its ranks with it. Returns rank 0's
    ``train_summary.json``. The network and data are the caller's: ranks read the
    same params file and are given the caller's fracture types, so the run is the
    one a single process would do.
    """
    arch = load_params(params_path).model.arch
    if arch in DENSE_ARCHS:  # refused here, before torchrun starts ranks that would each fail
        raise DistributedLaunchError(
            f"train.distributed.nproc_per_node > 1 is not available for {arch}: its head trains in one "
            "process on a cached frozen-trunk feature map; set train.distributed.nproc_per_node: 1"
        )
    args = [
        "--standalone",
        f"--nproc_per_node={nproc_per_node}",
        "-m",
        "bonefrac.training.distributed",
        "--params",
        str(params_path),
        "--cache-dir",
        str(cache_dir),
        "--out-dir",
        str(out_dir),
        "--type-names",
        ",".join(type_names),
    ]
    if dvclive_dir is not None:
        args += ["--dvclive-dir", str(dvclive_dir)]
    res = run_tool(tool_cmd("torchrun", *args), cwd or Path.cwd(), capture=True)
    if res.returncode != 0:
        raise DistributedLaunchError(
            f"DDP training with {nproc_per_node} processes failed ({res.returncode}):\n"
            f"{(res.stderr or res.stdout)[-4000:]}"
        )
    summary = Path(out_dir) / SUMMARY
    return json.loads(summary.read_text()) if summary.exists() else {}


def main(argv: list[str] | None = None) -> TrainResult:
    args = _parse(argv)
    exit_with_parent()  # an orphaned rank (torchrun killed) would hold the group's port and GPU
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    params = load_params(args.params)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30)
        )
    if params.train.threads == 0 and not use_cuda:
        # Ranks share the CPU: without this each would start one thread per core and thrash.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world)))
    try:
        _, index = load_cache(args.cache_dir)
        if args.type_names is not None:
            type_names = [t for t in args.type_names.split(",") if t]
        else:
            type_names = type_names_from_index(index) if params.data.use_fracture_types else []
        spatial_dims = cache_spec(args.cache_dir).spatial_dims
        result = train_model(
            cache_dir=args.cache_dir,
            out_dir=args.out_dir,
            model_params=params.model,
            train_params=params.train,
            spatial_dims=spatial_dims,
            type_names=type_names,
            seed=params.seed,
            dvclive_dir=args.dvclive_dir,
            resume=not args.no_resume,
            max_epochs_this_run=args.max_epochs_this_run,
        )
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.info(
                "done: best val AUROC %.4f at epoch %d (%d epochs, world size %d)",
                result.best_val_auroc,
                result.best_epoch,
                result.epochs_completed,
                world,
            )
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
