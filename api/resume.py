"""Where a client resumes: the ``Last-Event-ID`` it sends back, parsed and checked.

In the broker's own format every event is one SSE frame and its id is the event's id, a
plain integer. The OpenAI and AI SDK formats may turn one event into several frames (the
``finish_reason`` chunk, the usage chunk and ``[DONE]``; ``text-end`` then
``tool-input-start``). Only the last frame of such a group carries the event's id; frame
``k`` before it carries ``<previous id>.<k>``: "everything up to that event, and the first
``k`` frames of the next". A client cut between two frames of one group thus resumes at
the exact frame, not repeating the ones it has nor skipping the others. The ids still
increase when read as decimals (``41 < 41.1 < 41.2 < 42``).
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from api.errors import ApiError
from broker.numbers import InvalidNumber, parse_int

#: Largest accepted resume point; ids are sequence numbers, far below this.
MAX_EVENT_ID = 2**63 - 1
#: Largest frame count in a sub-event id; one event never becomes this many frames.
MAX_SKIP = 999


@dataclass(frozen=True)
class ResumePoint:
    """After event ``after``, skipping the first ``skip`` frames of the next group."""

    after: int = 0
    skip: int = 0

    @property
    def resumed(self) -> bool:
        return self.after > 0 or self.skip > 0

    def __str__(self) -> str:
        return f"{self.after}.{self.skip}" if self.skip else str(self.after)


def resume_point(request: Request, *, sub_ids: bool) -> ResumePoint:
    """The id of the last frame the client saw: header first, then query; 0 = the start.

    ASCII digits only (``broker.numbers``): no sign, ``_``, space or other scripts' digits.
    Spaces and tabs around the header's value are HTTP's, not part of it; the query's are.
    ``sub_ids``: the format being asked for sends ``<id>.<k>`` ids (see the module's doc)."""
    raw, source = request.headers.get("last-event-id", "").strip(" \t"), "Last-Event-ID header"
    if not raw:  # absent or blank (EventSource before its first event): try the query
        raw, source = request.query_params.get("last_event_id", ""), "last_event_id"
    if not raw:
        return ResumePoint()
    event, dot, frames = raw.partition(".")
    try:
        after = parse_int(event, max_digits=len(str(MAX_EVENT_ID)))
        skip = parse_int(frames, max_digits=len(str(MAX_SKIP))) if dot else 0
    except InvalidNumber:
        after, skip = MAX_EVENT_ID + 1, 0  # refused below, with the same message
    if after > MAX_EVENT_ID or (dot and not sub_ids) or (dot and skip == 0):
        expected = (
            "an event id (a non-negative integer, or <id>.<k> as this format sends)"
            if sub_ids
            else "the id of an event (a non-negative integer)"
        )
        raise ApiError(
            400, "invalid_last_event_id", f"the {source} must be {expected}, not {raw[:40]!r}"
        )
    return ResumePoint(after, skip)
