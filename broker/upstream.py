"""The OpenAI-compatible upstream: where it is and how to reach it.

Read from the variables the openai SDK itself reads (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``,
``OPENAI_ORG_ID``, ``OPENAI_PROJECT_ID``) by ``Settings.from_env``, once, and handed to the
api's model catalog and the workers' provider, so that both always talk to the same server
with the same credentials.

The SDK is imported only when a client is built: every process reads its settings, and
most (the command line, a worker serving only the fake model) never call the upstream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openai import AsyncOpenAI

#: Sent when a base URL is set without a key: local servers (vLLM, Ollama, llama.cpp, LM
#: Studio) ignore the key, but the SDK refuses to start without one.
PLACEHOLDER_API_KEY = "no-key-needed"
OPENAI_URL = "https://api.openai.com/v1"


@dataclass(frozen=True)
class Upstream:
    """Where the upstream is and the credentials it takes (each ``None`` when unset)."""

    base_url: str | None = None
    # Kept out of the repr: ``Settings`` holds this object, and a repr of the settings (in a
    # traceback or a debug line) must not carry the key.
    api_key: str | None = field(default=None, repr=False)
    organization: str | None = None
    project: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Upstream:
        """The upstream the ``OPENAI_*`` variables name; an empty variable counts as unset."""
        return cls(
            base_url=environ.get("OPENAI_BASE_URL") or None,
            api_key=environ.get("OPENAI_API_KEY") or None,
            organization=environ.get("OPENAI_ORG_ID") or None,
            project=environ.get("OPENAI_PROJECT_ID") or None,
        )

    @property
    def configured(self) -> bool:
        """Whether any upstream was named: without a URL or a key there is nobody to call."""
        return bool(self.base_url or self.api_key)

    def client(self, *, timeout: float, max_retries: int) -> AsyncOpenAI:
        from openai import AsyncOpenAI

        # Every value explicit, so this object (not os.environ) decides what the SDK uses.
        return AsyncOpenAI(
            api_key=self.api_key or PLACEHOLDER_API_KEY,
            base_url=self.base_url or OPENAI_URL,
            organization=self.organization,
            project=self.project,
            timeout=timeout,
            max_retries=max_retries,
        )
