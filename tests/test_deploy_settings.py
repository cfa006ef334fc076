"""Every variable the deployment files set is a setting: the names are read from the code
(``Settings.from_env`` asking a recording environment) and from docs/configuration.md, never
copied.
"""

from __future__ import annotations

from broker import settings
from tests.support.broker_exports import setting_names
from tests.support.deploy_files import (
    compose_broker_services,
    compose_env,
    dockerfile_env,
    k8s_containers,
    k8s_env,
)

#: Variables of the image that are the Python runtime's, not the broker's settings.
RUNTIME_ENV = {"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}


def test_every_variable_the_files_set_is_a_setting() -> None:
    known = setting_names()
    problems = []
    for name, service in compose_broker_services().items():
        problems += [f"compose {name}: {v}" for v in compose_env(service) if v not in known]
    problems += [f"infra/k8s: {v}" for v in k8s_env() if v not in known]
    for _, container in k8s_containers():
        names = [e["name"] for e in container.get("env", [])]
        problems += [f"infra/k8s {container['name']}: {v}" for v in names if v not in known]
    problems += [f"Dockerfile: {v}" for v in dockerfile_env() if v not in known | RUNTIME_ENV]
    assert not problems, "not settings:\n" + "\n".join(problems)


def test_settings_module_is_what_the_env_check_reads() -> None:
    """The recording environment sees every field of every settings section."""
    names = setting_names()
    for _, f in settings._setting_fields():
        assert settings.env_name(f.name) in names
