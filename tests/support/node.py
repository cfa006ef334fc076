"""Running the Node client scripts of ``tests/clients/node`` from pytest.

The client libraries and Node itself (the ``node`` package, a Node 22 binary) are pinned by
``tests/clients/node/package-lock.json``; ``npm ci`` in that directory installs them (CI does,
before pytest). A script is run as ``node <script> <case> '<json params>'`` with the broker's
addresses in its environment (see ``lib.mjs``) and prints one line of JSON: what the client
library observed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.support.generations import MESSAGES
from tests.support.processes import ROOT

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
