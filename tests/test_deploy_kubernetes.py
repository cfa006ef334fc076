"""infra/k8s/ stays true to the code: each Deployment's command is run through the command
line itself with the manifests' environment (``tests.support.cli_launch``); its probes ask
paths the process serves, on the port it listens on; its grace period covers the drain.
The manifests are valid for the API server (kubernetes-validate, its schemas bundled, no
network), and its Secrets are placeholders.
"""

from __future__ import annotations

import pytest

from broker.settings import Settings
from tests.support.broker_exports import api_paths, worker_paths
from tests.support.deploy_files import (
    K8S_DIR,
    container_port,
    k8s_containers,
    k8s_env,
    k8s_launch,
    k8s_resources,
    load_yaml,
)
from workers import health as worker_health

#: The Kubernetes versions the manifests are validated against (when kubernetes-validate
#: bundles them): the oldest this kit is meant for, and the newest it knows.
K8S_OLDEST = "1.30.0"


def test_kubernetes_commands_probes_and_ports_match_the_code() -> None:
    seen = set()
    for resource, container in k8s_containers():
        where = f"infra/k8s/{resource['__file__']}"
        started = k8s_launch(container, where)
        seen.add(started.command)
        spec = resource["spec"]["template"]["spec"]
        paths = api_paths() if started.command == "api" else worker_paths()
        probes = {kind: container[kind] for kind in ("readinessProbe", "livenessProbe")}
        assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz", where
        assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz", where
        for kind, probe in probes.items():
            get = probe["httpGet"]
            assert get["path"] in paths, f"{where}: {kind} {get['path']} is not served"
            port = container_port(container, get["port"])
            assert port == started.port, f"{where}: {kind} on {port}, serves on {started.port}"
        annotations = resource["spec"]["template"]["metadata"].get("annotations", {})
        assert int(annotations["prometheus.io/port"]) == started.port, where
        assert annotations["prometheus.io/path"] in paths, where
        grace = spec["terminationGracePeriodSeconds"]
        if started.command == "api":
            # The drain, then uvicorn's graceful shutdown, then room.
            needed = started.drain_seconds + started.uvicorn["timeout_graceful_shutdown"]
            assert started.drain_seconds > 0, f"{where}: no --drain-seconds behind Services"
            assert grace >= needed + 5, f"{where}: grace {grace} s, needs {needed} s + room"
            # The readiness probe sees the drain before it ends.
            readiness = probes["readinessProbe"]
            noticed = readiness["periodSeconds"] * readiness.get("failureThreshold", 3)
            assert started.drain_seconds > noticed, f"{where}: drain shorter than {noticed} s"
        else:
            # The jobs' last events (which may wait out a lease), then the endpoint's close.
            needed = started.settings.generation.lease_seconds + worker_health.SHUTDOWN_SECONDS
            assert grace >= needed + 5, f"{where}: grace {grace} s, needs {needed} s + room"
    assert seen == {"api", "worker"}


def test_kubernetes_manifests_are_valid_for_the_api_server() -> None:
    try:
        import kubernetes_validate
        from kubernetes_validate import utils as k8s_utils
    except ImportError:
        pytest.fail("kubernetes-validate is missing: pip install -e '.[test]'")
    versions = [
        v for v in (K8S_OLDEST, k8s_utils.latest_version()) if v in k8s_utils.all_versions()
    ]
    assert versions, k8s_utils.all_versions()
    kinds = set()
    for resource in k8s_resources():
        data = {k: v for k, v in resource.items() if k != "__file__"}
        kinds.add(data["kind"])
        for version in versions:
            try:
                kubernetes_validate.validate(data, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"infra/k8s/{resource['__file__']} on {version}: {exc.message}")
    assert {
        "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
        "ConfigMap", "Secret",
    } <= kinds  # fmt: skip
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    files = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_kubernetes_secrets_are_placeholders_and_the_settings_parse() -> None:
    for resource in k8s_resources():
        if resource["kind"] == "Secret":
            for name, value in resource["stringData"].items():
                assert "replace-me" in value, f"infra/k8s Secret {name} looks like a real one"
    # Settings.from_env raises on anything a process would refuse at start-up.
    parsed = Settings.from_env(k8s_env())
    assert parsed.api.api_keys
    assert parsed.api.read_token_secrets
