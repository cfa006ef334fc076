"""Running the Node client scripts of ``tests/clients/node`` from pytest.

The client libraries and Node itself (the ``node`` package, a Node 22 binary) are pinned by
``tests/clients/node/package-lock.json``; ``npm ci`` in that directory installs them (CI does,
before pytest). A script is run as ``node <script> <case> '<json params>'`` with the broker's
addresses in its environment (see ``lib.mjs``) and prints one line of JSON: what the client
library observed.

The ``test_clients_node_*`` modules share one ``NodeBroker`` (the ``node_broker`` fixture of
``tests/conftest.py``: an api and a worker whose upstream is the local ``OpenAIServer``), and
the constants and expectations below.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.support.chaos_proxy import ChaosProxy
from tests.support.client_libraries import PROMPT_TOKENS
from tests.support.generations import MESSAGES
from tests.support.openai_answers import TOOL_CALLS
from tests.support.openai_server import OpenAIServer
from tests.support.processes import ROOT, ApiProcess

NODE_DIR = ROOT / "tests" / "clients" / "node"
#: The pinned Node binary (the machine's own may be too old for these libraries).
NODE = NODE_DIR / "node_modules" / ".bin" / "node"
#: Packages the scripts import; any missing means ``npm ci`` did not run (or failed).
PACKAGES = (
    "openai",
    "ai",
    "@ai-sdk/openai-compatible",
    "@langchain/openai",
    "@langchain/core",
    "eventsource",
    "@microsoft/fetch-event-source",
    "zod",
)
#: Seconds a script may run (they take one or two; each also bounds its own waits).
TIMEOUT = 60


def node_or_skip() -> Path:
    """The pinned Node binary; without it (or the libraries), skip locally, fail under CI."""
    missing = [name for name in PACKAGES if not (NODE_DIR / "node_modules" / name).is_dir()]
    if not NODE.exists() or missing:
        message = (
            f"the Node client libraries are not installed ({', '.join(missing) or 'node'} "
            f"missing): run `npm ci` in {NODE_DIR.relative_to(ROOT)}"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; the Node client tests must not be skipped under CI")
        pytest.skip(message)
    return NODE


async def run_script(
    script: str,
    case: str,
    params: Mapping[str, Any] | None = None,
    *,
    broker: str,
    proxy: str | None = None,
) -> dict[str, Any]:
    """Run ``case`` of ``tests/clients/node/<script>`` against ``broker`` (through ``proxy``
    where the case reads through one); its JSON result, or the test fails with its stderr."""
    env = {
        # Only what Node needs: no proxy, tracing or API-key variables of the caller's.
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "SB_BROKER": broker,
        "SB_MESSAGES": json.dumps(MESSAGES),
        **({"SB_PROXY": proxy} if proxy else {}),
    }
    command = [str(node_or_skip()), script, case, json.dumps(dict(params or {}))]
    try:
        with anyio.fail_after(TIMEOUT):
            done = await anyio.run_process(command, cwd=NODE_DIR, env=env, check=False)
    except TimeoutError:
        pytest.fail(f"{script} {case} did not finish within {TIMEOUT} s")
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    if done.returncode != 0:
        pytest.fail(f"{script} {case} exited with {done.returncode}:\n{stderr}{stdout}")
    lines = stdout.strip().splitlines()
    assert lines, f"{script} {case} printed nothing; stderr:\n{stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# -- what the Node client tests share -------------------------------------------------------

#: Streams read through the cutting proxy: 60 tokens at 40/s, live for about 1.5 s, so the
#: cuts fall both in the catch-up of recorded events and at the live tail.
CUT_TOKENS = 60
CUT_RATE = 40
#: Bytes a connection carries before the proxy cuts it (response head included): enough for
#: the head and the largest single frame of the format, small enough for many cuts a stream.
NATIVE_CUTS = (300, 900)
OPENAI_CUTS = (400, 1500)
AI_SDK_CUTS = (300, 1000)
#: ``tool-model``'s calls as the AI SDK and LangChain parse them.
TOOL_INPUTS = [(call_id, name, json.loads(arguments)) for call_id, name, arguments in TOOL_CALLS]


@dataclass
class NodeBroker:
    """The api (and its upstream) a module's Node client tests run their scripts against."""

    api: ApiProcess
    upstream: OpenAIServer

    async def run(
        self,
        script: str,
        case: str,
        params: dict[str, Any] | None = None,
        proxy: ChaosProxy | None = None,
    ) -> dict[str, Any]:
        """Run a case of ``tests/clients/node/<script>`` (reading through ``proxy`` if given)."""
        via = f"http://127.0.0.1:{proxy.port}" if proxy is not None else None
        return await run_script(script, case, params, broker=self.api.url, proxy=via)

    async def stream_count(self, model: str) -> int:
        """How many generations of ``model`` the broker holds (they fit in one page)."""
        async with httpx.AsyncClient(timeout=30) as client:
            params: dict[str, str | int] = {"limit": 200, "model": model}
            response = await client.get(f"{self.api.url}/v1/streams", params=params)
        response.raise_for_status()
        streams: list[Any] = response.json()["data"]
        assert len(streams) < 200
        return len(streams)

    def cutting(self, cut_after: tuple[int, int], seed: int) -> ChaosProxy:
        """A proxy in front of the api that cuts every connection after ``cut_after`` bytes."""
        return ChaosProxy(self.api.port, cut_after=cut_after, seed=seed)


def usage(completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion_tokens,
        "total_tokens": PROMPT_TOKENS + completion_tokens,
    }
