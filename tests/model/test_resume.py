"""A run killed with SIGKILL after an epoch's checkpoint and resumed ends with the same weights
as a run never interrupted (augmentation, dropout and a weighted sampler all in play)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from _training_helpers import TYPES, make_tiny_cache, tiny_params

from bonefrac.config import ImbalanceParams, load_params
from bonefrac.preprocess.cache import cache_version
from bonefrac.training.checkpoint import load_checkpoint, save_checkpoint
from bonefrac.training.loop import train_model

EPOCHS, KILL_AFTER = 3, 0  # killed right after epoch 0's checkpoint, i.e. during epoch 1


def _params():
    return tiny_params(
        epochs=EPOCHS, dropout=0.3, imbalance=ImbalanceParams(sampler="weighted", loss="focal")
    )


def test_resume_after_sigkill_matches_uninterrupted(tmp_path: Path) -> None:
    cache = make_tiny_cache(tmp_path, n_train=16, n_val=8, size=32)
    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_resume import _params
        from bonefrac.training.loop import train_model

        def die(epoch):
            if epoch == {KILL_AFTER}:
                os.kill(os.getpid(), signal.SIGKILL)

        mp, tp = _params()
        train_model(Path({str(cache)!r}), Path({str(killed)!r}), mp, tp, 2, {TYPES!r}, seed=5,
                    on_epoch_end=die)
    """)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path.cwd() / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ck = load_checkpoint(killed / "last.ckpt")
    assert ck["epoch"] == KILL_AFTER
    assert not (killed / "best_model.pt").exists()  # unfinished runs have no bundle yet

    mp, tp = _params()
    resumed = train_model(cache, killed, mp, tp, 2, TYPES, seed=5, resume=True)
    reference = train_model(cache, tmp_path / "ref", mp, tp, 2, TYPES, seed=5, resume=True)
    assert resumed.finished and resumed.epochs_completed == EPOCHS

    w_resumed = load_checkpoint(killed / "last.ckpt")["model"]
    w_reference = load_checkpoint(tmp_path / "ref" / "last.ckpt")["model"]
    assert w_resumed.keys() == w_reference.keys()
    for k in w_reference:
        assert torch.equal(w_resumed[k], w_reference[k]), k
    keys = ("train/loss", "val/loss", "val/auroc")
    assert [[r[k] for k in keys] for r in resumed.history] == [
        [r[k] for k in keys] for r in reference.history
    ]


def test_max_epochs_this_run_then_resume_and_fresh_start(tmp_path: Path) -> None:
    cache = make_tiny_cache(tmp_path, n_train=8, n_val=4, size=32)
    mp, tp = tiny_params(epochs=2)
    part = train_model(cache, tmp_path / "o", mp, tp, 2, TYPES, seed=1, max_epochs_this_run=1)
    assert not part.finished and part.best_model_path is None and part.epochs_completed == 1
    done = train_model(cache, tmp_path / "o", mp, tp, 2, TYPES, seed=1)
    assert done.finished and done.epochs_completed == 2 and done.history[0] == part.history[0]
    # the same params on other compute (torch threads change CPU training's bytes): not resumed either
    mp1, tp1 = tiny_params(epochs=2, threads=1)
    part = train_model(cache, tmp_path / "t", mp1, tp1, 2, TYPES, seed=1, max_epochs_this_run=1)
    assert load_checkpoint(tmp_path / "t" / "last.ckpt")["compute"] == "threads=1 processes=1 device=cpu"
    tp2_threads = tp1.model_copy(update={"threads": 2})
    threads_before = torch.get_num_threads()
    try:
        again = train_model(cache, tmp_path / "t", mp1, tp2_threads, 2, TYPES, seed=1, max_epochs_this_run=1)
    finally:
        torch.set_num_threads(threads_before)  # train_model set 2 for this whole process
    assert not again.finished and again.epochs_completed == 1  # epoch 1 again, not epoch 2
    assert load_checkpoint(tmp_path / "t" / "last.ckpt")["compute"].startswith("threads=2 ")
    # other settings: the old checkpoint is not resumed
    mp2, tp2 = tiny_params(epochs=1, lr=1e-3)
    fresh = train_model(cache, tmp_path / "o", mp2, tp2, 2, TYPES, seed=1)
    assert fresh.epochs_completed == 1 and fresh.finished


def test_train_stage_resumes_only_a_checkpoint_of_the_same_params_and_data_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DVC train stage (what a retrain runs) continues a killed run instead of starting at epoch 1."""
    from flows.train import _train

    cache = make_tiny_cache(tmp_path, n_train=8, n_val=4, size=32)
    proj = tmp_path / "proj"
    proj.mkdir()
    params = {
        "seed": 1,
        "data": {"use_fracture_types": False},
        "model": {"arch": "custom_cnn", "pretrained": "none", "dropout": 0.0, "multitask": False},
        "train": {"epochs": 2, "batch_size": 8, "num_workers": 0, "threads": 1, "early_stopping_patience": 10},
        "paths": {"processed": str(cache), "models": str(proj / "models"), "reports": str(proj / "reports")},
    }
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(proj)
    p = load_params("params.yaml")
    out = proj / "models" / "train"
    # a run that stopped after epoch 1 of 2 (killed; max_epochs_this_run stands in for the kill)
    train_model(cache, out, p.model, p.train, 2, [], seed=p.seed, max_epochs_this_run=1)
    ck = load_checkpoint(out / "last.ckpt")
    assert ck["data_version"] == cache_version(cache)
    assert len(ck["params_hash"]) == 16 and len(ck["code_version"]) == 16
    ck["history"][0]["train/loss"] = 123.0  # a mark only a resumed run keeps (a fresh one recomputes epoch 1)
    save_checkpoint(out / "last.ckpt", ck)
    partial = (out / "last.ckpt").read_bytes()

    assert "2 epochs" in _train("params.yaml")
    resumed = load_checkpoint(out / "last.ckpt")["history"]
    assert len(resumed) == 2 and resumed[0]["train/loss"] == 123.0  # epoch 1 was not trained again

    # new data version, same params and the same row counts: the old checkpoint is not resumed
    (out / "last.ckpt").write_bytes(partial)
    index = pd.read_csv(cache / "index.csv", keep_default_na=False)
    index.loc[[0, 1], "label"] = index.loc[[1, 0], "label"].to_numpy()
    index.to_csv(cache / "index.csv", index=False)
    assert cache_version(cache) != ck["data_version"]
    _train("params.yaml")
    fresh = load_checkpoint(out / "last.ckpt")
    assert len(fresh["history"]) == 2 and fresh["history"][0]["train/loss"] != 123.0
    assert fresh["data_version"] == cache_version(cache)
