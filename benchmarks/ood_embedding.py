"""Per-image OOD check with the model's embedding: what it detects and what it adds per request.

Run after ``make run`` (it reads the bundle the evaluate stage wrote, whose ``ood`` metadata holds
the detector fitted on the training split with thresholds from the validation split and the drift
reference's PCA):

1. **Verdicts**: the run's own *test* split (phantoms the detector never saw; expected: no warning)
   and a sample of FracAtlas radiographs (real images; expected: a warning), each scored as the
   service scores them: image statistics of the decoded file, the embedding from the model's forward
   pass on the bundle's preprocessing. Counts per check (image statistics, embedding).
2. **Cost per request**, medians of interleaved repeats on one preprocessed image: the model's
   forward pass with and without the embedding output (ONNX Runtime, the CPU service's backend, and
   eager PyTorch), and the detector's scoring of one image (PCA projection + two Mahalanobis
   distances). The image statistics were already computed per request before this change.

    python -m benchmarks.ood_embedding [--model models/model.pt] [--fracatlas ../shared/data/fracatlas] [--n 40]

Writes ``benchmarks/results/ood_embedding.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import REPO_ROOT, command_line, envelope, goal, print_table, summarize, write_result


def _verdicts(bundle: Any, model: Any, detector: Any, paths: list[str]) -> dict[str, Any]:
    import torch

    from bonefrac.data.imageio import read_image
    from bonefrac.model.networks import forward_with_embedding
    from bonefrac.monitoring.ood import image_ood_features

    fired = {"any": 0, "image": 0, "embedding": 0, "embedding_only": 0}
    ratios: dict[str, list[float]] = {"image": [], "embedding": []}
    n = 0
    for p in paths:
        img = read_image(p)
        feats = image_ood_features(img.array, int(img.bit_depth), (img.meta or {}).get("value_range"))
        with torch.no_grad():
            _, emb = forward_with_embedding(model, bundle.preprocess(img.array)[None])
        v = detector.score(feats, emb[0].numpy())
        n += 1
        fired["any"] += v["flag"]
        for g in ("image", "embedding"):
            fired[g] += g in v["fired"]
            if g in v["ratios"]:
                ratios[g].append(v["ratios"][g])
        fired["embedding_only"] += v["fired"] == ["embedding"]
    return {
        "n": n,
        **{f"warned_{k}": c for k, c in fired.items()},
        **{f"ratio_{g}_median": float(np.median(r)) for g, r in ratios.items() if r},
        **{f"ratio_{g}_min": float(np.min(r)) for g, r in ratios.items() if r},
        **{f"ratio_{g}_max": float(np.max(r)) for g, r in ratios.items() if r},
    }


def _timings(bundle: Any, detector: Any, x: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    from bonefrac.inference.backends import OnnxRunner, TorchRunner
    from bonefrac.inference.onnx_export import export_bundle
    from bonefrac.monitoring.ood import image_ood_features

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = export_bundle(bundle, Path(tmp) / "m.onnx")
        runners = {"onnx": OnnxRunner(path, threads=1), "torch": TorchRunner(bundle.build_model())}
        for name, r in runners.items():
            plain, both = [], []
            for _ in range(2):
                r(x), r.with_embedding(x)  # warm-up
            for _ in range(repeats):  # interleaved: load on the machine hits both alike
                t0 = time.perf_counter()
                r(x)
                t1 = time.perf_counter()
                r.with_embedding(x)
                plain.append((t1 - t0) * 1000)
                both.append((time.perf_counter() - t1) * 1000)
            a, b = summarize(plain), summarize(both)
            rows.append({"what": f"{name} forward, logits only (ms)", **a.to_dict()})
            rows.append({"what": f"{name} forward, logits + embedding (ms)", **b.to_dict()})
    feats = image_ood_features(np.random.default_rng(0).integers(0, 255, (512, 400)).astype(np.uint8), 8)
    emb = runners["onnx"].with_embedding(x)[1][0]
    score = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        detector.score(feats, emb)
        score.append((time.perf_counter() - t0) * 1000)
    rows.append({"what": "detector.score: PCA projection + 2 distances (ms)", **summarize(score).to_dict()})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO_ROOT / "models" / "model.pt"))
    ap.add_argument("--cache", default=str(REPO_ROOT / "data" / "processed"))
    ap.add_argument("--fracatlas", default=str(REPO_ROOT.parent / "shared" / "data" / "fracatlas"))
    ap.add_argument("--n", type=int, default=40, help="FracAtlas images; as many test phantoms at most")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)

    import torch

    from bonefrac.config import resolve
    from bonefrac.model.bundle import ModelBundle
    from bonefrac.monitoring.ood import OODDetector
    from bonefrac.preprocess.cache import load_cache

    torch.set_num_threads(1)
    bundle = ModelBundle.load(args.model)
    if not bundle.metadata.get("ood"):
        print(f"{args.model} has no OOD detector: run `make run` first", file=sys.stderr)
        return 2
    detector = OODDetector.from_dict(bundle.metadata["ood"])
    model = bundle.build_model().eval()
    _, index = load_cache(Path(args.cache))
    test = [str(resolve(p)) for p in index[index["split"] == "test"]["path"]][: args.n]
    fa = Path(args.fracatlas) / "images"
    real = [str(p) for d in ("Fractured", "Non_fractured") for p in sorted((fa / d).glob("*.jpg"))[: args.n // 2]]
    verdicts = [
        {"images": "phantom test split (in distribution)", **_verdicts(bundle, model, detector, test)},
        {"images": "FracAtlas radiographs (out of distribution)", **_verdicts(bundle, model, detector, real)},
    ]
    x = bundle.preprocess(np.random.default_rng(1).integers(0, 4095, (600, 500)).astype(np.uint16))[None].numpy()
    timings = _timings(bundle, detector, x, args.repeats)
    onnx_plain = next(r["median"] for r in timings if r["what"].startswith("onnx forward, logits only"))
    onnx_both = next(r["median"] for r in timings if r["what"].startswith("onnx forward, logits +"))
    score_ms = timings[-1]["median"]
    added = onnx_both - onnx_plain + score_ms
    goals = [
        goal("phantom test images warned (false alarms)", verdicts[0]["warned_any"], 0, "<="),
        goal("FracAtlas images warned by the embedding check (share)",
             verdicts[1]["warned_embedding"] / max(verdicts[1]["n"], 1), 0.9, ">="),
        goal("added latency per request (ONNX, ms)", added, 2.0, "<=", "ms"),
    ]  # fmt: skip
    result = envelope(
        "ood_embedding",
        command_line("benchmarks.ood_embedding", argv if argv is not None else sys.argv[1:]),
        timings,
        settings={"model": bundle.arch, "image_size": bundle.preprocess_spec.image_size, "repeats": args.repeats,
                  "detector": {k: detector.meta.get(k) for k in ("n_train", "n_heldout", "quantile", "margin")}},
        goals=goals,
        verdicts=verdicts,
        added_latency_ms=added,
    )  # fmt: skip
    vcols = ["n", "warned_any", "warned_image", "warned_embedding", "warned_embedding_only",
             "ratio_image_median", "ratio_embedding_median", "ratio_embedding_min", "ratio_embedding_max"]  # fmt: skip
    print_table("OOD verdicts", ["images", *vcols], [[v["images"], *(v.get(c) for c in vcols)] for v in verdicts])
    print_table("cost", ["what", "median", "iqr", "n"], [[r["what"], r["median"], r["iqr"], r["n"]] for r in timings])
    print(f"added per request (ONNX): {added:.3f} ms")
    print(write_result("ood_embedding", result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
