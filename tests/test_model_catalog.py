"""The model catalog against a local OpenAI-compatible server's ``GET /models``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import pytest

from api.model_catalog import ModelCatalog
from broker.settings import ApiSettings, GenerationSettings, Settings
from broker.upstream import Upstream
from tests.support.openai_server import SCRIPTED_MODELS, OpenAIServer
from tests.support.redis_server import free_port

pytestmark = pytest.mark.anyio

WAIT = 10.0
CACHE_SECONDS = 60.0
FAILURE_SECONDS = 5.0


class Clock:
    """A monotonic clock the test moves by hand, so expiry needs no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


MakeCatalog = Callable[..., ModelCatalog]


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer(slow_seconds=30.0) as running:
        yield running


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make_catalog(server: OpenAIServer, clock: Clock) -> AsyncIterator[MakeCatalog]:
    server.reset()
    server.models_mode = "list"
    made: list[ModelCatalog] = []

    def make(
        upstream: Upstream | None = None,
        *,
        models: tuple[str, ...] | None = None,
        routes: tuple[tuple[str, str], ...] | None = None,
        **options: Any,
    ) -> ModelCatalog:
        generation = GenerationSettings() if routes is None else GenerationSettings(routes=routes)
        settings = Settings(
            api=ApiSettings(models=models, models_cache_seconds=CACHE_SECONDS),
            generation=generation,
            upstream=Upstream(base_url=server.base_url) if upstream is None else upstream,
        )
        catalog = ModelCatalog(
            settings, clock=clock, failure_cache_seconds=FAILURE_SECONDS, **options
        )
        made.append(catalog)
        return catalog

    yield make
    server.models_mode = "list"
    for catalog in made:
        await catalog.aclose()


async def known(catalog: ModelCatalog, model: str) -> bool:
    with anyio.fail_after(WAIT):
        return await catalog.is_known(model)


async def test_listed_models_are_known_and_others_are_not(make_catalog: MakeCatalog) -> None:
    catalog = make_catalog()

    assert await known(catalog, "echo-model")
    assert await known(catalog, "tool-model")
    assert not await known(catalog, "gpt-unlisted")


async def test_the_fake_model_is_always_known(
    make_catalog: MakeCatalog, server: OpenAIServer
) -> None:
    unreachable = Upstream(base_url=f"http://127.0.0.1:{free_port()}/v1")
    for catalog in (
        make_catalog(),
        make_catalog(Upstream()),
        make_catalog(models=("x",)),
        make_catalog(unreachable),
    ):
        assert await known(catalog, "fake")
    assert server.models_requests == 0  # no need to ask the upstream about the fake


async def test_wildcard_routes_to_the_fake_are_known_and_unrouted_names_are_not(
    make_catalog: MakeCatalog,
) -> None:
    catalog = make_catalog(routes=(("fake*", "fake"), ("echo-*", "openai")))

    assert await known(catalog, "fake-large")
    assert await known(catalog, "echo-model")
    assert not await known(catalog, "tool-model")  # listed upstream, but no route leads there


async def test_an_explicit_list_allows_exactly_those_names(
    make_catalog: MakeCatalog, server: OpenAIServer
) -> None:
    catalog = make_catalog(models=("gpt-x", "echo-model"))

    assert await known(catalog, "gpt-x")
    assert await known(catalog, "echo-model")
    assert await known(catalog, "fake")
    assert not await known(catalog, "tool-model")  # the upstream lists it; the list does not
    assert await catalog.list_models() == ["fake", "echo-model", "gpt-x"]
    assert server.models_requests == 0


async def test_an_explicit_list_needs_no_upstream_configuration(make_catalog: MakeCatalog) -> None:
    assert await known(make_catalog(Upstream(), models=("gpt-x",)), "gpt-x")


@pytest.mark.parametrize("mode", ["404", "405", "501", "malformed"])
async def test_an_upstream_that_does_not_list_lets_every_name_through(
    make_catalog: MakeCatalog, server: OpenAIServer, mode: str
) -> None:
    server.models_mode = mode
    catalog = make_catalog()

    assert await known(catalog, "anything-at-all")
    assert await known(catalog, "echo-model")
    assert await catalog.list_models() == ["fake"]
    assert server.models_requests == 1  # the answer is cached too


async def test_an_unreachable_upstream_lets_every_name_through(make_catalog: MakeCatalog) -> None:
    catalog = make_catalog(Upstream(base_url=f"http://127.0.0.1:{free_port()}/v1"))

    assert await known(catalog, "anything-at-all")


async def test_a_slow_models_endpoint_gives_up_quickly(
    make_catalog: MakeCatalog, server: OpenAIServer
) -> None:
    server.models_mode = "slow"
    catalog = make_catalog(fetch_timeout=0.2)

    with anyio.fail_after(2):  # the server would answer after 30 s
        assert await catalog.is_known("anything-at-all")


async def test_without_an_upstream_upstream_names_are_unknown(make_catalog: MakeCatalog) -> None:
    catalog = make_catalog(Upstream())

    assert not await known(catalog, "echo-model")
    assert await catalog.list_models() == ["fake"]


async def test_the_list_is_cached_then_refreshed_when_stale(
    make_catalog: MakeCatalog, server: OpenAIServer, clock: Clock
) -> None:
    catalog = make_catalog()
    for model in ("echo-model", "tool-model", "nope"):
        await known(catalog, model)
    assert server.models_requests == 1

    clock.now += CACHE_SECONDS - 1
    await known(catalog, "echo-model")
    assert server.models_requests == 1

    clock.now += 1
    await known(catalog, "echo-model")
    assert server.models_requests == 2


async def test_a_failed_fetch_is_cached_for_a_shorter_time(
    make_catalog: MakeCatalog, server: OpenAIServer, clock: Clock
) -> None:
    server.models_mode = "404"
    catalog = make_catalog()
    assert await known(catalog, "nope")

    server.models_mode = "list"
    clock.now += FAILURE_SECONDS - 0.5
    assert await known(catalog, "nope")
    assert server.models_requests == 1

    clock.now += 1
    assert not await known(catalog, "nope")
    assert server.models_requests == 2


async def test_a_transient_failure_keeps_the_previous_list(
    make_catalog: MakeCatalog, server: OpenAIServer, clock: Clock
) -> None:
    catalog = make_catalog()
    assert not await known(catalog, "nope")

    server.models_mode = "500"  # the upstream has a bad moment
    clock.now += CACHE_SECONDS
    assert await known(catalog, "echo-model")
    assert not await known(catalog, "nope")
    assert server.models_requests == 2

    server.models_mode = "list"  # retried after the shorter failure period, not the full one
    clock.now += FAILURE_SECONDS
    await known(catalog, "nope")
    assert server.models_requests == 3


async def test_concurrent_callers_share_one_fetch(
    make_catalog: MakeCatalog, server: OpenAIServer
) -> None:
    catalog = make_catalog()
    answers: dict[str, bool] = {}

    async def ask(model: str) -> None:
        answers[model] = await catalog.is_known(model)

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(ask, "echo-model" if i == 0 else f"model-{i}")

    assert server.models_requests == 1
    assert answers["echo-model"]
    assert not answers["model-1"]


async def test_list_models_names_the_fake_then_the_upstreams(make_catalog: MakeCatalog) -> None:
    catalog = make_catalog()

    assert await catalog.list_models() == ["fake", *sorted(SCRIPTED_MODELS)]
