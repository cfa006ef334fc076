"""The OpenAI-compatible upstream: where it is and how to reach it.

Read from the variables the openai SDK itself reads (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``,
``OPENAI_ORG_ID``, ``OPENAI_PROJECT_ID``), in one place, so that the api's model catalog and
the workers' provider always talk to the same server with the same credentials.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from openai import AsyncOpenAI

#: Sent when a base URL is set without a key: local servers (vLLM, Ollama, llama.cpp, LM
#: Studio) ignore the key, but the SDK refuses to start without one.
PLACEHOLDER_API_KEY = "no-key-needed"
OPENAI_URL = "https://api.openai.com/v1"


@dataclass(frozen=True)
class Upstream:
    base_url: str | None = None
    api_key: str | None = None
    organization: str | None = None
    project: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Upstream:
        env = os.environ if environ is None else environ
        return cls(
            base_url=env.get("OPENAI_BASE_URL") or None,
            api_key=env.get("OPENAI_API_KEY") or None,
            organization=env.get("OPENAI_ORG_ID") or None,
            project=env.get("OPENAI_PROJECT_ID") or None,
        )

    @property
    def configured(self) -> bool:
        """Whether any upstream was named: without a URL or a key there is nobody to call."""
        return bool(self.base_url or self.api_key)

    def client(self, *, timeout: float, max_retries: int) -> AsyncOpenAI:
        # Every value explicit, so this object (not os.environ) decides what the SDK uses.
        return AsyncOpenAI(
            api_key=self.api_key or PLACEHOLDER_API_KEY,
            base_url=self.base_url or OPENAI_URL,
            organization=self.organization,
            project=self.project,
            timeout=timeout,
            max_retries=max_retries,
        )
