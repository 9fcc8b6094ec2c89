"""A replica's batch slots: fewer batch rows enter the engine while online requests are in flight."""

import asyncio

import pytest

from pipeline.serving.admission import BatchSlots


async def _enter(slots: BatchSlots, entered: list[int], leave: asyncio.Event, i: int) -> None:
    async with slots:
        entered.append(i)
        await leave.wait()


def test_online_requests_lower_the_bound_and_their_end_raises_it():
    async def main() -> None:
        slots, entered, leave = BatchSlots(idle=4, busy=1), [], asyncio.Event()
        tasks = [asyncio.create_task(_enter(slots, entered, leave, i)) for i in range(3)]
        await asyncio.sleep(0)
        assert slots.inside == 3 and sorted(entered) == [0, 1, 2]
        slots.online(+1)  # an online request: new batch rows wait until fewer than 1 are inside
        late = [asyncio.create_task(_enter(slots, entered, leave, i)) for i in (3, 4)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert slots.inside == 3 and len(entered) == 3
        slots.online(-1)  # the online request ended: the idle bound (4) lets one more in
        for _ in range(5):
            await asyncio.sleep(0)
        assert slots.inside == 4 and len(entered) == 4
        leave.set()
        await asyncio.gather(*tasks, *late)
        assert slots.inside == 0 and sorted(entered) == [0, 1, 2, 3, 4]

    asyncio.run(main())


def test_a_cancelled_waiter_hands_its_slot_on():
    async def main() -> None:
        slots, entered, leave = BatchSlots(idle=1, busy=1), [], asyncio.Event()
        first = asyncio.create_task(_enter(slots, entered, leave, 0))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(_enter(slots, entered, leave, i)) for i in (1, 2)]
        await asyncio.sleep(0)
        waiting[0].cancel()
        leave.set()
        await first
        await waiting[1]
        with pytest.raises(asyncio.CancelledError):
            await waiting[0]
        assert entered == [0, 2] and slots.inside == 0

    asyncio.run(main())


def test_a_freed_slot_goes_to_the_longest_waiting_row_not_a_newcomer():
    """First come, first served, as asyncio.Semaphore: a slice's rows are not overtaken by a later
    slice's, so slices finish in the order they came."""
    async def main() -> None:
        slots, entered, leave = BatchSlots(idle=1, busy=1), [], asyncio.Event()
        await slots.__aenter__()  # the one slot is held
        queued = asyncio.create_task(_enter(slots, entered, leave, 1))
        await asyncio.sleep(0)  # row 1 waits
        newcomer = asyncio.create_task(_enter(slots, entered, leave, 2))  # first runs after the release
        await slots.__aexit__(None, None, None)  # the slot is row 1's, though row 2 runs first
        for _ in range(5):
            await asyncio.sleep(0)
        assert entered == [1] and slots.inside == 1
        leave.set()
        await asyncio.gather(queued, newcomer)
        assert entered == [1, 2] and slots.inside == 0

    asyncio.run(main())


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        BatchSlots(idle=0, busy=1)
    assert BatchSlots(idle=4, busy=16).busy == 4  # never more rows while busy than idle
