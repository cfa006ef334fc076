"""Which model names the api accepts (``422 unknown_model`` for the others).

A name is known when its route (``BROKER_ROUTES``) leads to a provider that serves it:

- the built-in providers (``fake``) serve every name routed to them;
- with ``BROKER_MODELS`` set, exactly those names (no upstream is asked: the api needs no key);
- otherwise the upstream's ``GET /models``, cached for ``BROKER_MODELS_CACHE_SECONDS`` and
  fetched again once stale; concurrent callers share one fetch, which has a short timeout so a
  create request never hangs on a slow upstream;
- an upstream that does not list its models (404/405/501, unreachable, slow, a malformed or
  empty answer) lets every name through — the upstream itself judges the name when the job runs.
  That answer is cached for a shorter time, and a transient failure keeps a list fetched
  before rather than switching to letting everything through;
- with no upstream configured (neither ``OPENAI_BASE_URL`` nor ``OPENAI_API_KEY``: see
  ``Settings.upstream``), names routed to ``openai`` are unknown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import httpx2
import openai
from openai import AsyncOpenAI

from broker.closing import AsyncCloseable
from broker.routing import fixed_models, route_model
from broker.settings import Settings

logger = logging.getLogger(__name__)

UPSTREAM = "openai"
#: Statuses meaning "this server has no model list" rather than "something went wrong".
NOT_LISTING = frozenset({404, 405, 501})


@dataclass(frozen=True)
class _Listing:
    models: frozenset[str] | None  # None: the upstream does not list, every name passes
    expires_at: float


class ModelCatalog(AsyncCloseable):
    def __init__(
        self,
        settings: Settings,
        *,
        fetch_timeout: float = 3.0,
        failure_cache_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._routes = settings.generation.routes
        self._explicit = frozenset(settings.api.models) if settings.api.models else None
        self._cache_seconds = settings.api.models_cache_seconds
        self._failure_seconds = min(failure_cache_seconds, self._cache_seconds)
        self._fetch_timeout = fetch_timeout
        self._clock = clock
        self._listing: _Listing | None = None
        self._lock = anyio.Lock()
        self._client: AsyncOpenAI | None = None
        if self._explicit is None and settings.upstream.configured:
            # A create request waits for this fetch: no retries, a failure is cached.
            self._client = settings.upstream.client(timeout=fetch_timeout, max_retries=0)

    async def is_known(self, model: str) -> bool:
        provider = route_model(model, self._routes)
        if provider is None:
            return False
        if provider != UPSTREAM:
            return True
        if self._explicit is not None:
            return model in self._explicit
        if self._client is None:
            return False
        listed = await self._upstream_models()
        return listed is None or model in listed

    async def list_models(self) -> list[str]:
        """The names a client can ask for: built-in ones first, then the upstream's, sorted.

        Wildcard routes cannot be listed, and an upstream that does not list adds nothing.
        """
        providers = dict.fromkeys(r[1] for r in self._routes if r[1] != UPSTREAM)
        builtin = [m for p in providers for m in fixed_models(self._routes, p)]
        if self._explicit is not None:
            upstream: frozenset[str] | None = self._explicit
        else:
            upstream = await self._upstream_models() if self._client is not None else None
        served = {m for m in upstream or () if route_model(m, self._routes) is not None}
        names = list(dict.fromkeys(builtin))
        return names + sorted(served - set(names))

    async def _upstream_models(self) -> frozenset[str] | None:
        if not self._is_stale():
            assert self._listing is not None
            return self._listing.models
        async with self._lock:
            # Whoever waited for the lock finds the listing the first caller fetched.
            if self._is_stale():
                self._listing = await self._fetch()
            assert self._listing is not None
            return self._listing.models

    def _is_stale(self) -> bool:
        return self._listing is None or self._clock() >= self._listing.expires_at

    async def _fetch(self) -> _Listing:
        assert self._client is not None
        try:
            # The SDK's timeout bounds each read; this bounds the whole answer.
            with anyio.fail_after(self._fetch_timeout):
                names = [model.id async for model in self._client.models.list()]
            # An empty list is as good as none: an answer without "data" also reads as empty.
            if not names or not all(isinstance(name, str) for name in names):
                raise ValueError("no model names")
        except openai.APIStatusError as exc:
            if exc.status_code in NOT_LISTING:
                return self._pass_through(f"it answers HTTP {exc.status_code}")
            return self._after_failure(f"it answered HTTP {exc.status_code}")
        except (openai.APIConnectionError, httpx2.HTTPError, OSError, TimeoutError) as exc:
            return self._after_failure(f"it could not be reached ({type(exc).__name__})")
        except (openai.OpenAIError, AttributeError, TypeError, ValueError) as exc:
            return self._pass_through(f"its answer is malformed ({type(exc).__name__})")
        return _Listing(frozenset(names), self._clock() + self._cache_seconds)

    def _pass_through(self, why: str) -> _Listing:
        logger.warning(
            "The upstream does not list its models (%s): every model name is "
            "accepted and the upstream judges it.",
            why,
        )
        return _Listing(None, self._clock() + self._failure_seconds)

    def _after_failure(self, why: str) -> _Listing:
        """A transient failure: keep a list fetched before, if any, for a short while."""
        previous = self._listing.models if self._listing is not None else None
        if previous is None:
            return self._pass_through(why)
        logger.warning(
            "Could not refresh the upstream's model list (%s); keeping the previous one.", why
        )
        return _Listing(previous, self._clock() + self._failure_seconds)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
