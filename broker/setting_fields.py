"""How one setting is declared, and how its variable's text becomes a typed value.

A setting is a dataclass field declared with ``setting()``: a default plus the metadata that
reading it needs (help text, bounds, a parser for structured values, whether the value is a
secret). ``read_value`` turns the text of one ``BROKER_*`` variable into the field's type
and checks its range; every refusal is a ``ConfigError`` that names the variable (and shows
the value, unless it is a secret). ``broker.settings`` declares the fields and decides
which variables exist; this module knows nothing of particular settings except the value
syntaxes below.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from typing import Any, NamedTuple

from broker import numbers
from broker.errors import ConfigError

PROVIDERS = ("fake", "openai")


class Continuation(enum.StrEnum):
    """How a route's provider continues a generation whose worker stopped or was lost
    (``workers.continuation``): the part of a ``BROKER_ROUTES`` entry after ``:``."""

    #: Not at all: the generation ends with ``worker_lost`` / ``worker_stopped``.
    OFF = "off"
    #: The fake model: the same tokens an uninterrupted run makes, from where it stopped.
    EXACT = "exact"
    #: vLLM: the partial answer as the last assistant message, with
    #: ``continue_final_message: true`` and ``add_generation_prompt: false``.
    CONTINUE_FINAL_MESSAGE = "continue_final_message"
    #: DeepSeek / Mistral style: the partial answer as an assistant message with ``prefix: true``.
    PREFIX = "prefix"
    #: llama.cpp and servers that prefill a trailing assistant message: the partial answer as
    #: the last message, nothing else.
    PREFILL = "prefill"
    #: Any server (OpenAI itself): the partial answer, then a user message asking the model to
    #: go on from there. Approximate: the model may repeat or rephrase a little at the seam.
    PROMPT = "prompt"


#: What each provider accepts, the first being its default.
CONTINUATIONS = {
    "fake": (Continuation.EXACT, Continuation.OFF),
    "openai": (
        Continuation.OFF,
        Continuation.CONTINUE_FINAL_MESSAGE,
        Continuation.PREFIX,
        Continuation.PREFILL,
        Continuation.PROMPT,
    ),
}


class Route(NamedTuple):
    """One ``BROKER_ROUTES`` entry: a model name pattern, the provider it routes to, and how
    that provider continues an interrupted generation (None: the provider's default)."""

    pattern: str
    provider: str
    continuation: Continuation | None = None


def setting(
    default: Any,
    *,
    help: str,
    min: float | None = None,
    max: float | None = None,
    parse: Callable[[str], Any] | None = None,
    secret: bool = False,
) -> Any:
    """A settings field: its default, and what ``read_value`` and ``describe()`` need."""
    return dataclasses.field(
        default=default,
        metadata={"help": help, "min": min, "max": max, "parse": parse, "secret": secret},
    )


def parse_routes(raw: str) -> tuple[Route, ...]:
    """``"fake=fake,llama-*=openai:prefix,*=openai"`` → ordered routes: ``PATTERN=PROVIDER``,
    optionally ``:CONTINUATION`` (``Continuation``; what the provider accepts)."""
    routes: list[Route] = []
    for part in filter(None, (p.strip() for p in raw.split(","))):
        pattern, sep, target = part.partition("=")
        provider, colon, mode = (x.strip() for x in target.partition(":"))
        pattern = pattern.strip()
        if not sep or not pattern or provider not in PROVIDERS:
            raise ValueError(
                f"{part!r} is not PATTERN=PROVIDER[:CONTINUATION] with PROVIDER one of "
                f"{', '.join(PROVIDERS)}"
            )
        accepted = CONTINUATIONS[provider]
        if colon and mode not in accepted:
            raise ValueError(
                f"{part!r}: the {provider} provider continues with one of "
                f"{', '.join(accepted)}, not {mode!r}"
            )
        routes.append(Route(pattern, provider, Continuation(mode) if colon else None))
    if not routes:
        raise ValueError("no routes given")
    return tuple(routes)


def one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    """A parser of one of ``choices``, in any case (the value is kept in lower case)."""

    def parse(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return raw.lower()

    return parse


def parse_api_keys(raw: str) -> tuple[tuple[str, str], ...]:
    """``"key1:tenant-a,key2:tenant-b"`` → (key, tenant) pairs. Messages never quote a key."""
    pairs: list[tuple[str, str]] = []
    for number, part in enumerate(filter(None, (p.strip() for p in raw.split(","))), 1):
        key, sep, tenant = (x.strip() for x in part.partition(":"))
        if not sep or not key or not tenant:
            raise ValueError(f"entry {number} is not KEY:TENANT")
        if len(key) < 16:
            raise ValueError(f"entry {number}: a key must have at least 16 characters")
        if any(key == k for k, _ in pairs):
            raise ValueError(f"entry {number} repeats a key")
        pairs.append((key, tenant))
    if not pairs:
        raise ValueError("no keys given")
    return tuple(pairs)


def parse_secrets(raw: str) -> tuple[str, ...]:
    """Comma-separated signing secrets, each long enough to resist guessing."""
    secrets = tuple(p.strip() for p in raw.split(",") if p.strip())
    if not secrets:
        raise ValueError("no secrets given")
    if any(len(secret) < 32 for secret in secrets):
        raise ValueError("every secret must have at least 32 characters")
    return secrets


def read_value(name: str, f: dataclasses.Field[Any], kind: Any, raw: str) -> Any:
    """The value of the variable ``name`` for the field ``f`` of type ``kind``.

    Raises ``ConfigError`` naming the variable when the text does not parse or the number
    is out of the field's bounds.
    """
    try:
        value = _convert(kind, raw.strip(), f.metadata.get("parse"))
    except ValueError as exc:
        shown = name if f.metadata.get("secret") else f"{name}={raw!r}"
        raise ConfigError(f"{shown} is malformed: {exc}") from None
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if is_number and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        raise ConfigError(f"{name}={raw!r} is out of range: expected {lo} to {hi}")
    return value


def _convert(kind: Any, raw: str, parse: Callable[[str], Any] | None) -> Any:
    if parse is not None:
        return parse(raw)
    if isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind):
        if raw == "":
            return None
        (inner,) = (a for a in typing.get_args(kind) if a is not type(None))
        return _convert(inner, raw, None)
    if kind is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    # ASCII digits only, as for numbers in requests: int() and float() would also take
    # other scripts' digits, '_' separators, exponents and nan. No setting is negative.
    if kind is int:
        return numbers.parse_int(raw, max_digits=18)
    if kind is float:
        return numbers.parse_decimal(raw, max_chars=32)
    if kind is str:
        return raw
    if typing.get_origin(kind) is tuple:
        items = tuple(p.strip() for p in raw.split(",") if p.strip())
        if not items:
            raise ValueError("expected a comma-separated list")
        return items
    raise TypeError(f"no parser for settings of type {kind!r}")
