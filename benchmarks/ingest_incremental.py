"""Incremental ingest: one changed file in a 1,000-image phantom folder, with and without the cache.

Three contenders, taking turns in every repeat (so a busy neighbour slows each alike):

* **no cache** — ``ingest`` as it ran before the per-file cache (every image decoded);
* **cold cache** — the first run with an empty cache (every image decoded and stored);
* **warm, 1 changed** — a rerun after one image changed (one new pixel value per repeat),
  the cache holding the rest: 1 decode, 999 files only hashed.

Each call empties its output folder first, as DVC does before rerunning a stage, and uses
the pipeline's default ``data.ingest_workers`` (2). The folder is the phantom generator's
own (``generate_phantom_dataset``, 256 px, 8- and 16-bit PNG), written once to a temp folder.

    python -m benchmarks.ingest_incremental [--quick] [--images 1000] [--repeats 5]

Writes ``benchmarks/results/ingest_incremental.json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks._common import command_line, envelope, goal, print_goals, print_table, summarize, write_result
from bonefrac.config import PhantomParams
from bonefrac.data.ingest import ingest

NAME = "ingest_incremental"
GOAL_RATIO = 0.10  # "a small fraction of the first run's time"


def _change_one(path: Path, value: int) -> None:
    """Give the first pixel of ``path`` a new value (a new content hash, same image otherwise)."""
    with Image.open(path) as im:
        arr = np.array(im)
    arr.flat[0] = value % (np.iinfo(arr.dtype).max + 1)
    Image.fromarray(arr).save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="100 images, 2 repeats (smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 100, 2
    with tempfile.TemporaryDirectory(prefix="bonefrac-ingest-bench-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        from bonefrac.data.phantom import generate_phantom_dataset

        generate_phantom_dataset(tmp / "phantom", PhantomParams(n_patients=args.images // 2, views_per_study=2))
        gen_s = time.perf_counter() - t0
        n_images = sum(1 for _ in (tmp / "phantom").rglob("*.png"))
        changed = sorted((tmp / "phantom").rglob("*.png"))[0]

        def run(cache: Path | None, out: str) -> tuple[float, dict[str, Any]]:
            out_dir = tmp / out
            shutil.rmtree(out_dir, ignore_errors=True)
            t = time.perf_counter()
            table = ingest("phantom", tmp / "phantom", out_dir / "manifest.csv", workers=args.workers, cache_dir=cache)
            return time.perf_counter() - t, table.attrs.get("cache", {})

        warm_cache = tmp / "cache-warm"
        run(warm_cache, "prepare")  # the first run that fills the warm cache (not timed)
        times: dict[str, list[float]] = {"no cache": [], "cold cache": [], "warm, 1 changed": []}
        decodes: dict[str, list[int]] = {k: [] for k in times}
        for r in range(args.repeats):
            order = list(times)
            order = order[r % 3 :] + order[: r % 3]
            for name in order:
                if name == "no cache":
                    dt, stats = run(None, "out-nocache")
                    decodes[name].append(n_images)
                elif name == "cold cache":
                    cold = tmp / f"cache-cold-{r}"
                    dt, stats = run(cold, "out-cold")
                    shutil.rmtree(cold)
                    decodes[name].append(stats["misses"].get("meta", 0))
                else:
                    _change_one(changed, 1000 + r)
                    dt, stats = run(warm_cache, "out-warm")
                    decodes[name].append(stats["misses"].get("meta", 0))
                times[name].append(dt)

    rows = []
    for name, values in times.items():
        s = summarize(values)
        rows.append(
            {
                "contender": name,
                "images": n_images,
                "decoded per run": int(np.median(decodes[name])),
                "wall s (median)": round(s.median, 3),
                "IQR s": round(s.iqr, 3),
                "min s": round(s.min, 3),
                "max s": round(s.max, 3),
            }
        )
    med = {r["contender"]: r["wall s (median)"] for r in rows}
    warm_over_cold = med["warm, 1 changed"] / med["cold cache"]
    warm_over_plain = med["warm, 1 changed"] / med["no cache"]
    cold_over_plain = med["cold cache"] / med["no cache"]
    goals = [goal("ingest rerun after 1 of 1,000 images changed / first run", warm_over_cold, GOAL_RATIO, "<=")]
    notes = [
        f"warm / cold = {warm_over_cold:.3f}; warm / no cache = {warm_over_plain:.3f}; "
        f"cold cache / no cache = {cold_over_plain:.3f} (the price of filling the cache)",
        f"phantom folder generated in {gen_s:.0f} s (not timed); workers = {args.workers}; "
        f"{args.repeats} repeats, contenders taking turns",
    ]
    payload = envelope(
        NAME,
        command_line("benchmarks.ingest_incremental", argv if argv is not None else sys.argv[1:]),
        rows,
        settings={"images": n_images, "repeats": args.repeats, "workers": args.workers, "quick": args.quick},
        goals=goals,
        notes=notes,
    )
    write_result(NAME, payload)
    cols = list(rows[0])
    print_table("Incremental ingest", cols, ([r[c] for c in cols] for r in rows))
    print_goals(goals)
    for n in notes:
        print(n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
