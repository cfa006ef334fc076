"""Continuing a generation whose writer was lost or stopped: what came before, and whether.

A job whose claim finds events an earlier attempt wrote (``Claim.last_seq`` > 0) continues
the same stream instead of starting over: it reads what the earlier attempts wrote, appends a
``resumed`` event after their last one, and asks the provider for what follows
(``workers.providers.base.Resume``). Nothing already in the log is generated again, so no
reader ever gets other text under an id it holds; how faithful the continuation is depends on
the route's mode (``broker.setting_fields.Continuation``: exact for the fake model; the
partial answer sent back as the last assistant message for servers that continue one).

It ends the stream explicitly instead (``worker_lost`` / ``worker_stopped``, retryable, as a
generation that was never continued) when:

- its route does not continue (``off``, the default for OpenAI-compatible servers, which
  cannot be told to continue an answer exactly);
- it was interrupted inside a tool call: a partial call's arguments cannot be continued as
  text, and a client may already have acted on the calls it received;
- its workers were lost more than ``BROKER_MAX_CONTINUATIONS`` times (a request that kills
  every worker that runs it must not go round forever). Graceful stops do not count: a
  rolling deploy may hand one answer over several times, through no fault of the request.
"""

from __future__ import annotations

from broker.earlier_attempts import EarlierAttempts
from broker.generation_log import Claim
from broker.setting_fields import Continuation


def why_not_continued(
    claim: Claim, mode: Continuation, earlier: EarlierAttempts, *, max_continuations: int
) -> str | None:
    """Why this continuation must end the stream instead; None when it may go on."""
    if mode is Continuation.OFF:
        return "its model's route does not continue generations"
    if claim.lost_continuations > max_continuations:
        return (
            f"it was continued after lost workers {max_continuations} times already "
            "(BROKER_MAX_CONTINUATIONS)"
        )
    if earlier.tool_call:
        return "it stopped inside a tool call, which cannot be continued"
    return None


def stopped_message(reason: str, why: str) -> str:
    """The ``error`` event's message for a continuation that ends the stream."""
    what = {
        "worker_stopped": "the worker running this generation shut down",
        "worker_lost": "the worker running this generation stopped responding",
    }.get(reason, "the worker running this generation stopped")
    return f"{what}, and it was not continued: {why}; retry the request"
