"""FracAtlas: a box-supervised dense fracture head on frozen high-resolution features (issue 14).

One command::

    PYTHONPATH=$PWD/src:$PWD python benchmarks/fracatlas_dense.py            # cache (resumes) + train + table
    PYTHONPATH=$PWD/src:$PWD python benchmarks/fracatlas_dense.py --stage cache

1. Feature cache (:mod:`bonefrac.training.feature_cache`): EfficientNet-Lite0's frozen
   stem + blocks.0..5 run once per image at ``--size`` px (original and mirrored view),
   float16 memmaps of the stride-16 (blocks.4) and stride-32 (blocks.5) maps.
2. The project's grouped split (``assign_splits`` with params.yaml's fractions and seed,
   perceptual-hash near-duplicate groups), all body parts (legs included).
3. Heads trained on the cache (:mod:`bonefrac.model.dense`): the plain Lite0 tail (blocks.6 →
   conv_head → GAP → linear) vs the dense FPN head with image loss only vs image + box loss,
   log-sum-exp vs top-k pooling. Metrics on test: AUROC (+ 95 % bootstrap CI), ECE after
   Platt scaling on val, specificity at the val high-sensitivity (>= 0.90) threshold,
   pointing game and energy-in-box (vs uniform) on boxed test fractures, with and without flip TTA.
4. Shortcut floor: AUROC of image width / height / aspect alone.

Writes ``benchmarks/results/fracatlas_dense.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bonefrac.data.sources import load_records
from bonefrac.explain.localisation import map_boxes_to_cache, parse_boxes
from bonefrac.model.boxes import map_outlines_to_cache, parse_outlines
from bonefrac.preprocess.splits import assign_splits
from bonefrac.training.feature_cache import UNDECODABLE, build_feature_cache, open_feature_cache

REPO = Path(__file__).resolve().parent.parent
DATA = Path("/work/shared/data/fracatlas")
RESULTS = REPO / "benchmarks" / "results" / "fracatlas_dense.json"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def records() -> pd.DataFrame:
    df = load_records("fracatlas", DATA, use_fracture_types=False)
    return df[df["label"].isin([0, 1])].reset_index(drop=True)


def split_frame(df: pd.DataFrame, cache_records: pd.DataFrame) -> pd.DataFrame:
    """The project's grouped split (params.yaml: val 0.15, test 0.25, seed 42, phash distance 4)."""
    d = df.copy()
    d["phash"] = cache_records["phash"].to_numpy()
    return assign_splits(d, val_fraction=0.15, test_fraction=0.25, seed=42, near_duplicate_max_distance=4)


def stage_cache(cache_dir: Path, size: int, budget_s: float | None) -> None:
    df = records()
    paths, ids = df["path"].tolist(), df["image_id"].tolist()
    n = len(df)
    build_feature_cache(
        paths, ids, cache_dir, size, order=[(0, i) for i in range(n)], progress=log, time_budget_s=budget_s
    )
    cache = open_feature_cache(cache_dir)
    if not cache.done[0].all():
        return
    sp = split_frame(df, cache.records)
    rank = {"train": 0, "test": 1, "val": 2}  # mirrors: train (augmentation) first, then test (TTA)
    order = sorted(range(n), key=lambda i: (rank[sp["split"].iat[i]], i))
    build_feature_cache(
        paths,
        ids,
        cache_dir,
        size,
        order=[(1, i) for i in order],
        progress=log,
        time_budget_s=None if budget_s is None else budget_s,
    )


S8_FILE, S8_DONE = "s8.f16", "done8.npy"


def _s8_shape(cache) -> tuple[int, ...]:
    from bonefrac.model.dense import S8_CHANNELS

    g8 = cache.image_size // 8
    return (2, len(cache.records), S8_CHANNELS, g8, g8)


def stage_cache8(cache_dir: Path, batch_size: int = 16, check_batches: int = 4) -> None:
    """Add the stride-8 tap (``blocks.2``, 40 ch) to an existing cache: ``s8.f16`` + ``done8.npy``, resumable.

    Every image is decoded again with the cache's own preprocessing spec (``meta.json``) and run
    through the frozen stem..blocks.2; for the first ``check_batches`` batches the pass continues to
    ``blocks.4`` and must reproduce the stored stride-16 map (else the decode differs: refused).
    """
    from bonefrac.model.dense import FrozenTrunk
    from bonefrac.model.transforms import PreprocessSpec
    from bonefrac.training.feature_cache import decode_for_cache

    cache = open_feature_cache(cache_dir)
    spec = PreprocessSpec(**cache.meta["preprocess"])
    shape = _s8_shape(cache)
    if not (cache_dir / S8_DONE).exists():
        np.memmap(cache_dir / S8_FILE, dtype=np.float16, mode="w+", shape=shape).flush()
        np.save(cache_dir / S8_DONE, np.zeros(shape[:2], dtype=bool))
    s8 = np.memmap(cache_dir / S8_FILE, dtype=np.float16, mode="r+", shape=shape)
    done8 = np.load(cache_dir / S8_DONE)
    paths = cache.records["path"].tolist()
    todo = [(v, i) for v in (0, 1) for i in range(shape[1]) if cache.done[v, i] and not done8[v, i]]
    log(f"stride-8 tap: {len(todo)} passes to run ({int(done8.sum())} cached), preprocessing v{spec.version}")
    trunk = FrozenTrunk(last_block=4)
    t0 = time.perf_counter()
    for nb, b0 in enumerate(range(0, len(todo), batch_size)):
        chunk = todo[b0 : b0 + batch_size]
        x = torch.stack([decode_for_cache(paths[i], spec)[0] for _, i in chunk])
        flip = torch.tensor([v == 1 for v, _ in chunk])
        x[flip] = x[flip].flip(-1)
        with torch.inference_mode():
            h = trunk.bn1(trunk.conv_stem(trunk.input_adapter(x)))
            for k in range(3):
                h = trunk.blocks[k](h)
            if nb < check_batches:
                s16 = trunk.blocks[4](trunk.blocks[3](h))
                stored = torch.from_numpy(np.stack([cache.s16[v, i] for v, i in chunk]).astype(np.float32))
                err = float((s16 - stored).abs().max())
                if err > 0.05:
                    raise SystemExit(f"stride-16 map not reproduced (max |diff| {err:.3g}): decode differs")
        for j, (v, i) in enumerate(chunk):
            s8[v, i] = h[j].numpy().astype(np.float16)
            done8[v, i] = True
        if nb % 20 == 19 or b0 + batch_size >= len(todo):
            s8.flush()
            np.save(cache_dir / S8_DONE, done8)
            nd = min(b0 + batch_size, len(todo))
            el = time.perf_counter() - t0
            log(f"  {nd}/{len(todo)}  {el / 60:.1f} min  eta {(len(todo) - nd) * el / nd / 60:.1f} min")


def attach_s8(data, cache_dir: Path, cache) -> None:
    """Load the stride-8 tap and the dense targets on its grid into ``data`` (for variants with ``"s8": True``)."""
    from bonefrac.model.dense import box_target_map

    shape = _s8_shape(cache)
    done8 = np.load(cache_dir / S8_DONE)
    if not (done8 >= cache.done).all():
        raise SystemExit("the stride-8 tap is incomplete: run --stage cache8 first")
    s8 = np.memmap(cache_dir / S8_FILE, dtype=np.float16, mode="r", shape=shape)
    data.s8_all = torch.from_numpy(np.ascontiguousarray(s8[0]))
    data.s8f_all = torch.from_numpy(np.ascontiguousarray(s8[1])) if data.s16_flip is not None else None
    grid = shape[-1]
    data.targets8 = torch.stack([box_target_map(b, cache.image_size, grid) for b in data.boxes_cache])


SHIFT_FILE, SHIFT_ROWS = "shift_{}.f16", "shift_rows.npy"


def stage_cacheshift(cache_dir: Path, batch_size: int = 8) -> None:
    """Trunk features of the :func:`~bonefrac.model.dense.stitch_shifts` views of every boxed fracture:
    for each of the four shifts, the image and its mirror (8 passes per image), blocks.4 (``s16``) and
    blocks.5 (``s32``) as the main cache stores them. Scores the shift-and-stitch map (``cv --stitch``)
    without a forward pass of the trunk per fold. The unshifted view of the first batch must reproduce
    the stored maps (else the decode differs: refused)."""
    from bonefrac.model.dense import S16_CHANNELS, S32_CHANNELS, FrozenTrunk, shift_image, stitch_shifts
    from bonefrac.model.transforms import PreprocessSpec
    from bonefrac.training.feature_cache import decode_for_cache

    cache = open_feature_cache(cache_dir)
    spec = PreprocessSpec(**cache.meta["preprocess"])
    df = records()
    rows = np.array([i for i, b in enumerate(df["boxes"]) if df["label"].iat[i] == 1 and parse_boxes(b)])
    g = cache.image_size // 16
    shifts = stitch_shifts(16)
    s16 = np.memmap(cache_dir / SHIFT_FILE.format("s16"), dtype=np.float16, mode="w+",
                    shape=(len(rows), len(shifts), 2, S16_CHANNELS, g, g))
    s32 = np.memmap(cache_dir / SHIFT_FILE.format("s32"), dtype=np.float16, mode="w+",
                    shape=(len(rows), len(shifts), 2, S32_CHANNELS, g // 2, g // 2))
    paths = cache.records["path"].tolist()
    trunk = FrozenTrunk(last_block=5)
    log(f"shifted views: {len(rows)} boxed fractures x {len(shifts)} shifts x 2 mirrors")
    t0 = time.perf_counter()
    for b0 in range(0, len(rows), batch_size):
        chunk = rows[b0 : b0 + batch_size]
        x = torch.stack([decode_for_cache(paths[i], spec)[0] for i in chunk])
        with torch.inference_mode():
            if b0 == 0:
                err = float((trunk(x)[0] - torch.from_numpy(cache.s16[0, chunk].astype(np.float32))).abs().max())
                if err > 0.05:
                    raise SystemExit(f"stride-16 map not reproduced (max |diff| {err:.3g}): decode differs")
            for k, (dy, dx) in enumerate(shifts):
                xs = shift_image(x, dy, dx)
                for v, view in enumerate((xs, xs.flip(-1))):
                    a, b = trunk(view)
                    s16[b0 : b0 + len(chunk), k, v] = a.numpy().astype(np.float16)
                    s32[b0 : b0 + len(chunk), k, v] = b.numpy().astype(np.float16)
        if (b0 // batch_size) % 10 == 9 or b0 + batch_size >= len(rows):
            nd = min(b0 + batch_size, len(rows))
            el = time.perf_counter() - t0
            log(f"  {nd}/{len(rows)}  {el / 60:.1f} min  eta {(len(rows) - nd) * el / nd / 60:.1f} min")
    s16.flush()
    s32.flush()
    np.save(cache_dir / SHIFT_ROWS, rows)


def stitched_pointing(head: torch.nn.Module, cache_dir: Path, idx: np.ndarray, boxes: list, size: int) -> dict:
    """Pointing game and energy-in-box of the head's shift-and-stitch flip-TTA map (``DenseFractureNet``
    with ``stitch``) on the boxed fractures among ``idx``, from the ``cacheshift`` features (the unshifted
    map's scores are the caller's ``score`` of the same head)."""
    from bonefrac.explain.localisation import localisation_summary
    from bonefrac.model.calibrate import sigmoid
    from bonefrac.model.dense import S16_CHANNELS, S32_CHANNELS, stitch_maps

    rows = np.load(cache_dir / SHIFT_ROWS)
    pos = {int(r): j for j, r in enumerate(rows)}
    g = size // 16
    shape16 = (len(rows), 4, 2, S16_CHANNELS, g, g)
    s16 = np.memmap(cache_dir / SHIFT_FILE.format("s16"), dtype=np.float16, mode="r", shape=shape16)
    shape32 = (len(rows), 4, 2, S32_CHANNELS, g // 2, g // 2)
    s32 = np.memmap(cache_dir / SHIFT_FILE.format("s32"), dtype=np.float16, mode="r", shape=shape32)
    keep = [int(i) for i in idx if int(i) in pos and boxes[int(i)]]
    head.eval()
    heat = []
    with torch.inference_mode():
        for i in keep:
            j = pos[i]
            a = torch.from_numpy(s16[j].astype(np.float32)).flatten(0, 1)  # (shift, mirror) → batch of 8
            b = torch.from_numpy(s32[j].astype(np.float32)).flatten(0, 1)
            _, m = head(a, b)
            m = m.view(4, 2, 1, g, g)
            tta = (m[:, 0] + m[:, 1].flip(-1)) / 2  # each shift's flip-TTA map
            fine = stitch_maps([tta[k][None] for k in range(4)])[0, 0].numpy()
            heat.append(sigmoid(fine))
    up = _upsample(np.stack(heat), size)
    loc = localisation_summary(list(up), [boxes[i] for i in keep])
    return {"pointing_stitch": loc["pointing_hit_rate"], "energy_stitch": loc["energy_in_box"],
            "n_stitch": loc["n"]}


# ------------------------------------------------------------------ training and evaluation
VARIANTS: dict[str, dict] = {
    # name: head kind, head kwargs, box-loss weight; optional: "s32" (which stride-32 input the head
    # gets: "b6" = frozen blocks.6 applied once (default), "raw" = blocks.5 output (the head trains
    # blocks.6), "none" = the head trains blocks.5 + blocks.6 from the stride-16 map), "epochs"
    # (overrides --epochs), "exact_flips" (False: mirror the feature maps instead of the cached mirror view),
    # "seed" (offset of the training seeds: a seed ensemble's members differ only here), "keep" (the epoch
    # whose weights are kept: "best_val_auroc", the default, or "last")
    "gap_plain": {"kind": "gap", "kw": {}, "box_weight": 0.0},
    "dense_lse_imgonly": {"kind": "dense", "kw": {"pool": "lse"}, "box_weight": 0.0},
    "dense_lse_box": {"kind": "dense", "kw": {"pool": "lse"}, "box_weight": 1.0},
    "dense_topk_box": {"kind": "dense", "kw": {"pool": "topk", "topk": 4}, "box_weight": 1.0},
    "dense_lse_box_e24": {"kind": "dense", "kw": {"pool": "lse"}, "box_weight": 1.0, "epochs": 24},
    "dense_lse_box_mapflip": {"kind": "dense", "kw": {"pool": "lse"}, "box_weight": 1.0, "exact_flips": False},
    "dense_lse_box_b6": {
        "kind": "dense", "kw": {"pool": "lse", "train_blocks6": True}, "box_weight": 1.0, "s32": "raw",
    },
    "dense_lse_box_b56": {
        "kind": "dense", "kw": {"pool": "lse", "train_blocks6": True, "train_blocks5": True},
        "box_weight": 1.0, "s32": "none",
    },
}
# Seed-ensemble members: the preset's variant with the training seeds offset.
VARIANTS.update({f"dense_lse_box_b6_s{k}": {**VARIANTS["dense_lse_box_b6"], "seed": k} for k in (1, 2)})
# The stride-8 level: FPN on blocks.2 (frozen, cached by --stage cache8), a logit per 8-px cell.
VARIANTS["dense_lse_box_b6_s8"] = {
    **VARIANTS["dense_lse_box_b6"], "kw": {**VARIANTS["dense_lse_box_b6"]["kw"], "s8_channels": 40}, "s8": True,
}
# Box targets peaked at the box centre (train.dense.box_profile: centre) instead of flat over the grown box.
VARIANTS["dense_lse_box_b6_centre"] = {**VARIANTS["dense_lse_box_b6"], "profile": "centre"}
# The dense loss weighted 3x / 6x against the image loss; boxes not grown (targets = each cell's box overlap).
VARIANTS.update({f"dense_lse_box_b6_bw{w}": {**VARIANTS["dense_lse_box_b6"], "box_weight": float(w)} for w in (3, 6)})
VARIANTS["dense_lse_box_b6_grow0"] = {**VARIANTS["dense_lse_box_b6"], "grow": 0.0}
VARIANTS["dense_lse_box_b6_bw3_grow0"] = {**VARIANTS["dense_lse_box_b6_bw3"], "grow": 0.0}
# Seed ensembles of the round-9 preset: members at the preset's 12 epochs, or at 6 epochs each (three
# 6-epoch heads cost what 1.5 preset heads do).
VARIANTS.update({
    f"dense_lse_box_b6_bw3_grow0_s{k}": {**VARIANTS["dense_lse_box_b6_bw3_grow0"], "seed": k} for k in (1, 2)
})
VARIANTS.update({
    f"dense_lse_box_b6_bw3_grow0_e6_s{k}": {**VARIANTS["dense_lse_box_b6_bw3_grow0"], "seed": k, "epochs": 6}
    for k in (0, 1, 2)
})
# The round-9 preset keeping its last epoch instead of the best-validation-AUROC one (train.dense.keep_epoch).
VARIANTS["dense_lse_box_b6_bw3_grow0_last"] = {**VARIANTS["dense_lse_box_b6_bw3_grow0"], "keep": "last"}
# Round 16: the fracture's outline (COCO polygon) as the dense target instead of its box.
VARIANTS["dense_lse_box_b6_bw3_grow0_last_outline"] = {
    **VARIANTS["dense_lse_box_b6_bw3_grow0_last"], "profile": "outline",
}
# The same head trained on mirrored cached feature maps instead of exact mirrored views
# (train.dense.flip: features): the trunk cache then needs one pass per training image, not two.
VARIANTS["dense_lse_box_b6_bw3_grow0_last_mapflip"] = {
    **VARIANTS["dense_lse_box_b6_bw3_grow0_last"], "exact_flips": False,
}
# Round 17: the peak loss (model.dense.peak_loss; train.dense.peak_weight) on top of the outline preset.
VARIANTS.update({
    f"dense_lse_box_b6_bw3_grow0_last_outline_peak{w}": {
        **VARIANTS["dense_lse_box_b6_bw3_grow0_last_outline"], "peak_weight": float(w) / 10
    } for w in (3, 10, 20, 30)
})
VARIANTS.update({f"dense_lse_box_b6_s8_s{k}": {**VARIANTS["dense_lse_box_b6_s8"], "seed": k} for k in (1, 2)})


def load_cached_set(cache, df: pd.DataFrame, use_exact_flips: bool = True):
    """Cache memmaps → in-memory float16 tensors, with frozen blocks.6 applied to the stride-32 maps."""
    from bonefrac.model.dense import box_target_map
    from bonefrac.training.dense import CachedSet

    size = cache.image_size
    grid = size // 16
    t0 = time.perf_counter()
    s16 = torch.from_numpy(np.ascontiguousarray(cache.s16[0]))
    s32_raw = np.ascontiguousarray(cache.s32[0])
    from bonefrac.model.networks import build_model

    b6 = build_model("efficientnet_lite0", 0, pretrained="efficientnet_lite_offline").backbone.blocks[6].eval()

    def run_b6(raw: np.ndarray) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for b in range(0, len(raw), 128):
                out.append(b6(torch.from_numpy(raw[b : b + 128]).float()).half())
        return torch.cat(out)

    s32 = run_b6(s32_raw)
    log(f"loaded cache + frozen blocks.6 on {len(s32)} images in {(time.perf_counter() - t0) / 60:.1f} min")
    flip_ok = torch.from_numpy(cache.done[1].copy()) if use_exact_flips else torch.zeros(len(df), dtype=torch.bool)
    s16f = s32f = None
    if bool(flip_ok.any()):
        s16f = torch.from_numpy(np.ascontiguousarray(cache.s16[1]))
        s32f = run_b6(np.ascontiguousarray(cache.s32[1]))
    labels = torch.tensor(df["label"].to_numpy(), dtype=torch.float32)
    targets = torch.zeros(len(df), grid, grid)
    boxes_cache, outlines_cache = [], []
    for i, row in enumerate(df.itertuples()):
        bx = parse_boxes(row.boxes)
        r = cache.records.iloc[i]
        hw = (int(r.orig_h), int(r.orig_w))
        mapped = map_boxes_to_cache(bx, hw, size) if bx and r.orig_h > 0 else []
        boxes_cache.append(mapped)
        outlines_cache.append(map_outlines_to_cache(parse_outlines(row.boxes), hw, size) if mapped else [])
        targets[i] = box_target_map(mapped, size, grid)
    has_boxes = torch.tensor([len(b) > 0 for b in boxes_cache])
    has_map = (labels == 0) | has_boxes
    data = CachedSet(s16, s32, labels, targets, has_map, s16f, s32f, flip_ok)
    data.boxes_cache = boxes_cache  # type: ignore[attr-defined]
    data.outlines_cache = outlines_cache  # type: ignore[attr-defined]
    data.image_size = size  # type: ignore[attr-defined]
    # The raw blocks.5 maps, for heads that train blocks.6 themselves (variant "s32": "raw").
    data.s32_raw = torch.from_numpy(s32_raw)  # type: ignore[attr-defined]
    data.s32f_raw = (  # type: ignore[attr-defined]
        torch.from_numpy(np.ascontiguousarray(cache.s32[1])) if s16f is not None else None
    )
    return data, boxes_cache


def variant_data(data, v: dict):
    """The CachedSet a variant trains on (its stride-32 input, exact or approximate mirror views)."""
    import dataclasses

    mode = v.get("s32", "b6")
    d = data
    if mode == "raw":
        d = dataclasses.replace(data, s32=data.s32_raw, s32_flip=data.s32f_raw)
    elif mode == "none":  # the head computes s32 from s16; keep a 1-element placeholder per image
        d = dataclasses.replace(data, s32=torch.zeros(len(data.labels), 1, 1, 1, dtype=torch.float16),
                                s32_flip=None if data.s32_flip is None else
                                torch.zeros(len(data.labels), 1, 1, 1, dtype=torch.float16))
    if v.get("s8"):
        d = dataclasses.replace(d, s8=data.s8_all, s8_flip=data.s8f_all, targets=data.targets8)
    profile, grow = v.get("profile", "area"), float(v.get("grow", 0.5))
    if (profile, grow) != ("area", 0.5):  # targets other than the preset's, built for this variant
        if v.get("s8"):
            raise SystemExit("non-default box targets are built on the stride-16 grid only")
        from bonefrac.model.dense import box_target_map

        grid = data.targets.shape[-1]
        d = dataclasses.replace(d, targets=torch.stack(
            [box_target_map(b, data.image_size, grid, grow=grow, profile=profile, outlines=o)
             for b, o in zip(data.boxes_cache, data.outlines_cache, strict=True)]))
    if v.get("exact_flips", True) is False:
        d = dataclasses.replace(d, flip_ok=torch.zeros(len(data.labels), dtype=torch.bool))
    return d


def _upsample(maps: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(maps[:, None].astype(np.float32))
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def evaluate(kind: str, z_val, z_test, maps_test, y_val, y_test, boxes_test, size: int, n_boot: int = 1000) -> dict:
    from sklearn.metrics import roc_auc_score

    from bonefrac.evaluation.bootstrap import auroc_replicates, percentile_interval, stratified_indices
    from bonefrac.evaluation.calibration import expected_calibration_error
    from bonefrac.evaluation.operating_points import HIGH_SENSITIVITY, choose_thresholds
    from bonefrac.explain.localisation import localisation_summary
    from bonefrac.model.calibrate import fit_calibration, sigmoid

    auc = float(roc_auc_score(y_test, z_test))
    reps = auroc_replicates(y_test, z_test, stratified_indices(y_test, n_boot, seed=0))
    lo, hi = percentile_interval(reps, 0.95)
    cal = fit_calibration(z_val, y_val, "platt")
    p_val, p_test = cal.probability(z_val), cal.probability(z_test)
    ece = expected_calibration_error(p_test, y_test)
    ece_raw = expected_calibration_error(sigmoid(z_test), y_test)
    thr = choose_thresholds(p_val, y_val, high_sensitivity_target=0.90)[HIGH_SENSITIVITY]
    pred = p_test >= thr
    sens = float(pred[y_test == 1].mean())
    spec = float((~pred[y_test == 0]).mean())
    # Evidence maps → heat (non-negative) at input resolution: dense map = sigmoid(logits); CAM = ReLU (Grad-CAM).
    heat = sigmoid(maps_test) if kind == "dense" else np.clip(maps_test, 0, None)
    heat = _upsample(heat, size)
    loc = localisation_summary(list(heat), boxes_test)
    loc_tol = localisation_summary(list(heat), boxes_test, tolerance=size / 24)
    return {
        "auroc": auc,
        "auroc_ci95": [lo, hi],
        "ece_platt": ece,
        "ece_raw": ece_raw,
        "sens_at_val_hs90": sens,
        "spec_at_val_hs90": spec,
        "threshold_hs90": float(thr),
        "pointing": loc["pointing_hit_rate"],
        "pointing_tol16px": loc_tol["pointing_hit_rate"],
        "energy_in_box": loc["energy_in_box"],
        "uniform_energy": loc["baseline_box_area_share"],
        "energy_ratio": loc["energy_in_box"] / loc["baseline_box_area_share"],
        "centre_pointing": loc["baseline_centre_hit_rate"],
        "n_boxed": loc["n"],
    }


def shortcut_floor(cache, sp: pd.DataFrame) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    r = cache.records
    ok = (r["orig_h"] > 0).to_numpy()
    h, w = r["orig_h"].clip(lower=1).astype(float), r["orig_w"].clip(lower=1).astype(float)
    feats = pd.DataFrame({"width": w, "height": h, "aspect": w / h})
    y = sp["label"].to_numpy()
    tr, te = (sp["split"] == "train").to_numpy() & ok, (sp["split"] == "test").to_numpy() & ok
    out = {}
    for c in feats:
        a = roc_auc_score(y[te], feats[c].to_numpy()[te])
        out[c] = float(max(a, 1 - a))
    x = np.log(feats.to_numpy(dtype=float))
    lr = LogisticRegression(max_iter=1000).fit(x[tr], y[tr])
    out["logreg_w_h_aspect"] = float(roc_auc_score(y[te], lr.decision_function(x[te])))
    return out


def end_to_end_check(head: torch.nn.Module, kw: dict, cache, rows: np.ndarray, cached_logits: np.ndarray) -> dict:
    """Full network (frozen trunk through blocks.6 + trained head) from pixels, saved and reloaded.

    The state_dict of :class:`DenseFractureNet` is what a model bundle would hold; the logits
    from decoded pixels must match the cached-feature path (float16 storage is the only gap).
    """
    from bonefrac.data.imageio import read_image
    from bonefrac.model.dense import DenseFractureNet, FrozenTrunk, build_head
    from bonefrac.model.transforms import PreprocessSpec

    net = DenseFractureNet(FrozenTrunk(last_block=6), head).eval()
    path = REPO / "tmp" / "dense_net_state.pt"
    torch.save(net.state_dict(), path)
    fresh = DenseFractureNet(FrozenTrunk(pretrained="none", last_block=6), build_head("dense", pretrained="none", **kw))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    fresh.eval()
    spec = PreprocessSpec(image_size=cache.image_size)
    x = torch.stack(
        [spec.apply(read_image(cache.records["path"].iat[i], max_side_hint=spec.image_size).array) for i in rows]
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        z = fresh(x)[:, 0].numpy()
    ms = (time.perf_counter() - t0) / len(rows) * 1000
    return {
        "n": len(rows),
        "state_dict_mb": path.stat().st_size / 1e6,
        "max_abs_logit_diff_vs_cache": float(np.abs(z - cached_logits).max()),
        "ms_per_image_from_pixels": ms,
    }


def stage_train(cache_dir: Path, df: pd.DataFrame, out_path: Path, variants: list[str], epochs: int) -> dict:
    from bonefrac.model.dense import build_head
    from bonefrac.training.dense import HeadTrainConfig, predict, train_head

    cache = open_feature_cache(cache_dir)
    if not cache.done[0].all():
        raise SystemExit(f"cache incomplete: {int(cache.done[0].sum())}/{len(df)}; run --stage cache")
    sp = split_frame(df, cache.records)
    size = cache.image_size
    ok = ~cache.records["decode_error"].str.startswith(UNDECODABLE).to_numpy()
    log(f"excluded {int((~ok).sum())} undecodable image(s): {cache.records['image_id'][~ok].tolist()}")
    idx = {s: np.flatnonzero((sp["split"] == s).to_numpy() & ok) for s in ("train", "val", "test")}
    counts = {s: {"n": len(v), "pos": int(sp["label"].to_numpy()[v].sum())} for s, v in idx.items()}
    log(f"split (grouped, all body parts): {counts}")
    data, boxes = load_cached_set(cache, df)
    y = data.labels.numpy().astype(int)
    boxes_test = [boxes[i] if y[i] == 1 else [] for i in idx["test"]]
    result = {
        "name": "fracatlas_dense",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "image_size": size,
        "cache": {k: cache.meta.get(k) for k in ("build_s", "bytes", "trunk", "taps")},
        "exact_flip_views": int(cache.done[1].sum()),
        "split": counts,
        "shortcut_floor_auroc": shortcut_floor(cache, sp),
        "rows": [],
    }
    log(f"shortcut floor (test AUROC): {result['shortcut_floor_auroc']}")
    for name in variants:
        v = VARIANTS[name]
        torch.manual_seed(0)
        head = build_head(v["kind"], **v["kw"])
        n_par = sum(p.numel() for p in head.parameters() if p.requires_grad)
        log(f"--- {name}: {v['kind']} head {v['kw']}, box weight {v['box_weight']}, {n_par / 1e3:.0f}k params")
        cfg = HeadTrainConfig(epochs=epochs, box_weight=v["box_weight"])
        info = train_head(head, data, idx["train"], idx["val"], cfg, progress=log)
        row = {
            "variant": name,
            "head": v["kind"],
            **v["kw"],
            "box_weight": v["box_weight"],
            "trainable_params": n_par,
            **{k: info[k] for k in ("train_minutes", "best_epoch", "best_val_auroc")},
        }
        for tta in (False, True):
            zv, _ = predict(head, data, idx["val"])
            zt, mt = predict(head, data, idx["test"])
            if tta:
                zv2, _ = predict(head, data, idx["val"], flip=True)
                zt2, mt2 = predict(head, data, idx["test"], flip=True)
                zv, zt, mt = (zv + zv2) / 2, (zt + zt2) / 2, (mt + mt2) / 2
            m = evaluate(v["kind"], zv, zt, mt, y[idx["val"]], y[idx["test"]], boxes_test, size)
            row["tta" if tta else "single"] = m
        row["history"] = info["history"]
        result["rows"].append(row)
        s, t = row["single"], row["tta"]
        log(
            f"    test AUROC {s['auroc']:.3f} [{s['auroc_ci95'][0]:.3f}, {s['auroc_ci95'][1]:.3f}]  "
            f"TTA {t['auroc']:.3f}  "
            f"ECE {s['ece_platt']:.3f}  spec@hs90 {s['spec_at_val_hs90']:.3f}  pointing {s['pointing']:.3f}  "
            f"energy {s['energy_ratio']:.1f}x uniform"
        )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2))
        if v["kind"] == "dense" and "end_to_end" not in result:
            rows8 = idx["test"][:8]
            z8, _ = predict(head, data, rows8)
            result["end_to_end"] = {"variant": name, **end_to_end_check(head, v["kw"], cache, rows8, z8)}
            log(f"    end to end from pixels: {result['end_to_end']}")
            out_path.write_text(json.dumps(result, indent=2))
    print_table(result)
    return result


def _topk_centroid_pointing(maps: np.ndarray, boxes: list, size: int, k: int = 4) -> float:
    """Pointing game with the point at the score-weighted centroid of the map's ``k`` hottest cells
    (instead of the single hottest): a top-k pooled model's evidence is a region, not a cell."""
    from bonefrac.explain.localisation import pointing_game

    hits = []
    for m, bx in zip(maps, boxes, strict=True):
        if not bx:
            continue
        g = m.shape[-1]
        flat = m.reshape(-1)
        top = np.argsort(flat)[-k:]
        w = flat[top] - flat[top].min() + 1e-6
        cy = float(np.sum((top // g + 0.5) * w) / w.sum()) * size / g
        cx = float(np.sum((top % g + 0.5) * w) / w.sum()) * size / g
        point = np.zeros((size, size))
        point[min(int(cy), size - 1), min(int(cx), size - 1)] = 1.0
        hits.append(pointing_game(point, bx))
    return float(np.mean(hits)) if hits else float("nan")


def stage_cv(
    cache_dir: Path, df: pd.DataFrame, out_path: Path, variants: list[str], epochs: int, k: int = 5,
    ensembles: list[str] | None = None, only_folds: list[int] | None = None, per_epoch: bool = False,
    stitch: bool = False,
) -> dict:
    """Grouped k-fold CV (near-duplicate groups, stratified by label × body part): each fold is the
    test set once; the next fold is validation (best epoch, Platt, threshold); the rest trains.

    Each variant is scored alone and with flip TTA (mean of the logits and maps of the image and
    its exact mirror); ``ensembles`` (``a+b``) average the logits of variants trained on the same
    folds (and their maps where all are dense maps on one grid; else the map is the first member's)."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    from bonefrac.model.dense import build_head
    from bonefrac.training.dense import HeadTrainConfig, predict, train_head

    cache = open_feature_cache(cache_dir)
    sp = split_frame(df, cache.records)
    ok = ~cache.records["decode_error"].str.startswith(UNDECODABLE).to_numpy()
    rows = np.flatnonzero(ok)
    strata = (sp["label"].astype(str) + "_" + sp["body_part"].astype(str)).to_numpy()[rows]
    skf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=42)
    folds = [rows[te] for _, te in skf.split(rows, strata, sp["group_id"].to_numpy()[rows])]
    data, boxes = load_cached_set(cache, df)
    if any(VARIANTS[v].get("s8") for v in variants):
        attach_s8(data, cache_dir, cache)
    y = data.labels.numpy().astype(int)
    size = cache.image_size
    fold_ids = sorted(only_folds) if only_folds else list(range(k))  # a screening run may score a subset
    result = {"name": "fracatlas_dense_cv", "k": k, "epochs": epochs, "n": len(rows), "rows": []}
    if only_folds:
        result["folds_run"] = [f + 1 for f in fold_ids]
    if out_path.exists():  # keep rows of variants measured in earlier runs
        old = json.loads(out_path.read_text())
        result["rows"] = [r for r in old.get("rows", []) if r["variant"] not in variants]
    preds: dict[str, dict[int, dict]] = {}
    keys = ("auroc", "ece_platt", "spec_at_val_hs90", "sens_at_val_hs90", "pointing", "pointing_topk",
            "energy_ratio")

    def summarise(name: str, per_fold: list[dict], pooled_z: list, pooled_y: list, extra: dict) -> None:
        present = [kk for kk in (*keys, "pointing_stitch") if all(kk in m for m in per_fold)]
        summ = {
            kk: [float(np.mean([m[kk] for m in per_fold])), float(np.std([m[kk] for m in per_fold]))]
            for kk in present
        }
        summ["pooled_auroc_uncalibrated"] = float(roc_auc_score(np.concatenate(pooled_y), np.concatenate(pooled_z)))
        summ["train_minutes_per_fold"] = float(np.mean([m.get("train_minutes", 0.0) for m in per_fold]))
        result["rows"] = [r for r in result["rows"] if r["variant"] != name]
        result["rows"].append({"variant": name, **extra, "mean_std": summ, "folds": per_fold})
        log(f"  {name}: " + "  ".join(f"{kk} {mv[0]:.3f}±{mv[1]:.3f}" for kk, mv in summ.items() if kk in present))
        out_path.write_text(json.dumps(result, indent=2))

    def score(kind, zv, zt, mt, va, te, n_boot=200) -> dict:
        bt = [boxes[i] if y[i] else [] for i in te]
        m = evaluate(kind, zv, zt, mt, y[va], y[te], bt, size, n_boot=n_boot)
        m["pointing_topk"] = _topk_centroid_pointing(mt, bt, size)
        return m

    def pointing_tta(head, vdata, idx) -> float:
        """Pointing game of the head's flip-TTA map on the boxed fractures among ``idx``."""
        _, m1 = predict(head, vdata, idx)
        _, m2 = predict(head, vdata, idx, flip=True)
        from bonefrac.explain.localisation import localisation_summary
        from bonefrac.model.calibrate import sigmoid

        keep = [j for j, i in enumerate(idx) if y[i] and boxes[i]]
        heat = _upsample(sigmoid((m1[keep] + m2[keep]) / 2), size)
        return float(localisation_summary(list(heat), [boxes[idx[j]] for j in keep])["pointing_hit_rate"])

    def epoch_scores(head, vdata, va, te) -> dict:
        """Per-epoch diagnostics (--per-epoch): flip-TTA pointing on validation and test, test AUROC."""
        zt, _ = predict(head, vdata, te)
        return {
            "val_pointing_tta": pointing_tta(head, vdata, va),
            "test_pointing_tta": pointing_tta(head, vdata, te),
            "test_auroc": float(roc_auc_score(y[te], zt)),
        }

    def run_ensemble(ens: str) -> None:
        members = ens.split("+")
        kind = VARIANTS[members[0]]["kind"]
        for tta in (False, True):
            per_fold, pz, py = [], [], []
            for f in fold_ids:
                te, va = folds[f], folds[(f + 1) % k]
                ps = [preds[mb][f] for mb in members]
                if tta:
                    zv = np.mean([(p["zv"] + p["zv2"]) / 2 for p in ps], axis=0)
                    zt = np.mean([(p["zt"] + p["zt2"]) / 2 for p in ps], axis=0)
                    maps = [(p["mt"] + p["mt2"]) / 2 for p in ps]
                else:
                    zv = np.mean([p["zv"] for p in ps], axis=0)
                    zt = np.mean([p["zt"] for p in ps], axis=0)
                    maps = [p["mt"] for p in ps]
                # Members on one grid (a seed ensemble): the mean logit map, as HeadEnsemble shows it.
                same_grid = all(mm.shape == maps[0].shape for mm in maps) and kind == "dense"
                mt = np.mean(maps, axis=0) if same_grid else maps[0]
                m = score(kind, zv, zt, mt, va, te)
                m.update(train_minutes=0.0, n_test=len(te), pos_test=int(y[te].sum()))
                per_fold.append(m)
                pz.append(zt)
                py.append(y[te])
            summarise(f"ens[{ens}]" + ("+tta" if tta else ""), per_fold, pz, py, {"members": members})

    done_ens: set[str] = set()
    for name in variants:
        v = VARIANTS[name]
        ep = int(v.get("epochs", epochs))
        vdata = variant_data(data, v)
        per_fold, per_fold_tta, pz, pz_tta, py = [], [], [], [], []
        preds[name] = {}
        for f in fold_ids:
            te, va = folds[f], folds[(f + 1) % k]
            tr = np.concatenate([folds[j] for j in range(k) if j not in (f, (f + 1) % k)])
            seed = f + 1000 * int(v.get("seed", 0))
            torch.manual_seed(seed)
            head = build_head(v["kind"], **v["kw"])
            info = train_head(
                head, vdata, tr, va, HeadTrainConfig(epochs=ep, box_weight=v["box_weight"], seed=seed,
                                                 peak_weight=v.get("peak_weight", 0.0),
                                                 keep=v.get("keep", "best_val_auroc")),
                progress=lambda _m: None,
                on_epoch=(lambda _e, h, d=vdata, va=va, te=te: epoch_scores(h, d, va, te)) if per_epoch else None,
            )
            zv, _ = predict(head, vdata, va)
            zt, mt = predict(head, vdata, te)
            zv2, _ = predict(head, vdata, va, flip=True)
            zt2, mt2 = predict(head, vdata, te, flip=True)
            preds[name][f] = {"zv": zv, "zt": zt, "mt": mt, "zv2": zv2, "zt2": zt2, "mt2": mt2}
            m = score(v["kind"], zv, zt, mt, va, te)
            mtta = score(v["kind"], (zv + zv2) / 2, (zt + zt2) / 2, (mt + mt2) / 2, va, te)
            if stitch:  # the shift-and-stitch map of the same head (TTA), beside the unshifted TTA map's score
                mtta.update(stitched_pointing(head, cache_dir, te, [boxes[i] if y[i] else [] for i in range(len(y))],
                                              size))
            for mm in (m, mtta):
                mm.update(train_minutes=info["train_minutes"], n_test=len(te), pos_test=int(y[te].sum()))
                mm.update(best_epoch=info["best_epoch"])
            if per_epoch:
                m["history"] = info["history"]
            per_fold.append(m)
            per_fold_tta.append(mtta)
            pz.append(zt)
            pz_tta.append((zt + zt2) / 2)
            py.append(y[te])
            log(
                f"  {name} fold {f + 1}/{k}: AUROC {m['auroc']:.3f} (TTA {mtta['auroc']:.3f})  "
                f"ECE {m['ece_platt']:.3f}  spec@hs90 {m['spec_at_val_hs90']:.3f}  "
                f"pointing {m['pointing']:.3f} (top-k {m['pointing_topk']:.3f})  "
                f"energy {m['energy_ratio']:.1f}x  {info['train_minutes']:.1f} min"
                + (f"  TTA pointing {mtta['pointing']:.3f} stitched {mtta['pointing_stitch']:.3f}" if stitch else "")
            )
            # Each finished fold reaches the file at once: a stopped run keeps what it measured.
            result["in_progress"] = {"variant": name, "folds_done": len(per_fold), "folds": per_fold,
                                     "folds_tta": per_fold_tta}
            out_path.write_text(json.dumps(result, indent=2))
        extra = {"epochs": ep, "box_weight": v["box_weight"], "grow": float(v.get("grow", 0.5)),
                 "s32": v.get("s32", "b6"), "exact_flips": v.get("exact_flips", True),
                 "seed": int(v.get("seed", 0)), "s8": bool(v.get("s8")), "profile": v.get("profile", "area"),
                 "keep": v.get("keep", "best_val_auroc"), "peak_weight": v.get("peak_weight", 0.0)}
        summarise(name, per_fold, pz, py, extra)
        result.pop("in_progress", None)
        summarise(name + "+tta", per_fold_tta, pz_tta, py, extra)
        for ens in ensembles or []:  # as soon as its members are trained
            if ens not in done_ens and all(mb in preds for mb in ens.split("+")):
                run_ensemble(ens)
                done_ens.add(ens)
    return result


def print_table(result: dict) -> None:
    sp = result["split"]
    print(
        f"\nFracAtlas dev part, grouped split seed 42 (train {sp['train']}, val {sp['val']}, test {sp['test']}), "
        f"{result['image_size']} px, frozen Lite0 stem..blocks.6"
    )
    hdr = (
        f"{'variant':20s} {'AUROC [95% CI]':24s} {'TTA':>6s} {'ECE':>6s} {'spec@hs':>7s} {'sens':>5s} "
        f"{'point':>6s} {'pt±16':>6s} {'energy':>7s} {'min':>5s}"
    )
    print(hdr)
    for r in result["rows"]:
        s, t = r["single"], r["tta"]
        print(
            f"{r['variant']:20s} {s['auroc']:.3f} [{s['auroc_ci95'][0]:.3f}, {s['auroc_ci95'][1]:.3f}]   "
            f"{t['auroc']:6.3f} {s['ece_platt']:6.3f} {s['spec_at_val_hs90']:7.3f} {s['sens_at_val_hs90']:5.2f} "
            f"{s['pointing']:6.3f} {s['pointing_tol16px']:6.3f} {s['energy_ratio']:6.1f}x {r['train_minutes']:5.1f}"
        )
    print(f"shortcut floor (test AUROC of size alone): {result['shortcut_floor_auroc']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["cache", "cache8", "cacheshift", "train", "cv", "all"], default="all")
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--cache-dir", type=Path, default=REPO / "tmp" / "dense_cache")
    ap.add_argument("--cache-budget-s", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--folds", default="", help="cv: run only these folds (1-based, comma-separated): a screen")
    ap.add_argument("--per-epoch", action="store_true",
                    help="cv: record each epoch's flip-TTA pointing (val and test) and test AUROC (a diagnostic)")
    ap.add_argument("--stitch", action="store_true",
                    help="cv: also score the shift-and-stitch flip-TTA map (needs --stage cacheshift first)")
    ap.add_argument("--ensembles", default="", help="cv: comma-separated a+b logit-averaged ensembles")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir = args.cache_dir / f"s{args.size}"
    if args.stage in ("cache", "all"):
        stage_cache(cache_dir, args.size, args.cache_budget_s)
    if args.stage == "cache8":
        stage_cache8(cache_dir)
    if args.stage == "cacheshift":
        stage_cacheshift(cache_dir)
    if args.stage in ("train", "all"):
        stage_train(cache_dir, records(), args.out, args.variants.split(","), args.epochs)
    if args.stage == "cv":
        out = args.out.with_name(args.out.stem + "_cv.json")
        stage_cv(cache_dir, records(), out, args.variants.split(","), args.epochs,
                 ensembles=[e for e in args.ensembles.split(",") if e],
                 only_folds=[int(f) - 1 for f in args.folds.split(",") if f], per_epoch=args.per_epoch,
                 stitch=args.stitch)


if __name__ == "__main__":
    main()
