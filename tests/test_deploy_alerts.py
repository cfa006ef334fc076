"""The alert rules and the dashboard stay true to the code: every series they read is one a
broker process exports (prometheus-client's registry, read at run time), with labels and
label values it declares; each alert explains itself and links its own section of the
runbook; promtool (Debian's ``prometheus``) checks the configuration and the rules and runs
their unit tests (skipped without it, except under ``CI=true``, where it fails).
"""

from __future__ import annotations

import json

from broker import metrics
from tests.support.broker_exports import exported_metrics
from tests.support.deploy_files import (
    GRAFANA,
    OPERATIONS,
    PROMETHEUS_DIR,
    alert_rules,
    all_expressions,
    grafana_expressions,
    scrape_jobs,
)
from tests.support.deploy_tools import run, tool
from tests.support.promql import promql_grouping, promql_selectors
from tests.support.runbook import markdown_anchors

#: What a scrape labels every series with, and what a histogram's buckets carry.
SCRAPE_LABELS = {"job", "instance"}


def test_every_metric_in_alerts_and_dashboard_is_one_the_broker_exports() -> None:
    exported = exported_metrics()
    # The registry was read: the families the brief of this kit names are there.
    assert "streambroker_event_connections" in exported
    assert "streambroker_time_to_first_token_seconds_bucket" in exported
    jobs = set(scrape_jobs())
    problems = []
    for where, expr in all_expressions():
        selectors = promql_selectors(expr)
        assert selectors, f"{where}: no series in {expr!r}"
        declared: set[str] = set(SCRAPE_LABELS)
        for name, labels in selectors:
            if name == "up":
                job = labels.get("job")
                if job not in jobs:
                    problems.append(f"{where}: up{{job={job!r}}} is no job of prometheus.yml")
                continue
            metric = exported.get(name)
            if metric is None:
                problems.append(f"{where}: {name} is not a series the broker exports")
                continue
            declared |= metric.labels
            unknown = set(labels) - metric.labels - SCRAPE_LABELS
            if unknown:
                problems.append(f"{where}: {name} has no label {sorted(unknown)}")
        unknown_groups = promql_grouping(expr) - declared
        if unknown_groups:
            problems.append(f"{where}: grouped by labels no series has: {sorted(unknown_groups)}")
    assert not problems, "\n".join(problems)


def test_label_values_in_expressions_are_ones_the_broker_counts() -> None:
    """The label values the code declares up front (``streambroker_lease_takeovers_total``'s
    outcomes, the provider error kinds) and the finished statuses."""
    from broker.state import Status

    known = {
        "status": {str(status) for status in Status if status.terminal},
        "outcome": set(metrics.TAKEOVER_OUTCOMES),
        "kind": set(metrics.PROVIDER_ERROR_KINDS),
        "process": {"api", "worker", "dev"},
    }
    for where, expr in all_expressions():
        for name, labels in promql_selectors(expr):
            for label, value in labels.items():
                if label in known and name.startswith("streambroker_"):
                    assert value in known[label], f"{where}: {name}{{{label}={value!r}}}"


def test_every_alert_explains_itself_and_links_its_runbook_section() -> None:
    anchors = markdown_anchors(OPERATIONS)
    rules = alert_rules()
    assert len(rules) >= 7
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key), f"{rule['alert']} has no {key}"
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, rule["alert"]
        url = annotations["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page == "docs/operations.md", f"{rule['alert']}: {url}"
        assert anchor == rule["alert"].lower(), f"{rule['alert']}: its own section, {url}"
        assert anchor in anchors, f"{rule['alert']}: docs/operations.md has no #{anchor}"


def test_promtool_checks_the_config_and_rules_and_runs_their_unit_tests() -> None:
    promtool = tool("promtool")
    config = run([promtool, "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR)
    assert config.returncode == 0, config.stdout + config.stderr
    rules = run([promtool, "check", "rules", "alerts.yml"], cwd=PROMETHEUS_DIR)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"{len(alert_rules())} rules found" in rules.stdout + rules.stderr
    tests = run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS_DIR)
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_the_dashboard_covers_what_operators_watch() -> None:
    dashboard = json.loads(GRAFANA.read_text())
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    used = {name for _, expr in grafana_expressions() for name, _ in promql_selectors(expr)}
    families = {m.family for n, m in exported_metrics().items() if n in used}
    wanted = {
        "streambroker_event_connections",
        "streambroker_events_sent",
        "streambroker_time_to_first_token_seconds",
        "streambroker_job_pickup_seconds",
        "streambroker_queue_depth",
        "streambroker_queue_oldest_age_seconds",
        "streambroker_jobs_in_flight",
        "streambroker_hub_lag_seconds",
        "streambroker_workers_lost",
        "streambroker_handovers",
        "streambroker_provider_errors",
        "streambroker_store_errors",
    }
    assert wanted <= families, f"the dashboard lacks {sorted(wanted - families)}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
