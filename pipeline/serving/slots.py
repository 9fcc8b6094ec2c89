"""A replica's batch slots: how many batch-job rows (``run --via-serve``, the Batch API) run inside
its generation engine at once.

Online requests come first. While the replica serves online traffic, and for ``quiet_s`` after
its last online request, batch rows are held to ``busy`` (``ServeConfig.max_batch_in_flight``):
the engine's steps stay short, so online time to first token stays close to idle. Once no online
request has come for ``quiet_s``, batch rows may fill the engine (``idle``, by default the
engine's ``max_num_seqs``), so a batch on a quiet fleet runs as fast as a plain job. When online
traffic returns, new batch rows wait until the rows inside drop below ``busy``; vLLM's priority
scheduler meanwhile runs the online requests first (and preempts batch rows if the engine is full).
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Optional


class BatchSlots:
    """An async context manager (``async with slots:``) admitting one batch row at a time."""

    def __init__(self, busy: int, idle: int, quiet_s: float):
        if busy < 1 or idle < 1 or quiet_s < 0:
            raise ValueError(f"batch slots need busy >= 1, idle >= 1, quiet_s >= 0 (got {busy}, {idle}, {quiet_s})")
        self.busy, self.idle, self.quiet_s = busy, max(busy, idle), quiet_s
        self.in_use = 0
        self.online = 0  # online requests inside the replica now
        self._last_online = float("-inf")
        self._free = asyncio.Condition()

    def capacity(self) -> int:
        """Batch rows allowed inside now: ``busy`` during online traffic, else ``idle``."""
        if self.online or time.monotonic() - self._last_online < self.quiet_s:
            return self.busy
        return self.idle

    def online_changed(self, online: int) -> None:
        """The replica's online requests in flight, told at every start and end of one."""
        self.online = online
        self._last_online = time.monotonic()

    async def __aenter__(self) -> "BatchSlots":
        async with self._free:
            # A wait ends on a release (rows leave all the time while a batch runs) or, when the
            # replica turns quiet, on the next check, at most ``quiet_s`` later.
            while self.in_use >= self.capacity():
                try:
                    await asyncio.wait_for(self._free.wait(), timeout=max(self.quiet_s, 0.05))
                except asyncio.TimeoutError:
                    pass
            self.in_use += 1
        return self

    async def __aexit__(self, exc_type: Optional[type], exc: Optional[BaseException],
                        tb: Optional[TracebackType]) -> None:
        async with self._free:
            self.in_use -= 1
            self._free.notify(max(1, self.capacity() - self.in_use))
