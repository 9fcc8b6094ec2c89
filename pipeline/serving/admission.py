"""Batch rows a replica lets into its engine, online traffic first.

A replica's engine runs online requests and batch rows (``run --via-serve``, the Batch API) in
the same steps; vLLM's priority scheduling puts an online request into the next step, but that
step still carries every batch row already inside. So the bound on batch rows is lower while any
online request is in flight: an online request's first token then waits for a short step, not
one carrying the whole batch. Rows already inside finish; new ones wait for a slot.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class BatchSlots:
    """``async with slots:`` around each batch row's engine call. ``idle`` rows at once while no
    online request is in flight, ``busy`` while one is (``online(+1)`` / ``online(-1)``)."""

    def __init__(self, idle: int, busy: int):
        if idle < 1 or busy < 1:
            raise ValueError("batch slots must be at least 1")
        self.idle, self.busy = idle, min(busy, idle)
        self.inside = 0  # batch rows in the engine now
        self.online_requests = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def bound(self) -> int:
        return self.busy if self.online_requests else self.idle

    def online(self, delta: int) -> None:
        """An online request came in (+1) or ended (-1); the last one's end frees the idle bound."""
        self.online_requests += delta
        if not self.online_requests:
            self._wake()

    async def __aenter__(self) -> None:
        if self.inside < self.bound and not self._waiters:
            self.inside += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)  # first come, first served: a woken row's slot is reserved
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # woken, then cancelled: hand the slot on
                self.inside -= 1
                self._wake()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    async def __aexit__(self, *exc: Any) -> None:
        self.inside -= 1
        self._wake()

    def _wake(self) -> None:
        """Give free slots to the longest waiting rows, in order (each woken row's slot is counted
        at once, so a row arriving meanwhile cannot take it)."""
        while self._waiters and self.inside < self.bound:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.inside += 1
