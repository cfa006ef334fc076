"""Which provider serves a model name: the first matching ``(pattern, provider)`` route.

Shared by the api (to validate a request and know which models exist) and the workers (to
pick the provider), so both always agree. Patterns are shell-style (``fnmatch``), matched
case-sensitively because model names are.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from broker.setting_fields import CONTINUATIONS, Continuation
from broker.settings import Route


def route_model(model: str, routes: Sequence[Route]) -> str | None:
    """The provider for ``model``, or None when no route matches it."""
    route = _route_of(model, routes)
    return None if route is None else route[1]


def continuation_mode(model: str, routes: Sequence[Route]) -> Continuation:
    """How an interrupted generation of ``model`` is continued: its route's continuation,
    else its provider's default (``OFF`` for a model no route serves)."""
    route = _route_of(model, routes)
    if route is None:
        return Continuation.OFF
    chosen = route.continuation if isinstance(route, Route) else None
    return chosen or CONTINUATIONS[route[1]][0]


def _route_of(model: str, routes: Sequence[Route]) -> Route | None:
    for route in routes:
        if fnmatchcase(model, route[0]):
            return route
    return None


def fixed_models(routes: Sequence[Route], provider: str) -> list[str]:
    """Model names routed to ``provider`` by an exact (wildcard-free) pattern."""
    return [r[0] for r in routes if r[1] == provider and not any(c in r[0] for c in "*?[")]
