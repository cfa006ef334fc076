"""JSON parsing that only accepts what the broker can store and send back unchanged.

Python's ``json`` accepts ``NaN``/``Infinity``, numbers too large for a float, integers of
any size (msgpack stores 64 bits) and lone UTF-16 surrogates (``\\ud800``, which cannot be
encoded as UTF-8): each would later fail, or come back different. ``loads`` refuses them with
a ``ValueError`` whose message says which.
"""

from __future__ import annotations

import json
import math
from typing import Any


def loads(text: str | bytes | bytearray) -> Any:
    try:
        value = json.loads(
            text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_int64
        )
    except RecursionError:
        raise ValueError("it nests too deeply") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "it contains a lone UTF-16 surrogate (an escape such as \\ud800 without its pair)"
        ) from None
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is too large for a number")
    return value


def _int64(text: str) -> int:
    """Integers the broker can store and every client can read back: 64-bit signed."""
    value = int(text)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"the integer {text[:40]} is outside the 64-bit range")
    return value
