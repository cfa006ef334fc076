"""Read tokens: bound to one stream, expiring, unforgeable, and rotatable."""

from __future__ import annotations

import pytest

from broker import read_token_signing
from broker.state import new_stream_id

OLD = "o" * 32
NEW = "n" * 40
NOW = 1_800_000_000.0


def test_a_token_grants_the_stream_it_was_issued_for() -> None:
    stream_id = new_stream_id()
    token = read_token_signing.issue([NEW], stream_id, now=NOW, ttl_seconds=60)
    assert read_token_signing.verify([NEW], token, now=NOW + 59) == stream_id


def test_an_expired_token_is_refused() -> None:
    token = read_token_signing.issue([NEW], new_stream_id(), now=NOW, ttl_seconds=60)
    with pytest.raises(read_token_signing.InvalidToken, match="expired"):
        read_token_signing.verify([NEW], token, now=NOW + 60)


@pytest.mark.parametrize("part", [0, 1, 2])
def test_changing_any_part_breaks_the_signature(part: int) -> None:
    stream_id = new_stream_id()
    pieces = read_token_signing.issue([NEW], stream_id, now=NOW, ttl_seconds=60).split(".")
    replacement = {0: new_stream_id(), 1: str(int(pieces[1]) + 3600), 2: "0" * 32}[part]
    pieces[part] = replacement
    with pytest.raises(read_token_signing.InvalidToken, match="signature"):
        read_token_signing.verify([NEW], ".".join(pieces), now=NOW)


def test_rotation_accepts_tokens_of_every_listed_secret_and_signs_with_the_first() -> None:
    stream_id = new_stream_id()
    old_token = read_token_signing.issue([OLD], stream_id, now=NOW, ttl_seconds=60)
    rotated = [NEW, OLD]
    assert read_token_signing.verify(rotated, old_token, now=NOW) == stream_id
    new_token = read_token_signing.issue(rotated, stream_id, now=NOW, ttl_seconds=60)
    assert read_token_signing.verify([NEW], new_token, now=NOW) == stream_id
    with pytest.raises(read_token_signing.InvalidToken):  # the old secret, once dropped
        read_token_signing.verify([NEW], old_token, now=NOW)


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b.c", f"{'x' * 26}.1.{'0' * 32}", "..", f"{new_stream_id()}.-5.{'0' * 32}"],
)
def test_malformed_tokens_are_refused_without_echoing_them(token: str) -> None:
    with pytest.raises(read_token_signing.InvalidToken) as refused:
        read_token_signing.verify([NEW], token, now=NOW)
    assert token not in str(refused.value) or token == ""


@pytest.mark.parametrize(
    "expiry",
    [
        "²",  # regression (the Unicode digits 500): str.isdigit() passed it, int() raised
        "\u0661\u0668\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660",  # Arabic-Indic
        "\uff11\uff18\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff10",  # full-width
        "1_800_000_000",
        "+1800000000",
        " 1800000000",
    ],
)
def test_an_expiry_not_in_ascii_digits_as_issued_is_malformed(expiry: str) -> None:
    """Checked before the signature: a token needs no key to send, so this must cost nothing
    and never raise anything but ``InvalidToken``."""
    stream_id = new_stream_id()
    signature = read_token_signing.issue([NEW], stream_id, now=NOW, ttl_seconds=60).split(".")[2]
    with pytest.raises(read_token_signing.InvalidToken, match="malformed"):
        read_token_signing.verify([NEW], f"{stream_id}.{expiry}.{signature}", now=NOW)


def test_a_second_spelling_of_a_signed_expiry_is_malformed() -> None:
    """``0<expiry>`` is the same number, so its signature is valid: one token, one spelling."""
    stream_id, expiry, signature = read_token_signing.issue(
        [NEW], new_stream_id(), now=NOW, ttl_seconds=60
    ).split(".")
    with pytest.raises(read_token_signing.InvalidToken, match="malformed"):
        read_token_signing.verify([NEW], f"{stream_id}.0{expiry}.{signature}", now=NOW)


def test_the_expiry_is_read_from_the_token() -> None:
    token = read_token_signing.issue([NEW], new_stream_id(), now=NOW, ttl_seconds=60)
    assert read_token_signing.expiry(token) == int(NOW) + 60
