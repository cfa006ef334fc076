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
#: arq's default for a job that was never started: dropped after a day.
JOB_EXPIRES_MS = 24 * 3600 * 1000


def queue_generation(pipe: Any, stream_id: str, now_ms: int) -> None:
    """Add ``generate(stream_id)`` to the queue, due now, on a pipeline (``MULTI`` or not)."""
    job = serialize_job(GENERATE_JOB, (stream_id,), {}, None, now_ms)
    pipe.psetex(job_key_prefix + stream_id, JOB_EXPIRES_MS, job)
    pipe.zadd(keys.QUEUE_NAME, {stream_id: now_ms})
