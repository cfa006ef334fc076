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

from dataclasses import dataclass

from broker.events import EventType
from broker.generation_log import Claim, GenerationLog
from broker.setting_fields import Continuation

#: Events read per round trip while collecting what earlier attempts wrote.
_PAGE = 512


@dataclass(frozen=True)
class EarlierAttempts:
    """What the attempts before a continuation wrote."""

    #: Their answer: every ``token`` event's text, end to end.
    text: str
    #: Their tokens (the ``token`` events' counts).
    tokens: int
    #: They wrote a ``tool_call`` event.
    tool_call: bool
    #: The ``t`` of their last event: where the seam's delay is measured from.
    last_t: int


async def read_earlier(log: GenerationLog, stream_id: str, last_seq: int) -> EarlierAttempts:
    """Collect events 1..``last_seq`` (the claim fenced their writers: no more will come)."""
    texts: list[str] = []
    tokens = 0
    tool_call = False
    last_t = 0
    after = 0
    while after < last_seq:
        page = await log.read(stream_id, after, count=_PAGE)
        if not page:
            break  # the log expired under us; what was read is all there is
        for event in page:
            if event.seq > last_seq:
                break
            if event.type is EventType.TOKEN:
                texts.append(str(event.data.get("text", "")))
                tokens += int(event.data.get("tokens", 0))
            elif event.type is EventType.TOOL_CALL:
                tool_call = True
            last_t = event.t
        after = page[-1].seq
    return EarlierAttempts("".join(texts), tokens, tool_call, last_t)


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


def streamed_usage(tokens: int) -> dict[str, int]:
    """Usage as the broker counted it, for an end without the provider's (a cancel at the
    seam): the tokens streamed, no prompt count."""
    return {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens}
