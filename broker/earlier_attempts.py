"""What the earlier attempts of a generation wrote, read back from its log.

A continuation reads it to go on from there (``workers.continuation``); a generation ended
while a continuation waited (a cancel at the seam) reads it for the usage its ``done`` event
reports: the tokens readers already have, which no provider will report now.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.events import EventType

if TYPE_CHECKING:
    from broker.generation_log import GenerationLog

#: Events read per round trip.
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
    """Collect events 1..``last_seq`` (the caller's claim fenced their writers: no more will
    come)."""
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


def streamed_usage(tokens: int) -> dict[str, int]:
    """Usage as the broker counted it, for an end without the provider's (a cancel at the
    seam): the tokens streamed, no prompt count."""
    return {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens}
