"""This machine's measured fp32 matrix-multiply peak (FLOP/s) with torch, on 1 thread and on all threads.

The datasheet peak of a shared, virtualised CPU says little; what a model can
reach is bounded by what ``torch.mm`` reaches here, now. The peak is the best
median over a few square sizes (small ones are limited by overheads, big ones
by memory), and the inference benchmark divides its FLOP/s by it.

    python -m benchmarks.matmul_peak [--quick] [--threads 1 2] [--sizes 512 1024 2048] [--repeats 7]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks._common import (
    command_line,
    envelope,
    machine_info,
    print_table,
    rates,
    summarize,
    time_repeats,
    write_result,
)

NAME = "matmul_peak"
DEFAULT_SIZES = (256, 512, 1024, 2048)
QUICK_SIZES = (512, 1024)


def all_threads() -> int:
    """Cores this process may use (the affinity mask, not the host's count)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def measure(threads: int, sizes: Sequence[int], repeats: int, min_time: float = 0.2) -> list[dict[str, Any]]:
    """Median FLOP/s of ``torch.mm`` on fp32 square matrices, one row per size."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        gen = torch.Generator().manual_seed(0)
        for n in sizes:
            a = torch.randn(n, n, generator=gen)
            b = torch.randn(n, n, generator=gen)
            c = torch.empty(n, n)
            per_call, calls = time_repeats(
                lambda a=a, b=b, c=c: torch.mm(a, b, out=c), repeats=repeats, warmup=2, min_time=min_time
            )
            s = summarize(rates(per_call, 2.0 * n**3))
            rows.append(
                {
                    "threads": threads,
                    "size": n,
                    "gflops_median": s.median / 1e9,
                    "gflops_iqr": s.iqr / 1e9,
                    "repeats": s.n,
                    "calls_per_repeat": calls,
                }
            )
    finally:
        torch.set_num_threads(previous)
    return rows


def peak_flops(threads: int, sizes: Sequence[int] = QUICK_SIZES, repeats: int = 3) -> float:
    """The measured peak in FLOP/s at ``threads`` (best median over ``sizes``)."""
    return max(r["gflops_median"] for r in measure(threads, sizes, repeats)) * 1e9


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.matmul_peak", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="sizes 512 and 1024, 3 repeats")
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="thread counts to measure (default: 1 and all usable cores)",
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=None)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = args.threads or sorted({1, all_threads()})
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    repeats = args.repeats or (3 if args.quick else 7)
    machine = machine_info()
    rows = [r for t in threads for r in measure(t, sizes, repeats)]
    peaks = {str(t): max(r["gflops_median"] for r in rows if r["threads"] == t) * 1e9 for t in threads}
    notes = []
    if len(threads) > 1 and "1" in peaks:
        top = str(max(threads))
        notes.append(f"scaling {top} threads / 1 thread: {peaks[top] / peaks['1']:.2f}x (same run)")
    result = envelope(
        NAME,
        command_line("benchmarks.matmul_peak", argv),
        rows,
        settings={"sizes": list(sizes), "repeats": repeats, "threads": threads, "dtype": "float32"},
        notes=notes,
        machine=machine,
        peak_flops=peaks,
    )
    print_table(
        "fp32 torch.mm throughput (median over repeats)",
        ["threads", "n", "GFLOP/s", "IQR"],
        [[r["threads"], r["size"], r["gflops_median"], r["gflops_iqr"]] for r in rows],
        caption="peak: " + ", ".join(f"{t} thr {v / 1e9:.1f} GFLOP/s" for t, v in peaks.items()),
    )
    for n in notes:
        print(n)
    print(f"wrote {write_result(NAME, result)}")
    return result


def render_markdown(result: dict[str, Any]) -> str:
    from benchmarks._common import markdown_table

    peaks = result.get("peak_flops", {})
    lines = [
        markdown_table(
            ["threads", "matrix n", "GFLOP/s (median)", "IQR"],
            [[r["threads"], r["size"], r["gflops_median"], r["gflops_iqr"]] for r in result["rows"]],
        )
    ]
    lines.append(
        "Measured peak (best median): "
        + ", ".join(f"{t} thread(s): **{v / 1e9:.1f} GFLOP/s**" for t, v in peaks.items())
    )
    lines += [f"- {n}" for n in result.get("notes", [])]
    return "\n\n".join(lines)


if __name__ == "__main__":
    main()
