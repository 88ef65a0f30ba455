"""Memory: peak RSS of a training run (goal ≤ 6 GiB for the FracAtlas preset) and of the service under load.

Training: the repository is copied to a temporary folder (as in
``benchmarks.pipeline``), its ``params.yaml`` is the default one with the
``--params`` preset laid over it (``params/fracatlas.yaml`` by default),
``dvc repro preprocess`` builds the tensor cache there, and then the train stage
(``python -m flows.train``, exactly what ``dvc repro`` runs) is started as a
child process. Its peak RSS is read two ways: ``ru_maxrss`` from ``wait4`` (the
kernel's high-water mark of the largest process) and a 0.2 s psutil sampler summing
the whole process tree (data-loader workers, Prefect's server).

Service: ``bentoml serve bonefrac.serving.service:FractureService`` with
``BONEFRAC_MODEL_PATH`` pointing at a bundle (``--bundle``, else ``models/model.pt``,
else a random-weight bundle of the params' architecture), RSS of its process
tree when idle and under ``--clients`` concurrent clients posting images.

    python -m benchmarks.memory [--quick] [--params params/fracatlas.yaml] [--epochs 2]
        [--project DIR] [--skip-train] [--skip-service] [--bundle PATH] [--clients 8] [--duration 20]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from benchmarks._common import (
    GIB,
    REPO_ROOT,
    RssSampler,
    bullets,
    child_env,
    command_line,
    copy_worktree,
    envelope,
    goal,
    goals_markdown,
    machine_info,
    markdown_table,
    print_goals,
    print_table,
    python_exe,
    run_child,
    write_result,
)
from benchmarks._servers import ServerError, bentoml_server, random_bundle, test_png
from benchmarks.pipeline import QUICK_OVERRIDES, _deep_merge, parse_sets, write_params

NAME = "memory"
TRAIN_GOAL_GIB = 6.0
DEFAULT_PRESET = REPO_ROOT / "params" / "fracatlas.yaml"


# ------------------------------------------------------------------- training
def train_overrides(
    preset: Path | None, epochs: int | None, quick: bool, sets: dict[str, Any] | None = None
) -> dict[str, Any]:
    over: dict[str, Any] = {}
    if preset is not None:
        over = yaml.safe_load(preset.read_text()) or {}
    if quick:
        over = _deep_merge(over, QUICK_OVERRIDES)
    if epochs:
        over = _deep_merge(over, {"train": {"epochs": epochs}})
    return _deep_merge(over, sets or {})


def bench_train(
    preset: Path | None,
    epochs: int | None,
    quick: bool,
    project: Path | None,
    timeout: float,
    keep: bool,
    sets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Prepare the cache in a copy (or reuse ``project``), then measure the train stage alone."""
    tmp: Path | None = None
    if project is None:
        tmp = Path(tempfile.mkdtemp(prefix="bonefrac-bench-memory-"))
        project = tmp / "bonefrac"
        copy_worktree(REPO_ROOT, project)
    overrides = train_overrides(preset, epochs, quick, sets)
    try:
        write_params(project, overrides)
        env = child_env(project)
        out: dict[str, Any] = {"project": str(project), "overrides": overrides}
        # Always: a no-op in seconds when a reused project's cache is up to date with its params.
        print(f"preparing the tensor cache: dvc repro preprocess in {project} ...")
        dvc = str(REPO_ROOT / ".venv" / "bin" / "dvc")
        prep = run_child(
            [dvc if Path(dvc).exists() else "dvc", "repro", "preprocess"], project, env, timeout=timeout
        )
        out["prepare_s"] = prep.wall_s
        if not prep.ok:
            out["error"] = (
                f"dvc repro preprocess failed (exit {prep.returncode}):\n{prep.output_tail[-2500:]}"
            )
            return out
        print("training (python -m flows.train) with RSS sampling ...")
        run = run_child([python_exe(), "-m", "flows.train", "params.yaml"], project, env, timeout=timeout)
        out.update(
            {
                "train_s": run.wall_s,
                "returncode": run.returncode,
                "timed_out": run.timed_out,
                "maxrss_bytes": run.maxrss_bytes,
                "peak_tree_bytes": run.peak_tree_bytes,
                "peak_single_bytes": run.peak_single_bytes,
            }
        )
        if not run.ok:
            out["error"] = f"train stage failed (exit {run.returncode}):\n{run.output_tail[-2500:]}"
        return out
    finally:
        if tmp is not None and not keep:
            shutil.rmtree(tmp, ignore_errors=True)


# -------------------------------------------------------------------- service
def bench_service(
    bundle: Path | None, clients: int, duration: float, startup_timeout: float
) -> dict[str, Any]:
    """RSS of the ``bentoml serve`` process tree idle and under ``clients`` concurrent /predict callers."""
    import httpx

    try:
        import bonefrac.serving.service  # noqa: F401  (fails fast if serving is not ready)
    except Exception as err:
        return {
            "skipped": f"serving not importable ({type(err).__name__}: {err}); service memory not measured"
        }
    with tempfile.TemporaryDirectory(prefix="bonefrac-bench-service-") as tmp:
        work = Path(tmp)
        if bundle is None:
            default = REPO_ROOT / "models" / "model.pt"
            bundle = default if default.exists() else random_bundle(work / "model.pt")
        try:
            server = bentoml_server(bundle, work, timeout=startup_timeout)
            with server as srv:
                with RssSampler(srv.proc.pid, interval=0.2) as idle:
                    time.sleep(3.0)
                png = test_png()
                counts = {"ok": 0, "error": 0}
                failures: dict[str, str] = {}  # status (or exception) -> first response text
                lock = threading.Lock()
                stop_at = time.perf_counter() + duration

                def client() -> None:
                    with httpx.Client(timeout=120) as c:
                        while time.perf_counter() < stop_at:
                            try:
                                r = c.post(f"{srv.url}/predict", files={"file": ("x.png", png, "image/png")})
                                key = "ok" if r.status_code == 200 else "error"
                                why = str(r.status_code)
                                text = r.text[:300]
                            except httpx.HTTPError as err:
                                key, why, text = "error", type(err).__name__, str(err)[:300]
                            with lock:
                                counts[key] += 1
                                if key == "error":
                                    failures.setdefault(why, text)

                with RssSampler(srv.proc.pid, interval=0.2) as load:
                    threads = [threading.Thread(target=client) for _ in range(clients)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                return {
                    "bundle": str(bundle),
                    "ready_s": srv.ready_s,
                    "clients": clients,
                    "duration_s": duration,
                    "requests_ok": counts["ok"],
                    "requests_failed": counts["error"],
                    "failures": failures,
                    "idle_tree_bytes": idle.peak_tree_bytes,
                    "load_peak_tree_bytes": load.peak_tree_bytes,
                    "load_peak_single_bytes": load.peak_single_bytes,
                }
        except ServerError as err:
            return {"error": str(err)}


# ----------------------------------------------------------------------- main
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="training on a small phantom with custom_cnn, 1 epoch; 4 clients for 8 s",
    )
    ap.add_argument(
        "--params",
        type=Path,
        default=None,
        help="preset laid over params.yaml (default params/fracatlas.yaml; --quick: none)",
    )
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="override train.epochs (default 2: the peak is reached within the first epochs)",
    )
    ap.add_argument(
        "--project",
        type=Path,
        default=None,
        help="reuse a prepared project copy (e.g. from `benchmarks.pipeline --keep`)",
    )
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params key for training, e.g. --set train.batch_size=16 (repeatable)",
    )
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-service", action="store_true")
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--duration", type=float, default=None, help="seconds of load")
    ap.add_argument("--timeout", type=float, default=7200.0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary project copy")
    return ap.parse_args(argv)


def _gib(b: int | None) -> float | None:
    return None if not b else b / GIB


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    preset = args.params if args.params is not None else (None if args.quick else DEFAULT_PRESET)
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else 2)
    clients = args.clients or (4 if args.quick else 8)
    duration = args.duration or (8.0 if args.quick else 20.0)
    machine = machine_info()
    rows: list[dict[str, Any]] = []
    goals: list[dict[str, Any]] = []
    notes: list[str] = []
    extra: dict[str, Any] = {}

    if not args.skip_train:
        tr = bench_train(
            preset, epochs, args.quick, args.project, args.timeout, args.keep, parse_sets(args.sets)
        )
        extra["train"] = tr
        label = (
            f"training ({preset.name if preset else 'params.yaml'}{', quick' if args.quick else ''}, "
            f"{epochs} epoch(s))"
        )
        if "maxrss_bytes" in tr:
            rows.append(
                {
                    "process": label,
                    "peak_rss_gib": _gib(tr["maxrss_bytes"]),
                    "peak_tree_gib": _gib(tr["peak_tree_bytes"]),
                    "seconds": tr["train_s"],
                    "ok": not tr.get("error"),
                }
            )
        if tr.get("error"):
            notes.append(tr["error"].splitlines()[0])
            print(tr["error"])
        is_fracatlas = preset is not None and "fracatlas" in preset.name and not args.quick
        if is_fracatlas:
            goals.append(
                goal(
                    "peak RSS of training, FracAtlas preset (GiB)",
                    _gib(tr.get("maxrss_bytes")),
                    TRAIN_GOAL_GIB,
                    "<=",
                    " GiB",
                )
            )
        notes.append(f"training overrides: {tr.get('overrides')}")
    if not args.skip_service:
        sv = bench_service(args.bundle, clients, duration, startup_timeout=300.0)
        extra["service"] = sv
        if sv.get("skipped") or sv.get("error"):
            msg = sv.get("skipped") or sv["error"]
            notes.append(msg.splitlines()[0])
            print(f"service: {msg}")
        else:
            rows.append(
                {
                    "process": "service, idle (bentoml serve tree)",
                    "peak_rss_gib": None,
                    "peak_tree_gib": _gib(sv["idle_tree_bytes"]),
                    "seconds": sv["ready_s"],
                    "ok": True,
                }
            )
            rows.append(
                {
                    "process": f"service, {clients} clients × {duration:.0f} s "
                    f"({sv['requests_ok']} ok, {sv['requests_failed']} failed)",
                    "peak_rss_gib": _gib(sv["load_peak_single_bytes"]),
                    "peak_tree_gib": _gib(sv["load_peak_tree_bytes"]),
                    "seconds": duration,
                    "ok": sv["requests_failed"] == 0,
                }
            )
            notes.append(f"service bundle: {sv['bundle']}")
            for why, text in sv.get("failures", {}).items():
                notes.append(f"failed requests ({why}): {text}")
    notes.append(
        "peak_rss = largest single process (train: kernel ru_maxrss via wait4; service: sampled); "
        "peak_tree = largest sampled sum over the process tree (counts shared pages once per process)"
    )
    result = envelope(
        NAME,
        command_line("benchmarks.memory", argv),
        rows,
        machine=machine,
        settings={
            "preset": str(preset) if preset else None,
            "epochs": epochs,
            "quick": args.quick,
            "clients": clients,
            "duration_s": duration,
        },
        goals=goals,
        notes=notes,
        **extra,
    )
    print_table(
        "Peak memory",
        ["process", "peak RSS GiB", "tree GiB", "seconds"],
        [[r["process"], r["peak_rss_gib"], r["peak_tree_gib"], r["seconds"]] for r in rows],
    )
    print_goals(goals)
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {write_result(NAME, result)}")
    return result


def render_markdown(result: dict[str, Any]) -> str:
    parts = [
        markdown_table(
            ["process", "peak RSS GiB (largest process)", "peak GiB (process tree)", "seconds"],
            [[r["process"], r["peak_rss_gib"], r["peak_tree_gib"], r["seconds"]] for r in result["rows"]],
        )
    ]
    if result.get("goals"):
        parts.append(goals_markdown(result["goals"]))
    parts.append(bullets(result.get("notes", [])))
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
