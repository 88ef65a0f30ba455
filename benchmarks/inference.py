"""Model inference: eager PyTorch vs ONNX Runtime vs torch.compile, for each architecture in the registry.

For every architecture (``bonefrac.model.networks.ARCHS``), input size (224 px
and the pipeline's 128 px; 3D nets get the pipeline's volume size) and batch
size, each backend runs side by side in the same process, on the same input,
with the same thread count. Reported: images/s (median over repeats, warm-up
excluded), FLOPs per image (``FlopCounterMode``), the FLOP/s reached and its
fraction of this machine's fp32 matmul peak measured in the same run, the
speed-up over eager, the one-off cost (ONNX export, torch.compile's first call
per shape) and the largest logit difference from eager.

    python -m benchmarks.inference [--quick] [--archs resnet18 custom_cnn] [--batches 1 8 32]
        [--sizes 224 128] [--backends eager onnx compile] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import (
    bullets,
    command_line,
    count_flops,
    envelope,
    machine_info,
    markdown_table,
    print_table,
    rates,
    ratio,
    summarize,
    time_interleaved,
    write_result,
)
from benchmarks.matmul_peak import all_threads, peak_flops

NAME = "inference"
BACKENDS = ("eager", "onnx", "compile")
QUICK_ARCHS = ("custom_cnn", "resnet18")
NUM_TYPES = 3  # a multi-task head like the phantom preset's; the head's cost is negligible either way


def registry_archs() -> list[str]:
    from bonefrac.model.networks import ARCHS

    return list(ARCHS)


def is_3d(arch: str) -> bool:
    return arch.startswith("monai_") and arch.endswith("3d")


def default_sizes() -> list[int]:
    """224 px (the common ImageNet size) and the pipeline's own ``preprocess.image_size``."""
    sizes = [224]
    with contextlib.suppress(Exception):
        from bonefrac.config import load_params, project_root

        sizes.append(load_params(project_root() / "params.yaml").preprocess.image_size)
    return sorted(set(sizes), reverse=True) if len(sizes) > 1 else [224, 128]


def default_volume() -> tuple[int, int, int]:
    with contextlib.suppress(Exception):
        from bonefrac.config import load_params, project_root

        return tuple(load_params(project_root() / "params.yaml").preprocess.volume_size)  # type: ignore[return-value]
    return (32, 64, 64)


def build(arch: str) -> torch.nn.Module:
    from bonefrac.model.networks import build_model

    return build_model(
        arch, num_types=NUM_TYPES, pretrained="none", dropout=0.0, spatial_dims=3 if is_3d(arch) else 2
    ).eval()


def export_onnx(model: torch.nn.Module, path: Path, example: torch.Tensor) -> Path:
    """The project's exporter when present (what the service ships), else the TorchScript-based one."""
    try:
        from bonefrac.inference.onnx_export import export_onnx as project_export
    except ImportError:
        project_export = None
    if project_export is not None:
        return project_export(model, path, example)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
        )
    return path


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _input_label(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape[2:]) if len(shape) == 5 else str(shape[-1])


class ArchBench:
    """All backends of one architecture; the expensive set-up (export, compile) is done once."""

    def __init__(self, arch: str, backends: Sequence[str], threads: int, workdir: Path) -> None:
        self.arch = arch
        self.backends = list(backends)
        self.threads = threads
        self.workdir = workdir
        self.model = build(arch)
        self.setup_errors: dict[str, str] = {}
        self.compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        if "compile" in self.backends:
            self.compiled = torch.compile(self.model)
        self.sessions: dict[tuple[int, ...], Any] = {}
        self.export_s: dict[tuple[int, ...], float] = {}

    def onnx(self, sample_shape: tuple[int, ...]) -> Any:
        """One ONNX file per input size (dynamic batch axis), exported on first use."""
        if sample_shape not in self.sessions:
            path = self.workdir / f"{self.arch}_{'x'.join(map(str, sample_shape))}.onnx"
            t0 = time.perf_counter()
            export_onnx(self.model, path, torch.rand(1, *sample_shape))
            self.export_s[sample_shape] = time.perf_counter() - t0
            self.sessions[sample_shape] = ort_session(path, self.threads)
        return self.sessions[sample_shape]

    def runner(self, backend: str, x: torch.Tensor) -> tuple[Callable[[], Any], float | None]:
        """(a zero-argument call to time, one-off set-up seconds for this shape or None)."""
        if backend == "eager":

            def call() -> Any:
                with torch.inference_mode():
                    return self.model(x)

            return call, None
        if backend == "onnx":
            sample = tuple(x.shape[1:])
            fresh = sample not in self.sessions
            sess = self.onnx(sample)
            feed = {sess.get_inputs()[0].name: x.numpy()}
            return (lambda: sess.run(None, feed)[0]), (self.export_s[sample] if fresh else None)
        if backend == "compile":
            assert self.compiled is not None
            compiled = self.compiled

            def call_c() -> Any:
                with torch.no_grad():
                    return compiled(x)

            t0 = time.perf_counter()
            call_c()  # the first call per shape compiles (or recompiles with a dynamic batch axis)
            return call_c, time.perf_counter() - t0
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")


def _as_numpy(out: Any) -> np.ndarray:
    return out.detach().float().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


def bench_arch(
    arch: str,
    sizes: Sequence[int],
    volume: tuple[int, int, int],
    batches: Sequence[int],
    backends: Sequence[str],
    repeats: int,
    threads: int,
    peak: float,
    min_time: float,
    budget_s: float,
    workdir: Path,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    bench = ArchBench(arch, backends, threads, workdir)
    build_s = time.perf_counter() - t0
    sample_shapes = [(1, *volume)] if is_3d(arch) else [(1, s, s) for s in sizes]
    gen = torch.Generator().manual_seed(0)
    for sample in sample_shapes:
        flops_per_image = count_flops(bench.model, torch.rand(1, *sample, generator=gen))
        for batch in batches:
            x = torch.rand(batch, *sample, generator=gen)
            with torch.inference_mode():
                reference = bench.model(x).float().numpy()
            base = {
                "arch": arch,
                "input": _input_label((batch, *sample)),
                "batch": batch,
                "threads": threads,
                "gflops_per_image": flops_per_image / 1e9,
                "build_s": build_s,
            }
            calls: dict[str, Callable[[], Any]] = {}
            extra: dict[str, dict[str, Any]] = {}
            for backend in backends:  # set-up (export, compile) first, so timing can interleave
                try:
                    call, setup_s = bench.runner(backend, x)
                    diff = float(np.max(np.abs(_as_numpy(call()) - reference)))
                except Exception as err:  # one backend failing must not lose the others' numbers
                    error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                    log(f"  {arch} {base['input']} b{batch} {backend}: FAILED {error}")
                    extra[backend] = {"error": error}
                    continue
                calls[backend] = call
                extra[backend] = {"setup_s": setup_s, "max_abs_logit_diff": diff}
            timed = time_interleaved(calls, repeats=repeats, warmup=1, min_time=min_time, budget_s=budget_s)
            eager_rate = summarize(rates(timed["eager"][0], batch)).median if "eager" in timed else None
            for backend in backends:
                row = {**base, "backend": backend, **extra[backend]}
                if backend in timed:
                    per_call, k = timed[backend]
                    s = summarize(rates(per_call, batch))
                    achieved = s.median * flops_per_image
                    row.update(
                        {
                            "images_per_s": s.median,
                            "images_per_s_iqr": s.iqr,
                            "repeats": s.n,
                            "calls_per_repeat": k,
                            "ms_per_batch": 1000 * batch / s.median,
                            "gflops_achieved": achieved / 1e9,
                            "peak_fraction": achieved / peak if peak else None,
                            "speedup_vs_eager": ratio(s.median, eager_rate),
                        }
                    )
                    setup = row.get("setup_s")
                    log(
                        f"  {arch:<18} {row['input']:>9} b{batch:<3} {backend:<8} {s.median:8.1f} img/s "
                        f"(IQR {s.iqr:.1f}, n={s.n}x{k})  {100 * (row['peak_fraction'] or 0):5.1f}% of peak"
                        + (f"  setup {setup:.1f}s" if setup else "")
                    )
                rows.append(row)
    return rows


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {', '.join(QUICK_ARCHS)}; 128 px; batches 1 and 8; 3 repeats; eager and onnx",
    )
    ap.add_argument("--archs", nargs="+", default=None, help="default: every architecture in the registry")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 8 32")
    ap.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="2D input sizes in px (default: 224 and params' preprocess.image_size)",
    )
    ap.add_argument(
        "--backends",
        nargs="+",
        default=None,
        choices=BACKENDS,
        help="default: all three; --quick leaves out compile (minutes per shape on 2 busy cores)",
    )
    ap.add_argument("--repeats", type=int, default=None, help="repeats per measurement (default 5; quick 3)")
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="intra-op threads for torch and ORT (default: all)",
    )
    ap.add_argument("--min-time", type=float, default=None, help="seconds per repeat at least (default 0.5)")
    ap.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="seconds of timing per (arch, input, batch), all backends: slow calls get fewer "
        "repeats (never under 3)",
    )
    ap.add_argument(
        "--warm-compile-cache",
        action="store_true",
        help="reuse torch.compile's on-disk cache (default: a fresh one, so compile times are cold)",
    )
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    archs = args.archs or (list(QUICK_ARCHS) if args.quick else registry_archs())
    unknown = sorted(set(archs) - set(registry_archs()))
    if unknown:
        raise SystemExit(f"error: unknown architecture(s) {unknown}; the registry has {registry_archs()}")
    batches = args.batches or ([1, 8] if args.quick else [1, 8, 32])
    sizes = args.sizes or ([128] if args.quick else default_sizes())
    repeats = args.repeats or (3 if args.quick else 5)
    min_time = args.min_time if args.min_time is not None else (0.2 if args.quick else 0.5)
    thread_counts = args.threads or [all_threads()]
    backends = args.backends or (["eager", "onnx"] if args.quick else list(BACKENDS))
    volume = default_volume()
    machine = machine_info()

    rows: list[dict[str, Any]] = []
    peaks: dict[str, float] = {}
    peaks_by_lib: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bonefrac-bench-inference-") as tmp:
        if "compile" in backends and not args.warm_compile_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        for threads in thread_counts:
            torch.set_num_threads(threads)
            print(f"measuring the fp32 matmul peak at {threads} thread(s)...")
            peak, peak_by_lib = peak_flops(threads)
            peaks[str(threads)], peaks_by_lib[str(threads)] = peak, peak_by_lib
            print(
                f"peak: {peak / 1e9:.1f} GFLOP/s ("
                + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peak_by_lib.items())
                + ")"
            )
            for arch in archs:
                print(f"{arch} ({threads} thread(s)):")
                rows += bench_arch(
                    arch,
                    sizes,
                    volume,
                    batches,
                    backends,
                    repeats,
                    threads,
                    peak,
                    min_time,
                    args.budget,
                    Path(tmp),
                )
                torch._dynamo.reset()  # free compiled graphs between architectures
    last = thread_counts[-1]
    peak_after, _ = peak_flops(last)
    notes = [
        f"matmul peak at {last} thread(s) measured before and after that part of the run: "
        f"{peaks[str(last)] / 1e9:.1f} and {peak_after / 1e9:.1f} GFLOP/s (fractions use the first; a large "
        "gap means the machine's load changed). The peak is the best of torch (MKL), numpy (OpenBLAS) "
        "and ONNX Runtime (MLAS) matmuls: "
        + "; ".join(
            f"{t} thread(s): " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in by.items())
            for t, by in peaks_by_lib.items()
        )
        + " GFLOP/s",
        "FLOPs count convolutions and matrix multiplications only (FlopCounterMode), a multiply-add as 2.",
        "setup_s: ONNX export time (first use of an input size) or torch.compile's first call "
        "for that shape.",
    ]
    result = envelope(
        NAME,
        command_line("benchmarks.inference", argv),
        rows,
        machine=machine,
        settings={
            "archs": archs,
            "batches": batches,
            "sizes": sizes,
            "volume": list(volume),
            "backends": backends,
            "repeats": repeats,
            "threads": thread_counts,
            "min_time_s": min_time,
            "budget_s": args.budget,
            "num_types": NUM_TYPES,
            "cold_compile_cache": not args.warm_compile_cache,
        },
        notes=notes,
        peak_flops=peaks,
        peak_flops_by_library=peaks_by_lib,
        peak_flops_end=peak_after,
        summary=summarize_backends(rows),
    )
    print_table(
        "Inference, images/s (median); peak "
        + ", ".join(f"{t} thr {v / 1e9:.1f}" for t, v in peaks.items())
        + " GFLOP/s",
        [
            "arch",
            "thr",
            "input",
            "batch",
            "backend",
            "img/s",
            "IQR",
            "GFLOP/img",
            "% peak",
            "× eager",
            "setup s",
        ],
        [
            [
                r["arch"],
                r["threads"],
                r["input"],
                r["batch"],
                r["backend"],
                r.get("images_per_s"),
                r.get("images_per_s_iqr"),
                r["gflops_per_image"],
                None if r.get("peak_fraction") is None else 100 * r["peak_fraction"],
                r.get("speedup_vs_eager"),
                r.get("setup_s") or r.get("error"),
            ]
            for r in rows
        ],
    )
    for line in result["summary"]["lines"]:
        print(line)
    print(f"wrote {write_result(NAME, result)}")
    return result


def _geomean(values: Sequence[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


def summarize_backends(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Geometric-mean speed-ups across the measured configurations: each backend over eager, and
    (when several thread counts ran) the most threads over one thread, per backend."""
    out: dict[str, Any] = {"lines": []}
    thread_counts = sorted({r["threads"] for r in rows})
    for t in thread_counts:
        for backend in BACKENDS[1:]:
            sp = [
                r["speedup_vs_eager"]
                for r in rows
                if r["backend"] == backend and r["threads"] == t and r.get("speedup_vs_eager")
            ]
            if sp:
                g = _geomean(sp)
                out[f"{backend}_geomean_speedup_{t}t"] = g
                out["lines"].append(
                    f"{backend} vs eager at {t} thread(s): geometric-mean speed-up {g:.2f}x over {len(sp)} "
                    f"configurations (min {min(sp):.2f}x, max {max(sp):.2f}x)"
                )
    if len(thread_counts) > 1:
        lo, hi = thread_counts[0], thread_counts[-1]
        key = lambda r: (r["arch"], r["input"], r["batch"], r["backend"])  # noqa: E731
        low = {key(r): r["images_per_s"] for r in rows if r["threads"] == lo and r.get("images_per_s")}
        for backend in BACKENDS:
            sp = [
                r["images_per_s"] / low[key(r)]
                for r in rows
                if r["threads"] == hi and r["backend"] == backend and r.get("images_per_s") and key(r) in low
            ]
            if sp:
                out["lines"].append(
                    f"{backend}: {hi} threads vs {lo}: geometric-mean {_geomean(sp):.2f}x "
                    f"(min {min(sp):.2f}x, max {max(sp):.2f}x)"
                )
    best = max((r for r in rows if r.get("peak_fraction")), key=lambda r: r["peak_fraction"], default=None)
    if best:
        out["lines"].append(
            f"highest fraction of peak: {100 * best['peak_fraction']:.1f}% "
            f"({best['arch']} {best['input']} b{best['batch']} {best['backend']}, "
            f"{best['threads']} thread(s))"
        )
    return out


def render_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    table = markdown_table(
        [
            "arch",
            "threads",
            "input",
            "batch",
            "backend",
            "images/s (median)",
            "IQR",
            "GFLOP/image",
            "% of peak",
            "× eager",
            "set-up s",
            "max abs Δlogit",
        ],
        [
            [
                r["arch"],
                r["threads"],
                r["input"],
                r["batch"],
                r["backend"],
                r.get("images_per_s"),
                r.get("images_per_s_iqr"),
                r["gflops_per_image"],
                None if r.get("peak_fraction") is None else 100 * r["peak_fraction"],
                r.get("speedup_vs_eager"),
                r.get("setup_s"),
                r.get("max_abs_logit_diff") if "error" not in r else r["error"],
            ]
            for r in rows
        ],
    )
    peaks = result.get("peak_flops")
    if isinstance(peaks, (int, float)):  # results written before per-thread peaks
        peaks = {str(result["settings"].get("threads")): peaks}
    head = (
        "Measured fp32 matmul peak in this run: "
        + ", ".join(f"{t} thread(s) **{v / 1e9:.1f} GFLOP/s**" for t, v in (peaks or {}).items())
        + "."
    )
    lines = [head, table, bullets([*result.get("summary", {}).get("lines", []), *result.get("notes", [])])]
    return "\n\n".join(x for x in lines if x)


if __name__ == "__main__":
    main()
