"""The end-to-end deployment of the ``test_e2e_*`` modules: two api front-ends and an arq worker
on the session's redis-server, and the local OpenAI-compatible upstream (``OpenAIServer``),
all on free ports. The ``deployment`` fixture (``tests/conftest.py``) starts one, which the
``test_e2e_*`` modules that use it share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tests.support.openai_server import OpenAIServer
from tests.support.processes import ApiProcess, BrokerProcess, Launcher

#: The front-ends' ``BROKER_MAX_BODY_BYTES``: a larger request body is refused with 413.
MAX_BODY_BYTES = 65_536


@dataclass
class Deployment:
    apis: list[ApiProcess]
    worker: BrokerProcess
    upstream: OpenAIServer

    @property
    def urls(self) -> list[str]:
        return [api.url for api in self.apis]


@contextmanager
def running_deployment(redis_url: str) -> Iterator[Deployment]:
    """The deployment, stopped on exit however the block ends."""
    with OpenAIServer() as upstream, Launcher(redis_url) as launch:
        env = {
            "OPENAI_BASE_URL": upstream.base_url,
            "BROKER_HEARTBEAT_SECONDS": "0.3",
            "BROKER_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
            # The 'slow' upstream model then times out within the test's patience.
            "BROKER_UPSTREAM_TIMEOUT_SECONDS": "1.5",
        }
        apis = [launch.api(env), launch.api(env)]
        worker = launch.worker(env)
        yield Deployment(apis=apis, worker=worker, upstream=upstream)
