"""A replica's batch slots: few batch rows while online requests are served, a full engine when quiet."""

import asyncio

import pytest

from pipeline.serving.slots import BatchSlots


async def _enter(slots: BatchSlots, inside: list, leave: asyncio.Event) -> None:
    async with slots:
        inside.append(1)
        await leave.wait()


async def _wait_for(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def test_batch_rows_are_held_to_busy_during_online_traffic_and_fill_the_engine_when_quiet():
    async def scenario() -> None:
        slots = BatchSlots(busy=2, idle=5, quiet_s=0.0)
        slots.online_changed(1)  # an online request is inside
        inside: list = []
        leave = asyncio.Event()
        rows = [asyncio.create_task(_enter(slots, inside, leave)) for _ in range(8)]
        await asyncio.wait_for(_wait_for(lambda: len(inside) == 2), 10)
        await asyncio.sleep(0.2)  # waiters poll; none may pass the busy limit meanwhile
        assert len(inside) == 2 and slots.capacity() == 2
        slots.online_changed(0)  # the online request ended; quiet_s=0: quiet at once
        await asyncio.wait_for(_wait_for(lambda: len(inside) == 5), 10)
        await asyncio.sleep(0.2)
        assert len(inside) == 5 and slots.in_use == 5  # never more than idle
        leave.set()
        await asyncio.wait_for(asyncio.gather(*rows), 10)
        assert len(inside) == 8 and slots.in_use == 0

    asyncio.run(scenario())


def test_quiet_time_keeps_the_busy_limit_after_the_last_online_request():
    slots = BatchSlots(busy=2, idle=5, quiet_s=3600)
    assert slots.capacity() == 5  # never saw an online request
    slots.online_changed(1)
    slots.online_changed(0)
    assert slots.capacity() == 2  # within quiet_s of the last online request


@pytest.mark.parametrize("busy,idle,quiet", [(0, 4, 1.0), (4, 0, 1.0), (4, 4, -1.0)])
def test_bad_limits_are_refused(busy, idle, quiet):
    with pytest.raises(ValueError):
        BatchSlots(busy, idle, quiet)


def test_idle_below_busy_means_busy():
    assert BatchSlots(busy=8, idle=2, quiet_s=0).capacity() == 8
