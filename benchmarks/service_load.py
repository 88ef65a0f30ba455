"""Load generator for the fracture service: throughput and p50/p99 latency at 1–64 concurrent clients.

Each client is a thread with its own HTTP connection that uploads images back to
back (closed loop) for ``--duration`` seconds; latency is measured per request on
the client. Works against the BentoML service and against the naive baseline
(``benchmarks/naive_fastapi.py``), which expose the same ``POST /predict``.

    python benchmarks/service_load.py --url http://127.0.0.1:3000 --image img.png \\
        --concurrency 1 2 4 8 16 32 64 --duration 30 --label bentoml-cpu

Prints a table and writes ``benchmarks/results/service_load-<label>-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run_load(
    url: str,
    images: list[tuple[str, bytes]],
    concurrency: int,
    duration_s: float,
    endpoint: str = "/predict",
    headers: dict[str, str] | None = None,
    timeout_s: float = 120.0,
    stall_s: float = 5.0,
) -> dict[str, Any]:
    """Closed-loop load at ``concurrency`` clients for ``duration_s``; returns counts and latency stats.

    A *stall* is a request that took longer than ``stall_s`` (whatever its answer): the
    1-in-5,000 ~30 s hang of issue 16 was one.
    """
    latencies: list[float] = []
    all_latencies: list[float] = []
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration_s

    def client(k: int) -> None:
        i = k
        with httpx.Client(base_url=url, headers=headers or {}, timeout=timeout_s) as c:
            while time.perf_counter() < stop_at:
                name, data = images[i % len(images)]
                i += 1
                t0 = time.perf_counter()
                try:
                    r = c.post(endpoint, files={"file": (name, data, "application/octet-stream")})
                    status = str(r.status_code)
                except httpx.HTTPError as err:
                    status = type(err).__name__
                dt = time.perf_counter() - t0
                with lock:
                    statuses[status] += 1
                    all_latencies.append(dt)
                    if status == "200":
                        latencies.append(dt)

    t_start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    lat = np.asarray(latencies) * 1000.0
    n = int(sum(statuses.values()))
    ok = int(statuses.get("200", 0))
    return {
        "concurrency": concurrency,
        "duration_s": round(wall, 2),
        "requests": n,
        "ok": ok,
        "errors": n - ok,
        "status_counts": dict(statuses),
        "throughput_rps": round(ok / wall, 2) if wall > 0 else 0.0,
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
        "latency_ms_mean": round(float(lat.mean()), 1) if lat.size else None,
        "latency_ms_max": round(max(all_latencies) * 1000.0, 1) if all_latencies else None,
        "stalls": int(sum(1 for t in all_latencies if t > stall_s)),
        "stall_s": stall_s,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'clients':>7} {'req':>6} {'err':>5} {'rps':>8} {'p50 ms':>9} {'p99 ms':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        p50 = r["latency_ms_p50"] or float("nan")
        p99 = r["latency_ms_p99"] or float("nan")
        lines.append(
            f"{r['concurrency']:>7} {r['requests']:>6} {r['errors']:>5} "
            f"{r['throughput_rps']:>8.2f} {p50:>9.1f} {p99:>9.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--image", nargs="+", required=True, type=Path, help="image files to upload (cycled)")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per concurrency level")
    ap.add_argument("--endpoint", default="/predict")
    ap.add_argument("--label", default="service")
    ap.add_argument("--api-key", default=os.environ.get("BONEFRAC_API_KEY"))
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of unrecorded load first")
    args = ap.parse_args(argv)
    images = [(p.name, p.read_bytes()) for p in args.image]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    if args.warmup > 0:
        run_load(args.url, images, min(4, max(args.concurrency)), args.warmup, args.endpoint, headers)
    rows = []
    for c in args.concurrency:
        rows.append(run_load(args.url, images, c, args.duration, args.endpoint, headers))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print(format_table(rows))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_DIR / f"service_load-{args.label}-{stamp}.json"
    payload = {"label": args.label, "url": args.url, "endpoint": args.endpoint, "duration_s": args.duration,
               "images": [p.name for p in args.image], "machine": {"cpus": os.cpu_count(),
               "platform": platform.platform()}, "results": rows}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
