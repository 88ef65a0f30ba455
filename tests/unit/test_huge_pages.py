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
    not THP.exists() or "[never]" in THP.read_text(), reason="the kernel has transparent huge pages off"
)
def test_importing_bonefrac_backs_large_tensors_with_huge_pages_and_an_operator_can_opt_out() -> None:
    default = _faults(None)
    opted_out = _faults("0")
    assert opted_out > 8_000, f"4 KiB pages should fault ~16 k times for 64 MiB, saw {opted_out}"
    assert default < opted_out / 4, f"huge pages not used by default: {default} faults vs {opted_out} without"
