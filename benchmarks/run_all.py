"""Run every benchmark present, one after the other, then rewrite ``BENCHMARKS.md`` from the JSON results.

Each benchmark runs as its own process (``python -m benchmarks.<name>``) so one
crash or a leaked thread pool cannot skew the next; a failure is reported and
the rest still run. ``BENCHMARKS.md`` is made of marked sections
(``<!-- section:NAME -->`` … ``<!-- /section:NAME -->``): a section is rewritten
only when its benchmark has a result, so numbers filled in by hand or by
another run (e.g. ``fracatlas_training``) are kept.

    python -m benchmarks.run_all [--quick] [--only inference pipeline] [--skip memory] [--render-only]
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._common import (
    BENCH_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    child_env,
    fmt,
    generic_markdown,
    load_result,
    machine_line,
    markdown_table,
    python_exe,
    run_child,
)

DOC = REPO_ROOT / "BENCHMARKS.md"


@dataclass(frozen=True)
class Bench:
    section: str  # section name in BENCHMARKS.md
    module: str  # benchmarks.<module>; "" for a section filled only from a result file
    title: str
    results: tuple[str, ...]  # result names to look for, first found wins
    what: str  # one line: what it compares


BENCHES: tuple[Bench, ...] = (
    Bench(
        "matmul_peak",
        "matmul_peak",
        "Matrix-multiply peak (fp32)",
        ("matmul_peak",),
        'fp32 `torch.mm` FLOP/s on 1 thread and all threads (the reference for "% of peak")',
    ),
    Bench(
        "inference",
        "inference",
        "Model inference: eager vs ONNX Runtime vs torch.compile",
        ("inference",),
        "eager PyTorch vs ONNX Runtime vs torch.compile, every registry architecture, batch 1/8/32, "
        "224 px and 128 px",
    ),
    Bench(
        "service",
        "service",
        "Service: BentoML vs in-process vs naive FastAPI",
        ("service",),
        "BentoML service vs the model called in-process vs naive FastAPI, 1–64 clients",
    ),
    Bench(
        "decode_bombs",
        "decode_bombs",
        "Service under six concurrent worst-case uploads: front-end memory",
        ("decode_bombs",),
        "peak and settled RSS of the service front end under six decode bombs at once",
    ),
    Bench(
        "draft_decode",
        "draft_decode",
        "Reduced-scale JPEG decode vs full resolution (FracAtlas)",
        ("draft_decode",),
        "decode + preprocess time, |Δp| and AUROC of a fitted probe, full vs 1/2–1/8 DCT-scaled decode",
    ),
    Bench(
        "train_input",
        "train_input",
        "Training input pipeline: cached tensors vs decoding",
        ("train_input",),
        "epoch time on cached tensors vs decoding every epoch; share of time waiting for data",
    ),
    Bench(
        "pipeline",
        "pipeline",
        "Pipeline: dvc repro and validation throughput",
        ("pipeline",),
        "full `dvc repro` in a fresh copy, a second `dvc repro`, ingest + validate images/s on FracAtlas",
    ),
    Bench(
        "memory",
        "memory",
        "Memory: training and service peak RSS",
        ("memory",),
        "peak RSS of training (FracAtlas preset) and of the service under load",
    ),
    Bench("drift", "drift_detector", "Drift detector", ("drift_detector", "drift"), "the drift detector"),
    Bench(
        "ingest_incremental",
        "ingest_incremental",
        "Incremental ingest: one changed image in 1,000",
        ("ingest_incremental",),
        "ingest rerun after one of 1,000 phantom images changed: no cache vs cold vs warm per-file cache",
    ),
    Bench(
        "huge_pages",
        "huge_pages",
        "Huge pages for PyTorch's CPU tensors",
        ("huge_pages",),
        "`THP_MEM_ALLOC_ENABLE` off vs on (what `import bonefrac` sets): 512 px trunk, stitched map, phantom step",
    ),
    Bench(
        "omp_wait",
        "omp_wait",
        "OpenMP wait policy with two torch processes on two cores",
        ("omp_wait",),
        "libgomp default (spin) vs `OMP_WAIT_POLICY=PASSIVE` (`make test`): Lite0 training steps alone and in pairs",
    ),
    Bench(
        "prefect_flow_start",
        "prefect_flow_start",
        "A stage's Prefect flow: its own temporary server vs a running one",
        ("prefect_flow_start",),
        "a fresh process running a one-task flow with Prefect's ephemeral server vs on `bonefrac run`'s local server",
    ),
    Bench(
        "fracatlas_training",
        "",
        "FracAtlas training (filled by the lead)",
        ("fracatlas_training",),
        "training on the FracAtlas preset",
    ),
)

PREAMBLE = """# Benchmarks

Measured on this project's own machine; every number below comes from a command
you can rerun. Each benchmark is one command (`python -m benchmarks.<name>`) that
prints a table and writes `benchmarks/results/<name>.json`; `make bench`
(= `python -m benchmarks.run_all`) runs them all and rewrites the sections of
this file from those results. Numbers are **medians over repeated runs** (IQR
beside them); ratios (speed-ups, fractions of peak) come from measurements made
side by side in the same run, taking turns, so a busy neighbour slows every
contender alike. The machine is shared: each section gives the load average
when its run started.

{table}

`--quick` on any of them is a smoke run (fewer architectures, sizes and repeats) that proves the
command works; the numbers worth quoting come from the full runs.
"""


def preamble() -> str:
    rows = [
        [b.title.split(":")[0], f"`python -m benchmarks.{b.module}`", b.what] for b in BENCHES if b.module
    ]
    rows.append(
        [
            "everything",
            "`python -m benchmarks.run_all [--quick]`",
            "all of the above present; rewrites this file",
        ]
    )
    return PREAMBLE.format(table=markdown_table(["benchmark", "command", "what it compares"], rows))


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- section:{name} -->", f"<!-- /section:{name} -->"


def replace_section(text: str, name: str, body: str) -> str:
    """Put ``body`` between the markers of section ``name`` (appended at the end when missing)."""
    start, end = section_markers(name)
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _m: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def module_present(module: str) -> bool:
    return bool(module) and (BENCH_DIR / f"{module}.py").exists()


def accepts_quick(module: str) -> bool:
    """Pass ``--quick`` only to benchmarks that take it (other helpers' scripts may not)."""
    return "--quick" in (BENCH_DIR / f"{module}.py").read_text(errors="replace")


def find_result(bench: Bench, results_dir: Path = RESULTS_DIR) -> dict[str, Any] | None:
    for name in bench.results:
        result = load_result(name, results_dir)
        if result is not None:
            return result
    return None


def render_section(bench: Bench, result: dict[str, Any]) -> str:
    body = None
    if module_present(bench.module):
        try:
            mod = importlib.import_module(f"benchmarks.{bench.module}")
            if hasattr(mod, "render_markdown"):
                body = mod.render_markdown(result)
        except Exception as err:  # a broken renderer must not lose the numbers
            body = f"_(renderer failed: {type(err).__name__}: {err})_\n\n" + generic_markdown(result)
    if body is None:
        body = generic_markdown(result)
    head = [f"## {bench.title}", ""]
    if result.get("command"):
        head.append(f"Command: `{result['command']}`  ")
    if result.get("created"):
        head.append(f"Run: {result['created']}  ")
    if result.get("machine"):
        head.append(f"Machine: {machine_line(result['machine'])}")
    return "\n".join(head) + "\n\n" + body


def placeholder(bench: Bench) -> str:
    how = (
        f"run `python -m benchmarks.{bench.module}`"
        if bench.module
        else f"write `benchmarks/results/{bench.results[0]}.json` (the common result layout, see "
        "`benchmarks/_common.py`)"
    )
    return f"## {bench.title}\n\n_Not measured yet: {how}._"


def goals_section(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for section, result in results.items():
        for g in result.get("goals") or []:
            verdict = {True: "met", False: "**not met**", None: "not measured"}[g.get("met")]
            unit = g.get("unit", "")
            rows.append(
                [
                    section,
                    g["name"],
                    f"{g['op']} {fmt(g['target'])}{unit}",
                    f"{fmt(g.get('value'))}{unit if g.get('value') is not None else ''}",
                    verdict,
                ]
            )
    if not rows:
        return "## Goals\n\n_No goals measured yet._"
    return "## Goals\n\n" + markdown_table(
        ["benchmark", "goal", "target", "measured (median)", "verdict"], rows
    )


def render_document(existing: str | None, results_dir: Path = RESULTS_DIR) -> str:
    """The new BENCHMARKS.md: sections with results rewritten, the others kept (or placeholders)."""
    text = existing if existing and existing.strip() else preamble()
    if section_markers("goals")[0] not in text:  # the verdicts first, right after the preamble
        text = replace_section(text, "goals", "## Goals\n\n_No goals measured yet._")
    found: dict[str, dict[str, Any]] = {}
    for bench in BENCHES:
        result = find_result(bench, results_dir)
        start, _ = section_markers(bench.section)
        if result is not None:
            found[bench.section] = result
            text = replace_section(text, bench.section, render_section(bench, result))
        elif start not in text:
            text = replace_section(text, bench.section, placeholder(bench))
    start_goals, _ = section_markers("goals")
    if found or start_goals not in text:
        text = replace_section(text, "goals", goals_section(found))
    return text


def write_document(text: str, path: Path = DOC) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark that takes it")
    ap.add_argument("--only", nargs="+", default=None, help="modules to run (e.g. inference pipeline)")
    ap.add_argument("--skip", nargs="+", default=[], help="modules not to run")
    ap.add_argument("--render-only", action="store_true", help="just rewrite BENCHMARKS.md from the JSON")
    ap.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds allowed per benchmark")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    status: list[tuple[str, str, float]] = []
    if not args.render_only:
        for bench in BENCHES:
            mod = bench.module
            if not module_present(mod):
                if mod:
                    status.append((mod, "absent", 0.0))
                continue
            if (args.only and mod not in args.only) or mod in args.skip:
                continue
            cmd = [python_exe(), "-m", f"benchmarks.{mod}"]
            if args.quick and accepts_quick(mod):
                cmd.append("--quick")
            print(f"=== {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            run = run_child(cmd, REPO_ROOT, child_env(REPO_ROOT), timeout=args.timeout, tail_chars=6000)
            wall = time.perf_counter() - t0
            print(run.output_tail)
            state = "ok" if run.ok else ("timed out" if run.timed_out else f"failed (exit {run.returncode})")
            status.append((mod, state, wall))
            print(f"=== {mod}: {state} in {wall:.0f} s", flush=True)
    text = render_document(DOC.read_text() if DOC.exists() else None)
    write_document(text)
    print(f"rewrote {DOC}")
    for mod, state, wall in status:
        print(f"  {mod:<16} {state:<20} {wall:7.0f} s")
    return 0 if all(s in ("ok", "absent") for _, s, _ in status) else 1


if __name__ == "__main__":
    raise SystemExit(main())
