"""The train stage's one entry: the network named in ``model.arch`` → ``best_model.pt``.

Two ways to train, chosen by the arch: the registry's :class:`~bonefrac.model.networks.FractureNet`
archs train end to end on the preprocessed tensors (:func:`bonefrac.training.loop.train_model`:
augmentation, early stopping, exact resume, DDP); the dense archs
(:data:`bonefrac.model.dense.DENSE_ARCHS`) run their frozen trunk once per image into a feature
cache and train the head on it (:func:`bonefrac.training.dense.train_dense_model`). Both write
the same bundle contract, so nothing downstream tells them apart.
"""

from __future__ import annotations

from pathlib import Path

from bonefrac.config import ModelParams, TrainParams
from bonefrac.model.dense import DENSE_ARCHS
from bonefrac.training.dense import train_dense_model
from bonefrac.training.loop import TrainResult, train_model


def run_training(
    cache_dir: Path,
    out_dir: Path,
    model_params: ModelParams,
    train_params: TrainParams,
    spatial_dims: int,
    type_names: list[str],
    seed: int,
    features_dir: Path,
    dvclive_dir: Path | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train ``model_params.arch`` on the ``train`` split of ``cache_dir``; see the module docstring."""
    if model_params.arch in DENSE_ARCHS:
        return train_dense_model(cache_dir, out_dir, model_params, train_params, seed, features_dir, dvclive_dir)
    return train_model(
        cache_dir,
        out_dir,
        model_params=model_params,
        train_params=train_params,
        spatial_dims=spatial_dims,
        type_names=type_names,
        seed=seed,
        dvclive_dir=dvclive_dir,
        resume=resume,
    )
