"""Warm-up + cosine schedule: shape, per-group base lrs, and exact state round trip."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from bonefrac.training.schedule import WarmupCosine, warmup_cosine


def _opt() -> torch.optim.Optimizer:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    return torch.optim.AdamW([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 1.0}])


def test_shape() -> None:
    f = WarmupCosine(warmup_steps=10, total_steps=110)
    vals = [f(s) for s in range(110)]
    assert vals[0] == pytest.approx(1 / 11)
    assert all(x < y for x, y in itertools.pairwise(vals[:11]))  # linear rise
    assert vals[10] == pytest.approx(1.0)  # peak after warm-up
    assert all(x >= y for x, y in itertools.pairwise(vals[10:]))  # then monotone decay
    assert vals[60] == pytest.approx(0.5, abs=1e-9)  # cosine midpoint
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    assert WarmupCosine(0, 100, min_factor=0.1)(100) == pytest.approx(0.1)


def test_scheduler_scales_each_group_and_resumes() -> None:
    opt = _opt()
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[2][0] == pytest.approx(0.1) and lrs[2][1] == pytest.approx(1.0)
    assert all(math.isclose(b, 10 * a) for a, b in lrs)
    # resume from a state_dict mid-way gives the same lrs
    opt2 = _opt()
    s2 = warmup_cosine(opt2, 2, 8)
    for _ in range(3):
        opt2.step()
        s2.step()
    state = s2.state_dict()
    opt3 = _opt()
    s3 = warmup_cosine(opt3, 2, 8)
    s3.load_state_dict(state)
    opt3.load_state_dict(opt2.state_dict())
    assert [g["lr"] for g in opt3.param_groups] == pytest.approx(lrs[3])
