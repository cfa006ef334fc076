"""infra/compose.yaml stays true to the code: each broker service's command is run through
the command line itself, with the service's environment, stopped just before it would serve
(``tests.support.cli_launch``), so a flag, a value or a setting the code would refuse fails
here as it would at start-up. Its Redis is the shipped Sentinel set; the proxies and
Prometheus reach its processes where they listen. ``docker compose config`` runs when
docker compose is installed.
"""

from __future__ import annotations

import re
import shutil

import pytest

from broker.store_url import parse_store_url
from tests.support.broker_exports import api_paths, worker_paths
from tests.support.deploy_files import (
    COMPOSE,
    INFRA,
    PROMETHEUS_DIR,
    compose,
    compose_broker_services,
    compose_env,
    compose_launches,
    load_yaml,
    scrape_jobs,
)
from tests.support.deploy_tools import run
from tests.support.proxy_configs import haproxy_servers, nginx_servers


def test_compose_commands_start_with_this_code_and_these_settings() -> None:
    launched = compose_launches()
    kinds = sorted(launch.command for launch in launched.values())
    assert kinds.count("api") == 3, kinds
    assert kinds.count("worker") == 2, kinds
    for name, started in launched.items():
        if started.command == "worker":
            # The image's health check and Prometheus reach the worker there.
            assert started.port > 0, f"compose {name}: a worker without BROKER_METRICS_PORT"


def test_compose_redis_is_the_shipped_sentinel_set() -> None:
    services = compose()["services"]
    sentinel_conf = (INFRA / "sentinel" / "sentinel.conf").read_text()
    monitored = re.search(r"^sentinel monitor (\S+) \S+ (\d+) (\d+)", sentinel_conf, re.M)
    assert monitored, "infra/sentinel/sentinel.conf monitors nothing"
    for name, service in compose_broker_services().items():
        sentinel = parse_store_url(compose_env(service)["REDIS_URL"]).sentinel
        assert sentinel is not None, f"compose {name}: REDIS_URL is not redis+sentinel://"
        assert sentinel.service == monitored.group(1), f"compose {name}"
        assert len(sentinel.sentinels) == 3, f"compose {name}: list every Sentinel"
        for host, port in sentinel.sentinels:
            assert host in services, f"compose {name}: no service {host}"
            assert port == 26379, host
            assert "--sentinel" in str(services[host]["command"]), host
    # The files compose mounts exist, and the ones the commands name are among them.
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"compose {name} mounts a missing {source}"
        command = " ".join(map(str, service.get("command", [])))
        for conf in re.findall(r"/etc/streambroker-redis/([\w.]+)", command):
            assert (INFRA / "sentinel" / conf).exists(), f"compose {name}: {conf}"
        if "sed " in command:
            # The substitution must find the shipped file's monitor line.
            pattern = re.search(r"s/(\^sentinel monitor [^/]+)/", command)
            assert pattern, name
            assert re.search(pattern.group(1), sentinel_conf, re.M), name


def test_compose_is_valid_for_docker_compose() -> None:
    """``docker compose config`` when docker compose is installed (it needs no daemon);
    the YAML itself parses either way (the other tests read it)."""
    assert compose()["services"]
    docker = shutil.which("docker")
    if docker is None or run([docker, "compose", "version"]).returncode != 0:
        pytest.skip("docker compose is not installed: the file was checked as YAML only")
    result = run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"])
    assert result.returncode == 0, result.stderr


def test_the_proxies_and_prometheus_reach_the_compose_processes_where_they_listen() -> None:
    launched = compose_launches()
    apis = sorted(f"{name}:{s.port}" for name, s in launched.items() if s.command == "api")
    workers = sorted(f"{name}:{s.port}" for name, s in launched.items() if s.command == "worker")
    assert sorted(nginx_servers()) == apis, "infra/nginx/upstreams.inc"
    assert sorted(haproxy_servers()) == apis, "infra/haproxy/haproxy.cfg"
    jobs = scrape_jobs()
    assert sorted(jobs["streambroker-api"]) == apis, "prometheus.yml, streambroker-api"
    assert sorted(jobs["streambroker-worker"]) == workers, "prometheus.yml, streambroker-worker"
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    for job in config["scrape_configs"]:
        path = job.get("metrics_path", "/metrics")
        served = api_paths() if job["job_name"] == "streambroker-api" else worker_paths()
        assert path in served, f"{job['job_name']} scrapes {path}"
