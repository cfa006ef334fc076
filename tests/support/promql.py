"""Enough of PromQL to read the shipped alert rules and dashboard: the series selectors of
an expression (metric name and label matchers) and the labels it groups by."""

from __future__ import annotations

import re

_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"((?:[^\"\\]|\\.)*)\"")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "rate", "irate", "increase", "delta", "idelta",
    "histogram_quantile", "scalar", "vector", "absent", "clamp_min", "clamp_max", "abs",
    "humanize", "time", "le", "inf", "nan",
}  # fmt: skip


def promql_selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, label matchers) of each series selector in an expression."""
    text = re.sub(r"\[[^\]]*\]", "", expr)  # ranges: [5m], [$__rate_interval]
    text = _GROUPING.sub("", text)
    found = []
    for match in _SELECTOR.finditer(text):
        name, braces = match.group(1), match.group(2)
        if name.lower() in _PROMQL_WORDS or re.fullmatch(r"[0-9.e]+", name):
            continue
        if text[match.end(1) :].lstrip().startswith("(") and braces is None:
            continue  # a function
        labels = {m.group(1): m.group(3) for m in _MATCHER.finditer(braces or "")}
        found.append((name, labels))
    return found


def promql_grouping(expr: str) -> set[str]:
    return {
        label.strip() for group in _GROUPING.findall(expr) for label in group.split(",") if label
    }
