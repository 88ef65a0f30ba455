"""Service: BentoML vs the same model in-process vs a naive FastAPI server, 1–64 clients, one command.

Same machine, same model file, same images, one after the other in one run:

1. **in-process (raw)**: the backend the service picks (``select_backend``, as
   ``FractureModel`` does) called directly on batches of ``max_batch_size``:
   model only (images already preprocessed), and end to end (decode + preprocess +
   model + calibration, one process).
2. **BentoML**: ``bentoml serve`` of the project's service, once per front-end
   worker count in ``--front-workers`` (the tuning knob), closed-loop clients
   posting images to ``/predict`` at each level of ``--concurrency``.
3. **naive**: FastAPI + eager PyTorch, one image per request (``benchmarks/naive_fastapi.py``).

Images: ``--images`` files, else 16 real FracAtlas radiographs when
``../shared/data/fracatlas`` exists, else synthetic PNGs. Goals (issue #8):
service ≥ 0.8× raw, ≥ 2× naive, p99 ≤ 2× p50 at saturation.

    python -m benchmarks.service [--quick] [--arch efficientnet_lite0] [--image-size 128]
        [--concurrency 1 2 4 8 16 32 64] [--duration 15] [--front-workers 1 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
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
    machine_info,
    markdown_table,
    print_goals,
    summarize,
    write_result,
)
from benchmarks._servers import ServerError, bentoml_server, naive_server, random_bundle, test_png
from benchmarks.service_load import run_load

NAME = "service"
FRACATLAS = REPO_ROOT.parent / "shared" / "data" / "fracatlas"


def pick_images(paths: Sequence[Path] | None, n: int = 16) -> list[tuple[str, bytes]]:
    if paths:
        return [(p.name, p.read_bytes()) for p in paths]
    files = sorted((FRACATLAS / "images").rglob("*.jpg")) if FRACATLAS.is_dir() else []
    if files:
        step = max(1, len(files) // n)
        return [(p.name, p.read_bytes()) for p in files[::step][:n]]
    return [(f"synthetic{i}.png", test_png(512 + 64 * i)) for i in range(4)]


def in_process(
    bundle_path: Path, images: list[tuple[str, bytes]], batch: int, seconds: float, reduced_decode: bool
) -> dict[str, Any]:
    """Raw throughput of the service's own backend, called in-process (no HTTP, no batching queue).

    End to end is the service's own per-request pipeline in one process: the same upload
    policy, the same JPEG decode as the served service (the scale the bundle's preprocessing
    defines; for a version-1 bundle reduced DCT scale only when ``reduced_decode``, i.e.
    ``serving.reduced_jpeg_decode``, is on for the servers too),
    preprocessing, the image statistics the prediction log records, the model on batches
    with the embedding output the model worker returns, the per-image OOD check when the
    bundle carries a detector, calibration. "Model only" is that same forward pass (logits +
    embedding) on preprocessed batches: the served model's raw throughput.
    """
    from bonefrac.inference.backends import default_device, select_backend
    from bonefrac.inference.upload_policy import SafetyLimits, decode_upload, upload_decode_hints
    from bonefrac.model.bundle import ModelBundle
    from bonefrac.monitoring.ood import OODDetector
    from bonefrac.monitoring.prediction_log import image_statistics
    from bonefrac.serving.upload_ood import decoded_image_ood_features

    bundle = ModelBundle.load(bundle_path)
    choice = select_backend(bundle, "auto", default_device())
    hint, _ = upload_decode_hints(bundle.preprocess_spec, reduced_decode)  # the service's own rule
    limits = SafetyLimits()

    ood_dict = bundle.describe().get("ood")
    detector = OODDetector.from_dict(ood_dict) if ood_dict else None
    forward = choice.runner.with_embedding  # what ServedModel.infer runs in the model worker

    def prepare(data: bytes) -> np.ndarray:
        x, _ = prepare_with_features(data)
        return x

    def prepare_with_features(data: bytes) -> tuple[np.ndarray, dict[str, float] | None]:
        img = decode_upload(data, bundle.spatial_dims, limits, max_side_hint=hint)
        x = bundle.preprocess(img.array).numpy()
        image_statistics(img)
        return x, decoded_image_ood_features(img) if detector is not None else None

    pre = np.stack([prepare(d) for _, d in images])
    reps = int(np.ceil(batch / len(pre)))
    x = np.concatenate([pre] * reps)[:batch]

    def rate(fn: Any) -> list[float]:
        fn()  # warm-up
        out, t_end = [], time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(out) < 3:
            t0 = time.perf_counter()
            fn()
            out.append(batch / (time.perf_counter() - t0))
        return out

    def end_to_end() -> None:
        prepared = [prepare_with_features(images[i % len(images)][1]) for i in range(batch)]
        logits, emb = forward(np.stack([p for p, _ in prepared]))
        if detector is not None:
            for (_, feats), e in zip(prepared, np.asarray(emb).reshape(batch, -1), strict=True):
                if feats is not None:
                    detector.score(feats, e)
        bundle.calibrate(np.asarray(logits))

    model_only = summarize(rate(lambda: forward(x)))
    e2e = summarize(rate(end_to_end))
    return {
        "backend": choice.name,
        "backend_reason": choice.reason,
        "batch": batch,
        "model_only_ips": model_only.median,
        "model_only_iqr": model_only.iqr,
        "end_to_end_ips": e2e.median,
        "end_to_end_iqr": e2e.iqr,
        "ood_check": detector is not None,
    }


def load_levels(
    url: str, images: list[tuple[str, bytes]], levels: Sequence[int], duration: float, soak: float = 0.0,
    stall_s: float = 5.0, soak_requests: int = 0,
) -> list[dict]:
    """Closed-loop load at each level, then an optional soak at the peak level.

    The soak lasts ``soak`` seconds, or longer when ``soak_requests`` asks for a total request
    count (levels + soak): the stall goal names a count, and a fixed duration falls short of it
    whenever the service is slower than the run that chose the duration (10 % margin).
    """
    run_load(url, images, max(levels[0], 2), 3.0)  # warm-up: ONNX sessions, batch-size estimator
    rows = []

    def report(r: dict) -> None:
        print(
            f"  {r['concurrency']:>3} clients: {r['throughput_rps']:7.2f} req/s  p50 {r['latency_ms_p50']} ms  "
            f"p99 {r['latency_ms_p99']} ms  max {r['latency_ms_max']} ms  errors {r['errors']}  "
            f"stalls {r['stalls']}",
            flush=True,
        )

    for c in levels:
        rows.append(run_load(url, images, c, duration, stall_s=stall_s))
        report(rows[-1])
    if soak > 0 or soak_requests > 0:
        best = max(rows, key=lambda r: r["throughput_rps"])
        missing = soak_requests - sum(r["requests"] for r in rows)
        if missing > 0 and best["throughput_rps"] > 0:
            soak = max(soak, 1.1 * missing / best["throughput_rps"])
        print(f"  soak of {soak:.0f} s at {best['concurrency']} clients...", flush=True)
        r = {**run_load(url, images, best["concurrency"], soak, stall_s=stall_s), "soak": True}
        rows.append(r)
        print("  soak:", end="")
        report(r)
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 levels × 5 s, one worker setting: a smoke run")
    ap.add_argument("--arch", default=None, help="architecture of the random-weight bundle (default: params')")
    ap.add_argument("--image-size", type=int, default=None, help="bundle input size (default: params')")
    ap.add_argument("--bundle", type=Path, default=None, help="serve this bundle instead of random weights")
    ap.add_argument("--images", type=Path, nargs="+", default=None)
    ap.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 1 2 4 8 16 32 64")
    ap.add_argument("--duration", type=float, default=None, help="seconds per level (default 15)")
    ap.add_argument("--front-workers", type=int, nargs="+", default=None, help="BentoML front workers (default 1 2)")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-latency-ms", type=int, default=None, help="default: params.yaml's serving value")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--result-name", default=NAME, help="results/<name>.json (a second configuration kept beside "
                    "the main one; `run_all` renders only the main one)")
    ap.add_argument("--reduced-decode", choices=["on", "off"], default=None,
                    help="serving.reduced_jpeg_decode for the service and the in-process pipeline alike "
                         "(default: params.yaml's)")
    ap.add_argument("--soak-requests", type=int, default=0,
                    help="make the soak (of the first BentoML setting) long enough for this many requests in "
                         "all, levels included (the stall goal needs 20,000)")
    ap.add_argument("--soak", type=float, default=0.0,
                    help="seconds of extra load at the peak level of the first BentoML setting, counting stalls")
    ap.add_argument("--stall-s", type=float, default=5.0, help="a request slower than this is a stall")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    machine = machine_info()  # the load *before* this run's own servers add to it
    levels = args.concurrency or ([1, 8] if args.quick else [1, 2, 4, 8, 16, 32, 64])
    duration = args.duration or (5.0 if args.quick else 15.0)
    workers = args.front_workers or ([1] if args.quick else [1, 2])
    images = pick_images(args.images)
    if args.reduced_decode is None:  # what the service does by default
        from bonefrac.config import load_params

        reduced = load_params(REPO_ROOT / "params.yaml").serving.reduced_jpeg_decode
    else:
        reduced = args.reduced_decode == "on"
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bonefrac-bench-service-") as tmp:
        work = Path(tmp)
        bundle = args.bundle or random_bundle(work / "model.pt", args.arch, args.image_size)
        from bonefrac.model.bundle import ModelBundle

        b = ModelBundle.load(bundle)
        print(f"model {b.arch} at {b.preprocess_spec.image_size} px; {len(images)} images", flush=True)
        raw = in_process(bundle, images, args.max_batch_size, 3.0 if args.quick else 10.0, reduced)
        print(f"in-process ({raw['backend']}): model only {raw['model_only_ips']:.1f} img/s, "
              f"end to end {raw['end_to_end_ips']:.1f} img/s", flush=True)
        servers: list[tuple[str, Any]] = []
        for w in workers:
            env = {"BONEFRAC_WORKERS": str(w), "BONEFRAC_MAX_BATCH_SIZE": str(args.max_batch_size),
                   "BONEFRAC_REDUCED_JPEG_DECODE": "true" if reduced else "false"}
            if args.max_latency_ms:
                env["BONEFRAC_MAX_LATENCY_MS"] = str(args.max_latency_ms)
            servers.append((f"bentoml-{w}w", lambda env=env: bentoml_server(bundle, work, env)))
        soaks = {servers[0][0]: args.soak} if servers else {}
        if not args.skip_naive:
            servers.append(("naive", lambda: naive_server(bundle, work)))
        for label, start in servers:
            print(f"{label}:", flush=True)
            try:
                with start() as srv:
                    soak_s, soak_n = soaks.get(label, 0.0), args.soak_requests if label in soaks else 0
                    for r in load_levels(srv.url, images, levels, duration, soak_s, args.stall_s, soak_n):
                        rows.append({"server": label, **r})
                    if label.startswith("bentoml"):  # kept: the stall investigation reads it
                        log_copy = REPO_ROOT / "benchmarks" / "results" / f"{args.result_name}-{label}.log"
                        log_copy.write_bytes(srv.log.read_bytes()[-300_000:])
            except ServerError as err:
                notes.append(f"{label} failed: {err}")
                print(f"  failed: {err}", flush=True)

    def peak(label: str) -> dict[str, Any] | None:
        mine = [r for r in rows if r["server"] == label and r["ok"] and not r.get("soak")]
        return max(mine, key=lambda r: r["throughput_rps"]) if mine else None

    best_label = max(
        (lbl for lbl, _ in servers if lbl.startswith("bentoml") and peak(lbl)),
        key=lambda lbl: peak(lbl)["throughput_rps"],  # type: ignore[index]
        default=None,
    )
    best, naive = (peak(best_label) if best_label else None), peak("naive")
    sat = None
    if best_label:  # saturation: the highest level whose throughput is within 5 % of the peak
        mine = [r for r in rows if r["server"] == best_label and r["ok"] and not r.get("soak")]
        sat = max((r for r in mine if r["throughput_rps"] >= 0.95 * best["throughput_rps"]),  # type: ignore[index]
                  key=lambda r: r["concurrency"])
    bento_rps = best["throughput_rps"] if best else None
    bento_rows = [r for r in rows if r["server"].startswith("bentoml")]
    n_bento = sum(r["requests"] for r in bento_rows)
    stalls = sum(r.get("stalls", 0) for r in bento_rows)
    goals = [
        goal("service / in-process same pipeline (serving overhead)", _ratio(bento_rps, raw["end_to_end_ips"]),
             0.9, ">="),
        goal("service / raw in-process (model only)", _ratio(bento_rps, raw["model_only_ips"]), 0.8, ">="),
        goal("service / naive FastAPI (peak req/s)", _ratio(bento_rps, naive and naive["throughput_rps"]), 2.0, ">="),
        goal("p99 / p50 at saturation", _ratio(sat and sat["latency_ms_p99"], sat and sat["latency_ms_p50"]), 2, "<="),
        goal(f"stalls (> {args.stall_s:g} s) over >= 20,000 BentoML requests", stalls if n_bento >= 20_000 else None,
             0, "<="),
    ]
    notes.append(f"BentoML requests in this run: {n_bento:,}; stalls (> {args.stall_s:g} s): {stalls}; "
                 f"slowest: {max((r.get('latency_ms_max') or 0 for r in bento_rows), default=0):,.0f} ms")
    notes.append(
        f"in-process end to end (decode + preprocess + model, one process): {raw['end_to_end_ips']:.1f} img/s; "
        f"service / that: {fmt(_ratio(bento_rps, raw['end_to_end_ips']))}×"
    )
    if best_label:
        notes.append(f"best BentoML setting: {best_label} (peak at {best['concurrency']} clients); "  # type: ignore[index]
                     f"saturation level used for p99/p50: {sat['concurrency']} clients")  # type: ignore[index]
    argv_used = list(argv) if argv is not None else sys.argv[1:]
    result = envelope(
        NAME,
        command_line("benchmarks.service", argv_used),
        rows,
        settings={"levels": levels, "duration_s": duration, "front_workers": workers, "arch": b.arch,
                  "image_size": b.preprocess_spec.image_size, "n_images": len(images),
                  "images": [n for n, _ in images], "max_batch_size": args.max_batch_size,
                  "reduced_jpeg_decode": reduced,
                  "preprocess_version": b.preprocess_spec.version,
                  "decode_side_hint": b.preprocess_spec.decode_side_hint,
                  "weights": "random weights" if args.bundle is None else f"trained bundle {args.bundle.name}"},
        goals=goals,
        notes=notes,
        raw=raw,
        machine=machine,
    )
    path = write_result(args.result_name, result)
    print_goals(goals)
    print(f"wrote {path}")
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else float(a) / float(b)


def _decode_note(s: dict[str, Any]) -> str:
    """How JPEGs were decoded in this run (older runs recorded less)."""
    if s.get("decode_side_hint"):
        return (f"; JPEG decoded at the scale the model's preprocessing (version {s['preprocess_version']}) "
                f"defines, shortest side >= {s['decode_side_hint']} px, in the service, the in-process "
                "pipeline and the naive server alike.")
    if "reduced_jpeg_decode" not in s:
        return "."
    how = "at reduced DCT scale" if s["reduced_jpeg_decode"] else "at full resolution"
    return f"; JPEG decode {how} in the service and the in-process pipeline alike."


def render_markdown(result: dict[str, Any]) -> str:
    s, raw = result["settings"], result["raw"]
    servers = list(dict.fromkeys(r["server"] for r in result["rows"]))
    by = {(r["server"], r["concurrency"]): r for r in result["rows"] if not r.get("soak")}
    soaks = [r for r in result["rows"] if r.get("soak")]
    head = ["clients"] + [f"{sv} req/s · p50/p99 ms" for sv in servers]
    table = []
    for c in s["levels"]:
        cells = [c]
        for sv in servers:
            r = by.get((sv, c))
            cells.append(
                "—" if r is None else
                f"{fmt(r['throughput_rps'])} · {fmt(r['latency_ms_p50'])}/{fmt(r['latency_ms_p99'])}"
                + (f" ({r['errors']} err)" if r["errors"] else "")
            )
        table.append(cells)
    return "\n".join([
        f"Model: {s['arch']} ({s.get('weights', 'random weights')}) at {s['image_size']} px; "
        f"{s['n_images']} images cycled; {s['duration_s']:.0f} s per level after a warm-up; "
        f"max batch {s['max_batch_size']}" + _decode_note(s),
        "",
        f"In-process raw baseline ({raw['backend']}, batch {raw['batch']}; {raw['backend_reason']}): "
        f"model only **{fmt(raw['model_only_ips'])} img/s**; decode + preprocess + model in one process "
        f"{fmt(raw['end_to_end_ips'])} img/s.",
        "",
        markdown_table(head, table),
        *[f"\nSoak ({r['server']}, {r['concurrency']} clients, {fmt(r['duration_s'])} s): {r['requests']:,} requests, "
          f"{fmt(r['throughput_rps'])} req/s, p50/p99/max {fmt(r['latency_ms_p50'])}/{fmt(r['latency_ms_p99'])}/"
          f"{fmt(r.get('latency_ms_max'))} ms, {r['errors']} errors, {r.get('stalls', 0)} stalls." for r in soaks],
        "",
        goals_markdown(result["goals"]),
        "",
        *[f"- {n}" for n in result["notes"]],
    ])


if __name__ == "__main__":
    main()
