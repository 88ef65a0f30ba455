"""DDP from the train stage: `train.distributed.nproc_per_node: 2` runs 2 gloo processes under torchrun,
and they train like one process with the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from _training_helpers import make_tiny_cache

from bonefrac.config import load_params
from bonefrac.model.networks import build_model
from bonefrac.training.checkpoint import load_checkpoint
from bonefrac.training.loop import seed_everything


def _project(root: Path, params: dict, cache: Path, nproc: int) -> Path:
    """A project folder (params.yaml) whose train stage reads ``cache`` and writes under ``root``."""
    root.mkdir()
    p = {
        **params,
        "paths": {"processed": str(cache), "models": str(root / "models"), "reports": str(root / "reports")},
        "train": {**params["train"], "distributed": {"nproc_per_node": nproc}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    return root


def test_train_stage_with_two_gloo_processes_matches_single_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GroupNorm net (no batch statistics), no dropout, no augmentation, single-task (the type loss
    # is a mean over a varying number of samples per rank): then DDP's average of the per-rank
    # half-batch gradients equals the single-process full-batch gradient, and the runs agree up
    # to summation order.
    from flows.train import _train

    cache = make_tiny_cache(tmp_path, n_train=16, n_val=8, size=32)
    params = {
        "seed": 3,
        "data": {"use_fracture_types": False},
        "model": {"arch": "custom_cnn", "pretrained": "none", "dropout": 0.0, "multitask": False},
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "lr": 0.003,
            "warmup_epochs": 0.5,
            "num_workers": 0,
            "threads": 1,
            "early_stopping_patience": 10,
            "imbalance": {"sampler": "none", "loss": "weighted_bce"},
            "augment": {"flip_prob": 0.0, "affine_prob": 0.0, "contrast_prob": 0.0, "noise_prob": 0.0},
        },
    }
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    ddp = _project(tmp_path / "ddp", params, cache, nproc=2)
    monkeypatch.chdir(ddp)
    summary = _train("params.yaml")  # the DVC stage's own function: it launches torchrun
    assert "on 2 DDP processes" in summary, summary
    ddp_out = ddp / "models" / "train"
    assert (ddp_out / "best_model.pt").exists() and (ddp / "dvclive" / "metrics.json").exists()
    assert json.loads((ddp_out / "train_summary.json").read_text())["world_size"] == 2

    one = _project(tmp_path / "one", params, cache, nproc=1)
    monkeypatch.chdir(one)
    assert "DDP" not in _train("params.yaml")
    ddp_ck = load_checkpoint(ddp_out / "last.ckpt")
    one_ck = load_checkpoint(one / "models" / "train" / "last.ckpt")
    for k, v in one_ck["model"].items():
        torch.testing.assert_close(ddp_ck["model"][k], v, rtol=1e-3, atol=1e-4, msg=k)
    for a, b in zip(ddp_ck["history"], one_ck["history"], strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
        assert a["val/loss"] == pytest.approx(b["val/loss"], rel=1e-4)
        assert a["val/auroc"] == pytest.approx(b["val/auroc"], abs=1e-6)
    # the weights really moved (by far more than the tolerance): not a comparison of untrained nets
    p = load_params(one / "params.yaml")
    seed_everything(p.seed, True)
    init = build_model("custom_cnn", 0, "none", 0.0, 2).state_dict()
    moved = max(float((one_ck["model"][k] - init[k]).abs().max()) for k in init)
    assert moved > 20 * 1e-4  # far above the tolerance used above


def test_ddp_of_a_dense_arch_is_refused_before_any_rank_starts(tmp_path: Path) -> None:
    """A dense arch trains its head in one process on a feature cache: DDP is refused by name, at once."""
    from bonefrac.training.distributed import DistributedLaunchError, launch

    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump({"model": {"arch": "efficientnet_lite0_dense"}, "train": {"distributed": {"nproc_per_node": 2}}})
    )
    with pytest.raises(DistributedLaunchError, match=r"efficientnet_lite0_dense.*nproc_per_node: 1"):
        launch(params, tmp_path / "cache", tmp_path / "out", 2, [])
    assert not (tmp_path / "out").exists()
