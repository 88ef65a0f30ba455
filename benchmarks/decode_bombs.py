"""Six worst-case uploads at once: the service front end's peak RSS, and whether it shrinks back.

Against a real ``bentoml serve`` (default settings: ``max_pixels`` 60 M, ``max_decoded_mb``
1024, a decode slot per core), three bursts of six concurrent ``POST /predict``:

1. **RGBA at the decode budget**: a real 8-bit RGBA PNG whose header-estimated decode
   need is just under ``max_decoded_mb`` (~5,180² px; a few hundred KB on the wire);
   accepted, decoded, windowed, scored.
2. **gray at the decode budget**: a real 8-bit gray PNG, likewise (~6,980² px).
3. **the issue's bomb**: 7,700² RGBA (59 Mpx, ~1.6 GB to decode): refused from its header.

The front-end worker's RSS is sampled every 50 ms: idle before each burst, the peak
during it, and the settled value 8 s after its last answer. The bound the service
states (``bonefrac.serving.decode_gate``): idle + ``max_decoded_mb`` + the bodies in flight.

    python -m benchmarks.decode_bombs [--quick]
"""

from __future__ import annotations

import argparse
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks._common import (
    command_line,
    envelope,
    fmt,
    goal,
    goals_markdown,
    markdown_table,
    print_goals,
    write_result,
)
from benchmarks._servers import bentoml_server, random_bundle, test_png

NAME = "decode_bombs"
MB = 1024 * 1024
GIB = 1024 * MB


def png_stripes(width: int, height: int, colour: int) -> bytes:
    """A real PNG (every row present) that compresses to almost nothing: one gradient row, then "Up" rows.

    Not constant (it passes the content check), so the service decodes, windows and scores it.
    """
    channels = {0: 1, 6: 4}[colour]
    x = np.arange(width, dtype=np.float64)
    row = np.empty((width, channels), np.uint8)
    row[:, 0] = (40 + 180 * x / width).astype(np.uint8)
    if channels == 4:
        row[:, 1] = row[:, 0]
        row[:, 2] = row[:, 0]
        row[:, 3] = 255
    z = zlib.compressobj(6)
    parts = [z.compress(b"\x00" + row.tobytes())]
    up = b"\x02" + bytes(width * channels)
    for _ in range(height - 1):
        parts.append(z.compress(up))
    parts.append(z.flush())

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def front_end_pid(server_pid: int) -> int:
    """The public service's worker process (not the model worker, not the arbiter)."""
    import psutil

    for p in psutil.Process(server_pid).children(recursive=True):
        cmd = " ".join(p.cmdline())
        if "_bentoml_impl.worker.service" in cmd and "bonefrac_model" not in cmd:
            return p.pid
    raise RuntimeError("front-end worker not found")


class Sampler:
    def __init__(self, pid: int, interval: float = 0.05) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter(), self.proc.memory_info().rss))
            except Exception:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def between(self, t0: float, t1: float) -> list[int]:
        return [r for t, r in self.samples if t0 <= t <= t1]


def burst(url: str, data: bytes, n: int, timeout: float = 300.0) -> list[tuple[int, float]]:
    """``n`` concurrent uploads of ``data``; (status, seconds) each."""
    out: list[tuple[int, float]] = []
    lock = threading.Lock()

    def one() -> None:
        t0 = time.perf_counter()
        try:
            r = httpx.post(f"{url}/predict", files={"file": ("x.png", data, "image/png")}, timeout=timeout)
            status = r.status_code
        except httpx.HTTPError:
            status = -1
        with lock:
            out.append((status, time.perf_counter() - t0))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="three uploads per burst instead of six")
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--settle", type=float, default=8.0, help="seconds after a burst before the settled RSS")
    args = ap.parse_args(argv)
    n = 3 if args.quick else args.concurrency
    from bonefrac.config import ServingParams

    defaults = ServingParams()
    budget = int(defaults.max_decoded_mb * MB)
    from bonefrac.inference.upload_policy import decode_memory_estimate

    def side_at_budget(colour: int) -> int:  # the largest square the header estimate admits
        per_px = decode_memory_estimate(png_stripes(100, 100, colour), "png") / 100**2  # type: ignore[operator]
        return min(int((budget / per_px) ** 0.5) - 1, int(defaults.max_pixels**0.5))

    side_rgba, side_gray = side_at_budget(6), side_at_budget(0)
    print(f"building uploads: RGBA {side_rgba}², gray {side_gray}², bomb 7700² RGBA", flush=True)
    uploads = {
        f"RGBA {side_rgba}² at the decode budget": png_stripes(side_rgba, side_rgba, 6),
        f"gray {side_gray}² at the decode budget": png_stripes(side_gray, side_gray, 0),
        "7700² RGBA (the issue's bomb)": png_stripes(7700, 7700, 6),
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bonefrac-bench-bombs-") as tmp:
        work = Path(tmp)
        bundle = random_bundle(work / "model.pt")
        with bentoml_server(bundle, work, {"BONEFRAC_BACKEND": "torch"}) as srv:
            pid = front_end_pid(srv.proc.pid)
            warm = httpx.post(f"{srv.url}/predict", files={"file": ("w.png", test_png(512))}, timeout=120)
            assert warm.status_code == 200, warm.text
            with Sampler(pid) as s:
                for label, data in uploads.items():
                    time.sleep(2.0)
                    t_idle = time.perf_counter()
                    time.sleep(1.0)
                    t0 = time.perf_counter()
                    answers = burst(srv.url, data, n)
                    t1 = time.perf_counter()
                    time.sleep(args.settle)
                    t2 = time.perf_counter()
                    idle = int(np.median(s.between(t_idle, t0)))
                    peak = max(s.between(t0, t1 + 0.5))
                    settled = int(np.median(s.between(t2 - 1.0, t2)))
                    statuses = sorted(st for st, _ in answers)
                    row = {
                        "upload": label,
                        "bytes": len(data),
                        "concurrent": n,
                        "statuses": statuses,
                        "seconds_max": max(t for _, t in answers),
                        "idle_gib": idle / GIB,
                        "peak_gib": peak / GIB,
                        "peak_over_idle_mib": (peak - idle) / MB,
                        "settled_gib": settled / GIB,
                        "settled_over_idle_mib": (settled - idle) / MB,
                    }
                    rows.append(row)
                    print(f"  {label}: {row}", flush=True)
            healthy = httpx.get(f"{srv.url}/readyz", timeout=10).status_code == 200
    worst = max(rows, key=lambda r: r["peak_over_idle_mib"])
    goals = [
        goal("front-end peak RSS over idle, worst burst (MiB)", worst["peak_over_idle_mib"],
             defaults.max_decoded_mb, "<="),
        goal("front-end RSS 8 s after the burst, over idle (MiB)",
             max(r["settled_over_idle_mib"] for r in rows), 256, "<="),
    ]
    notes = [
        f"bound stated by the service: idle + max_decoded_mb ({defaults.max_decoded_mb:g} MiB) + the bodies in "
        "flight; the decode gate admits decodes while their header estimates sum to at most max_decoded_mb",
        f"/readyz after the bursts: {'200' if healthy else 'not 200'}",
        "before this change (issue 16): six 7700² RGBA PNGs took the front end from 2.2 to 5.5 GB and it did "
        "not shrink back",
    ]
    argv_used = list(argv) if argv is not None else sys.argv[1:]
    result = envelope(NAME, command_line("benchmarks.decode_bombs", argv_used), rows,
                      settings={"concurrency": n, "max_decoded_mb": defaults.max_decoded_mb,
                                "max_pixels": defaults.max_pixels, "settle_s": args.settle},
                      goals=goals, notes=notes)
    path = write_result(NAME, result)
    print_goals(goals)
    print(f"wrote {path}")
    return result


def render_markdown(result: dict[str, Any]) -> str:
    head = ["upload (6 at once)", "KB on the wire", "answers", "slowest s", "idle GiB", "peak GiB",
            "peak − idle MiB", "8 s later GiB", "later − idle MiB"]
    table = [[r["upload"], fmt(r["bytes"] / 1024), " ".join(map(str, r["statuses"])), fmt(r["seconds_max"]),
              fmt(r["idle_gib"]), fmt(r["peak_gib"]), fmt(r["peak_over_idle_mib"]), fmt(r["settled_gib"]),
              fmt(r["settled_over_idle_mib"])] for r in result["rows"]]
    return "\n".join([
        "Front-end worker RSS (the public service process; the model worker is separate), sampled every 50 ms.",
        "",
        markdown_table(head, table),
        "",
        goals_markdown(result["goals"]),
        "",
        *[f"- {n}" for n in result["notes"]],
    ])


if __name__ == "__main__":
    main()
