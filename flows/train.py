"""Stage `train`: fine-tune the network named in params on the cached tensors.

Resumes from ``models/train/last.ckpt`` when it was written by the same params and
the same data version (a retrain killed mid-run continues where it stopped; any
change starts at epoch 1). ``train.distributed.nproc_per_node > 1`` runs the same
training under ``torch.distributed.run`` (DDP) from this same DVC stage.
"""

from __future__ import annotations

import sys

import pandas as pd
from prefect import flow
from prefect.states import State

from bonefrac.config import load_params, resolve
from bonefrac.training.distributed import launch
from bonefrac.training.stage import run_training
from flows._stage import guarded, run_stage


def _train(params_path: str) -> str:
    p = load_params(params_path)
    cache_dir = resolve(p.paths.processed)
    index = pd.read_csv(cache_dir / "index.csv", keep_default_na=False)
    type_names: list[str] = []
    if p.model.multitask and p.data.use_fracture_types:
        type_names = sorted(set(index.loc[index["label"] == 1, "fracture_type"]) - {""})
    out_dir = resolve(p.paths.models) / "train"
    nproc = p.train.distributed.nproc_per_node
    if nproc > 1:
        s = launch(params_path, cache_dir, out_dir, nproc, type_names, dvclive_dir=resolve("dvclive"))
        return (
            f"train: {p.model.arch} on {nproc} DDP processes, {s['epochs_completed']} epochs"
            f"{' (stopped early)' if s['stopped_early'] else ''}, best val AUROC {s['best_val_auroc']:.3f} "
            f"at epoch {int(s['best_epoch']) + 1}, {float(s['train_seconds']) / 60:.1f} min -> {s['best_model_path']}"
        )
    result = run_training(
        cache_dir,
        out_dir,
        model_params=p.model,
        train_params=p.train,
        spatial_dims=p.spatial_dims,
        type_names=type_names,
        seed=p.seed,
        features_dir=resolve(p.paths.features),
        dvclive_dir=resolve("dvclive"),
        resume=True,  # only a checkpoint of the same params and data version is resumed
    )
    return (
        f"train: {p.model.arch}, {result.epochs_completed} epochs"
        f"{' (stopped early)' if result.stopped_early else ''}, kept epoch {result.best_epoch + 1} "
        f"({'the last' if result.monitor == 'last epoch' else 'best ' + result.monitor}; val AUROC "
        f"{result.best_val_auroc:.3f}), {result.train_seconds / 60:.1f} min -> {result.best_model_path}"
    )


@flow(name="train", log_prints=True)
def train_flow(params_path: str = "params.yaml") -> str | State:
    return guarded(lambda: _train(params_path))


if __name__ == "__main__":
    run_stage(train_flow, sys.argv)
