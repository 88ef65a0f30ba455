"""DDP: 2 CPU processes (gloo) under torchrun train like one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _training_helpers import make_tiny_cache

from bonefrac.config import load_params
from bonefrac.model.networks import build_model
from bonefrac.training.checkpoint import load_checkpoint
from bonefrac.training.loop import seed_everything, train_model


def test_two_process_gloo_matches_single_process(tmp_path: Path) -> None:
    # GroupNorm net (no batch statistics), no dropout, no augmentation, single-task (the type loss
    # is a mean over a varying number of samples per rank): then DDP's average of the per-rank
    # half-batch gradients equals the single-process full-batch gradient, and the runs agree up
    # to summation order.
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
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path.cwd() / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "bonefrac.training.distributed",
        "--params",
        str(pfile),
        "--cache-dir",
        str(cache),
        "--out-dir",
        str(tmp_path / "ddp"),
        "--dvclive-dir",
        str(tmp_path / "live"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "ddp" / "best_model.pt").exists() and (tmp_path / "live" / "metrics.json").exists()

    p = load_params(pfile)
    single = train_model(cache, tmp_path / "single", p.model, p.train, 2, [], seed=p.seed)
    ddp_ck = load_checkpoint(tmp_path / "ddp" / "last.ckpt")
    one_ck = load_checkpoint(tmp_path / "single" / "last.ckpt")
    for k, v in one_ck["model"].items():
        torch.testing.assert_close(ddp_ck["model"][k], v, rtol=1e-3, atol=1e-4, msg=k)
    for a, b in zip(ddp_ck["history"], single.history, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
        assert a["val/loss"] == pytest.approx(b["val/loss"], rel=1e-4)
        assert a["val/auroc"] == pytest.approx(b["val/auroc"], abs=1e-6)
    # the weights really moved (by far more than the tolerance): not a comparison of untrained nets
    seed_everything(p.seed, True)
    init = build_model("custom_cnn", 0, "none", 0.0, 2).state_dict()
    moved = max(float((one_ck["model"][k] - init[k]).abs().max()) for k in init)
    assert moved > 20 * 1e-4  # far above the tolerance used above
