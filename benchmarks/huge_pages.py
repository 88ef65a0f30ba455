"""Transparent huge pages for PyTorch's CPU tensors: what ``THP_MEM_ALLOC_ENABLE`` buys here.

``import bonefrac`` sets ``THP_MEM_ALLOC_ENABLE=1`` (unless the environment already says).
PyTorch's CPU allocator then aligns allocations of 2 MiB and more to the page size and
advises the kernel to back them with 2 MiB pages. Without it, each large activation
is a fresh ``mmap`` whose first touch costs one page fault per 4 KiB page; at 512 px
that was more system time than arithmetic (``make run-fracatlas`` logged more system
than user CPU seconds). Each case runs in its own process with the variable set
explicitly, taking turns (off, on, off, on, ...), so a busy neighbour slows both alike:

- ``trunk_512``: the frozen Lite0 trunk on a batch of 16 at 512 px (the FracAtlas
  feature-cache pass, :func:`bonefrac.training.feature_cache.build_feature_cache`);
- ``stitched_map_512``: the preset's evidence map (flip TTA x shift-and-stitch: 8 trunk
  passes an image; what ``/explain`` and the evaluation compute), batch 4;
- ``phantom_step_128``: one training step (forward + backward) of the phantom default's
  EfficientNet-Lite0 at 128 px, batch 16 (small tensors: the case that should gain little).

    python -m benchmarks.huge_pages [--quick] [--repeats 3]
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

NAME = "huge_pages"
CASES = ("trunk_512", "stitched_map_512", "phantom_step_128")

# The child: build the case, one warm-up call, then time `iters` calls; report per-image
# milliseconds and the process's user/system CPU seconds and minor page faults over them.
CHILD = r"""
import json, resource, sys, time
import torch
import bonefrac  # noqa: F401  (sets the default; the parent set the variable explicitly)
case, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
if case == "trunk_512":
    from bonefrac.model.dense import FrozenTrunk
    net = FrozenTrunk("efficientnet_lite_offline").to(memory_format=torch.channels_last).eval()
    x = torch.randn(16, 1, 512, 512).contiguous(memory_format=torch.channels_last)
    def step():
        with torch.inference_mode():
            net(x)
    n_img, iters = 16, 3
elif case == "stitched_map_512":
    from bonefrac.model.dense import build_dense_net
    net = build_dense_net("efficientnet_lite0_dense_tta_stitch").eval()
    x = torch.randn(4, 1, 512, 512)
    def step():
        with torch.inference_mode():
            net.evidence_map(x)
    n_img, iters = 4, 2
else:
    from bonefrac.model.networks import build_model
    net = build_model("efficientnet_lite0", 0, "efficientnet_lite_offline").train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x, y = torch.randn(16, 1, 128, 128), torch.randint(0, 2, (16,)).float()
    def step():
        opt.zero_grad()
        out = net(x)
        out = out[0] if isinstance(out, tuple) else out
        torch.nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), y).backward()
        opt.step()
    n_img, iters = 16, 5
step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(iters):
    step()
t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "ms_per_image": (t1 - t0) / (iters * n_img) * 1000,
    "user_s": r1.ru_utime - r0.ru_utime, "system_s": r1.ru_stime - r0.ru_stime,
    "minor_faults": r1.ru_minflt - r0.ru_minflt, "images": iters * n_img,
}))
"""


def run_case(case: str, thp: str, threads: int) -> dict[str, Any]:
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE=thp)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, case, str(threads)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(cases: Sequence[str], repeats: int, threads: int) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        runs: dict[str, list[dict[str, Any]]] = {"0": [], "1": []}
        for _ in range(repeats):
            for thp in ("0", "1"):  # taking turns
                runs[thp].append(run_case(case, thp, threads))
        row: dict[str, Any] = {"case": case}
        for thp, label in (("0", "off"), ("1", "on")):
            row[f"ms_per_image_{label}"] = summarize([r["ms_per_image"] for r in runs[thp]])
            row[f"system_s_per_image_{label}"] = summarize([r["system_s"] / r["images"] for r in runs[thp]])
            row[f"user_s_per_image_{label}"] = summarize([r["user_s"] / r["images"] for r in runs[thp]])
            row[f"faults_per_image_{label}"] = summarize([r["minor_faults"] / r["images"] for r in runs[thp]])
        row["speedup"] = row["ms_per_image_off"].median / row["ms_per_image_on"].median
        rows.append(row)
    return rows


def render_markdown(result: dict[str, Any]) -> str:
    table = markdown_table(
        ["case", "ms / image, off", "ms / image, on", "speed-up", "system s / image, off → on",
         "page faults / image, off → on"],
        [
            [
                r["case"],
                fmt(r["ms_per_image_off"]["median"]),
                fmt(r["ms_per_image_on"]["median"]),
                f"{r['speedup']:.2f}×",
                f"{fmt(r['system_s_per_image_off']['median'])} → {fmt(r['system_s_per_image_on']['median'])}",
                f"{fmt(r['faults_per_image_off']['median'])} → {fmt(r['faults_per_image_on']['median'])}",
            ]
            for r in result["rows"]
        ],
    )
    s = result["settings"]
    return (
        f"`THP_MEM_ALLOC_ENABLE` 0 (off) against 1 (on, what `import bonefrac` sets), {s['threads']} torch "
        f"threads, each case in its own process, taking turns, median of {s['repeats']} processes each. "
        "The arithmetic is the same either way: a fresh-clone `make run` wrote the same `dvc.lock` bytes "
        "with 0 and with 1.\n\n" + table
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat of the trunk case only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default=NAME)
    args = ap.parse_args(argv)
    cases = ("trunk_512",) if args.quick else CASES
    repeats = 1 if args.quick else args.repeats
    rows = measure(cases, repeats, args.threads)
    print_table(
        "Huge pages: THP_MEM_ALLOC_ENABLE off vs on",
        ["case", "off ms/img", "on ms/img", "speed-up"],
        [[r["case"], r["ms_per_image_off"].median, r["ms_per_image_on"].median,
          f"{r['speedup']:.2f}"] for r in rows],
    )  # fmt: skip
    result = envelope(
        args.name,
        command_line("benchmarks.huge_pages", argv if argv is not None else sys.argv[1:]),
        rows,
        settings={"cases": list(cases), "repeats": repeats, "threads": args.threads, "quick": args.quick},
    )
    write_result(args.name, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
