"""The shipped deployment files, parsed: where they are, and what the compose file, the
Kubernetes manifests, the Dockerfile, ``.dockerignore`` and the Prometheus and Grafana files
say, as the tests of ``tests/test_deploy_*.py`` read them.

The commands the compose file and the manifests run are passed to the command line itself
(``tests.support.cli_launch``): what comes back is what the code would start.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.support.cli_launch import Launch, launch
from tests.support.processes import ROOT

INFRA = ROOT / "infra"
NGINX_DIR = INFRA / "nginx"
HAPROXY_CFG = INFRA / "haproxy" / "haproxy.cfg"
PROMETHEUS_DIR = INFRA / "prometheus"
K8S_DIR = INFRA / "k8s"
COMPOSE = INFRA / "compose.yaml"
GRAFANA = INFRA / "grafana" / "streambroker.json"
OPERATIONS = ROOT / "docs" / "operations.md"


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def load_yaml_documents(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


# == Prometheus and Grafana =================================================================


def alert_rules() -> list[dict[str, Any]]:
    rules = []
    for group in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]:
        rules.extend(group["rules"])
    return rules


def grafana_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(GRAFANA.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"grafana panel {panel['title']!r}", target["expr"]))
    return found


def all_expressions() -> list[tuple[str, str]]:
    rules = [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    return rules + grafana_expressions()


def scrape_jobs() -> dict[str, list[str]]:
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    return {
        job["job_name"]: [t for static in job["static_configs"] for t in static["targets"]]
        for job in config["scrape_configs"]
    }


# == compose ================================================================================


def interpolate(value: str) -> str:
    """compose's ``${VAR:-default}`` with the defaults (the host's variables left out)."""
    value = re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", value)
    assert not re.search(r"\$\{?\w", value.replace("$$", "")), f"unresolved: {value!r}"
    return value.replace("$$", "$")


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def compose_broker_services() -> dict[str, dict[str, Any]]:
    """The services that run the repository's image."""
    return {
        name: service
        for name, service in compose()["services"].items()
        if service.get("image", "").startswith("streambroker") or "build" in service
    }


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate(str(value)) for key, value in env.items()}


def compose_launches() -> dict[str, Launch]:
    return {
        name: launch(list(service["command"]), compose_env(service), f"compose {name}")
        for name, service in compose_broker_services().items()
    }


def compose_api() -> Launch:
    return next(s for s in compose_launches().values() if s.command == "api")


# == Kubernetes =============================================================================


def k8s_resources() -> list[dict[str, Any]]:
    found = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_yaml_documents(path):
            doc["__file__"] = path.name
            found.append(doc)
    return found


def k8s_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for resource in k8s_resources():
        if resource["kind"] == "ConfigMap":
            env |= resource.get("data", {})
        if resource["kind"] == "Secret":
            env |= resource.get("stringData", {})
    return env


def k8s_containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for resource in k8s_resources():
        if resource["kind"] == "Deployment":
            for container in resource["spec"]["template"]["spec"]["containers"]:
                yield resource, container


def k8s_launch(container: dict[str, Any], name: str) -> Launch:
    command = container.get("command", ["streambroker"])
    assert command == ["streambroker"], f"{name}: runs {command}, not streambroker"
    env = k8s_env() | {e["name"]: e["value"] for e in container.get("env", [])}
    return launch([str(arg) for arg in container["args"]], env, name)


def container_port(container: dict[str, Any], port: Any) -> int:
    if isinstance(port, int):
        return port
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise AssertionError(f"{container['name']}: no port named {port}")


# == Dockerfile and .dockerignore ===========================================================


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def dockerfile_exec_form(keyword: str) -> list[str]:
    values = [rest for kw, rest in dockerfile_instructions() if kw == keyword]
    assert values, f"the Dockerfile has no {keyword}"
    parsed = json.loads(values[-1])
    assert isinstance(parsed, list), f"{keyword} is not in exec form"
    return [str(item) for item in parsed]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            for token in shlex.split(rest):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches decides; ``!`` re-includes; a pattern
    matching a directory matches everything under it."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = re.sub(r"\\\[([^\]]*)\\\]", r"[\1]", regex)
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded
