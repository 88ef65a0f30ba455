"""This machine's measured fp32 matrix-multiply peak (FLOP/s), on 1 thread and on all threads.

The datasheet peak of a shared, virtualised CPU says little; what a model can
reach is bounded by what a GEMM reaches here, now. Three libraries are timed
side by side, taking turns: ``torch.mm`` (MKL, what eager PyTorch uses),
``numpy.matmul`` (OpenBLAS) and an ONNX Runtime ``MatMul`` (MLAS, what the ONNX
backend uses). MKL is known to take slower code paths on AMD CPUs, so torch's
number alone can sit below what ONNX Runtime's convolutions reach; the
machine's peak is the best median over the libraries and a few square sizes
(small ones are limited by overheads, big ones by memory). The inference
benchmark divides its FLOP/s by that peak.

    python -m benchmarks.matmul_peak [--quick] [--threads 1 2] [--sizes 512 1024 2048] [--repeats 7]
        [--libs torch numpy onnxruntime]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from benchmarks._common import (
    command_line,
    envelope,
    machine_info,
    print_table,
    rates,
    summarize,
    time_interleaved,
    write_result,
)

NAME = "matmul_peak"
DEFAULT_SIZES = (256, 512, 1024, 2048)
QUICK_SIZES = (512, 1024)
LIBS = ("torch", "numpy", "onnxruntime")


def all_threads() -> int:
    """Cores this process may use (the affinity mask, not the host's count)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's and the BLAS libraries' thread pools set to ``n`` for the duration."""
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(previous)


def _ort_matmul(n: int, threads: int) -> Callable[[np.ndarray, np.ndarray], Any]:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])
    b = helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])
    c = helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "mm", [a, b], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    return lambda x, y: sess.run(None, {"A": x, "B": y})


def _callables(n: int, threads: int, libs: Sequence[str]) -> dict[str, Callable[[], Any]]:
    gen = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    c = torch.empty(n, n)
    an, bn = a.numpy().copy(), b.numpy().copy()
    cn = np.empty((n, n), dtype=np.float32)
    fns: dict[str, Callable[[], Any]] = {}
    for lib in libs:
        if lib == "torch":
            fns[lib] = lambda: torch.mm(a, b, out=c)
        elif lib == "numpy":
            fns[lib] = lambda: np.matmul(an, bn, out=cn)
        elif lib == "onnxruntime":
            run = _ort_matmul(n, threads)
            fns[lib] = lambda run=run: run(an, bn)
        else:
            raise ValueError(f"unknown library {lib!r}; choose from {LIBS}")
    return fns


def measure(
    threads: int, sizes: Sequence[int], repeats: int, min_time: float = 0.2, libs: Sequence[str] = LIBS
) -> list[dict[str, Any]]:
    """Median FLOP/s of an fp32 square matmul, one row per (library, size); libraries take turns."""
    rows = []
    with _threads(threads):
        for n in sizes:
            timed = time_interleaved(
                _callables(n, threads, libs), repeats=repeats, warmup=2, min_time=min_time
            )
            for lib, (per_call, calls) in timed.items():
                s = summarize(rates(per_call, 2.0 * n**3))
                rows.append(
                    {
                        "library": lib,
                        "threads": threads,
                        "size": n,
                        "gflops_median": s.median / 1e9,
                        "gflops_iqr": s.iqr / 1e9,
                        "repeats": s.n,
                        "calls_per_repeat": calls,
                    }
                )
    return rows


def peak_from_rows(rows: Sequence[dict[str, Any]], threads: int, library: str | None = None) -> float:
    """Best median FLOP/s at ``threads`` (over sizes, and over libraries unless one is named)."""
    vals = [r["gflops_median"] for r in rows if r["threads"] == threads and library in (None, r["library"])]
    return max(vals) * 1e9


def peak_flops(
    threads: int, sizes: Sequence[int] = QUICK_SIZES, repeats: int = 3
) -> tuple[float, dict[str, float]]:
    """The measured peak in FLOP/s at ``threads`` and each library's own best, measured now."""
    rows = measure(threads, sizes, repeats)
    return peak_from_rows(rows, threads), {lib: peak_from_rows(rows, threads, lib) for lib in LIBS}


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
    ap.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = args.threads or sorted({1, all_threads()})
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    repeats = args.repeats or (3 if args.quick else 7)
    machine = machine_info()
    rows = [r for t in threads for r in measure(t, sizes, repeats, libs=args.libs)]
    peaks = {str(t): peak_from_rows(rows, t) for t in threads}
    by_lib = {str(t): {lib: peak_from_rows(rows, t, lib) for lib in args.libs} for t in threads}
    notes = []
    for t in threads:
        best = max(by_lib[str(t)], key=by_lib[str(t)].get)  # type: ignore[arg-type]
        notes.append(
            f"{t} thread(s): best library {best}; "
            + ", ".join(f"{lib} {v / 1e9:.1f}" for lib, v in by_lib[str(t)].items())
            + " GFLOP/s"
        )
    if len(threads) > 1 and "1" in peaks:
        top = str(max(threads))
        notes.append(f"scaling {top} threads / 1 thread: {peaks[top] / peaks['1']:.2f}x (same run)")
    result = envelope(
        NAME,
        command_line("benchmarks.matmul_peak", argv),
        rows,
        settings={
            "sizes": list(sizes),
            "repeats": repeats,
            "threads": threads,
            "libs": args.libs,
            "dtype": "float32",
        },
        notes=notes,
        machine=machine,
        peak_flops=peaks,
        peak_flops_by_library=by_lib,
    )
    print_table(
        "fp32 matmul throughput (median over repeats)",
        ["library", "threads", "n", "GFLOP/s", "IQR"],
        [[r["library"], r["threads"], r["size"], r["gflops_median"], r["gflops_iqr"]] for r in rows],
        caption="peak: " + ", ".join(f"{t} thr {v / 1e9:.1f} GFLOP/s" for t, v in peaks.items()),
    )
    for n in notes:
        print(n)
    print(f"wrote {write_result(NAME, result)}")
    return result


def render_markdown(result: dict[str, Any]) -> str:
    from benchmarks._common import bullets, markdown_table

    peaks = result.get("peak_flops", {})
    lines = [
        markdown_table(
            ["library", "threads", "matrix n", "GFLOP/s (median)", "IQR"],
            [
                [r.get("library", "torch"), r["threads"], r["size"], r["gflops_median"], r["gflops_iqr"]]
                for r in result["rows"]
            ],
        )
    ]
    lines.append(
        "Measured peak (best median over libraries and sizes): "
        + ", ".join(f"{t} thread(s): **{v / 1e9:.1f} GFLOP/s**" for t, v in peaks.items())
    )
    lines.append(bullets(result.get("notes", [])))
    return "\n\n".join(lines)


if __name__ == "__main__":
    main()
