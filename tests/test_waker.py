"""How the hub wakes its subscribers: a slice per loop iteration, each client queued once
however many frames arrive, no empty wake-ups, and closing that does not need the waker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from api.hub import Frame, Subscription, Waker
from tests.support.waiting import eventually_async

pytestmark = pytest.mark.anyio


def frame(seq: int) -> Frame:
    return Frame(seq, f"id: {seq}\n\n".encode(), terminal=False)


@pytest.fixture
async def waker() -> AsyncIterator[Waker]:
    waker = Waker(slice_size=4)
    task = asyncio.create_task(waker.run())
    yield waker
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def parked(subscription: Subscription) -> bool:
    """The client's task waits in ``take()`` on a future nothing has resolved yet."""
    waiter = subscription._waiter
    return waiter is not None and not waiter.done()


async def parks(subscription: Subscription, taken: asyncio.Task[list[Frame]]) -> None:
    """Until the client is parked in ``take()``, or its take ended (which the test then
    reports): the task has run, however many loop iterations that took."""
    await eventually_async(lambda: parked(subscription) or taken.done())


async def test_a_large_fan_out_leaves_room_for_other_work_between_slices(waker: Waker) -> None:
    """A callback that reschedules itself marks each loop iteration: between two of its
    marks at most one slice of clients may run. Woken all at once, all 20 would."""
    loop = asyncio.get_running_loop()
    order: list[str] = []
    subscriptions = [Subscription("s", limit=10, waker=waker) for _ in range(20)]

    async def client(index: int, subscription: Subscription) -> None:
        await subscription.take()
        order.append(f"client {index}")

    tasks = [asyncio.create_task(client(i, s)) for i, s in enumerate(subscriptions)]
    await eventually_async(lambda: all(parked(s) for s in subscriptions))

    def mark() -> None:
        order.append("|")
        if not all(task.done() for task in tasks):
            loop.call_soon(mark)

    for subscription in subscriptions:
        subscription.offer(frame(1))
    loop.call_soon(mark)
    await asyncio.gather(*tasks)

    runs = [len(run.split()) // 2 for run in " ".join(order).split("|")]
    assert max(runs) <= 4, order
    # First in, first out: clients are served in the order their frames came.
    assert [o for o in order if o != "|"] == [f"client {i}" for i in range(20)]


async def test_frames_that_arrive_while_a_client_waits_go_out_in_one_take(waker: Waker) -> None:
    subscription = Subscription("s", limit=10, waker=waker)
    taken = asyncio.create_task(subscription.take())
    await parks(subscription, taken)
    assert not taken.done()
    for seq in (1, 2, 3):
        subscription.offer(frame(seq))
    assert len(waker) == 1  # queued once, not three times
    assert [f.seq for f in await taken] == [1, 2, 3]


async def test_a_stale_wake_does_not_end_a_take_with_nothing() -> None:
    """A client that took its frames before its queued wake came must keep waiting:
    returning [] would make it write a heartbeat that nothing asked for."""
    waker = Waker(slice_size=4)  # started only once the client is parked again
    subscription = Subscription("s", limit=10, waker=waker)
    subscription.offer(frame(1))  # queued for a wake...
    assert [f.seq for f in await subscription.take()] == [1]  # ...but taken at once
    taken = asyncio.create_task(subscription.take())
    await parks(subscription, taken)
    stale = subscription._waiter
    running = asyncio.create_task(waker.run())
    # The stale wake is delivered: the waker's queue is empty and the client was woken (its
    # waiter resolved), then it either parked again on a new waiter or ended its take.
    await eventually_async(
        lambda: (
            len(waker) == 0
            and (taken.done() or (parked(subscription) and subscription._waiter is not stale))
        )
    )
    assert not taken.done()
    subscription.offer(frame(2))
    assert [f.seq for f in await taken] == [2]
    running.cancel()


async def test_a_poke_ends_a_take_with_nothing_once(waker: Waker) -> None:
    subscription = Subscription("s", limit=10, waker=waker)
    subscription.poke()
    assert await subscription.take() == []
    taken = asyncio.create_task(subscription.take())
    # The poke's queued wake comes too: the client is woken once more and parks again.
    await eventually_async(
        lambda: (
            taken.done()
            or (len(waker) == 0 and not subscription.wake_queued and parked(subscription))
        )
    )
    assert not taken.done()  # the poke was used up
    subscription.poke()
    assert await taken == []


async def test_overflow_wakes_the_client_with_nothing_buffered(waker: Waker) -> None:
    subscription = Subscription("s", limit=2, waker=waker)
    for seq in (1, 2, 3):
        subscription.offer(frame(seq))
    assert await subscription.take() == []
    assert subscription.overflowed
    subscription.offer(frame(4))  # ignored: the client reads the log now
    assert await subscription.take() == []


async def test_closing_wakes_a_waiting_client_without_the_waker() -> None:
    idle = Waker()  # never run: shutdown cancels the waker as it drains
    subscription = Subscription("s", limit=10, waker=idle)
    taken = asyncio.create_task(subscription.take())
    await parks(subscription, taken)
    assert not taken.done()
    subscription.close("shutdown")
    assert await taken == []
    assert subscription.closed == "shutdown"
