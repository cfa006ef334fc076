"""What the broker's code exposes, read from the code at run time, never copied: the metric
series a process can export (prometheus-client's registry once the api's and the workers'
modules are imported, plus the families of custom collectors), the paths the api's and the
worker's health endpoints serve, and the names of the variables the settings are read from.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any

import api.app  # noqa: F401  (registers every metric the api counts)
import workers.worker  # noqa: F401  (and every metric the workers count)
from api import health
from broker import metrics
from broker.settings import Settings
from tests.support.processes import ROOT
from workers import health as worker_health


@dataclass(frozen=True)
class MetricName:
    family: str
    kind: str
    labels: frozenset[str]


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}


def exported_metrics() -> dict[str, MetricName]:
    """Every series name a broker process can expose (``streambroker_…``), with the labels
    its family is declared with: from prometheus-client's registry (the broker's modules are
    imported above), plus the families of custom collectors, which a registry cannot list
    before they yield (read from their ``…MetricFamily("name", …)`` calls in the source)."""
    families: dict[str, tuple[str, frozenset[str]]] = {}
    for collector in list(metrics.REGISTRY._collector_to_names):
        describe = getattr(collector, "describe", None)
        listed = describe() if describe is not None else collector.collect()
        labels = frozenset(getattr(collector, "_labelnames", ()))
        for family in listed:
            families[family.name] = (family.type, labels)
    for path in sorted((ROOT / "broker").rglob("*.py")) + sorted((ROOT / "workers").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            called = node.func.attr if isinstance(node.func, ast.Attribute) else None
            called = called or (node.func.id if isinstance(node.func, ast.Name) else "")
            first = node.args[0]
            if (
                called.endswith("MetricFamily")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                kind = called.removesuffix("MetricFamily").lower() or "unknown"
                families.setdefault(first.value, (kind, frozenset()))
    exported: dict[str, MetricName] = {}
    for family, (kind, labels) in families.items():
        if not family.startswith("streambroker_"):
            continue
        for suffix in _SUFFIXES.get(kind, ("",)):
            series_labels = labels | {"le"} if suffix == "_bucket" else labels
            exported[family + suffix] = MetricName(family, kind, frozenset(series_labels))
    return exported


def api_paths() -> set[str]:
    return {route.path for route in health.routes}


def worker_paths() -> set[str]:
    app = worker_health.health_app(worker_health.WorkerHealth())
    return {route.path for route in app.routes}  # type: ignore[attr-defined]


def setting_names() -> set[str]:
    """The variables the settings are read from, as ``Settings.from_env`` asks for them,
    and the other variables docs/configuration.md lists ("Where things are")."""
    asked: set[str] = set()

    class Recording(dict[str, str]):
        def __contains__(self, name: object) -> bool:
            asked.add(str(name))
            return False

        def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
            asked.add(name)
            return default

        def __getitem__(self, name: str) -> str:
            asked.add(name)
            raise KeyError(name)

    Settings.from_env(Recording())
    documented = set()
    table = (ROOT / "docs" / "configuration.md").read_text()
    for line in table.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            documented |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", first_cell))
    assert {"REDIS_URL", "BROKER_HEARTBEAT_SECONDS", "OPENAI_BASE_URL"} <= asked
    return asked | documented
