"""train_head: the per-epoch hook (a benchmark reads the model each epoch without changing the run)
and which epoch's weights it keeps."""

from __future__ import annotations

import numpy as np
import torch

from bonefrac.model.dense import DenseFractureHead, box_target_map
from bonefrac.training.dense import CachedSet, HeadTrainConfig, train_head

GRID, SIZE = 8, 128


def _cached_set(n: int, seed: int) -> CachedSet:
    rng = np.random.default_rng(seed)
    s16 = torch.from_numpy(rng.normal(size=(n, 16, GRID, GRID)).astype(np.float16))
    s32 = torch.from_numpy(rng.normal(size=(n, 8, GRID // 2, GRID // 2)).astype(np.float16))
    labels = torch.from_numpy((np.arange(n) % 2).astype(np.float32))
    targets = torch.zeros(n, GRID, GRID)
    for i in np.flatnonzero(labels.numpy()):
        gx, gy = rng.integers(0, GRID - 1, size=2)
        s16[i, :8, gy, gx] += 2.0
        targets[i] = box_target_map([[gx * 16 + 2.0, gy * 16 + 2.0, 20.0, 12.0]], SIZE, GRID)
    return CachedSet(s16=s16, s32=s32, labels=labels, targets=targets, has_map=torch.ones(n, dtype=torch.bool))


def _train(on_epoch=None, keep="best_val_auroc", epochs=3, lr=2e-3) -> tuple[DenseFractureHead, dict]:
    torch.manual_seed(0)
    head = DenseFractureHead(None, s16_channels=16, s32_channels=8, width=8, pool="lse", dropout=0.1)
    data = _cached_set(48, seed=0)
    cfg = HeadTrainConfig(epochs=epochs, batch_size=16, seed=0, lr=lr, keep=keep)
    info = train_head(head, data, np.arange(32), np.arange(32, 48), cfg, progress=lambda _m: None, on_epoch=on_epoch)
    return head, info


def test_the_hook_sees_every_epoch_and_its_numbers_join_the_history():
    seen: list[int] = []

    def hook(epoch: int, head: torch.nn.Module) -> dict:
        seen.append(epoch)
        assert not head.training  # called with the head in eval mode
        return {"probe": float(epoch) * 10}

    _, info = _train(hook)
    assert seen == [1, 2, 3]
    assert [h["probe"] for h in info["history"]] == [10.0, 20.0, 30.0]


def test_a_hook_that_runs_the_head_leaves_the_trained_weights_unchanged():
    data = _cached_set(48, seed=1)

    def hook(_epoch: int, head: torch.nn.Module) -> dict:
        with torch.no_grad():
            z, _ = head(data.s16.float(), data.s32.float())
        return {"mean_logit": float(z.mean())}

    plain, _ = _train()
    probed, info = _train(hook)
    for (name, a), (_, b) in zip(plain.state_dict().items(), probed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert all(np.isfinite(h["mean_logit"]) for h in info["history"])


def _snapshots() -> tuple[list[dict], object]:
    """A hook that copies the head's weights after every epoch."""
    states: list[dict] = []

    def hook(_epoch: int, head: torch.nn.Module) -> dict:
        states.append({k: v.clone() for k, v in head.state_dict().items()})
        return {}

    return states, hook


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_keep_best_restores_the_best_validation_epoch_and_keep_last_the_final_weights():
    """The two settings of train.dense.keep_epoch: the weights are that epoch's, and the result names it.
    (A high learning rate over 6 epochs makes the best validation epoch an early one here.)"""
    best_states, best_hook = _snapshots()
    best_head, best_info = _train(best_hook, keep="best_val_auroc", epochs=6, lr=5e-2)
    aurocs = [h["val_auroc"] for h in best_info["history"]]
    best_epoch = int(np.argmax(aurocs)) + 1
    assert best_epoch < 6, "the test needs a run whose best validation epoch is not the last"
    assert best_info["best_epoch"] == best_epoch and best_info["best_val_auroc"] == max(aurocs)
    assert _same(best_head.state_dict(), best_states[best_epoch - 1])

    last_states, last_hook = _snapshots()
    last_head, last_info = _train(last_hook, keep="last", epochs=6, lr=5e-2)
    assert last_info["best_epoch"] == 6 and last_info["best_val_auroc"] == last_info["history"][-1]["val_auroc"]
    kept = last_head.state_dict()
    assert _same(kept, last_states[-1]) and not _same(kept, last_states[best_epoch - 1])
    assert [h["val_auroc"] for h in last_info["history"]] == aurocs  # the same run, only the kept weights differ
