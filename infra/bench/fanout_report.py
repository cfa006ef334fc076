"""What ``fanout.py`` prints and writes: percentiles, the tables, the targets, machine facts.

Everything here works on the plain dicts that go into the JSON, so a saved result can be
printed again: ``python infra/bench/fanout_report.py results/fanout-….json``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

#: Histogram unit of the load generators' latencies (loadgen.BUCKETS_PER_MS).
BUCKETS_PER_MS = 10


def percentile_hist(hist: Counter[int], q: float) -> float | None:
    """Nearest-rank percentile of a latency histogram, in ms (a measured value, no
    interpolation)."""
    total = sum(hist.values())
    if not total:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return bucket / BUCKETS_PER_MS
    return None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: with 20 samples, p99 is the largest."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# --------------------------------------------------------------------------------------------
# Tables

#: label, key in a run's figures, format, whether "baseline ÷ broker" means something.
ROWS: list[tuple[str, str, str, bool]] = [
    ("delivery latency p50 (ms)", "latency_p50_ms", ".1f", True),
    ("delivery latency p99 (ms)", "latency_p99_ms", ".1f", True),
    ("delivery latency max (ms)", "latency_max_ms", ".1f", True),
    ("events delivered", "events", ",d", False),
    ("events/s delivered", "events_per_s", ",.0f", False),
    ("server CPU s, connecting", "server_cpu_connect", ".2f", True),
    ("server CPU s, streaming", "server_cpu_stream", ".2f", True),
    ("server CPU s per 1,000 events", "server_cpu_per_1000_events", ".4f", True),
    ("server RSS before clients (MB)", "server_rss_before_mb", ".1f", False),
    ("server RSS per connection (KB)", "server_rss_per_conn_kb", ".1f", True),
    ("server Redis connections (max)", "server_redis_conns_max", "d", True),
    ("Redis CPU s, streaming", "redis_cpu_stream", ".2f", True),
    ("Redis CPU s per 1,000 events", "redis_cpu_per_1000_events", ".4f", True),
    ("Redis calls, streaming (all)", "redis_calls_stream", ",d", True),
    ("Redis XREAD calls, streaming", "redis_xreads_stream", ",d", True),
    ("job pickup p50 (ms)", "pickup_p50_ms", ".0f", False),
    ("job pickup p99 (ms)", "pickup_p99_ms", ".0f", False),
    ("cancel → done p50 (ms)", "cancel_p50_ms", ".0f", False),
    ("cancel → done p99 (ms)", "cancel_p99_ms", ".0f", False),
    ("cancel POST answered p99 (ms)", "cancel_post_p99_ms", ".0f", False),
    ("connect all clients (s)", "connect_seconds", ".1f", False),
    ("clients with skipped ids", "clients_with_gaps", "d", False),
    ("workers CPU s, streaming", "workers_cpu_stream", ".2f", False),
    ("load generators CPU s, connecting", "loadgen_cpu_connect", ".2f", False),
    ("load generators CPU s, streaming", "loadgen_cpu_stream", ".2f", False),
    ("load generator processes", "loadgen_procs", "d", False),
    ("machine CPU busy, streaming (%)", "machine_busy_pct", ".0f", False),
    ("other processes' CPU s, streaming", "others_cpu_stream", ".2f", False),
]


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ratio(broker: Any, baseline: Any) -> str:
    if not isinstance(broker, int | float) or not isinstance(baseline, int | float):
        return ""
    if broker <= 0:
        return "inf" if baseline > 0 else ""
    return f"{baseline / broker:.1f}x"


def scenario_title(config: dict[str, Any], clients: int) -> str:
    return (
        f"N = {clients:,} clients on {config['streams']} streams "
        f"({clients / config['streams']:g} each), {config['tokens']} tokens at "
        f"{config['rate']:g}/s ± {100 * config.get('rate_spread', 0):g}%; "
        f"+ {config['cancel_streams']} cancelled streams x "
        f"{config['cancel_watchers']} watchers; {config['probes']} pickup probes"
    )


def scenario_table(config: dict[str, Any], scenario: dict[str, Any]) -> str:
    runs = {t: scenario[t] for t in ("broker", "baseline") if t in scenario}
    both = len(runs) == 2
    lines = [
        scenario_title(config, scenario["clients"]),
        f"{'':34}{''.join(f'{t:>14}' for t in runs)}{'baseline÷broker' if both else '':>17}",
    ]

    def row(label: str, cells: list[str], extra: str = "") -> None:
        lines.append(f"{label:34}{''.join(f'{c:>14}' for c in cells)}{extra:>17}".rstrip())

    def cell(run: dict[str, Any], text: str) -> str:
        return "FAILED" if "error" in run else text

    row(
        "clients complete, exact text",
        [cell(r, f"{r.get('complete')}/{r.get('clients_main')}") for r in runs.values()],
    )
    row(
        "cancel watchers ended cancelled",
        [cell(r, f"{r.get('cancel_ok')}/{r.get('cancel_watchers')}") for r in runs.values()],
    )
    row(
        "  or completed: cancel too late",
        [cell(r, f"{r.get('cancel_late')}") for r in runs.values()],
    )
    for label, key, spec, with_ratio in ROWS:
        values = [r.get(key) for r in runs.values()]
        row(label, [fmt(v, spec) for v in values], ratio(*values) if with_ratio and both else "")
    for name, run in runs.items():
        if "error" in run:
            lines.append(f"  {name} FAILED: {run['error']}")
        if run.get("problems"):
            lines.append(f"  {name} clients' problems: {run['problems']}")
        if run.get("state_mismatches"):
            lines.append(
                f"  {name}: the broker's final state differs from the fake model's text or "
                f"status for {run['state_mismatches']}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Targets


def _run(results: list[dict[str, Any]], target: str, clients: int) -> dict[str, Any] | None:
    for scenario in results:
        run: dict[str, Any] | None = scenario.get(target)
        if scenario["clients"] == clients and run and "error" not in run:
            return run
    return None


def _check(name: str, value: Any, ok: bool | None) -> dict[str, Any]:
    return {"target": name, "value": value, "pass": None if value is None else ok}


def _at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def _complete(run: dict[str, Any] | None) -> tuple[str | None, bool | None]:
    if run is None:
        return None, None
    return f"{run['complete']}/{run['clients_main']}", run["complete"] == run["clients_main"]


def check_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The benchmark's targets, each judged on the scenario it names (value ``None``: not run)."""
    at1k, at5k = _run(results, "broker", 1000), _run(results, "broker", 5000)
    base1k = _run(results, "baseline", 1000)
    runs = [s["broker"] for s in results if "error" not in s.get("broker", {"error": ""})]

    def worst(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return round(max(values), 1) if values else None

    def at_1k(key: str, run: dict[str, Any] | None = at1k) -> Any:
        return None if run is None else run[key]

    conns = at_1k("server_redis_conns_max")
    rss = at_1k("server_rss_per_conn_kb")
    rss = None if rss is None else round(rss, 1)
    base_conns = at_1k("server_redis_conns_max", base1k)
    fewer = None if conns is None or base_conns is None else round(base_conns / max(1, conns), 1)
    pickup = worst("pickup_p99_ms")
    checks = [
        _check(
            "1,000 clients on one api process all complete with the exact text", *_complete(at1k)
        ),
        _check("≤ 10 Redis connections for that process", conns, _at_most(conns, 10)),
        _check(
            "delivery p99 ≤ 50 ms at 1,000 clients (ms)",
            at_1k("latency_p99_ms"),
            _at_most(at_1k("latency_p99_ms"), 50),
        ),
        _check("RSS ≤ 50 KB per connection at 1,000 clients (KB)", rss, _at_most(rss, 50)),
        _check("5,000 clients all complete", *_complete(at5k)),
        _check("job pickup p99 ≤ 100 ms (worst scenario, ms)", pickup, _at_most(pickup, 100)),
        cancel_check(runs, worst("cancel_p99_ms")),
        _check(
            "≥ 50x fewer Redis connections than the baseline at 1,000 clients",
            fewer,
            None if fewer is None else fewer >= 50,
        ),
    ]
    for key, label in (
        ("latency_p99_ms", "p99 latency"),
        ("server_cpu_per_1000_events", "CPU per event"),
    ):
        ours, theirs = at_1k(key), at_1k(key, base1k)
        if ours and theirs:
            checks.append(
                {
                    "target": f"baseline ÷ broker, {label}, at 1,000 clients",
                    "value": round(theirs / ours, 2),
                    "pass": "info",
                }
            )
    return checks


def cancel_check(runs: list[dict[str, Any]], worst_p99: float | None) -> dict[str, Any]:
    """Cancel → terminal p99 ≤ 1 s. A cancel that took effect too late to end anything (the
    api answered its POST after the generation had completed) has no latency sample, and
    fails the target: the user's cancel did nothing."""
    late = {r["clients_main"]: r["cancel_late"] for r in runs if r.get("cancel_late")}
    name = "cancel → terminal p99 ≤ 1 s (worst scenario, ms)"
    if late:
        where = ", ".join(f"{n} at {clients:,} clients" for clients, n in late.items())
        return _check(name, f"{worst_p99}; too late to cancel anything: {where}", False)
    return _check(name, worst_p99, worst_p99 is not None and worst_p99 <= 1000)


def targets_table(checks: list[dict[str, Any]]) -> str:
    lines = ["Targets, judged on the broker's runs"]
    for c in checks:
        if c["value"] is None:
            verdict, value = "not run", ""
        else:
            verdict = {True: "PASS", False: "FAIL"}.get(c["pass"], "info")
            value = c["value"]
        lines.append(f"  {verdict:8} {c['target']}" + (f": {value}" if value != "" else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Where it ran


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(directory: Path) -> dict[str, Any]:
    """Read-only (no index refresh): the commit, and whether tracked files differ from it."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=directory,
            text=True,
            capture_output=True,
            timeout=10,
            check=False,
        )
        return done.stdout.strip()

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = git("rev-parse", "HEAD")
        if commit:
            return {"commit": commit, "dirty": bool(git("status", "--porcelain", "-uno"))}
    return {"commit": None, "dirty": None}


def machine_info(redis_version: str) -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    packages = (
        "uvicorn",
        "starlette",
        "redis",
        "hiredis",
        "sse-starlette",
        "arq",
        "uvloop",
        "httptools",
        "psutil",
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "redis": redis_version,
        "packages": {p: v for p in packages if (v := package_version(p))},
    }


def header(document: dict[str, Any]) -> str:
    m, b, c = document["machine"], document["broker"], document["config"]
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    commit = (b["commit"] or "?")[:12] + (" + uncommitted changes" if b["dirty"] else "")
    return "\n".join(
        [
            f"$ {document['command']}",
            f"{document['date']}  {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB, "
            f"Python {m['python']}, Redis {m['redis']}",
            f"broker: {b['dir']} at {commit}" + (f" ({b['label']})" if b.get("label") else ""),
            f"packages: {packages}",
            f"{c['worker_procs']} worker process(es), heartbeat {c['heartbeat']:g} s, "
            f"up to {c['clients_per_proc']} clients per load generator"
            + ("; the measured server alone on one core (--pin)" if c.get("pin") else ""),
        ]
    )


def render(document: dict[str, Any]) -> str:
    parts = [header(document)]
    parts += [scenario_table(document["config"], s) for s in document["scenarios"]]
    parts.append(targets_table(check_targets(document["scenarios"])))
    return "\n\n".join(parts)


if __name__ == "__main__":
    print(render(json.loads(Path(sys.argv[1]).read_text())))
