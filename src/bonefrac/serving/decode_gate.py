"""Admission to decoding in a front-end process: a slot per core, and one memory budget for all of them.

Each upload's working memory is known before a pixel is decoded
(:func:`bonefrac.inference.upload_policy.decode_memory_estimate`, from the header),
and no single upload may need more than ``max_decoded_mb``. Slots alone (one
decode per core) still let two near-limit uploads decode at once: six 230 KB
RGBA PNGs took a front end from 2.2 to 5.5 GB (issue 16). So the gate also keeps
the sum of the estimates in flight within one budget (``max_decoded_mb`` again):
ordinary radiographs (tens of MB) still decode one per core, near-limit ones one
at a time, in arrival order. The bound per front-end process is then its idle
size + ``max_decoded_mb`` + the request bodies in flight.

After a large decode the freed memory is handed back to the OS (``malloc_trim``):
glibc keeps freed blocks of its per-thread arenas otherwise, and the process stays
at its peak long after the burst.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import AsyncIterator

logger = logging.getLogger("bonefrac.serving")

#: A decode that needed at least this much is followed by ``malloc_trim``.
TRIM_AFTER_BYTES = 64 * 1024 * 1024


class DecodeGate:
    """FIFO admission: at most ``slots`` holders, their ``need`` summing to at most ``budget_bytes``.

    A need larger than the budget is admitted alone (the per-upload limit has
    refused anything larger than the operator allows; clamping keeps it from
    waiting forever).
    """

    def __init__(self, slots: int, budget_bytes: int) -> None:
        if slots < 1 or budget_bytes < 1:
            raise ValueError("slots and budget_bytes must be positive")
        self.slots = int(slots)
        self.budget = int(budget_bytes)
        self.active = 0
        self.used = 0
        self.peak_used = 0
        self._queue: collections.deque[object] = collections.deque()
        self._cond = asyncio.Condition()

    def _fits(self, ticket: object, need: int) -> bool:
        return (
            self._queue[0] is ticket
            and self.active < self.slots
            and (self.used + need <= self.budget or self.active == 0)
        )

    @contextlib.asynccontextmanager
    async def admit(self, need_bytes: int) -> AsyncIterator[None]:
        """Wait for a slot and ``need_bytes`` of the budget (in arrival order); release them on exit."""
        need = max(0, min(int(need_bytes), self.budget))
        ticket = object()
        async with self._cond:
            self._queue.append(ticket)
            try:
                await self._cond.wait_for(lambda: self._fits(ticket, need))
            except BaseException:  # cancelled while waiting: leave the queue, let the next one in
                self._queue.remove(ticket)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self.active += 1
            self.used += need
            self.peak_used = max(self.peak_used, self.used)
            self._cond.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            async with self._cond:
                self.active -= 1
                self.used -= need
                self._cond.notify_all()


def _load_trim():  # pragma: no cover - depends on the C library
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc.malloc_trim if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_MALLOC_TRIM = _load_trim()


def release_memory() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim``); ``False`` where there is none (musl, macOS)."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
