"""The arq job that runs a generation, queued in the transaction that records it.

The api writes the job itself, in arq's format, instead of calling ``ArqRedis.enqueue_job``:
that call is a ``WATCH``/``EXISTS``/``MULTI`` exchange of several round trips of its own,
after the generation was recorded in another. Folded into the record's transaction it is
one round trip (on a busy api each round trip waits its turn on the event loop), and a
generation can no longer be recorded without its job, or a job queued without its
generation. The uniqueness check ``enqueue_job`` makes is not needed: the job id is the
new stream id.
"""

from __future__ import annotations

from typing import Any

from arq.constants import job_key_prefix
from arq.jobs import serialize_job

from broker import keys

#: The worker function's name in arq.
GENERATE_JOB = "generate"
#: How long a job may wait in the queue before it is dropped (arq's own default: a day). arq
#: skips a job whose record expired; the lease sweeper then ends its generation.
DEFAULT_QUEUE_TIMEOUT_SECONDS = 24 * 3600


def queue_generation(pipe: Any, stream_id: str, now_ms: int, *, expires_ms: int) -> None:
    """Add ``generate(stream_id)`` to the queue, due now, on a pipeline (``MULTI`` or not);
    its record expires unstarted after ``expires_ms``."""
    job_id = keys.job_id(stream_id)
    pipe.psetex(job_record_key(stream_id), expires_ms, job_record(stream_id, now_ms))
    pipe.zadd(keys.QUEUE_NAME, {job_id: now_ms})


def job_record(stream_id: str, now_ms: int) -> bytes:
    """arq's serialized ``generate(stream_id)`` job, enqueued at ``now_ms``."""
    return serialize_job(GENERATE_JOB, (stream_id,), {}, None, now_ms)


async def queue_continuation(
    redis: Any, stream_id: str, number: int, now_ms: int, *, queued: int, expires_ms: int
) -> None:
    """Queue ``generate(stream_id, number)``, the generation's ``number``-th continuation,
    due now, for the ``queued``-th time (``keys.continuation_job_id``)."""
    job_id = keys.continuation_job_id(stream_id, number, queued)
    record = serialize_job(GENERATE_JOB, (stream_id, number), {}, None, now_ms)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.psetex(job_key_prefix + job_id, expires_ms, record)
        pipe.zadd(keys.QUEUE_NAME, {job_id: now_ms})
        await pipe.execute()


def job_record_key(stream_id: str) -> str:
    """arq's record of the generation's job: there while the job is queued or running,
    deleted when a worker is done with it."""
    return job_key_prefix + keys.job_id(stream_id)
