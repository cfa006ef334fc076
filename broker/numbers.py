"""Numbers read from request text: ASCII decimal digits only, of bounded length.

``int()`` and ``float()`` read more than a client should send: any Unicode decimal digit
(Arabic-Indic ``\\u0661``, full-width ``\\uff11``), a sign, surrounding whitespace and ``_``
separators (``'+5'``, ``' 5'``, ``'5_000'``); ``float()`` also reads ``nan``, ``inf`` and
exponents (``'1e999'`` is infinite). Nor is ``str.isdigit()`` a guard: superscripts and
circled digits (``'²'``, ``'①'``) pass it, then ``int()`` raises, which answered 500, for a
read token before its signature was checked. Every number the api takes from a query
parameter, a header, a cursor or a read token goes through this module instead; a refusal is
an ``InvalidNumber``, which the caller turns into its own 400 (401 for a token).

What is accepted, and nothing else:

- ``parse_int``: ``[0-9]{1,max_digits}``, a whole number of at least 0. Leading zeros are
  read (``"007"`` is 7); a caller that needs one spelling per number (a signed token)
  compares with ``str()`` of the result.
- ``parse_decimal``: ``[0-9]+`` or ``[0-9]+.[0-9]+``, at most ``max_chars`` long: no sign,
  exponent, ``nan`` or ``inf``, and no ``"1."`` or ``".5"``: what Python's ``f"{x:g}"`` and
  JavaScript's ``String(x)`` write for numbers from 0.0001 to 100000.

Surrounding whitespace is refused too; a caller reading a header strips what HTTP allows
around a field value (spaces and tabs) first. The bound keeps ``int()`` and ``float()`` from
spending time on megabytes of digits, and makes ``parse_decimal`` always finite.
"""

from __future__ import annotations

__all__ = ["InvalidNumber", "int_or_none", "parse_decimal", "parse_int"]


class InvalidNumber(ValueError):
    """The text is not a number written as this module accepts; the message says what was
    expected, without echoing the text (it may be part of a secret, such as a token)."""


def _is_digits(text: str) -> bool:
    # ASCII first: among ASCII characters only 0-9 are digits, among the rest many more are.
    return text.isascii() and text.isdigit()


def parse_int(text: str, *, max_digits: int) -> int:
    """A whole number of at least 0 written as 1 to ``max_digits`` ASCII digits."""
    if not 0 < len(text) <= max_digits or not _is_digits(text):
        raise InvalidNumber(f"expected a whole number of at most {max_digits} digits 0-9")
    return int(text)


def int_or_none(text: str, *, max_digits: int) -> int | None:
    """``parse_int``, or None where it refuses: for text from a peer that is skipped, not
    answered (an SSE field, a header the server merely reads)."""
    try:
        return parse_int(text, max_digits=max_digits)
    except InvalidNumber:
        return None


def parse_decimal(text: str, *, max_chars: int) -> float:
    """A number of at least 0 written as ASCII digits with at most one ``.`` between them,
    at most ``max_chars`` characters in all."""
    whole, dot, fraction = text.partition(".")
    if len(text) > max_chars or not _is_digits(whole) or (dot and not _is_digits(fraction)):
        raise InvalidNumber(
            f"expected digits 0-9 with at most one '.' between them, at most {max_chars} in all"
        )
    return float(text)
