"""``Client``: the same API for code without an event loop.

It runs an ``AsyncClient`` on a private event loop, one call at a time, so the two can never
disagree about retries, resume or parsing. It cannot be used from inside a running event
loop (use ``AsyncClient`` there).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Awaitable, Generator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from broker.client.aio import AsyncClient, Created, Page
from broker.client.errors import ClientError
from broker.client.events import StreamEvent
from broker.client.watch import Watch, WatchStats

T = TypeVar("T")


class Client:
    """``with Client(url, api_key=...) as sb:`` then the methods of ``AsyncClient``."""

    def __init__(self, base_url: str | None = None, **options: Any) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # no loop running here: the private one can run
        else:
            raise ClientError(
                "Client (sync) cannot run inside an event loop: use AsyncClient there"
            )
        if base_url is not None:
            options["base_url"] = base_url
        # A Runner, as asyncio.run uses: Ctrl-C cancels the call in progress where it waits,
        # so that the watch it runs unwinds and can be closed, then raises KeyboardInterrupt.
        # The factory keeps the loop private (not the thread's current loop).
        self._runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)
        self._loop = self._runner.get_loop()
        self._async = self._run(_build(options))
        self._watches: weakref.WeakSet[SyncWatch] = weakref.WeakSet()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            # Watches the caller left half-way are closed outermost first, so that each
            # generator closes the ones it holds, in order.
            for watch in list(self._watches):
                watch.close()
            self._run(self._async.aclose())
            # Generators abandoned half-way (a watch the caller left) are closed on this
            # loop, then the loop.
            self._runner.close()

    def _run(self, work: Awaitable[T]) -> T:
        return self._runner.run(_awaited(work))

    def create(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int | None = None,
        metadata: Mapping[str, str] | None = None,
        fake: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> Created:
        """``AsyncClient.create``: sent again, with its ``Idempotency-Key``, when its answer
        is lost."""
        return self._run(
            self._async.create(
                model,
                messages,
                max_tokens=max_tokens,
                metadata=metadata,
                fake=fake,
                idempotency_key=idempotency_key,
                **params,
            )
        )

    def get(self, stream_id: str) -> dict[str, Any]:
        return self._run(self._async.get(stream_id))

    def cancel(self, stream_id: str) -> dict[str, Any]:
        return self._run(self._async.cancel(stream_id))

    def list_streams(self, **filters: Any) -> Page:
        return self._run(self._async.list_streams(**filters))

    def export(self, stream_id: str) -> Generator[bytes, None, None]:
        return self._iterate(self._async.export(stream_id))

    def import_archive(self, archive: bytes) -> dict[str, Any]:
        return self._run(self._async.import_archive(archive))

    def watch(
        self, stream_id: str, *, last_event_id: int = 0, replay: float | None = None
    ) -> SyncWatch:
        watch = SyncWatch(
            self, self._async.watch(stream_id, last_event_id=last_event_id, replay=replay)
        )
        self._watches.add(watch)
        return watch

    def _iterate(self, items: AsyncIterator[T]) -> Generator[T, None, None]:
        try:
            while True:
                try:
                    yield self._run(anext(items))
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None and not self._loop.is_closed():
                self._run(aclose())


class SyncWatch:
    """An iterator of ``StreamEvent`` with ``stats``; ``close()`` stops it early."""

    def __init__(self, client: Client, watch: Watch) -> None:
        self._client = client
        self._watch = watch
        self._events = client._iterate(watch)

    @property
    def stats(self) -> WatchStats:
        return self._watch.stats

    def __iter__(self) -> Iterator[StreamEvent]:
        return self._events

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._events.close()


async def _awaited(work: Awaitable[T]) -> T:
    return await work  # Runner.run takes coroutines only (``anext()`` gives an awaitable)


async def _build(options: dict[str, Any]) -> AsyncClient:
    # Built inside the private loop, so that httpx binds nothing to another loop.
    return AsyncClient(**options)
