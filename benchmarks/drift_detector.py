"""Drift detector: false-alarm rate on one distribution, detection rate on real shifts.

The detector is ``bonefrac.monitoring.drift.run_drift`` with the thresholds in
``params.yaml`` (``drift``), on per-image feature tables built from image
statistics (``bonefrac.monitoring.features.image_features``: intensity mean, std,
p01/p50/p99, width, height, aspect, bit depth). No model is used, so the
embedding and score columns are absent; the image statistics alone carry the
shifts measured here.

1. **False alarms**: a pool of phantom radiographs (``bonefrac.data.phantom``)
   from one generator; each repeat draws a reference and a disjoint current
   batch at random from it. Every dataset-level alarm is a false alarm.
2. **Phantom shifts**: the current batch is rendered from the same generator,
   then its exposure is changed (stored values scaled, as an over/under-exposed
   detector would) or noise is added (Gaussian, a share of the stored range).
3. **FracAtlas body parts**: the reference is hand radiographs only; current
   batches of hands (control: a false-alarm check on real data), legs, hips and
   shoulders, none of which the reference contained.

    python -m benchmarks.drift_detector [--quick] [--repeats 50] [--fracatlas ../shared/data/fracatlas]

Writes ``benchmarks/results/drift.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks._common import REPO_ROOT, command_line, envelope, goal, print_table, write_result
from bonefrac.config import DriftParams, load_params
from bonefrac.monitoring.drift import run_drift
from bonefrac.monitoring.features import image_features

NAME = "drift"
FRACATLAS = REPO_ROOT.parent / "shared" / "data" / "fracatlas"


def phantom_pool(n: int, size: int, seed: int) -> list[tuple[np.ndarray, int]]:
    """``n`` phantom radiographs (8- and 16-bit), random anatomy and view, half fractured."""
    from bonefrac.data.phantom import render_phantom
    from bonefrac.data.schema import FRACTURE_TYPES_PHANTOM

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = FRACTURE_TYPES_PHANTOM[i % len(FRACTURE_TYPES_PHANTOM)] if i % 2 else None
        bits = 8 if rng.random() < 0.5 else 16
        arr, _ = render_phantom(rng, size, kind, str(rng.choice(["frontal", "lateral"])), bits)
        out.append((arr, bits))
    return out


def shifted(
    img: np.ndarray, bits: int, rng: np.random.Generator, exposure: float, noise: float
) -> np.ndarray:
    """Scale stored values by ``exposure`` and add Gaussian noise of ``noise`` × the stored range."""
    top = float(np.iinfo(img.dtype).max)
    x = img.astype(np.float64) * exposure
    if noise:
        x = x + rng.normal(0.0, noise * top, size=x.shape)
    return np.clip(np.rint(x), 0, top).astype(img.dtype)


def table(images: list[tuple[np.ndarray, int]]) -> pd.DataFrame:
    return pd.DataFrame([image_features(a, b) for a, b in images])


def rate(fires: list[bool]) -> float:
    return float(np.mean(fires)) if fires else float("nan")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson interval of a rate (honest for rates near 0 with few repeats)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _row(
    scenario: str,
    group: str,
    fires: list[bool],
    shares: list[float],
    per_feature: dict[str, int],
    n_ref: int,
    n_cur: int,
    seconds: float,
) -> dict[str, Any]:
    k, n = int(sum(fires)), len(fires)
    lo, hi = wilson(k, n)
    top = sorted(per_feature.items(), key=lambda kv: -kv[1])[:3]
    return {
        "group": group,
        "scenario": scenario,
        "repeats": n,
        "alarms": k,
        "alarm_rate": rate(fires),
        "ci95_low": lo,
        "ci95_high": hi,
        "median_drift_share": float(np.median(shares)) if shares else None,
        "n_reference": n_ref,
        "n_current": n_cur,
        "most_drifted": ", ".join(f"{c} ({v}/{n})" for c, v in top if v),
        "seconds_per_check": seconds / max(n, 1),
    }


def _check(
    ref: pd.DataFrame,
    cur: pd.DataFrame,
    params: DriftParams,
    fires: list[bool],
    shares: list[float],
    per_feature: dict[str, int],
) -> None:
    res = run_drift(ref, cur, params)
    fires.append(res.dataset_drift)
    shares.append(res.drift_share)
    for c in res.drifted_columns:
        per_feature[c] = per_feature.get(c, 0) + 1


def phantom_benchmark(
    params: DriftParams, repeats: int, shift_repeats: int, n_ref: int, n_cur: int, size: int, seed: int
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    pool = phantom_pool(n_ref + n_cur + n_cur, size, seed)
    feats = table(pool)
    rows = []
    fires: list[bool] = []
    shares: list[float] = []
    per: dict[str, int] = {}
    t0 = time.perf_counter()
    for _ in range(repeats):  # false alarms: two disjoint random draws from one pool
        idx = rng.permutation(len(pool))
        _check(feats.iloc[idx[:n_ref]], feats.iloc[idx[n_ref : n_ref + n_cur]], params, fires, shares, per)
    rows.append(
        _row(
            "same distribution (false alarms)",
            "phantom",
            fires,
            shares,
            per,
            n_ref,
            n_cur,
            time.perf_counter() - t0,
        )
    )
    scenarios = [
        ("exposure x0.85", 0.85, 0.0),
        ("exposure x1.15", 1.15, 0.0),
        ("exposure x1.3", 1.3, 0.0),
        ("noise +2% of range", 1.0, 0.02),
        ("noise +5% of range", 1.0, 0.05),
    ]
    for name, exposure, noise in scenarios:
        fires, shares, per = [], [], {}
        t0 = time.perf_counter()
        for _ in range(shift_repeats):
            idx = rng.permutation(len(pool))
            cur = [pool[i] for i in idx[n_ref : n_ref + n_cur]]
            cur_feats = table([(shifted(a, b, rng, exposure, noise), b) for a, b in cur])
            _check(feats.iloc[idx[:n_ref]], cur_feats, params, fires, shares, per)
        rows.append(_row(name, "phantom", fires, shares, per, n_ref, n_cur, time.perf_counter() - t0))
    return rows


def fracatlas_benchmark(
    root: Path, params: DriftParams, repeats: int, n_ref: int, n_cur: int, seed: int
) -> list[dict[str, Any]]:
    from bonefrac.monitoring.reference import map_decoded

    meta = pd.read_csv(root / "dataset.csv")
    folder = {1: "Fractured", 0: "Non_fractured"}
    meta["path"] = [
        str(root / "images" / folder[int(f)] / i)
        for i, f in zip(meta["image_id"], meta["fractured"], strict=True)
    ]
    rng = np.random.default_rng(seed)
    parts = {"hand": n_ref + n_cur, "leg": n_cur * 2, "hip": n_cur * 2, "shoulder": n_cur * 2}
    tables: dict[str, pd.DataFrame] = {}
    for part, n in parts.items():
        rows = meta[(meta[part] == 1) & (meta["mixed"] == 0)]
        rows = rows.sample(n=min(n, len(rows)), random_state=seed)
        stats, skipped = map_decoded(list(rows["path"]), image_features)
        tables[part] = pd.DataFrame([d for d in stats if d is not None])
        if skipped:
            print(f"fracatlas {part}: {len(skipped)} undecodable images skipped", file=sys.stderr)
    out = []
    for part in ("hand", "leg", "hip", "shoulder"):
        fires: list[bool] = []
        shares: list[float] = []
        per: dict[str, int] = {}
        t0 = time.perf_counter()
        for _ in range(repeats):
            hands = tables["hand"].iloc[rng.permutation(len(tables["hand"]))]
            ref = hands.iloc[:n_ref]
            if part == "hand":  # control: other hands, never in this reference
                cur = hands.iloc[n_ref : n_ref + n_cur]
            else:
                cur = tables[part].iloc[rng.permutation(len(tables[part]))[:n_cur]]
            _check(ref, cur, params, fires, shares, per)
        label = "hand (control, false alarms)" if part == "hand" else f"{part} vs hand reference"
        out.append(_row(label, "fracatlas", fires, shares, per, n_ref, n_cur, time.perf_counter() - t0))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small scale: fewer repeats and images")
    ap.add_argument("--repeats", type=int, default=None, help="false-alarm repeats (default 50; quick 50)")
    ap.add_argument(
        "--shift-repeats", type=int, default=None, help="repeats per shift (default 20; quick 10)"
    )
    ap.add_argument("--n-ref", type=int, default=None, help="reference rows (default 300; quick 120)")
    ap.add_argument("--n-cur", type=int, default=None, help="current batch rows (default 100; quick 50)")
    ap.add_argument("--size", type=int, default=128, help="phantom size in px")
    ap.add_argument("--fracatlas", type=Path, default=FRACATLAS)
    ap.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drift-share", type=float, default=None, help="override drift.drift_share")
    ap.add_argument("--name", default=NAME, help="result name (benchmarks/results/<name>.json)")
    a = ap.parse_args(argv)
    repeats = a.repeats or 50
    shift_repeats = a.shift_repeats or (10 if a.quick else 20)
    n_ref = a.n_ref or (120 if a.quick else 300)
    n_cur = a.n_cur or (50 if a.quick else 100)
    params = load_params(a.params).drift
    if a.drift_share is not None:
        params = params.model_copy(update={"drift_share": a.drift_share})

    rows = phantom_benchmark(params, repeats, shift_repeats, n_ref, n_cur, a.size, a.seed)
    notes = [
        "Image-statistics features only (no model): embedding and score columns absent.",
        "Constant columns (one value in both tables) are reported but not counted in the drift share.",
    ]
    if (a.fracatlas / "dataset.csv").exists():
        rows += fracatlas_benchmark(a.fracatlas, params, shift_repeats, n_ref, n_cur, a.seed)
    else:
        notes.append(f"FracAtlas not found at {a.fracatlas}: body-part shifts not measured")
    cols = [
        "group",
        "scenario",
        "repeats",
        "alarms",
        "alarm_rate",
        "ci95_low",
        "ci95_high",
        "median_drift_share",
        "most_drifted",
    ]
    print_table(
        "Drift detector: dataset-level alarms",
        cols,
        [[r[c] for c in cols] for r in rows],
        caption=f"stattest_threshold={params.stattest_threshold}, drift_share={params.drift_share}, "
        f"reference {n_ref} rows, current {n_cur} rows",
    )
    fa = [r for r in rows if "false alarms" in r["scenario"]]
    shifts = [r for r in rows if "false alarms" not in r["scenario"]]
    goals = [goal(f"false-alarm rate, {r['group']}", r["alarm_rate"], 0.05, "<=") for r in fa]
    goals += [goal(f"detection, {r['group']}: {r['scenario']}", r["alarm_rate"], 0.8, ">=") for r in shifts]
    result = envelope(
        a.name,
        command_line("benchmarks.drift_detector", argv),
        rows,
        settings={
            "stattest_threshold": params.stattest_threshold,
            "drift_share": params.drift_share,
            "repeats": repeats,
            "shift_repeats": shift_repeats,
            "n_reference": n_ref,
            "n_current": n_cur,
            "phantom_size": a.size,
            "seed": a.seed,
        },
        goals=goals,
        notes=notes,
    )
    print(f"wrote {write_result(a.name, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
