"""bonefrac: detect and classify bone fractures in radiographs and CT/MRI volumes."""

from __future__ import annotations

import os

# Analytics and telemetry off for every tool, whichever entry point imports us
# (CLI, flows, BentoML service, tests). setdefault: an operator may still override.
for _key, _value in {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "BENTOML_DO_NOT_TRACK": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(_key, _value)

# Transparent huge pages for PyTorch's large CPU tensors (c10's allocator reads this on its first
# large allocation, so setting it here works whether torch was imported first or not). A 512 px
# EfficientNet batch allocates ~100 MB activations per layer; glibc hands each one to mmap, and
# touching it costs one page fault per 4 KiB page: more system time than arithmetic. What it gains
# (large trunks and maps) and does not (the small phantom steps) is benchmarks/huge_pages.py's, in
# BENCHMARKS.md. The arithmetic is unchanged (tests/unit/test_huge_pages.py);
# where the kernel has THP off it does nothing. An operator's own setting wins (setdefault).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
