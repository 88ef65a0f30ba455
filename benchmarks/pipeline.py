"""Pipeline: a full ``dvc repro`` from scratch, a second (no-op) ``dvc repro``, and validation throughput.

1. The repository (tracked files plus untracked-not-ignored ones, i.e. the work
   in progress) is copied to a temporary folder with ``git init``: no data, no
   models, no DVC cache, as after a fresh clone. A full ``dvc repro`` there is
   timed, stage by stage (from the time each "Running stage" line appears);
   then ``dvc repro`` again, several times (goal: ≤ 5 s, nothing rerun).
2. Ingest + validate on the real FracAtlas images (``../shared/data/fracatlas``),
   in process, with the same calls and settings the ``ingest``/``validate`` flows
   make: images/s for each step and for both together.

    python -m benchmarks.pipeline [--quick] [--skip-repro] [--skip-validation]
        [--repeats 3] [--fracatlas-limit N] [--workers 2] [--keep]

3. ``--preset params/fracatlas.yaml --name pipeline_fracatlas --goal-minutes 60 --goal-rss-gib 6``:
   the same fresh-copy ``dvc repro`` with a preset's params (what ``make run-fracatlas`` runs),
   its wall time and peak RSS (the largest single process of the tree, from ``getrusage``
   of the waited-for children) against goals, with the load average before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from benchmarks._common import (
    REPO_ROOT,
    child_env,
    command_line,
    copy_worktree,
    envelope,
    goal,
    machine_info,
    markdown_table,
    print_goals,
    print_table,
    summarize,
    write_result,
)

NAME = "pipeline"
SECOND_REPRO_GOAL_S = 5.0
FRACATLAS = (REPO_ROOT / ".." / "shared" / "data" / "fracatlas").resolve()
# --quick: a smaller phantom, one epoch of the small custom CNN, fewer bootstrap samples.
QUICK_OVERRIDES: dict[str, Any] = {
    "data": {"phantom": {"n_patients": 24}},
    "model": {"arch": "custom_cnn", "pretrained": "none"},
    "train": {"epochs": 1},
    "evaluate": {"bootstrap_samples": 100, "gradcam_gallery": 2},
}


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=2"]`` → nested overrides; values are parsed as YAML (``null``, ``2``, ``[1]``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set expects KEY=VALUE with a dotted key, got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def write_params(project: Path, overrides: dict[str, Any] | None, source_root: Path = REPO_ROOT) -> None:
    """Apply ``overrides`` to the copy's ``params.yaml`` (validated: a bad key fails here, not mid-run).

    Without overrides the file is left exactly as committed (comments and all).
    A relative ``data.root`` for a source outside the project (FracAtlas) is made
    absolute against the original checkout, since the copy lives elsewhere.
    """
    from bonefrac.config import params_from_dict

    if not overrides:
        return
    path = project / "params.yaml"
    raw = yaml.safe_load(path.read_text()) or {}
    raw = _deep_merge(raw, overrides)
    data = raw.get("data", {})
    root = data.get("root")
    if root and data.get("source", "phantom") != "phantom" and not Path(root).is_absolute():
        data["root"] = str((source_root / root).resolve())
    params_from_dict(raw, str(path))
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _error_line(lines: list[str]) -> str:
    """The line that says what went wrong (dvc's ``ERROR:``), else the last one."""
    errors = [x for x in lines if x.startswith("ERROR") or "error:" in x.lower()]
    return (errors or lines or ["(no output)"])[-1]


def stage_times(lines: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Seconds per stage, from when dvc prints each "Running stage 'x':" line (the last ends at ``end``)."""
    starts: list[tuple[str, float]] = []
    for t, line in lines:
        if line.startswith("Running stage '"):
            starts.append((line.split("'")[1], t))
    out = {}
    for i, (name, t) in enumerate(starts):
        t_next = starts[i + 1][1] if i + 1 < len(starts) else end
        out[name] = t_next - t
    return out


def run_timed_lines(
    cmd: list[str], cwd: Path, env: dict[str, str], timeout: float
) -> tuple[int, float, list[tuple[float, str]]]:
    """Run ``cmd``, timestamping each output line (relative to the start); kill its session on timeout."""
    import os
    import signal
    import subprocess
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**env, "PYTHONUNBUFFERED": "1"},  # lines must arrive when printed for the stage times
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    lines: list[tuple[float, str]] = []

    def _kill() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, _kill)
    timer.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.perf_counter() - t0, line.rstrip("\n")))
    rc = proc.wait()
    timer.cancel()
    return rc, time.perf_counter() - t0, lines


def children_peak_rss_mb() -> float:
    """Largest resident set of any waited-for descendant so far (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def bench_repro(repeats: int, overrides: dict[str, Any] | None, timeout: float, keep: bool) -> dict[str, Any]:
    """Full ``dvc repro`` in a fresh copy, then ``repeats`` second runs. Returns rows + stage times."""
    tmp = Path(tempfile.mkdtemp(prefix="bonefrac-bench-pipeline-"))
    project = tmp / "bonefrac"
    try:
        n_files = copy_worktree(REPO_ROOT, project)
        write_params(project, overrides)
        env = child_env(project)
        dvc = (
            [str(REPO_ROOT / ".venv" / "bin" / "dvc")] if (REPO_ROOT / ".venv/bin/dvc").exists() else ["dvc"]
        )
        print(f"copied {n_files} files to {project}; running a full `dvc repro` (this takes a while)...")
        import os

        load_before = os.getloadavg()
        rc, full_s, lines = run_timed_lines([*dvc, "repro"], project, env, timeout)
        stages = stage_times(lines, full_s)
        out: dict[str, Any] = {
            "full_s": full_s,
            "full_rc": rc,
            "peak_rss_mb": children_peak_rss_mb(),
            "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()),
            "stages": stages,
            "files_copied": n_files,
            "project": str(project) if keep else None,
        }
        for name, s in stages.items():
            print(f"  stage {name:<12} {s:7.1f} s")
        print(f"full dvc repro: {full_s:.1f} s (exit {rc}), peak RSS {out['peak_rss_mb']:.0f} MB, "
              f"load {load_before[0]:.1f} -> {out['loadavg_after'][0]:.1f}")
        (project.parent / "repro.log").write_text("\n".join(f"{t:8.1f} {x}" for t, x in lines))
        if rc != 0:
            out["error"] = (
                f"full `dvc repro` failed: {_error_line([t for _, t in lines])}\nlast output:\n"
                + "\n".join(text for _, text in lines[-25:])
            )
            print(out["error"])
            return out
        second: list[float] = []
        reran: list[str] = []
        for i in range(repeats):
            rc2, s2, lines2 = run_timed_lines([*dvc, "repro"], project, env, timeout)
            if rc2 != 0:
                out["error"] = (
                    f"second `dvc repro` failed: {_error_line([t for _, t in lines2])}\n"
                    + "\n".join(text for _, text in lines2[-15:])
                )
                break
            second.append(s2)
            reran += [text for _, text in lines2 if text.startswith("Running stage '")]
            print(f"second dvc repro #{i + 1}: {s2:.2f} s")
        out["second_s"] = second
        out["second_reran_stages"] = sorted(set(reran))
        return out
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def fracatlas_subset(root: Path, limit: int, dst: Path) -> Path:
    """A FracAtlas-shaped folder of symlinks to ``limit`` images, every k-th of each class (keeps the ratio).

    Symlinks in a temp folder, never copies: the images stay where they are.
    """
    folders = ["Fractured", "Non_fractured"]
    files = {f: sorted((root / "images" / f).glob("*.jpg")) for f in folders}
    total = sum(len(v) for v in files.values())
    step = max(1, total // max(1, limit))
    keep_names: set[str] = set()
    for f, paths in files.items():
        (dst / "images" / f).mkdir(parents=True, exist_ok=True)
        for p in paths[::step]:
            (dst / "images" / f / p.name).symlink_to(p)
            keep_names.add(p.name)
    table = pd.read_csv(root / "dataset.csv", dtype=str, keep_default_na=False)
    table[table["image_id"].isin(keep_names)].to_csv(dst / "dataset.csv", index=False)
    if (root / "annotations").is_dir():
        (dst / "annotations").symlink_to(root / "annotations")
    return dst


def bench_validation(root: Path, repeats: int, limit: int | None, workers: int) -> dict[str, Any]:
    """Ingest + validate ``root`` (FracAtlas) ``repeats`` times, in process, as the flows call them."""
    from bonefrac.config import load_params
    from bonefrac.data.ingest import ingest
    from bonefrac.validation.run import validate_manifest

    vparams = load_params(REPO_ROOT / "params.yaml").validation
    ingest_s: list[float] = []
    validate_s: list[float] = []
    n_images = n_clean = 0
    with tempfile.TemporaryDirectory(prefix="bonefrac-bench-validate-") as tmp:
        tmp_p = Path(tmp)
        src = fracatlas_subset(root, limit, tmp_p / "subset") if limit else root
        for i in range(repeats):
            out = tmp_p / f"run{i}"
            t0 = time.perf_counter()
            table = ingest(
                "fracatlas",
                src,
                out / "ingest" / "manifest.csv",
                use_fracture_types=False,
                deid_dir=out / "ingest" / "deid",
                workers=workers,
            )
            t1 = time.perf_counter()
            result = validate_manifest(
                table,
                vparams,
                out_dir=out / "validated",
                data_docs_dir=out / "reports" / "validation",
                summary_json=out / "metrics" / "validation.json",
            )
            t2 = time.perf_counter()
            ingest_s.append(t1 - t0)
            validate_s.append(t2 - t1)
            n_images, n_clean = len(table), len(result.clean)
            print(
                f"  run {i + 1}: {n_images} images; "
                f"ingest {t1 - t0:.1f} s ({n_images / (t1 - t0):.1f} img/s), "
                f"validate {t2 - t1:.1f} s ({n_images / (t2 - t1):.1f} img/s); {n_clean} clean"
            )
    return {
        "images": n_images,
        "clean": n_clean,
        "ingest_s": ingest_s,
        "validate_s": validate_s,
        "workers": workers,
        "subset": limit,
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smaller phantom + 1 epoch of custom_cnn; 2 second runs; a 150-image FracAtlas subset",
    )
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params key in the copy, e.g. --set train.epochs=2 (repeatable)",
    )
    ap.add_argument("--preset", type=Path, default=None, help="apply a params preset (e.g. params/fracatlas.yaml)")
    ap.add_argument("--name", default=NAME, help="result name: benchmarks/results/NAME.json")
    ap.add_argument("--goal-minutes", type=float, default=None, help="goal for the full repro's wall time")
    ap.add_argument("--goal-rss-gib", type=float, default=None, help="goal for the full repro's peak RSS")
    ap.add_argument("--skip-repro", action="store_true")
    ap.add_argument("--skip-validation", action="store_true")
    ap.add_argument(
        "--repeats", type=int, default=None, help="second-repro and validation repeats (default 3)"
    )
    ap.add_argument("--fracatlas", type=Path, default=FRACATLAS)
    ap.add_argument(
        "--fracatlas-limit", type=int, default=None,
        help="validate a subset of N images; with a FracAtlas --preset, also run the repro on such a subset",
    )
    ap.add_argument("--workers", type=int, default=2, help="ingest decode processes (the ingest flow uses 2)")
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds allowed for one dvc repro")
    ap.add_argument(
        "--keep", action="store_true", help="keep the temporary project copy (its path is printed)"
    )
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    repeats = args.repeats or (2 if args.quick else 3)
    limit = args.fracatlas_limit or (150 if args.quick else None)
    machine = machine_info()
    rows: list[dict[str, Any]] = []
    goals: list[dict[str, Any]] = []
    notes: list[str] = []
    extra: dict[str, Any] = {}

    if not args.skip_repro:
        overrides = _deep_merge(QUICK_OVERRIDES if args.quick else {}, parse_sets(args.sets))
        if args.preset is not None:
            from bonefrac.presets import load_preset

            overrides = _deep_merge(load_preset(args.preset), overrides)
            if args.fracatlas_limit and overrides.get("data", {}).get("source") == "fracatlas":
                # a FracAtlas-shaped subset (symlinks) as the preset's data root
                tmp_root = Path(tempfile.mkdtemp(prefix="fa-subset-"))
                sub = fracatlas_subset(args.fracatlas, args.fracatlas_limit, tmp_root)
                overrides = _deep_merge(overrides, {"data": {"root": str(sub)}})
        repro = bench_repro(repeats, overrides, args.timeout, args.keep)
        repro["overrides"] = overrides
        extra["repro"] = repro
        rows.append(
            {
                "measure": "full dvc repro (fresh copy)",
                "median_s": repro["full_s"],
                "n": 1,
                "ok": repro["full_rc"] == 0,
            }
        )
        for name, s in repro.get("stages", {}).items():
            rows.append({"measure": f"  stage {name}", "median_s": s, "n": 1, "ok": True})
        second = repro.get("second_s") or []
        med2 = summarize(second).median if second else None
        if second:
            s2 = summarize(second)
            rows.append(
                {
                    "measure": "second dvc repro (no changes)",
                    "median_s": s2.median,
                    "iqr_s": s2.iqr,
                    "n": s2.n,
                    "ok": not repro["second_reran_stages"],
                }
            )
        goals.append(goal("second `dvc repro` (no changes)", med2, SECOND_REPRO_GOAL_S, "<=", " s"))
        rows.append({"measure": "peak RSS of one process, MB", "median_s": None, "n": 1, "ok": True,
                     "peak_rss_mb": repro.get("peak_rss_mb")})  # fmt: skip
        if args.goal_minutes is not None:
            goals.append(goal("full dvc repro wall time", repro["full_s"] / 60, args.goal_minutes, "<=", " min"))
        if args.goal_rss_gib is not None:
            rss = repro.get("peak_rss_mb")
            goals.append(goal("peak RSS", None if rss is None else rss / 1024, args.goal_rss_gib, "<=", " GiB"))
        if repro.get("second_reran_stages"):
            notes.append(
                f"the second dvc repro reran {repro['second_reran_stages']}: a stage is not "
                "reproducible (an output or dependency changes on every run)"
            )
        if repro.get("error"):
            notes.append(repro["error"].splitlines()[0])
        if args.quick:
            notes.append(
                f"--quick: params overridden with {QUICK_OVERRIDES} (plus any --set); "
                "the default full repro is without --quick"
            )

    if not args.skip_validation:
        if not args.fracatlas.is_dir():
            notes.append(f"validation throughput skipped: {args.fracatlas} not found")
        else:
            try:
                v = bench_validation(args.fracatlas, repeats, limit, args.workers)
            except ImportError as err:
                notes.append(f"validation throughput skipped: {err} (ingest/validation modules missing)")
            else:
                extra["validation"] = v
                n = v["images"]
                both = [a + b for a, b in zip(v["ingest_s"], v["validate_s"], strict=True)]
                for label, secs in (
                    ("ingest (decode + metadata)", v["ingest_s"]),
                    ("validate (GX checks + Data Docs)", v["validate_s"]),
                    ("ingest + validate", both),
                ):
                    s = summarize([n / t for t in secs])
                    rows.append(
                        {
                            "measure": f"{label}, images/s",
                            "median_images_per_s": s.median,
                            "iqr_images_per_s": s.iqr,
                            "median_s": summarize(secs).median,
                            "n": s.n,
                            "images": n,
                            "ok": True,
                        }
                    )
                notes.append(
                    f"validation on {n} FracAtlas images ({'subset' if limit else 'all'}), "
                    f"{v['clean']} clean, ingest with {v['workers']} worker process(es)"
                )

    result = envelope(
        args.name,
        command_line("benchmarks.pipeline", argv),
        rows,
        machine=machine,
        settings={"repeats": repeats, "quick": args.quick, "fracatlas_limit": limit, "workers": args.workers,
                  "preset": str(args.preset) if args.preset else None},
        goals=goals,
        notes=notes,
        **extra,
    )
    print_table(
        "Pipeline timings (median over repeats)",
        ["measure", "seconds", "images/s", "IQR", "n"],
        [
            [
                r["measure"],
                r.get("median_s"),
                r.get("median_images_per_s"),
                r.get("iqr_images_per_s", r.get("iqr_s")),
                r["n"],
            ]
            for r in rows
        ],
    )
    print_goals(goals)
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {write_result(args.name, result)}")
    return result


def render_markdown(result: dict[str, Any]) -> str:
    from benchmarks._common import bullets, goals_markdown

    parts = [
        markdown_table(
            ["measure", "seconds (median)", "images/s (median)", "IQR", "repeats"],
            [
                [
                    r["measure"],
                    r.get("median_s"),
                    r.get("median_images_per_s"),
                    r.get("iqr_images_per_s", r.get("iqr_s")),
                    r["n"],
                ]
                for r in result["rows"]
            ],
        )
    ]
    if result.get("goals"):
        parts.append(goals_markdown(result["goals"]))
    parts.append(bullets(result.get("notes", [])))
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
