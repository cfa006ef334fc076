"""A failover that loses acknowledged events is never silent: the store epoch.

Redis replicates asynchronously, so a replica promoted by a failover may lack the last events
its master acknowledged, and readers may hold them. Each generation records the store epoch
(the master's replication id, new at every promotion or restart) with its writes; a sweeper
that takes over a generation last written under another epoch records ``last_seq + 1`` as
lost and ends it with ``log_lost``, so a reader holding an id from the lost timeline is
answered 410, never 204 or other text under that id; a new attempt is refused there. A writer
whose batch's reply was lost ends the stream on the new master with the loss recorded, and on
the same master with none.

Without a timeline change nothing differs from before: ``tests/test_store_epoch_no_loss.py``.
Appends that wait for replicas (``WAIT``): ``tests/test_store_epoch_replica_wait.py``.

Real redis-server processes, a master and its replica (``tests.support.replication``); the
failover is the replica's promotion at a chosen moment, the lag what the master wrote after.
Sweeps take the clock as an argument: a lapsed lease is a ``now`` past it, not a wait.
"""

from __future__ import annotations

import anyio
import pytest

from broker import events
from broker.errors import ClaimRefused, StoreUnavailable
from broker.events import Event, EventType
from broker.generation_log import LogWriter
from broker.state import Status, now_ms
from tests.support.replication import (
    LATER,
    LEASE,
    Failover,
    failed_over,
    promote,
    queued,
    resumes_on,
    running,
    token,
    wait_for_replica,
)
from tests.support.sse import decode_sse
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


# ----------------------------------------------------------------------- the lost timeline


async def test_a_sweep_after_a_failover_ends_with_log_lost_where_readers_may_hold_events(
    pair: Failover,
) -> None:
    """The issue's case: the sweeper used to append ``worker_lost`` under id 4, which
    readers of the old master hold as a token, and a reader resuming at 4 got 204."""
    stream_id, _ = await failed_over(pair, kept="ab", lost="cd")  # 1 metadata, 2-3 | 4-5

    assert await pair.sweeper_on_b().sweep_once(now=now_ms() + LATER) == [stream_id]

    stored = await pair.log_b.read(stream_id, 0)
    assert [e.type for e in stored] == [EventType.METADATA, *[EventType.TOKEN] * 2, EventType.ERROR]
    assert stored[-1].seq == 4
    assert stored[-1].data["code"] == "log_lost"
    assert stored[-1].data["retryable"] is True
    state = await pair.log_b.get(stream_id)
    assert state.status is Status.FAILED
    assert state.lost_from_seq == 4
    assert state.text == "ab"

    answers = await anyio.to_thread.run_sync(resumes_on, pair.b, stream_id, "5", "4", "3", "0")
    assert answers["5"] == (410, "log_lost")  # beyond the log's end
    assert answers["4"] == (410, "log_lost")  # the terminal's id, but not the event it holds
    assert answers["3"] == (200, "4:error")  # saw nothing lost: told by the event
    assert answers["0"] == (200, "1:metadata 2:token 3:token 4:error")


async def test_a_new_attempt_after_a_failover_is_refused_and_a_sweep_ends_it(
    pair: Failover,
) -> None:
    """A job run again on the new master must not write under ids readers hold either."""
    stream_id, _ = await failed_over(pair, kept="ab", lost="cd")

    with pytest.raises(ClaimRefused, match="timeline"):
        await pair.log_b.claim(stream_id, worker="w2", lease_seconds=LEASE)

    assert await pair.sweeper_on_b().sweep_once(now=now_ms() + LATER) == [stream_id]
    last = (await pair.log_b.read(stream_id, 0))[-1]
    assert (last.seq, last.data["code"]) == (4, "log_lost")


async def test_a_queued_generation_whose_job_ran_on_the_lost_timeline_is_not_run_again(
    pair: Failover,
) -> None:
    """Created before the failover, claimed and written only after it on the old master:
    the new master has it queued, and readers hold events 1-3 of it."""
    state = queued()
    await pair.log_a.create(state)
    await wait_for_replica(pair.log_a.redis)
    promote(pair.b)
    claim = await pair.log_a.claim(state.id, worker="w1", lease_seconds=LEASE)
    await pair.log_a.writer(state.id, claim, lease_seconds=LEASE).append(
        Event(EventType.METADATA, {"id": state.id}, t=0), token("a"), token("b")
    )

    with pytest.raises(ClaimRefused, match="timeline"):
        await pair.log_b.claim(state.id, worker="w2", lease_seconds=LEASE)
    # Due at once, not at its queue deadline (a day): the next sweeps end it.
    assert await pair.sweeper_on_b().sweep_once(now=now_ms() + LATER) == [state.id]

    stored = await pair.log_b.read(state.id, 0)
    assert [(e.seq, e.type) for e in stored] == [(1, EventType.METADATA), (2, EventType.ERROR)]
    assert stored[-1].data["code"] == "log_lost"
    assert (await pair.log_b.get(state.id)).lost_from_seq == 1
    answers = await anyio.to_thread.run_sync(resumes_on, pair.b, state.id, "3", "2", "1", "0")
    assert answers["3"] == answers["2"] == answers["1"] == (410, "log_lost")
    assert answers["0"] == (200, "1:metadata 2:error")


async def test_a_cancel_asked_for_is_honoured_and_the_loss_still_recorded(
    pair: Failover,
) -> None:
    stream_id, _ = await failed_over(pair, kept="ab", lost="cd")
    await pair.log_b.request_cancel(stream_id)

    assert await pair.sweeper_on_b().sweep_once(now=now_ms() + LATER) == [stream_id]

    state = await pair.log_b.get(stream_id)
    assert (state.status, state.finish_reason, state.lost_from_seq) == (
        Status.CANCELLED,
        "cancelled",
        4,
    )
    answers = await anyio.to_thread.run_sync(resumes_on, pair.b, stream_id, "4")
    assert answers["4"] == (410, "log_lost")  # not 204: the 4 it holds is not this done


async def watch_across_the_sweep(pair: Failover, stream_id: str, cursor: int) -> str:
    """A live reader of the new master at ``cursor`` (subscribed to a reader hub before the
    sweep ends the generation): everything it receives until its response ends by itself.
    Fails if it does not end within seconds."""
    from api.hub import ReaderHub
    from api.watch import watch_frames

    received: list[bytes] = []
    redis_b = pair.log_b.redis
    async with ReaderHub(pair.b.url, redis_b, buffer_frames=100, check_seconds=1.0) as hub:

        async def reader() -> None:
            async for chunk in watch_frames(pair.log_b, hub, stream_id, cursor):
                received.append(chunk)

        with anyio.fail_after(4):
            async with anyio.create_task_group() as group:
                group.start_soon(reader)
                await eventually_async(lambda: hub.subscriber_count == 1, timeout=3)
                assert await pair.sweeper_on_b().sweep_once(now=now_ms() + LATER) == [stream_id]
    return b"".join(received).decode()


async def test_a_live_reader_the_log_did_not_reach_gets_the_error_event(pair: Failover) -> None:
    stream_id, _ = await failed_over(pair, kept="ab", lost="cd")  # the new master has 1-3
    body = await watch_across_the_sweep(pair, stream_id, cursor=3)
    assert [(f.id, f.event) for f in decode_sse(body)] == [("4", "error")]
    assert '"code":"log_lost"' in body


async def test_a_live_reader_beyond_the_log_is_let_go_and_its_resume_refused(
    pair: Failover,
) -> None:
    stream_id, _ = await failed_over(pair, kept="ab", lost="cd")
    body = await watch_across_the_sweep(pair, stream_id, cursor=5)
    assert decode_sse(body) == []  # let go without an event: it resumes, and learns it
    answers = await anyio.to_thread.run_sync(resumes_on, pair.b, stream_id, "5")
    assert answers["5"] == (410, "log_lost")


async def test_a_live_reader_holding_the_id_the_sweep_ends_at_is_let_go(pair: Failover) -> None:
    """It holds event 4 of the lost timeline; the sweep writes its own 4, which the hub
    never offers it (it is not past its cursor), and the log is not shorter than it."""
    stream_id, _ = await failed_over(pair, kept="ab", lost="cd")
    body = await watch_across_the_sweep(pair, stream_id, cursor=4)
    assert decode_sse(body) == []
    answers = await anyio.to_thread.run_sync(resumes_on, pair.b, stream_id, "4")
    assert answers["4"] == (410, "log_lost")


# ------------------------------------------------------------------- a batch in doubt


async def end_after_a_batch_in_doubt(pair: Failover, *, reached_the_master: bool) -> str:
    """A writer's batch (ids 4-5) whose reply is lost (it reached the master, or not), then
    the store stays away until the writer's lease would lapse; the writer then ends the
    stream on the way out (as ``AttemptOutput.end_quietly`` does) on whichever master it
    is pointed at by then. Returns the stream's id."""
    stream_id, running_writer = await running(pair.log_a, "a", "b")
    await wait_for_replica(pair.log_a.redis)
    if reached_the_master:
        promote(pair.b)  # what A writes from now on, B never gets
    real_append = pair.log_a.append_batch

    async def reply_lost(*args: object, **kwargs: object) -> tuple[int, bool]:
        if reached_the_master:
            await real_append(*args, **kwargs)  # type: ignore[arg-type]
        raise StoreUnavailable("the reply was lost")

    pair.log_a.append_batch = reply_lost  # type: ignore[method-assign]
    writer = LogWriter(
        pair.log_a, stream_id, running_writer.attempt, running_writer.next_seq, lease_seconds=0.2
    )
    with pytest.raises(StoreUnavailable):
        await writer.append(token("c"), token("d"))
    if reached_the_master:
        writer.log = pair.log_b  # re-pointed at the new master, as a Sentinel pool is
    else:
        pair.log_a.append_batch = real_append  # type: ignore[method-assign]
    await writer.end(events.error("worker_stopped", "the worker stopped", retryable=True, t=9))
    return stream_id


async def test_an_end_after_a_batch_in_doubt_on_a_new_master_records_the_loss(
    pair: Failover,
) -> None:
    """Readers of the old master hold token 4 ("c"); the writer's end lands at 4 on the new
    one. The append says its id was in doubt, and on another epoch the store records it as
    lost: a reader holding 4 or 5 gets 410, never 204 under an id that now means an error."""
    stream_id = await end_after_a_batch_in_doubt(pair, reached_the_master=True)
    state = await pair.log_b.get(stream_id)
    assert state.lost_from_seq == 4
    answers = await anyio.to_thread.run_sync(resumes_on, pair.b, stream_id, "3", "4", "5")
    assert answers == {"3": (200, "4:error"), "4": (410, "log_lost"), "5": (410, "log_lost")}


async def test_an_end_after_a_batch_in_doubt_on_the_same_master_is_no_loss(
    pair: Failover,
) -> None:
    """The batch never reached the store and nothing failed over: nobody can hold id 4, so
    the end stands as the stream's last event and nothing is recorded lost."""
    stream_id = await end_after_a_batch_in_doubt(pair, reached_the_master=False)
    state = await pair.log_a.get(stream_id)
    assert state.lost_from_seq is None
    assert state.last_seq == 4
    answers = await anyio.to_thread.run_sync(resumes_on, pair.a, stream_id, "3", "4")
    assert answers == {"3": (200, "4:error"), "4": (204, "")}
