"""Read tokens: a signed, expiring capability to read one stream (its state and events).

A browser ``EventSource`` cannot send an ``Authorization`` header, and a shared link should
not carry an API key; ``?token=<read token>`` serves both. The token is
``<stream id>.<expiry, epoch seconds>.<signature>`` where the signature is the first 128
bits of HMAC-SHA256 over ``sb-read:1:<stream id>:<expiry>``, hex-encoded: URL-safe as it is,
bound to one stream, and checked in constant time. The first configured secret signs; every
configured secret verifies, so a secret is rotated without downtime by putting the new one
first, then dropping the old one once its tokens have expired.

Anyone can send a token, no key needed: its shape is checked before any signature is
computed, and the expiry is read as ASCII digits only (``broker.numbers``), spelled as
``issue`` writes it (no leading zero), so a malformed token is a 401, never a crash.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from broker.numbers import InvalidNumber, parse_int
from broker.state import is_stream_id

_SIGNATURE_CHARS = 32  # 128 bits in hex
_EXPIRY_DIGITS = 12  # epoch seconds: 10 digits until the year 2286


class InvalidToken(Exception):
    """The message says why, without echoing the token."""


def _signature(secret: str, stream_id: str, expires: int) -> str:
    message = f"sb-read:1:{stream_id}:{expires}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()[:_SIGNATURE_CHARS]


def issue(secrets: Sequence[str], stream_id: str, *, now: float, ttl_seconds: int) -> str:
    expires = int(now) + ttl_seconds
    return f"{stream_id}.{expires}.{_signature(secrets[0], stream_id, expires)}"


def expiry(token: str) -> int:
    """The expiry (epoch seconds) written in a token ``issue`` wrote; not a check of it."""
    return parse_int(token.split(".")[1], max_digits=_EXPIRY_DIGITS)


def verify(secrets: Sequence[str], token: str, *, now: float) -> str:
    """The stream id the token grants; ``InvalidToken`` if it is malformed, forged or
    expired."""
    parts = token.split(".")
    if len(parts) != 3 or not is_stream_id(parts[0]) or len(parts[2]) != _SIGNATURE_CHARS:
        raise InvalidToken("the read token is malformed")
    stream_id, expires_text, signature = parts
    try:
        expires = parse_int(expires_text, max_digits=_EXPIRY_DIGITS)
    except InvalidNumber:
        raise InvalidToken("the read token is malformed") from None
    if str(expires) != expires_text:  # "0123" would verify as 123: one token, one spelling
        raise InvalidToken("the read token is malformed")
    # Every secret is tried, also after a match, so timing tells nothing about which one.
    valid = False
    for secret in secrets:
        expected = _signature(secret, stream_id, expires)
        valid |= hmac.compare_digest(expected.encode(), signature.encode())
    if not valid:
        raise InvalidToken("the read token's signature is not valid")
    if expires <= now:
        raise InvalidToken("the read token has expired")
    return stream_id
