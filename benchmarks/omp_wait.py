"""OpenMP's wait policy when two torch processes share two cores (why `make test` sets PASSIVE).

`make test` runs two pytest-xdist workers on the machine's two cores, and several
tests train or run networks with two torch threads (as the pipeline does). By
default libgomp's idle threads spin before they sleep; with more threads than
cores a spinning thread holds the core its partner needs to finish the parallel
region. ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep at once. Alone on the
machine spinning is the faster policy, so only `make test` sets PASSIVE (``make
run`` and ``make run-fracatlas`` run alone and keep libgomp's default).

Each case runs fresh processes doing EfficientNet-Lite0 training steps (128 px,
batch 32, as the phantom tests) for a fixed time; the policies take turns:

- ``alone_2_threads``: one process, two threads (the pipeline's setting, alone);
- ``pair_2_threads``: two such processes at once (two test workers both training);
- ``pair_1_thread``: two processes of one thread each (the oversubscription-free reference);
- ``beside_python``: one two-thread process beside a busy pure-Python process.

    python -m benchmarks.omp_wait [--quick] [--repeats 3] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks._common import command_line, envelope, fmt, markdown_table, print_table, summarize, write_result

NAME = "omp_wait"
POLICIES = ("default", "PASSIVE")
# case -> (torch threads of each training process, training processes, busy Python processes beside)
CASES: dict[str, tuple[int, int, int]] = {
    "alone_2_threads": (2, 1, 0),
    "pair_2_threads": (2, 2, 0),
    "pair_1_thread": (1, 2, 0),
    "beside_python": (2, 1, 1),
}

CHILD = r"""
import json, sys, time
import torch
import bonefrac  # noqa: F401
from bonefrac.model.networks import build_model
threads, seconds = int(sys.argv[1]), float(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
net = build_model("efficientnet_lite0", 0, "efficientnet_lite_offline").train()
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
x, y = torch.randn(32, 1, 128, 128), torch.rand(32)
def step():
    opt.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(net(x)[:, 0], y).backward()
    opt.step()
step()
t0, n = time.perf_counter(), 0
while time.perf_counter() - t0 < seconds:
    step()
    n += 1
print(json.dumps({"steps_per_s": n / (time.perf_counter() - t0)}))
"""
BUSY = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < float(__import__('sys').argv[1]): pass"


def run_case(case: str, policy: str, seconds: float) -> float:
    """Summed training steps per second of the case's training processes under ``policy``."""
    threads, trainers, busy = CASES[case]
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(threads), str(seconds)], env=env,
                         stdout=subprocess.PIPE, text=True)
        for _ in range(trainers)
    ]  # fmt: skip
    # The busy neighbours start with the trainers and outlast their start-up and timed window.
    busy_procs = [subprocess.Popen([sys.executable, "-c", BUSY, str(seconds + 60)]) for _ in range(busy)]
    try:
        outs = [p.communicate()[0] for p in procs]
    finally:
        for b in busy_procs:
            b.kill()
            b.wait()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{case}/{policy}: a training process failed")
    return sum(json.loads(o.strip().splitlines()[-1])["steps_per_s"] for o in outs)


def measure(cases: Sequence[str], repeats: int, seconds: float) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        runs: dict[str, list[float]] = {p: [] for p in POLICIES}
        for _ in range(repeats):
            for policy in POLICIES:  # taking turns
                runs[policy].append(run_case(case, policy, seconds))
        row: dict[str, Any] = {"case": case, "threads": CASES[case][0], "trainers": CASES[case][1]}
        for policy in POLICIES:
            row[f"steps_per_s_{policy}"] = summarize(runs[policy])
        row["passive_over_default"] = row["steps_per_s_PASSIVE"].median / row["steps_per_s_default"].median
        rows.append(row)
    return rows


def render_markdown(result: dict[str, Any]) -> str:
    table = markdown_table(
        ["case", "training processes × threads", "steps / s, default", "steps / s, PASSIVE", "PASSIVE / default"],
        [
            [
                r["case"],
                f"{r['trainers']} × {r['threads']}",
                fmt(r["steps_per_s_default"]["median"]),
                fmt(r["steps_per_s_PASSIVE"]["median"]),
                f"{r['passive_over_default']:.2f}×",
            ]
            for r in result["rows"]
        ],
    )
    s = result["settings"]
    return (
        "EfficientNet-Lite0 training steps (128 px, batch 32) summed over the case's training processes, "
        f"{s['seconds']:g} s each, libgomp's default wait policy against `OMP_WAIT_POLICY=PASSIVE`, taking turns, "
        f"median of {s['repeats']}. `make test` sets PASSIVE (two test workers on two cores); `make run` and "
        "`make run-fracatlas` run alone and keep the default.\n\n" + table
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat of 8 s each")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--name", default=NAME)
    args = ap.parse_args(argv)
    repeats, seconds = (1, 8.0) if args.quick else (args.repeats, args.seconds)
    cases = list(CASES)
    rows = measure(cases, repeats, seconds)
    print_table(
        "OpenMP wait policy: default vs PASSIVE",
        ["case", "default steps/s", "PASSIVE steps/s", "PASSIVE/default"],
        [[r["case"], r["steps_per_s_default"].median, r["steps_per_s_PASSIVE"].median,
          f"{r['passive_over_default']:.2f}"] for r in rows],
    )  # fmt: skip
    result = envelope(
        args.name,
        command_line("benchmarks.omp_wait", argv if argv is not None else sys.argv[1:]),
        rows,
        settings={"cases": cases, "repeats": repeats, "seconds": seconds, "quick": args.quick},
    )
    write_result(args.name, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
