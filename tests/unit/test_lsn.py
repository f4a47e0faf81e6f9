"""LSN text parsing and formatting."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.core.errors import DecodeError
from cdc.core.lsn import MAX_LSN, format_lsn, parse_lsn


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("16/B374D848", 0x16_B374D848),
        ("0/0", 0),
        ("0/1", 1),
        ("1/0", 1 << 32),
        ("FFFFFFFF/FFFFFFFF", MAX_LSN),
        ("16/b374d848", 0x16_B374D848),
        ("00000016/0000000A", 0x16_0000000A),
    ],
)
def test_parse_lsn(text: str, value: int) -> None:
    assert parse_lsn(text) == value


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0/0"),
        (0x16_B374D848, "16/B374D848"),
        (0x1_0000000A, "1/A"),
        (MAX_LSN, "FFFFFFFF/FFFFFFFF"),
    ],
)
def test_format_lsn_matches_postgresql(value: int, text: str) -> None:
    assert format_lsn(value) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "16",
        "16/",
        "/16",
        "16//1",
        "1/2/3",
        "0x16/1",
        "+1/2",
        "-1/2",
        "1_0/2",
        " 1/2",
        "1/2 ",
        "1/2\n",
        "123456789/0",
        "0/123456789",
        "g/1",
        "\uff11/2",  # full-width digit one: str.isdigit() says yes, PostgreSQL says no
    ],
)
def test_parse_lsn_rejects_what_postgresql_rejects(text: str) -> None:
    with pytest.raises(DecodeError, match="invalid LSN"):
        parse_lsn(text)


def test_parse_lsn_rejects_non_strings() -> None:
    with pytest.raises(DecodeError, match="must be a str"):
        parse_lsn(b"0/0")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [-1, MAX_LSN + 1, True, 1.0])
def test_format_lsn_rejects_non_lsns(value: object) -> None:
    with pytest.raises(ValueError):
        format_lsn(value)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=MAX_LSN))
def test_format_then_parse_round_trips(value: int) -> None:
    text = format_lsn(value)
    assert parse_lsn(text) == value
    high, low = text.split("/")
    assert high == high.upper() and low == low.upper()
    assert high == "0" or not high.startswith("0")
    assert low == "0" or not low.startswith("0")


_HEX = st.text(alphabet="0123456789abcdefABCDEF", min_size=1, max_size=8)


@given(_HEX, _HEX)
def test_parse_then_format_normalizes(high: str, low: str) -> None:
    value = parse_lsn(f"{high}/{low}")
    assert format_lsn(value) == f"{int(high, 16):X}/{int(low, 16):X}"


@given(st.text(max_size=20))
def test_parse_lsn_raises_only_decode_error(text: str) -> None:
    try:
        value = parse_lsn(text)
    except DecodeError:
        return
    assert 0 <= value <= MAX_LSN
