"""Benchmark: training epoch time from the cached tensors vs decoding + preprocessing every epoch.

Both modes run the same training steps (same model, batch size, augmentation,
DataLoader workers); only where an image comes from differs:

- ``cached``: a row of the float16 ``images.npy`` memmap (``bonefrac.preprocess.cache``)
- ``decode``: read the file (JPEG/PNG) and run the model contract's preprocessing on it, every epoch

It reports the median epoch time over repeats, the ratio decode/cached (goal ≥ 3×)
and the share of step time spent waiting for data. Results are printed as a
table and written to ``benchmarks/results/train_input.json``.

    python benchmarks/train_input.py --source fracatlas --n 256 --repeats 3 --workers 2
    python benchmarks/train_input.py --source phantom --n 64 --repeats 2   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from bonefrac.config import AugmentParams
from bonefrac.model.networks import build_model
from bonefrac.model.transforms import PreprocessSpec
from bonefrac.preprocess.augment import apply_augmentation, random_transform, sample_seed
from bonefrac.preprocess.cache import build_cache, load_cache
from bonefrac.training.data import CachedDataset, EpochTaggedSampler, make_loader
from bonefrac.training.sampling import EpochSampler

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train_input.json"


def read_any(path: str) -> np.ndarray:
    """The project decoder when available (DICOM, 16-bit ...), else PIL for JPEG/PNG."""
    try:
        from bonefrac.data.imageio import read_image
    except ImportError:
        return np.asarray(Image.open(path).convert("I;16" if path.endswith(".png") else "L"), dtype=np.float32)
    return np.asarray(read_image(path).array, dtype=np.float32)


def phantom_files(out: Path, n: int, size: int) -> list[str]:
    """Radiograph-like 16-bit PNGs (a bright 'bone' bar on noise) at a realistic size."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        img = rng.normal(8000, 1500, (size, int(size * 0.8))).clip(0, 65535)
        img[:, img.shape[1] // 2 - size // 20 : img.shape[1] // 2 + size // 20] += 30000
        p = out / f"ph{i:04d}.png"
        Image.fromarray(img.clip(0, 65535).astype(np.uint16)).save(p)
        paths.append(str(p))
    return paths


def fracatlas_files(root: Path, n: int) -> list[str]:
    files = sorted((root / "images").glob("*/*.jpg"))
    if not files:
        sys.exit(f"no FracAtlas JPEGs under {root}/images")
    rng = np.random.default_rng(0)
    return [str(files[i]) for i in sorted(rng.choice(len(files), size=min(n, len(files)), replace=False))]


class DecodeDataset(Dataset):
    """Decode + preprocess + augment on every access: what training without the cache does."""

    def __init__(self, paths: list[str], image_size: int, aug: Any, seed: int) -> None:
        self.paths, self.image_size, self.aug, self.seed = paths, image_size, aug, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        epoch, i = key
        x = PreprocessSpec(image_size=self.image_size).apply(read_any(self.paths[i]))
        x = apply_augmentation(self.aug, x, sample_seed(self.seed, epoch, i))
        return x, torch.tensor(float(i % 2)), torch.tensor(-1), torch.tensor(i)


def run_epochs(dataset: Dataset, n: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(args.arch, 0, "none", 0.0, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = EpochSampler(n, seed=0)
    loader = make_loader(dataset, args.batch_size, EpochTaggedSampler(sampler), args.workers, pin_memory=False)
    epochs = []
    for epoch in range(args.repeats + 1):  # epoch 0 warms up workers and caches; not counted
        sampler.set_epoch(epoch)
        model.train()
        wait = step = 0.0
        t_start = t0 = time.perf_counter()
        for x, y, _, _ in loader:
            t1 = time.perf_counter()
            wait += t1 - t0
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            t0 = time.perf_counter()
            step += t0 - t1
        if epoch > 0:
            epochs.append({"seconds": time.perf_counter() - t_start, "data_wait_s": wait, "compute_s": step})
    # The input pipeline alone (no model): how fast each mode can feed a GPU that waits for nothing.
    loader_only = []
    for epoch in range(args.repeats):
        sampler.set_epoch(100 + epoch)
        t = time.perf_counter()
        for _ in loader:
            pass
        loader_only.append(time.perf_counter() - t)
    med = statistics.median(e["seconds"] for e in epochs)
    wait_share = sum(e["data_wait_s"] for e in epochs) / sum(e["data_wait_s"] + e["compute_s"] for e in epochs)
    load_med = statistics.median(loader_only)
    return {
        "median_epoch_s": med,
        "data_wait_share": wait_share,
        "images_per_s": n / med,
        "loader_only_median_s": load_med,
        "loader_only_images_per_s": n / load_med,
        "epochs": epochs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["fracatlas", "phantom"], default="phantom")
    p.add_argument("--root", type=Path, default=ROOT.parent / "shared" / "data" / "fracatlas")
    p.add_argument("--n", type=int, default=64, help="images per epoch")
    p.add_argument("--phantom-size", type=int, default=1024, help="longest side of the phantom PNGs")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--arch", default="custom_cnn")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per mode (after one warm-up epoch)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_at_start = list(os.getloadavg()[:2])
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        if args.source == "fracatlas":
            paths = fracatlas_files(args.root, args.n)
        else:
            (tmpd / "raw").mkdir()
            paths = phantom_files(tmpd / "raw", args.n, args.phantom_size)
        n = len(paths)
        df = pd.DataFrame({"path": paths, "label": [i % 2 for i in range(n)], "split": "train"})
        t = time.perf_counter()
        build_cache(
            df,
            tmpd / "cache",
            PreprocessSpec(image_size=args.image_size),
            read_fn=read_any,
            workers=max(1, args.workers),
        )
        cache_build_s = time.perf_counter() - t
        _, index = load_cache(tmpd / "cache")
        aug = random_transform(AugmentParams(), 2)
        cached_ds = CachedDataset.from_index(tmpd / "cache", index, [], aug, seed=0)
        results = {
            "cached": run_epochs(cached_ds, n, args),
            "decode": run_epochs(DecodeDataset(paths, args.image_size, aug, 0), n, args),
        }
    ratio = results["decode"]["median_epoch_s"] / results["cached"]["median_epoch_s"]
    load_ratio = results["decode"]["loader_only_median_s"] / results["cached"]["loader_only_median_s"]
    report = {
        "command": "python -m benchmarks.train_input " + " ".join(sys.argv[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_at_start": load_at_start,
        "goals": [
            {
                "name": "epoch time, decode every epoch / cached",
                "value": ratio,
                "target": 3.0,
                "op": ">=",
                "unit": "",
                "met": bool(ratio >= 3.0),
            },
        ],
        "source": args.source,
        "n_images": n,
        "image_size": args.image_size,
        "arch": args.arch,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "cache_build_s": cache_build_s,
        "speedup_cached_vs_decode": ratio,
        "loader_only_speedup": load_ratio,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "results": results,
    }
    print(
        f"\ntraining input pipeline: {n} {args.source} images -> {args.image_size}px, {args.arch}, "
        f"batch {args.batch_size}, {args.workers} workers, {torch.get_num_threads()} threads"
    )
    print(f"{'mode':<8} {'median epoch s':>15} {'images/s':>10} {'data wait share':>16} {'loader-only img/s':>18}")
    for mode, r in results.items():
        print(
            f"{mode:<8} {r['median_epoch_s']:>15.2f} {r['images_per_s']:>10.1f} "
            f"{r['data_wait_share']:>16.1%} {r['loader_only_images_per_s']:>18.1f}"
        )
    print(
        f"speed-up cached vs decode every epoch: {ratio:.1f}x training epoch, {load_ratio:.1f}x input "
        f"pipeline alone (cache built once in {cache_build_s:.1f}s)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmpf = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(report, fh, indent=2)
    os.replace(tmpf, args.out)
    print(f"wrote {args.out}")


def render_markdown(result: dict[str, Any]) -> str:
    """The BENCHMARKS.md section (``benchmarks.run_all``) from ``train_input.json``."""
    rows = []
    for mode, r in result["results"].items():
        rows.append(
            f"| {mode} | {r['median_epoch_s']:.2f} | {r['images_per_s']:.1f} | {r['data_wait_share']:.1%} "
            f"| {r['loader_only_images_per_s']:.1f} |"
        )
    return "\n".join(
        [
            f"Load average {result.get('load_at_start', '?')} at start; "
            f"{result['cpu_count']} cores, torch {result['torch']} ({result['threads']} threads)",
            "",
            f"{result['n_images']} {result['source']} images → {result['image_size']} px, {result['arch']}, "
            f"batch {result['batch_size']}, {result['workers']} loader workers, median of {result['repeats']} "
            "epochs after a warm-up epoch.",
            "",
            "| mode | median epoch s | images/s | share of time waiting for data | input pipeline alone, images/s |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"- cached vs decoding every epoch: **{result['speedup_cached_vs_decode']:.2f}×** per training epoch "
            f"(goal ≥ 3×), **{result['loader_only_speedup']:.1f}×** for the input pipeline alone; "
            f"the cache is built once in {result['cache_build_s']:.1f} s.",
        ]
    )


if __name__ == "__main__":
    main()
