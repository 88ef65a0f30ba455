"""Shared helpers for the benchmarks: statistics, machine details, results, tables, child processes.

Every benchmark reports **medians over repeated runs** with the interquartile
range (one slow repeat on a shared machine moves a mean, not a median), says
which machine it ran on (CPU model, cores, RAM, library versions, threads, the
load average at start: this machine is shared, and a busy neighbour shows up
there), and writes one JSON file, ``benchmarks/results/<name>.json``, in the
same envelope so ``run_all`` can render any of them into ``BENCHMARKS.md``::

    {"name", "command", "created", "machine", "settings", "rows": [{...}],
     "goals": [{"name", "value", "target", "op", "unit", "met"}], "notes": [...]}
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
VENV_BIN = REPO_ROOT / ".venv" / "bin"
GIB = 1024**3


# ----------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Summary:
    """Median and spread of repeated measurements."""

    median: float
    q1: float
    q3: float
    iqr: float
    min: float
    max: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(values: Iterable[float]) -> Summary:
    """Median, quartiles (linear interpolation, numpy's default) and IQR of ``values``.

    Raises ``ValueError`` on an empty input or a non-finite value: a NaN that
    slipped into a timing list would otherwise silently become the "median".
    """
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        raise ValueError("summarize: no measurements")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"summarize: non-finite measurement in {arr.tolist()}")
    q1, med, q3 = (float(v) for v in np.percentile(arr, [25, 50, 75]))
    return Summary(
        median=med, q1=q1, q3=q3, iqr=q3 - q1, min=float(arr.min()), max=float(arr.max()), n=int(arr.size)
    )


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator) / float(denominator)


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    min_time: float = 0.0,
    budget_s: float | None = None,
    min_repeats: int = 3,
) -> dict[str, tuple[list[float], int]]:
    """Seconds per call of each function, one value per repeat, the functions taking turns.

    Side-by-side comparisons on a shared machine are only fair if a burst of
    load from a neighbour hits every contender alike, so each repeat runs every
    function once, in an order that rotates from repeat to repeat.

    The last warm-up call of each function is timed to plan the rest: a repeat
    calls a function until at least ``min_time`` seconds have passed (at least
    once), so a 2 ms call is not timed alone against the clock's and the
    scheduler's noise; and when ``budget_s`` is given, the number of repeats is
    cut (never below ``min_repeats``) so that a 30-second call does not take an
    hour. Returns {name: (seconds per call for each repeat, calls per repeat)}.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if not fns:
        return {}
    one: dict[str, float] = {}
    for name, fn in fns.items():
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            fn()
            one[name] = max(time.perf_counter() - t0, 1e-9)
    calls = {n: max(1, math.ceil(min_time / one[n])) if min_time > 0 else 1 for n in fns}
    if budget_s is not None:
        round_s = sum(one[n] * calls[n] for n in fns)
        repeats = max(min(repeats, min_repeats), min(repeats, int(budget_s // round_s)))
    names = list(fns)
    per_call: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, k = fns[name], calls[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            per_call[name].append((time.perf_counter() - t0) / k)
    return {n: (per_call[n], calls[n]) for n in names}


def time_repeats(
    fn: Callable[[], Any],
    repeats: int,
    warmup: int = 1,
    min_time: float = 0.0,
    budget_s: float | None = None,
    min_repeats: int = 3,
) -> tuple[list[float], int]:
    """:func:`time_interleaved` for a single function: (seconds per call per repeat, calls per repeat)."""
    return time_interleaved({"fn": fn}, repeats, warmup, min_time, budget_s, min_repeats)["fn"]


def rates(seconds_per_call: Sequence[float], items_per_call: float) -> list[float]:
    """Items per second for each repeat."""
    return [items_per_call / s for s in seconds_per_call]


# ---------------------------------------------------------------------- FLOPs
def count_flops(model: Any, *inputs: Any) -> int:
    """FLOPs of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode``.

    The counter follows PyTorch's convention: a multiply-add is 2 FLOPs, and
    only matrix multiplications and convolutions are counted (bias adds,
    activations, norms and pooling are not), which is also what the matmul peak
    measures, so "fraction of peak" compares like with like.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    return int(counter.get_total_flops())


# -------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(
                    f for f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in have
                )
    except OSError:
        pass
    return []


def git_commit(root: Path = REPO_ROOT) -> str | None:
    """HEAD's short hash plus ``-dirty`` when the tree has changes (the project's one definition)."""
    from bonefrac.provenance import git_commit as full_commit

    commit = full_commit(root)
    if commit == "unknown":
        return None
    head, _, dirty = commit.partition("-")
    return head[:7] + (f"-{dirty}" if dirty else "")


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare numbers across machines and runs."""
    import psutil
    import torch

    try:
        import onnxruntime

        ort_version: str | None = onnxruntime.__version__
    except ImportError:
        ort_version = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    load1, load5, _ = os.getloadavg()
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": usable,
        "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
        "load_avg_1m_5m": [round(load1, 2), round(load5, 2)],
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "onnxruntime": ort_version,
        "numpy": np.__version__,
        "cuda_available": bool(torch.cuda.is_available()),
        "git_commit": git_commit(),
    }


def machine_line(machine: Mapping[str, Any]) -> str:
    """One line for tables and Markdown."""
    return (
        f"{machine.get('cpu_model')} · {machine.get('usable_cores')} usable cores "
        f"({machine.get('physical_cores')} physical) · {machine.get('ram_gib')} GiB RAM · "
        f"load {machine.get('load_avg_1m_5m')} at start · torch {machine.get('torch')} · "
        f"onnxruntime {machine.get('onnxruntime')} · Python {machine.get('python')} · "
        f"commit {machine.get('git_commit')}"
    )


# -------------------------------------------------------------------- results
def goal(name: str, value: float | None, target: float, op: str, unit: str = "") -> dict[str, Any]:
    """A goal with its verdict; ``op`` is ``<=`` or ``>=``. A missing value is "not measured", not met."""
    if op not in ("<=", ">="):
        raise ValueError(f"goal op must be '<=' or '>=', got {op!r}")
    met = None if value is None else bool(value <= target if op == "<=" else value >= target)
    return {"name": name, "value": value, "target": target, "op": op, "unit": unit, "met": met}


def command_line(module: str, argv: Sequence[str]) -> str:
    """The command that reproduces a result, as a reader would type it."""
    return " ".join(["python", "-m", module, *(shlex.quote(a) for a in argv)])


def envelope(
    name: str,
    command: str,
    rows: list[dict[str, Any]],
    *,
    settings: Mapping[str, Any] | None = None,
    goals: list[dict[str, Any]] | None = None,
    notes: list[str] | None = None,
    machine: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The common JSON layout of a benchmark result."""
    return {
        "name": name,
        "command": command,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": dict(machine) if machine is not None else machine_info(),
        "settings": dict(settings or {}),
        "rows": rows,
        "goals": goals or [],
        "notes": notes or [],
        **extra,
    }


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_result(name: str, payload: Mapping[str, Any], results_dir: Path | None = None) -> Path:
    """Write ``<results_dir>/<name>.json`` atomically (temp file, then ``os.replace``)."""
    from bonefrac.atomic import atomic_write_text

    out_dir = Path(results_dir) if results_dir else RESULTS_DIR
    text = json.dumps(payload, indent=2, default=_json_default, allow_nan=False) + "\n"
    return atomic_write_text(out_dir / f"{name}.json", text)


def load_result(name: str, results_dir: Path | None = None) -> dict[str, Any] | None:
    """A result written by :func:`write_result`, or None when that benchmark has not run."""
    path = (Path(results_dir) if results_dir else RESULTS_DIR) / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


# --------------------------------------------------------------------- output
def fmt(value: Any, digits: int = 3) -> str:
    """Numbers with ``digits`` significant digits (thousands kept whole); None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 10**digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def print_table(
    title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None
) -> None:
    """A rich table on stdout (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption, show_lines=False, min_width=min(len(title) + 4, 160))
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    Console(width=max(120, Console().width)).print(table)


def print_goals(goals: Sequence[Mapping[str, Any]]) -> None:
    for g in goals:
        verdict = {True: "MET", False: "NOT MET", None: "not measured"}[g["met"]]
        print(
            f"goal: {g['name']}: {fmt(g['value'])}{g.get('unit', '')} {g['op']} {fmt(g['target'])}"
            f"{g.get('unit', '')} -> {verdict}"
        )


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def goals_markdown(goals: Sequence[Mapping[str, Any]]) -> str:
    out = []
    for g in goals:
        verdict = {True: "**met**", False: "**not met**", None: "not measured"}[g.get("met")]
        unit = g.get("unit", "")
        out.append(
            f"- Goal: {g['name']} {g['op']} {fmt(g['target'])}{unit}: measured "
            f"{fmt(g.get('value'))}{unit if g.get('value') is not None else ''} → {verdict}"
        )
    return "\n".join(out)


def bullets(items: Iterable[Any]) -> str:
    """A Markdown list (one block, no blank lines between items)."""
    return "\n".join(f"- {item}" for item in items)


def generic_markdown(result: Mapping[str, Any]) -> str:
    """Render any result in the common envelope: the rows as a table, the goals, the notes."""
    parts = []
    rows = result.get("rows") or []
    if rows:
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols and not isinstance(r[k], (dict, list))]
        parts.append(markdown_table(cols, ([r.get(c) for c in cols] for r in rows)))
    if result.get("goals"):
        parts.append(goals_markdown(result["goals"]))
    if result.get("notes"):
        parts.append(bullets(result["notes"]))
    return "\n\n".join(parts) if parts else "_(no rows)_"


# ------------------------------------------------------- child processes, RSS
def child_env(project: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for running the pipeline inside ``project`` (a copy of the repo).

    The project's own ``src`` comes first on PYTHONPATH so a copy runs its own
    code rather than the editable install's, tools keep their state inside the
    project, analytics are off, and the venv's ``python``/``dvc`` come first on PATH.
    """
    env = dict(os.environ)
    env.update(
        {
            "DO_NOT_TRACK": "1",
            "DVC_NO_ANALYTICS": "1",
            "BENTOML_DO_NOT_TRACK": "true",
            "GX_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": env.get(
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"
            ),
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_HOME": str(project / ".prefect"),
            "BENTOML_HOME": str(project / ".bentoml"),
            "HF_HUB_OFFLINE": "1",
            "TORCH_HOME": str(REPO_ROOT / ".torch"),
            "PYTHONPATH": os.pathsep.join([str(project / "src"), str(project)]),
            "PATH": os.pathsep.join([str(VENV_BIN), env.get("PATH", "")]),
        }
    )
    env.update(extra or {})
    return env


def copy_worktree(src: Path, dst: Path) -> int:
    """Copy the repo's tracked and untracked-not-ignored files to ``dst`` and commit them there.

    This is what a fresh clone plus the work in progress looks like: no
    ``data/``, ``models/`` or DVC cache, so a ``dvc repro`` there runs every stage.
    Returns the number of files copied.
    """
    import shutil

    listing = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=src,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    n = 0
    for rel in filter(None, listing):
        s = src / rel
        if not s.is_file():  # deleted in the work tree but still in the index
            continue
        d = dst / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(s, d)
        n += 1
    git_snapshot(dst)
    return n


def git_snapshot(project: Path) -> None:
    """``git init`` + one commit of everything (the copy's own throwaway repository).

    DVC finds its root through git, and DVCLive reads HEAD when training starts
    ("Empty git repo" otherwise), so the copy needs a commit, like a real clone.
    """
    ident = [
        "-c",
        "user.name=bonefrac-bench",
        "-c",
        "user.email=bench@localhost",
        "-c",
        "commit.gpgsign=false",
    ]
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", *ident, "commit", "-q", "-m", "benchmark snapshot"], cwd=project, check=True)


@dataclass
class RssSampler:
    """Samples the resident memory of a process and its descendants in a background thread.

    ``peak_tree_bytes`` is the largest *sum* over the tree (what the machine must
    hold; overcounts pages shared copy-on-write between forked workers);
    ``peak_single_bytes`` the largest single process.
    """

    pid: int
    interval: float = 0.1
    peak_tree_bytes: int = 0
    peak_single_bytes: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            self.peak_single_bytes = max(self.peak_single_bytes, rss)
        self.peak_tree_bytes = max(self.peak_tree_bytes, total)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)


@dataclass
class ChildRun:
    """A finished child process: exit code, wall time, memory, and the end of its output."""

    cmd: list[str]
    returncode: int
    wall_s: float
    maxrss_bytes: int  # ru_maxrss of the child and its waited-for descendants (wait4)
    peak_tree_bytes: int
    peak_single_bytes: int
    timed_out: bool
    output_tail: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def run_child(
    cmd: Sequence[str],
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    sample_interval: float = 0.2,
    tail_chars: int = 4000,
) -> ChildRun:
    """Run ``cmd`` to completion, timing it and measuring its peak RSS two ways.

    ``os.wait4`` gives the kernel's ``ru_maxrss`` for exactly this child (and
    the descendants it waited for), which ``RUSAGE_CHILDREN`` cannot once an
    earlier, larger child has run in the same benchmark process; the sampler
    adds the whole tree's sum. The child gets its own session so a timeout ends
    it and everything it started, and nothing else.
    """
    with tempfile.TemporaryFile(mode="w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=dict(env) if env else None,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timed_out = threading.Event()

        def _kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, _kill) if timeout else None
        if timer:
            timer.start()
        with RssSampler(proc.pid, interval=sample_interval) as sampler:
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if timer:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it; tell Popen
        log.seek(0)
        text = log.read()
    return ChildRun(
        cmd=list(cmd),
        returncode=proc.returncode,
        wall_s=wall,
        maxrss_bytes=int(usage.ru_maxrss) * 1024,  # Linux reports KiB
        peak_tree_bytes=sampler.peak_tree_bytes,
        peak_single_bytes=sampler.peak_single_bytes,
        timed_out=timed_out.is_set(),
        output_tail=text[-tail_chars:],
    )


def python_exe() -> str:
    """The venv's interpreter when present (benchmarks may be started from another one)."""
    venv_py = VENV_BIN / "python"
    return str(venv_py) if venv_py.exists() else sys.executable
