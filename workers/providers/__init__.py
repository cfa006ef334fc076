"""Model backends. ``Providers`` builds each one once per worker and routes models to them."""

from __future__ import annotations

from broker.routing import route_model
from broker.settings import GenerationSettings
from broker.upstream import Upstream
from workers.providers.base import Provider
from workers.providers.fake import FakeProvider


class Providers:
    """The providers of one worker process, created lazily and closed together."""

    def __init__(self, settings: GenerationSettings, upstream: Upstream) -> None:
        self.settings = settings
        self.upstream = upstream
        self._built: dict[str, Provider] = {}

    def for_model(self, model: str) -> Provider | None:
        name = route_model(model, self.settings.routes)
        if name is None:
            return None
        if name not in self._built:
            self._built[name] = self._build(name)
        return self._built[name]

    def warm(self) -> None:
        """Build, at start-up, the providers the routes can reach and that can serve: the
        openai SDK takes a second or more to import, which inside a job would stall every
        generation of the worker (and, with a short lease, cost them their leases). A
        worker with no upstream configured never imports it."""
        for route in self.settings.routes:
            name = route[1]
            if name in self._built or (name == "openai" and not self.upstream.configured):
                continue
            self._built[name] = self._build(name)

    def _build(self, name: str) -> Provider:
        if name == "fake":
            return FakeProvider(default_max_tokens=self.settings.default_max_tokens)
        # Imported here so that a worker serving only the fake never loads the SDK.
        from workers.providers.openai import OpenAIProvider

        return OpenAIProvider(self.settings, self.upstream)

    async def aclose(self) -> None:
        for provider in self._built.values():
            await provider.aclose()
        self._built.clear()
