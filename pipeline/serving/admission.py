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
        while self.inside >= self.bound:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                else:  # woken, then cancelled: hand the slot on
                    self._wake()
                raise
        self.inside += 1

    async def __aexit__(self, *exc: Any) -> None:
        self.inside -= 1
        self._wake()

    def _wake(self) -> None:
        free = self.bound - self.inside
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1
