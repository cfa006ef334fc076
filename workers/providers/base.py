"""The provider protocol: what every model backend gives the generate job.

A provider turns a ``GenerationRequest`` into an async iterator of normalized chunks. The job
does not care where tokens come from; it batches text, forwards tool-call deltas, and records
usage and the finish reason. Closing the iterator (``aclose()``) must close the upstream
request: that is how cancellation stops a generation that is still producing.

Failures surface as ``ProviderError`` with a stable ``code`` (part of the public ``error``
event), a readable message, and whether retrying the same request may succeed.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from broker.request import GenerationRequest
from broker.setting_fields import Continuation


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str


Chunk = TextDelta | ToolCallDelta | Usage | Finish


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a continuation picks up (``workers.continuation``): what the attempts before it
    wrote, and how the route continues. A provider makes only what comes after: its chunks
    continue ``text``, and its ``Usage`` counts its own request (the job adds ``tokens``)."""

    #: The answer so far: every ``token`` event's text, end to end.
    text: str
    #: The tokens streamed so far (the ``token`` events' counts).
    tokens: int
    mode: Continuation


class ProviderError(Exception):
    def __init__(
        self, code: str, message: str, *, retryable: bool, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


class Provider(Protocol):
    name: str

    def stream(
        self, request: GenerationRequest, resume: Resume | None = None
    ) -> AsyncGenerator[Chunk, None]:
        """Chunks of one generation, in order; with ``resume``, only those after what earlier
        attempts wrote. Raises ``ProviderError`` on failure."""
        ...

    async def aclose(self) -> None:
        """Release clients and connections the provider holds."""
        ...
