"""What ``nchan.py`` prints: per client count, the median of each figure over the reps, its
range, and broker ÷ nchan, as a markdown table.

A saved result prints again with ``python infra/bench/nchan_report.py results/nchan-….json``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

#: label, key in a run's figures, format, whether broker ÷ nchan means something.
ROWS: list[tuple[str, str, str, bool]] = [
    ("delivery latency p50 (ms)", "latency_p50_ms", ".1f", True),
    ("delivery latency p99 (ms)", "latency_p99_ms", ".1f", True),
    ("delivery latency max (ms)", "latency_max_ms", ".1f", True),
    ("p99 of events 11 to N-4 (ms)", "middle_p99_ms", ".1f", True),
    ("p99 of each client's last 4 events (ms)", "last4_p99_ms", ".1f", True),
    ("fan-out process CPU s per 1,000 token events", "server_cpu_per_1000", ".4f", True),
    ("  per 1,000 events of any kind", "server_cpu_per_1000_all", ".4f", True),
    ("fan-out process CPU s, live part", "server_cpu", ".2f", True),
    ("  of which in the kernel (system CPU share)", "server_cpu_system_share", ".2f", False),
    ("fan-out process RSS per connection (KB)", "rss_per_conn_kb", ".1f", True),
    ("fan-out process RSS before clients (MB)", "rss_before_mb", ".1f", False),
    ("Redis connections of the api", "redis_conns", "g", False),
    ("load generator CPU s per 1,000 token events", "loadgen_cpu_per_1000", ".4f", True),
    ("load generator CPU ÷ fan-out process CPU", "loadgen_share", ".2f", False),
    ("connect all clients (s)", "connect_seconds", ".2f", False),
    ("live part (s)", "live_seconds", ".2f", False),
    ("machine CPU busy, live part (%)", "machine_busy_pct", ".0f", False),
    ("other processes' CPU s, live part", "others_cpu", ".2f", False),
]
SYSTEMS = ("broker", "nchan")


def good_runs(document: dict[str, Any], clients: int, system: str) -> list[dict[str, Any]]:
    return [
        r
        for r in document["runs"]
        if r["clients"] == clients and r["system"] == system and "error" not in r
    ]


def stats(runs: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    values = [figure(r, key) for r in runs]
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def figure(run: dict[str, Any], key: str) -> float | None:
    if key == "loadgen_share":
        server = run.get("server_cpu")
        return run["loadgen_cpu"] / server if server else None
    value = run.get(key)
    return float(value) if isinstance(value, int | float) else None


def summarize(document: dict[str, Any]) -> dict[str, Any]:
    """Medians, ranges and ratios of every figure, per client count and system."""
    out: dict[str, Any] = {}
    for clients in document["config"]["clients"]:
        per: dict[str, Any] = {}
        for system in SYSTEMS:
            runs = good_runs(document, clients, system)
            per[system] = {key: stats(runs, key) for _, key, _, _ in ROWS}
            per[system]["runs"] = len(runs)
            per[system]["complete"] = [r["complete"] for r in runs]
        ratios = {}
        for _, key, _, with_ratio in ROWS:
            b, n = per["broker"].get(key), per["nchan"].get(key)
            if with_ratio and b and n and n["median"]:
                ratios[key] = b["median"] / n["median"]
        per["broker_over_nchan"] = ratios
        out[str(clients)] = per
    return out


def cell(s: dict[str, Any] | None, spec: str) -> str:
    if s is None:
        return "-"
    if len(s["values"]) == 1:
        return format(s["median"], spec)
    return f"{s['median']:{spec}} ({s['min']:{spec}}..{s['max']:{spec}})"


def render(document: dict[str, Any], clients: int) -> str:
    cfg = document["config"]
    per = summarize(document)[str(clients)]
    runs = {s: per[s]["runs"] for s in SYSTEMS}
    lines = [
        f"N = {clients:,} clients, {cfg['events']} events at {cfg['rate']:g}/s; median "
        f"(min..max) of {runs['broker']} broker and {runs['nchan']} nchan runs",
        "",
        "| | broker (`api --workers 1`) | nginx + nchan (1 worker) | broker ÷ nchan |",
        "| --- | --- | --- | --- |",
    ]
    complete = [", ".join(f"{c}/{clients}" for c in per[s]["complete"]) or "-" for s in SYSTEMS]
    lines.append(f"| clients complete | {complete[0]} | {complete[1]} | |")
    for label, key, spec, with_ratio in ROWS:
        ratio = per["broker_over_nchan"].get(key)
        shown = f"{ratio:.2f}x" if with_ratio and ratio is not None else ""
        b, n = (cell(per[s].get(key), spec) for s in SYSTEMS)
        lines.append(f"| {label} | {b} | {n} | {shown} |")
    for run in document["runs"]:
        if run["clients"] == clients and "error" in run:
            lines.append(f"\n{run['system']} rep {run['rep'] + 1} FAILED: {run['error']}")
    return "\n".join(lines)


def main() -> None:
    document = json.loads(Path(sys.argv[1]).read_text())
    for clients in document["config"]["clients"]:
        print(render(document, clients) + "\n")


if __name__ == "__main__":
    main()
