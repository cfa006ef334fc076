"""Which provider serves a model name: the first matching ``(pattern, provider)`` route.

Shared by the api (to validate a request and know which models exist) and the workers (to
pick the provider), so both always agree. Patterns are shell-style (``fnmatch``), matched
case-sensitively because model names are.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from broker.settings import Route


def route_model(model: str, routes: Sequence[Route]) -> str | None:
    """The provider for ``model``, or None when no route matches it."""
    for pattern, provider in routes:
        if fnmatchcase(model, pattern):
            return provider
    return None


def fixed_models(routes: Sequence[Route], provider: str) -> list[str]:
    """Model names routed to ``provider`` by an exact (wildcard-free) pattern."""
    return [p for p, name in routes if name == provider and not any(c in p for c in "*?[")]
