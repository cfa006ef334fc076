"""``broker.numbers``: ASCII decimal digits and nothing else, bounded; what ``int()``,
``float()`` and ``str.isdigit()`` would also take is refused with ``InvalidNumber``."""

from __future__ import annotations

import pytest

from broker import numbers
from broker.numbers import InvalidNumber, parse_decimal, parse_int

#: Each is read by int(), float() or str.isdigit() and refused here: a superscript and a
#: circled digit (isdigit, then int() raises), ARABIC-INDIC, DEVANAGARI and FULLWIDTH digits
#: (int() reads them), a sign, '_', spaces, a newline (int() and float() skip it), a minus.
NOT_ASCII_DECIMAL = [
    "²",
    "①",
    "\u0661",
    "\u0966",
    "\uff11",
    "1\uff10",
    "+1",
    "-1",
    "1_0",
    " 1",
    "1 ",
    "1\n",
    "\xa01",  # NO-BREAK SPACE, which str.strip() would remove
    "",
]


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0), ("7", 7), ("007", 7), ("200", 200), ("9" * 19, 10**19 - 1)]
)
def test_parse_int_reads_ascii_digits(text: str, value: int) -> None:
    assert parse_int(text, max_digits=19) == value


@pytest.mark.parametrize("text", [*NOT_ASCII_DECIMAL, "1.0", "1e3", "0x1", "nan"])
def test_parse_int_refuses_anything_else(text: str) -> None:
    with pytest.raises(InvalidNumber, match="digits 0-9"):
        parse_int(text, max_digits=19)


def test_parse_int_refuses_more_digits_than_allowed_before_reading_them() -> None:
    assert parse_int("999", max_digits=3) == 999
    with pytest.raises(InvalidNumber, match="at most 3 digits"):
        parse_int("1000", max_digits=3)
    with pytest.raises(InvalidNumber):  # int() itself would raise past 4300 digits
        parse_int("1" * 5000, max_digits=19)


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0.0), ("2", 2.0), ("0.5", 0.5), ("1000", 1000.0), ("0.30000000000000004", 0.3)],
)
def test_parse_decimal_reads_digits_with_one_point(text: str, value: float) -> None:
    assert parse_decimal(text, max_chars=32) == pytest.approx(value)


@pytest.mark.parametrize(
    "text",
    [
        *NOT_ASCII_DECIMAL,
        "\u0661.\u0665",
        "1.",
        ".5",
        "1.2.3",
        "1e2",
        "1E2",
        "1e999",
        "nan",
        "NaN",
        "inf",
        "-inf",
        "Infinity",
        "0x1p3",
        "1.0_0",
    ],
)
def test_parse_decimal_refuses_anything_else(text: str) -> None:
    with pytest.raises(InvalidNumber, match="digits 0-9"):
        parse_decimal(text, max_chars=32)


def test_parse_decimal_is_bounded_so_always_finite() -> None:
    with pytest.raises(InvalidNumber, match="at most 32"):
        parse_decimal("9" * 400, max_chars=32)


def test_the_exported_names_are_the_module_surface() -> None:
    public = {name for name in vars(numbers) if not name.startswith("_")} - {"annotations"}
    assert public == set(numbers.__all__)
