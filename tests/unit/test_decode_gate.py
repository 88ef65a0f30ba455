"""Bounded decode memory in the service's front end (issue 16): the gate, and refusal from the header."""

from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from bonefrac.inference.upload_policy import (
    InputRejected,
    SafetyLimits,
    check_upload,
    decode_memory_estimate,
    decode_upload,
    jpeg_draft_scale,
)
from bonefrac.serving.decode_gate import DecodeGate, release_memory

MB = 1024 * 1024


def _run(gate: DecodeGate, needs: list[int], hold_s: float = 0.02) -> tuple[list[int], int, int]:
    """Admit one task per need at once; (admission order, most holders at once, most bytes at once)."""
    order: list[int] = []
    state = {"now": 0, "most": 0, "bytes": 0, "most_bytes": 0}

    async def task(i: int, need: int) -> None:
        async with gate.admit(need):
            order.append(i)
            state["now"] += 1
            state["bytes"] += min(need, gate.budget)
            state["most"] = max(state["most"], state["now"])
            state["most_bytes"] = max(state["most_bytes"], state["bytes"])
            await asyncio.sleep(hold_s)
            state["now"] -= 1
            state["bytes"] -= min(need, gate.budget)

    async def main() -> None:
        await asyncio.gather(*(task(i, n) for i, n in enumerate(needs)))

    asyncio.run(main())
    return order, state["most"], state["most_bytes"]


def test_six_near_limit_decodes_run_one_at_a_time_in_arrival_order():
    order, most, most_bytes = _run(DecodeGate(slots=2, budget_bytes=1024 * MB), [600 * MB] * 6)
    assert order == list(range(6)) and most == 1 and most_bytes == 600 * MB


def test_ordinary_uploads_still_use_every_slot_but_never_more():
    _, most, _ = _run(DecodeGate(slots=2, budget_bytes=1024 * MB), [40 * MB] * 8)
    assert most == 2
    _, most, _ = _run(DecodeGate(slots=3, budget_bytes=1024 * MB), [40 * MB] * 8)
    assert most == 3


def test_mixed_sizes_stay_within_the_budget_and_one_over_it_runs_alone():
    needs = [700 * MB, 100 * MB, 500 * MB, 2000 * MB, 30 * MB, 400 * MB, 400 * MB]
    gate = DecodeGate(slots=4, budget_bytes=1024 * MB)
    order, _, most_bytes = _run(gate, needs)
    assert sorted(order) == list(range(len(needs))) and order == list(range(len(needs)))  # FIFO, no overtaking
    assert most_bytes <= 1024 * MB and gate.peak_used <= 1024 * MB
    assert gate.active == 0 and gate.used == 0


def test_a_cancelled_waiter_does_not_block_the_queue():
    gate = DecodeGate(slots=1, budget_bytes=100)

    async def main() -> list[str]:
        done: list[str] = []

        async def hold(name: str, s: float) -> None:
            async with gate.admit(10):
                await asyncio.sleep(s)
                done.append(name)

        first = asyncio.create_task(hold("first", 0.05))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(hold("cancelled", 0.0))
        last = asyncio.create_task(hold("last", 0.0))
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.wait_for(asyncio.gather(first, last), timeout=2)
        return done

    assert asyncio.run(main()) == ["first", "last"]
    assert gate.used == 0 and gate.active == 0


def _header_only_png(w: int, h: int, depth: int, colour: int) -> bytes:
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def test_the_issues_bomb_is_refused_from_its_header_before_queueing():
    bomb = _header_only_png(7700, 7700, 8, 6)  # 7700² RGBA: 59 Mpx, under max_pixels, ~1.6 GB to decode
    limits = SafetyLimits(max_pixels=60_000_000, max_decoded_bytes=1024 * MB)
    t0 = time.perf_counter()
    with pytest.raises(InputRejected) as info:
        check_upload(bomb, 2, limits)
    assert info.value.status == 413 and "decode budget" in info.value.message
    assert time.perf_counter() - t0 < 0.5  # nothing was decoded
    # Just under the budget: admitted with its need, which the gate then accounts for.
    side = int((1024 * MB / 40) ** 0.5) - 1  # 40 B/px for 8-bit RGBA
    need = check_upload(_header_only_png(side, side, 8, 6), 2, limits)
    assert 1000 * MB < need <= 1024 * MB


def test_a_reduced_scale_jpeg_needs_what_its_decode_needs(tmp_path):
    arr = (np.add.outer(np.arange(1200), np.arange(1000)) % 251).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    full = decode_memory_estimate(data, "jpeg")
    for hint, scale in ((None, 1), (600, 1), (256, 2), (128, 4), (64, 8), (16, 8)):
        assert jpeg_draft_scale(1000, 1200, hint) == scale
        assert decode_memory_estimate(data, "jpeg", hint) == full // scale**2
        img = decode_upload(data, 2, SafetyLimits(), max_side_hint=hint)
        assert img.array.shape == (-(-1200 // scale), -(-1000 // scale))  # Pillow's draft agrees
    assert release_memory() in (True, False)
