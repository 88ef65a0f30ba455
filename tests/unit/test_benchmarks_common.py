"""The benchmarks' shared helpers: statistics, timing, FLOP counting, results and BENCHMARKS.md sections."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from types import SimpleNamespace

import benchmarks._common as bench_common
import numpy as np
import pytest
import torch
from benchmarks._common import (
    count_flops,
    goal,
    load_result,
    ratio,
    summarize,
    time_interleaved,
    time_repeats,
    write_result,
)
from benchmarks.run_all import replace_section
from torch import nn


# ----------------------------------------------------------------- statistics
def test_summarize_median_and_iqr_of_odd_sample() -> None:
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s.median == 3.0
    # numpy's linear interpolation: q1 at position 1 (=2), q3 at position 3 (=4)
    assert (s.q1, s.q3, s.iqr) == (2.0, 4.0, 2.0)
    assert (s.min, s.max, s.n) == (1.0, 5.0, 5)


def test_summarize_even_sample_interpolates() -> None:
    s = summarize([1.0, 2.0, 3.0, 10.0])
    assert s.median == 2.5
    assert s.q1 == pytest.approx(1.75)  # position 0.75 between 1 and 2
    assert s.q3 == pytest.approx(4.75)  # position 2.25 between 3 and 10
    assert s.iqr == pytest.approx(3.0)


def test_summarize_median_ignores_one_outlier() -> None:
    assert summarize([10.0, 10.5, 9.5, 1000.0, 10.0]).median == 10.0


def test_summarize_single_value() -> None:
    s = summarize([7.0])
    assert (s.median, s.iqr, s.n) == (7.0, 0.0, 1)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")]])
def test_summarize_rejects_empty_and_non_finite(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        summarize(bad)


def test_ratio() -> None:
    assert ratio(6.0, 3.0) == 2.0
    assert ratio(None, 3.0) is None
    assert ratio(1.0, 0.0) is None


def test_goal_verdicts() -> None:
    assert goal("t", 4.0, 5.0, "<=")["met"] is True
    assert goal("t", 6.0, 5.0, "<=")["met"] is False
    assert goal("t", 2.5, 2.0, ">=")["met"] is True
    assert goal("t", None, 2.0, ">=")["met"] is None
    with pytest.raises(ValueError):
        goal("t", 1.0, 1.0, "<")


# --------------------------------------------------------------------- timing
def test_time_repeats_excludes_warmup_and_measures_per_call() -> None:
    calls = []

    def fn() -> None:
        calls.append(1)
        time.sleep(0.01)

    per_call, k = time_repeats(fn, repeats=3, warmup=2)
    assert k == 1 and len(per_call) == 3
    assert len(calls) == 2 + 3  # warm-ups are called but not reported
    assert all(0.009 <= t < 0.2 for t in per_call)


class FakeClock:
    """A clock that only moves when the timed function says so: timing logic tested without sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def work(self, seconds: float) -> Callable[[], None]:
        def fn() -> None:
            self.now += seconds

        return fn


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(bench_common, "time", SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def test_time_repeats_min_time_batches_fast_calls(clock: FakeClock) -> None:
    per_call, k = time_repeats(clock.work(0.002), repeats=2, min_time=0.02)
    assert k == 10  # ceil(0.02 / 0.002) calls per repeat
    assert per_call == pytest.approx([0.002, 0.002])


def test_time_repeats_budget_cuts_repeats_but_not_below_minimum(clock: FakeClock) -> None:
    per_call, _ = time_repeats(clock.work(1.0), repeats=50, budget_s=10.0, min_repeats=3)
    assert len(per_call) == 10  # 10 s of budget for 1 s calls
    per_call, _ = time_repeats(clock.work(1.0), repeats=50, budget_s=0.5, min_repeats=3)
    assert len(per_call) == 3  # the budget never cuts below min_repeats
    per_call, _ = time_repeats(clock.work(1.0), repeats=2, budget_s=100.0, min_repeats=3)
    assert len(per_call) == 2  # nor raises the number asked for


def test_time_interleaved_rotates_order_and_times_each() -> None:
    order: list[str] = []
    fns = {
        name: (lambda name=name, d=d: (order.append(name), time.sleep(d)))
        for name, d in (("a", 0.002), ("b", 0.01))
    }
    timed = time_interleaved(fns, repeats=4, warmup=1)
    assert set(timed) == {"a", "b"}
    assert len(timed["a"][0]) == len(timed["b"][0]) == 4
    assert np.median(timed["b"][0]) > np.median(timed["a"][0])
    rounds = order[2:]  # after one warm-up each
    firsts = [rounds[i] for i in range(0, len(rounds), 2)]
    assert firsts == ["a", "b", "a", "b"]  # who goes first alternates


# ---------------------------------------------------------------------- FLOPs
def test_count_flops_conv_and_linear_by_hand() -> None:
    # Conv2d(3→8, 3×3, padding 1) on 16×16: every output value is a 3·3·3-term multiply-add.
    # Linear(8·16·16 → 4): 2048 multiply-adds per output. A multiply-add is 2 FLOPs; bias not counted.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 4))
    batch = 2
    conv = batch * (8 * 16 * 16) * (3 * 3 * 3) * 2
    linear = batch * 4 * (8 * 16 * 16) * 2
    assert count_flops(model, torch.rand(batch, 3, 16, 16)) == conv + linear == 253_952


def test_count_flops_strided_grouped_conv() -> None:
    # Depthwise 3×3, stride 2: 16 channels, each output value is a 1·3·3 multiply-add; 32×32 → 16×16.
    model = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
    assert count_flops(model, torch.rand(1, 16, 32, 32)) == 16 * 16 * 16 * 9 * 2


def test_count_flops_scales_with_batch() -> None:
    model = nn.Linear(10, 3)
    assert count_flops(model, torch.rand(5, 10)) == 5 * count_flops(model, torch.rand(1, 10))


# -------------------------------------------------------------------- results
def test_write_and_load_result_round_trip(tmp_path) -> None:
    payload = {"name": "x", "value": np.float32(1.5), "n": np.int64(3), "rows": [{"a": 1}]}
    path = write_result("x", payload, tmp_path)
    assert path == tmp_path / "x.json"
    back = json.loads(path.read_text())
    assert back["value"] == 1.5 and back["n"] == 3
    assert load_result("x", tmp_path) == back
    assert load_result("missing", tmp_path) is None
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_write_result_refuses_nan_and_keeps_previous(tmp_path) -> None:
    write_result("x", {"v": 1.0}, tmp_path)
    with pytest.raises(ValueError):
        write_result("x", {"v": math.nan}, tmp_path)
    assert load_result("x", tmp_path) == {"v": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# --------------------------------------------------------------- BENCHMARKS.md
def test_replace_section_replaces_only_that_section() -> None:
    doc = (
        "# B\n\n<!-- section:a -->\nold a\n<!-- /section:a -->\n\n"
        "<!-- section:b -->\nkeep b\n<!-- /section:b -->\n"
    )
    out = replace_section(doc, "a", "new a\nline 2")
    assert "new a\nline 2" in out and "old a" not in out
    assert "<!-- section:b -->\nkeep b\n<!-- /section:b -->" in out
    assert replace_section(out, "a", "new a\nline 2") == out  # idempotent


def test_replace_section_appends_missing_section() -> None:
    out = replace_section("# B\n", "c", "body")
    assert out.rstrip().endswith("<!-- section:c -->\nbody\n<!-- /section:c -->")


# ------------------------------------------------------------- pipeline helpers
def test_stage_times_from_dvc_output_timestamps() -> None:
    from benchmarks.pipeline import stage_times

    lines = [
        (0.5, "Running stage 'generate':"),
        (0.6, "> python -m flows.generate"),
        (10.5, "Running stage 'ingest':"),
        (12.0, "Updating lock file 'dvc.lock'"),
    ]
    assert stage_times(lines, end=30.5) == {"generate": 10.0, "ingest": 20.0}
    assert stage_times([(1.0, "Data and pipelines are up to date.")], end=2.0) == {}


def test_parse_sets_builds_nested_yaml_values() -> None:
    from benchmarks.pipeline import parse_sets

    assert parse_sets(["train.epochs=2", "data.include_body_parts=null", "data.phantom.bit_depths=[8]"]) == {
        "train": {"epochs": 2},
        "data": {"include_body_parts": None, "phantom": {"bit_depths": [8]}},
    }
    with pytest.raises(SystemExit):
        parse_sets(["train.epochs"])


def test_service_and_train_input_sections_render_their_numbers() -> None:
    from benchmarks import service, train_input
    from benchmarks._common import envelope, goal

    rows = [
        {"server": s, "concurrency": c, "throughput_rps": rps, "latency_ms_p50": 40.0 * c,
         "latency_ms_p99": 70.0 * c, "errors": err, "ok": 10}
        for s, c, rps, err in (("bentoml-1w", 1, 20.0, 0), ("bentoml-1w", 8, 31.5, 1), ("naive", 1, 11.0, 0))
    ]
    result = envelope(
        "service", "python -m benchmarks.service", rows,
        settings={"levels": [1, 8], "duration_s": 15, "arch": "efficientnet_lite0", "image_size": 128,
                  "n_images": 16, "max_batch_size": 16},
        goals=[goal("service / naive FastAPI (peak req/s)", 31.5 / 11.0, 2.0, ">=")],
        notes=["a note"], machine={"cpu_model": "x"},
        raw={"backend": "onnx", "backend_reason": "measured", "batch": 16, "model_only_ips": 160.0,
             "end_to_end_ips": 32.0},
    )
    md = service.render_markdown(result)
    assert "| 8 | 31.5 · 320/560 (1 err) | — |" in md and "| 1 | 20 · 40/70 | 11 · 40/70 |" in md
    assert "**160 img/s**" in md and "→ **met**" in md and "- a note" in md

    ti = {"results": {m: {"median_epoch_s": s, "images_per_s": 96 / s, "data_wait_share": w,
                          "loader_only_images_per_s": lo} for m, s, w, lo in
                      (("cached", 13.0, 0.06, 120.0), ("decode", 16.9, 0.15, 48.0))},
          "cpu_count": 2, "torch": "2", "threads": 2, "n_images": 96, "source": "fracatlas", "image_size": 192,
          "arch": "efficientnet_lite0", "batch_size": 32, "workers": 0, "repeats": 3,
          "speedup_cached_vs_decode": 1.3, "loader_only_speedup": 2.5, "cache_build_s": 1.5}
    md = train_input.render_markdown(ti)
    assert "| cached | 13.00 | 7.4 | 6.0% | 120.0 |" in md and "**1.30×** per training epoch" in md


def test_service_soak_lasts_long_enough_for_the_requested_count(monkeypatch) -> None:
    """The stall goal counts requests: a soak sized in seconds fell short when the service got slower."""
    from benchmarks import service

    calls: list[tuple[int, float]] = []

    def fake_load(url, images, concurrency, duration, stall_s=5.0):  # 25 req/s whatever the level
        calls.append((concurrency, duration))
        return {"concurrency": concurrency, "throughput_rps": 25.0 + concurrency / 100, "requests": int(25 * duration),
                "latency_ms_p50": 1.0, "latency_ms_p99": 2.0, "latency_ms_max": 3.0, "errors": 0, "stalls": 0}

    monkeypatch.setattr(service, "run_load", fake_load)
    rows = service.load_levels("http://x", [], [1, 8], 10.0, soak=60.0, soak_requests=20_000)
    soak = rows[-1]
    assert soak["soak"] and calls[-1][0] == 8  # at the peak level
    # 500 requests in the levels; 19,500 more at ~25 req/s with a 10 % margin: ~858 s, not the 60 asked.
    assert calls[-1][1] == pytest.approx(1.1 * 19_500 / 25.08)
    assert sum(r["requests"] for r in rows) >= 20_000
    calls.clear()
    service.load_levels("http://x", [], [1, 8], 10.0, soak=900.0, soak_requests=20_000)
    assert calls[-1][1] == 900.0  # a longer soak asked in seconds is kept


def test_every_committed_result_renders_with_its_own_renderer() -> None:
    """``run_all`` swallows a renderer's exception (the numbers are kept as a generic table), so a
    broken ``render_markdown`` would only show up as a degraded BENCHMARKS.md: call each one directly
    on the committed result it renders, and on the older result files kept beside it."""
    import importlib

    from benchmarks._common import RESULTS_DIR, load_result
    from benchmarks.run_all import BENCHES, module_present

    rendered = 0
    for bench in BENCHES:
        if not module_present(bench.module):
            continue
        mod = importlib.import_module(f"benchmarks.{bench.module}")
        if not hasattr(mod, "render_markdown"):
            continue
        names = {*bench.results, *(p.stem for p in RESULTS_DIR.glob(f"{bench.results[0]}_*.json"))}
        for name in sorted(names):
            result = load_result(name)
            if result is None:
                continue
            body = mod.render_markdown(result)
            assert "|" in body, f"{name}: no table rendered"
            rendered += 1
    assert rendered >= 5
