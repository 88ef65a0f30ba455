"""Importing bonefrac turns on transparent huge pages for PyTorch's large CPU tensors.

Without them a 512 px forward pass spends more time in page faults than in arithmetic
(BENCHMARKS "Huge pages"). The check counts the page faults of touching a fresh 64 MiB
tensor in a clean interpreter: ~16 k with 4 KiB pages, a few hundred with 2 MiB pages.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

PROBE = """
import resource, torch, bonefrac  # torch first: the setting must work whatever the import order
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(64 * 2**20 // 4)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env_value: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not THP.exists() or "[madvise]" not in THP.read_text(),
    reason="only a kernel in THP 'madvise' mode tells the setting apart: 'never' gives 4 KiB pages and "
    "'always' gives huge pages to both processes",
)
def test_importing_bonefrac_backs_large_tensors_with_huge_pages_and_an_operator_can_opt_out() -> None:
    default = _faults(None)
    opted_out = _faults("0")
    assert opted_out > 8_000, f"4 KiB pages should fault ~16 k times for 64 MiB, saw {opted_out}"
    assert default < opted_out / 4, f"huge pages not used by default: {default} faults vs {opted_out} without"


STEP = """
import hashlib, sys, torch
import bonefrac  # noqa: F401
from bonefrac.model.networks import build_model
torch.manual_seed(0)
torch.set_num_threads(2)
net = build_model("efficientnet_lite0", 0, "efficientnet_lite_offline").train()
opt = torch.optim.SGD(net.parameters(), lr=1e-2)
x, y = torch.randn(16, 1, 128, 128), (torch.arange(16) % 2).float()
for _ in range(2):
    opt.zero_grad()
    out = net(x)
    out = out[0] if isinstance(out, tuple) else out
    torch.nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), y).backward()
    opt.step()
h = hashlib.sha256()
for t in net.state_dict().values():
    h.update(t.detach().contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def test_huge_pages_leave_the_training_arithmetic_unchanged() -> None:
    """README: the same results either way (the allocator's page size and alignment must not reach the sums)."""
    digests = {}
    for value in ("0", "1"):
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | {"THP_MEM_ALLOC_ENABLE": value}
        out = subprocess.run([sys.executable, "-c", STEP], env=env, capture_output=True, text=True, check=True)
        digests[value] = out.stdout.strip().splitlines()[-1]
    assert digests["0"] == digests["1"]


def test_readme_quotes_the_huge_pages_benchmark() -> None:
    """The README's speed-ups are the committed benchmark's medians (a rerun that changes them changes the text)."""
    import json

    root = Path(__file__).resolve().parents[2]
    rows = {r["case"]: r for r in json.loads((root / "benchmarks/results/huge_pages.json").read_text())["rows"]}
    readme = " ".join((root / "README.md").read_text().split())
    trunk, stitched = rows["trunk_512"]["speedup"], rows["stitched_map_512"]["speedup"]
    assert trunk > 1.2 and stitched > 1.2  # "faster"
    assert rows["phantom_step_128"]["speedup"] < 1.1  # "no faster"
    assert f"the 512-px trunk pass ran {trunk:.1f}× and the stitched evidence map {stitched:.1f}× faster" in readme
