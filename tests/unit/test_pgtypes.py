"""Tests for cdc.core.pgtypes: PostgreSQL text -> Python/Arrow values, Debezium JSON and schemas.

The renderers below reproduce PostgreSQL's text output under the session settings the
connections use (DateStyle=ISO, TimeZone=UTC, extra_float_digits=3, bytea_output=hex), so the
round trips test the parsers against what the server actually sends.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.core.errors import ValueConversionError
from cdc.core.pgtypes import (
    OID,
    Oid,
    arrow_type,
    connect_schema,
    debezium_encoder,
    debezium_value,
    numeric_precision_scale,
    parse_array_text,
    text_parser,
    text_to_arrow,
    text_to_arrow_lossless,
    type_name,
)


def numeric_typmod(precision: int, scale: int) -> int:
    return ((precision << 16) | (scale & 0x7FF)) + 4


NUM_10_2 = numeric_typmod(10, 2)

# ---------------------------------------------------------------------------------------------
# PostgreSQL text renderers
# ---------------------------------------------------------------------------------------------


def pg_float8(x: float) -> str:
    # float8out with extra_float_digits > 0: shortest text that reads back exactly.
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    s = repr(x)
    return s[:-2] if s.endswith(".0") else s


def pg_float4(x: float) -> str:
    """Shortest text that reads back to the same float32 (float4out's contract)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    bits = struct.pack("<f", x)
    for digits in range(1, 10):
        s = f"{x:.{digits}g}"
        try:
            if struct.pack("<f", float(s)) == bits:
                return s
        except OverflowError:  # rounded up past FLT_MAX: need more digits
            continue
    raise AssertionError(x)


def to_float32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def pg_fraction(microsecond: int) -> str:
    # PostgreSQL drops trailing zeros and the point when the fraction is zero.
    return f".{microsecond:06d}".rstrip("0") if microsecond else ""


def pg_time(t: time) -> str:
    return f"{t.hour:02d}:{t.minute:02d}:{t.second:02d}{pg_fraction(t.microsecond)}"


def pg_timestamp(dt: datetime) -> str:
    return f"{dt.date().isoformat()} {pg_time(dt.time())}"


def pg_offset(offset: timedelta) -> str:
    total = int(offset.total_seconds())
    sign = "-" if total < 0 else "+"
    total = abs(total)
    hh, rest = divmod(total, 3600)
    mm, ss = divmod(rest, 60)
    out = f"{sign}{hh:02d}"
    if mm or ss:
        out += f":{mm:02d}"
    if ss:
        out += f":{ss:02d}"
    return out


def pg_timestamptz(dt: datetime) -> str:
    offset = dt.utcoffset()
    assert offset is not None
    return pg_timestamp(dt.replace(tzinfo=None)) + pg_offset(offset)


def pg_bytea(b: bytes) -> str:
    return "\\x" + b.hex()


def pg_decimal(d: Decimal) -> str:
    return format(d, "f")


# ---------------------------------------------------------------------------------------------
# Strategies: (python value, text, type_oid, typmod)
# ---------------------------------------------------------------------------------------------


def int_values(bits: int) -> st.SearchStrategy[int]:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return st.one_of(st.sampled_from([lo, hi, 0, -1, 1]), st.integers(lo, hi))


float32s = st.floats(width=32, allow_nan=True, allow_infinity=True)
float64s = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def fixed_decimals(draw: st.DrawFn) -> tuple[Decimal, int, int]:
    precision = draw(st.integers(1, 38))
    scale = draw(st.integers(0, precision))
    limit = 10**precision - 1
    unscaled = draw(
        st.one_of(st.sampled_from([limit, -limit, 0, 1, -1]), st.integers(-limit, limit))
    )
    digits = tuple(int(c) for c in str(abs(unscaled)))
    # Build from the tuple: exact, no decimal-context rounding beyond 28 digits.
    value = Decimal((1 if unscaled < 0 else 0, digits, -scale))
    return value, precision, scale


@st.composite
def fractional_micros(draw: st.DrawFn) -> int:
    digits = draw(st.integers(0, 6))  # 0-6 fractional digits, as PostgreSQL may print
    unit = 10 ** (6 - digits)
    return draw(st.integers(0, 999_999 // unit)) * unit


@st.composite
def timestamps(draw: st.DrawFn) -> datetime:
    dt = draw(
        st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59))
    )
    return dt.replace(microsecond=draw(fractional_micros()))


@st.composite
def times(draw: st.DrawFn) -> time:
    t = draw(st.times())
    return t.replace(microsecond=draw(fractional_micros()))


offsets = st.one_of(
    st.just(timedelta(0)),
    st.integers(-15 * 60, 15 * 60).map(lambda m: timedelta(minutes=m)),
    # PostgreSQL prints second-level offsets for LMT-era zones, e.g. +05:53:28.
    st.integers(-15 * 3600 + 1, 15 * 3600 - 1).map(lambda s: timedelta(seconds=s)),
)


@st.composite
def timestamptzs(draw: st.DrawFn) -> datetime:
    # Keep a day of margin so the local rendering stays inside year 1..9999.
    utc = draw(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30))).replace(
        microsecond=draw(fractional_micros()), tzinfo=UTC
    )
    offset = draw(offsets)
    return utc.astimezone(timezone(offset))


texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
json_texts = st.recursive(
    st.none() | st.booleans() | st.integers() | texts,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(texts, kids, max_size=3),
    max_leaves=8,
).map(lambda v: json.dumps(v, ensure_ascii=False))


@st.composite
def cases(draw: st.DrawFn) -> tuple[Any, str, int, int]:
    """One (expected python value, PostgreSQL text, type oid, typmod) for any mapped type."""
    kind = draw(
        st.sampled_from(
            [
                "int2", "int4", "int8", "oid", "float4", "float8", "bool", "numeric",
                "numeric_free", "date", "time", "timestamp", "timestamptz", "bytea", "text",
                "uuid", "json", "unknown",
            ]
        )
    )  # fmt: skip
    value: Any
    text: str
    oid: int = {"int2": Oid.INT2, "int4": Oid.INT4, "int8": Oid.INT8}.get(kind, 0)
    typmod = -1
    if kind in ("int2", "int4", "int8"):
        value = draw(int_values({"int2": 16, "int4": 32, "int8": 64}[kind]))
        text = str(value)
    elif kind == "oid":
        value = draw(st.sampled_from([0, 2**32 - 1]) | st.integers(0, 2**32 - 1))
        text, oid = str(value), Oid.OID
    elif kind == "float4":
        value = draw(float32s)
        text, oid = pg_float4(value), Oid.FLOAT4
    elif kind == "float8":
        value = draw(float64s)
        text, oid = pg_float8(value), Oid.FLOAT8
    elif kind == "bool":
        value = draw(st.booleans())
        text, oid = "t" if value else "f", Oid.BOOL
    elif kind == "numeric":
        value, p, s = draw(fixed_decimals())
        text, oid, typmod = pg_decimal(value), Oid.NUMERIC, numeric_typmod(p, s)
    elif kind == "numeric_free":
        text = draw(
            st.sampled_from(["NaN", "Infinity", "-Infinity"])
            | st.decimals(allow_nan=False, allow_infinity=False).map(pg_decimal)
        )
        value, oid = text, Oid.NUMERIC
    elif kind == "date":
        value = draw(st.dates(min_value=date(1, 1, 1), max_value=date(9999, 12, 31)))
        text, oid = value.isoformat(), Oid.DATE
    elif kind == "time":
        # Delta has no time type: the lake keeps PostgreSQL's exact text.
        value = text = pg_time(draw(times()))
        oid = Oid.TIME
    elif kind == "timestamp":
        value = draw(timestamps())
        text, oid = pg_timestamp(value), Oid.TIMESTAMP
    elif kind == "timestamptz":
        value = draw(timestamptzs())
        text, oid = pg_timestamptz(value), Oid.TIMESTAMPTZ
    elif kind == "bytea":
        value = draw(st.binary(max_size=64))
        text, oid = pg_bytea(value), Oid.BYTEA
    elif kind == "text":
        value = text = draw(
            texts | st.sampled_from(["", "a,b", 'say "hi"', "it's", "line\nbreak", "ü€😀"])
        )
        oid = draw(st.sampled_from([Oid.TEXT, Oid.VARCHAR, Oid.BPCHAR]))
    elif kind == "uuid":
        value = text = str(draw(st.uuids()))
        oid = Oid.UUID
    elif kind == "json":
        value = text = draw(json_texts)
        oid = draw(st.sampled_from([Oid.JSON, Oid.JSONB]))
    else:
        # Any other type keeps its exact text, e.g. inet or an enum's array.
        value = text = draw(texts | st.sampled_from(["10.0.0.1/8", "{1,2,3}", '{"a,b",NULL}']))
        oid = 869
    return value, text, oid, typmod


def same(a: Any, b: Any) -> bool:
    """Equality that also distinguishes -0.0 from 0.0 and treats NaN as equal to NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return (a == b and math.copysign(1, a) == math.copysign(1, b)) or (a != a and b != b)
    if isinstance(a, Decimal) and isinstance(b, Decimal):
        return a.as_tuple() == b.as_tuple() or a == b
    return type(a) is type(b) and a == b


def arrays_equal(actual: pa.Array | pa.ChunkedArray, expected: pa.Array) -> None:
    assert actual.type == expected.type
    got, want = actual.to_pylist(), expected.to_pylist()
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if isinstance(g, float) and isinstance(w, float):
            assert same(g, w), (g, w)
        else:
            assert g == w, (g, w)


# ---------------------------------------------------------------------------------------------
# Scalar round trips
# ---------------------------------------------------------------------------------------------


@settings(max_examples=600)
@given(cases())
def test_text_parser_round_trip(case: tuple[Any, str, int, int]) -> None:
    expected, text, oid, typmod = case
    parsed = text_parser(oid, typmod)(text)
    if oid == Oid.TIMESTAMPTZ:
        # Same instant, delivered in UTC.
        assert parsed == expected
        assert parsed.utcoffset() == timedelta(0)
    elif oid == Oid.NUMERIC and typmod >= 0:
        assert parsed == expected
        assert parsed.as_tuple().exponent == expected.as_tuple().exponent
    elif oid == Oid.FLOAT4:
        # The parser keeps the text's nearest double (JSON shows 1.1, not 1.100000023841858);
        # narrowed to float32 it must be the original value exactly.
        assert same(to_float32(parsed), expected)
    else:
        assert same(parsed, expected), (parsed, expected)
    # The parsed value must fit its Arrow type without loss.
    stored = pa.array([parsed], type=arrow_type(oid, typmod)).to_pylist()[0]
    if oid == Oid.FLOAT4:
        assert same(stored, expected)
    elif isinstance(parsed, float):
        assert same(stored, parsed)
    else:
        assert stored == parsed


@pytest.mark.parametrize(
    ("oid", "text", "expected"),
    [
        (Oid.TIMESTAMPTZ, "2026-01-01 10:00:00.5+00", datetime(2026, 1, 1, 10, 0, 0, 500000, UTC)),
        (Oid.TIMESTAMPTZ, "2026-01-01 10:00:00+05:30", datetime(2026, 1, 1, 4, 30, tzinfo=UTC)),
        (
            Oid.TIMESTAMPTZ,
            "1890-01-01 00:00:00+05:53:28",
            datetime(1889, 12, 31, 18, 6, 32, tzinfo=UTC),
        ),
        (Oid.TIMESTAMP, "0001-01-01 00:00:00", datetime(1, 1, 1)),
        (Oid.TIMESTAMP, "9999-12-31 23:59:59.999999", datetime(9999, 12, 31, 23, 59, 59, 999999)),
        (Oid.DATE, "0099-03-01", date(99, 3, 1)),
        (Oid.TIME, "23:59:59.999999", "23:59:59.999999"),
        (Oid.TIME, "24:00:00", "24:00:00"),  # valid in PostgreSQL, kept as text
        (Oid.FLOAT8, "NaN", math.nan),
        (Oid.FLOAT8, "-Infinity", -math.inf),
        (Oid.FLOAT8, "-0", -0.0),
        (Oid.FLOAT4, "3.4028235e+38", 3.4028235e38),
        (Oid.BYTEA, "\\x", b""),
        (Oid.BOOL, "t", True),
        (Oid.CHAR, "\\001", "\\001"),
    ],
)
def test_text_parser_examples(oid: int, text: str, expected: Any) -> None:
    parsed = text_parser(oid, -1)(text)
    assert same(parsed, expected) or parsed == expected
    if oid == Oid.TIMESTAMPTZ:
        assert parsed.utcoffset() == timedelta(0)


# ---------------------------------------------------------------------------------------------
# Vectorized conversion agrees with the scalar path
# ---------------------------------------------------------------------------------------------


@st.composite
def columns(draw: st.DrawFn) -> tuple[list[str | None], int, int]:
    """A column of one type: rendered texts with nulls mixed in."""
    first = draw(cases())
    _, _, oid, typmod = first
    rows: list[str | None] = []
    for _ in range(draw(st.integers(0, 25))):
        if draw(st.integers(0, 4)) == 0:
            rows.append(None)
            continue
        # Redraw until the same column type comes up; cheap, the kind list is short.
        case = draw(cases().filter(lambda c: c[2] == oid and c[3] == typmod))
        rows.append(case[1])
    return rows, oid, typmod


def expected_array(rows: list[str | None], oid: int, typmod: int) -> pa.Array:
    parse = text_parser(oid, typmod)
    return pa.array([None if r is None else parse(r) for r in rows], type=arrow_type(oid, typmod))


@settings(max_examples=300)
@given(columns(), st.sampled_from(["array", "chunked", "large"]))
def test_text_to_arrow_matches_scalar(column: tuple[list[str | None], int, int], form: str) -> None:
    rows, oid, typmod = column
    expected = expected_array(rows, oid, typmod)
    if form == "array":
        values: pa.Array | pa.ChunkedArray = pa.array(rows, type=pa.string())
    elif form == "large":
        values = pa.array(rows, type=pa.large_string())
    else:
        half = len(rows) // 2
        values = pa.chunked_array(
            [pa.array(rows[:half], pa.string()), pa.array(rows[half:], pa.string())]
        )
    result = text_to_arrow(values, oid, typmod)
    assert isinstance(result, pa.ChunkedArray) == (form == "chunked")
    assert result.null_count == sum(r is None for r in rows)
    arrays_equal(result, expected)


def test_text_to_arrow_null_typed_column() -> None:
    # pyarrow.csv infers the null type for an all-empty column.
    out = text_to_arrow(pa.nulls(3), Oid.INT8, -1)
    assert out.type == pa.int64()
    assert out.null_count == 3


def test_text_to_arrow_accepts_dictionary_and_view_strings() -> None:
    rows = ["1", None, "-7", "1"]
    for values in (pa.array(rows).dictionary_encode(), pa.array(rows, type=pa.string_view())):
        assert text_to_arrow(values, Oid.INT4, -1).to_pylist() == [1, None, -7, 1]


def test_text_to_arrow_rejects_non_string_input() -> None:
    with pytest.raises(TypeError):
        text_to_arrow(pa.array([1, 2]), Oid.INT8, -1)


def test_text_to_arrow_converts_forms_arrow_cannot_parse() -> None:
    # A second-level offset is valid PostgreSQL output; Arrow's parser rejects it, the scalar
    # fallback converts the chunk exactly instead of failing.
    out = text_to_arrow(
        pa.array(["1890-01-01 00:00:00+05:53:28", None, "2026-01-01 10:00:00+00"]),
        Oid.TIMESTAMPTZ,
        -1,
    )
    assert out.to_pylist() == [
        datetime(1889, 12, 31, 18, 6, 32, tzinfo=UTC),
        None,
        datetime(2026, 1, 1, 10, tzinfo=UTC),
    ]


# ---------------------------------------------------------------------------------------------
# Unconvertible values: both paths raise, neither rounds, clamps nor nulls
# ---------------------------------------------------------------------------------------------

BAD_VALUES = [
    (Oid.NUMERIC, NUM_10_2, "NaN", "NaN"),
    (Oid.NUMERIC, NUM_10_2, "Infinity", "Infinity"),
    (Oid.NUMERIC, NUM_10_2, "1.505", "fractional digits"),
    (Oid.NUMERIC, NUM_10_2, "123456789.00", "integer digits"),
    (Oid.NUMERIC, numeric_typmod(2, 2), "1.00", "integer digits"),
    (Oid.DATE, -1, "infinity", "infinity"),
    (Oid.DATE, -1, "-infinity", "infinity"),
    (Oid.DATE, -1, "10000-01-01", "9999"),
    (Oid.DATE, -1, "0044-03-15 BC", "BC"),
    (Oid.DATE, -1, "0000-01-01", "ISO"),
    (Oid.TIMESTAMP, -1, "infinity", "infinity"),
    (Oid.TIMESTAMP, -1, "-infinity", "infinity"),
    (Oid.TIMESTAMP, -1, "10000-01-01 00:00:00", "9999"),
    (Oid.TIMESTAMP, -1, "0044-03-15 12:00:00 BC", "BC"),
    (Oid.TIMESTAMP, -1, "2026-01-01 10:00:00+00", "offset"),
    (Oid.TIMESTAMPTZ, -1, "infinity", "infinity"),
    (Oid.TIMESTAMPTZ, -1, "-infinity", "infinity"),
    (Oid.TIMESTAMPTZ, -1, "10000-01-01 00:00:00+00", "9999"),
    (Oid.TIMESTAMPTZ, -1, "0044-03-15 12:00:00+00 BC", "BC"),
    (Oid.TIMESTAMPTZ, -1, "2026-01-01 10:00:00", "offset"),
    (Oid.TIME, -1, "24:00:01", "outside"),
    (Oid.TIME, -1, "10:00:00.1234567", "not PostgreSQL time output"),
    (Oid.TIMESTAMP, -1, "2026-01-01 10:00:00.1234567", "truncated"),
    (Oid.TIMESTAMPTZ, -1, "2026-01-01 10:00:00.1234567+00", "truncated"),
    (Oid.TIMESTAMPTZ, -1, "2026-01-01 10:00:00.1234567+05:30", "truncated"),
    (Oid.INT2, -1, "32768", "range"),
    (Oid.INT2, -1, "-32769", "range"),
    (Oid.INT4, -1, "2147483648", "range"),
    (Oid.INT8, -1, "9223372036854775808", "range"),
    (Oid.INT8, -1, "-9223372036854775809", "range"),
    (Oid.INT8, -1, "1.5", "integer"),
    (Oid.OID, -1, "-1", "range"),
    (Oid.OID, -1, "4294967296", "range"),
    (Oid.FLOAT4, -1, "1e39", "float32"),
    (Oid.FLOAT8, -1, "abc", "floating"),
    (Oid.BOOL, -1, "true", "'t'"),
    (Oid.BYTEA, -1, "\\000", "hex"),
    (Oid.BYTEA, -1, "\\xzz", "hex"),
]


@pytest.mark.parametrize(("oid", "typmod", "text", "reason"), BAD_VALUES)
def test_scalar_path_raises(oid: int, typmod: int, text: str, reason: str) -> None:
    with pytest.raises(ValueConversionError) as err:
        text_parser(oid, typmod)(text)
    message = str(err.value)
    assert type_name(oid) in message
    assert repr(text) in message
    assert reason in message


@pytest.mark.parametrize(("oid", "typmod", "text", "reason"), BAD_VALUES)
def test_vectorized_path_raises(oid: int, typmod: int, text: str, reason: str) -> None:
    good_values: dict[int, str] = {
        Oid.NUMERIC: "1.50" if typmod == NUM_10_2 else "0.50",
        Oid.DATE: "2026-01-01",
        Oid.TIMESTAMP: "2026-01-01 10:00:00",
        Oid.TIMESTAMPTZ: "2026-01-01 10:00:00+00",
        Oid.TIME: "10:00:00",
        Oid.BOOL: "t",
        Oid.BYTEA: "\\x00",
    }
    good = good_values.get(oid, "1")
    values = pa.chunked_array([pa.array([good, None]), pa.array([good, text, None])])
    with pytest.raises(ValueConversionError) as err:
        text_to_arrow(values, oid, typmod)
    assert reason in str(err.value)
    assert "row 3" in str(err.value)  # global row number across chunks


def test_float4_overflow_is_not_silently_infinity() -> None:
    # double->float32 narrowing overflows to inf without an error in Arrow; we must catch it.
    with pytest.raises(ValueConversionError):
        text_to_arrow(pa.array(["3.5e+38"]), Oid.FLOAT4, -1)
    # A real infinity is fine.
    assert text_to_arrow(pa.array(["Infinity"]), Oid.FLOAT4, -1).to_pylist() == [math.inf]


def test_lossless_text_fallbacks_never_fail() -> None:
    for typmod in (-1, numeric_typmod(60, 10)):
        assert arrow_type(Oid.NUMERIC, typmod) == pa.string()
        for text in ("NaN", "Infinity", "-0.000000000000000000000000000000001", "1" * 200):
            assert text_parser(Oid.NUMERIC, typmod)(text) == text
    assert text_to_arrow(pa.array(["NaN", None]), Oid.NUMERIC, -1).to_pylist() == ["NaN", None]


# ---------------------------------------------------------------------------------------------
# Type mapping
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("oid", "typmod", "expected"),
    [
        (Oid.INT2, -1, pa.int16()),
        (Oid.INT4, -1, pa.int32()),
        (Oid.INT8, -1, pa.int64()),
        (Oid.OID, -1, pa.int64()),
        (Oid.FLOAT4, -1, pa.float32()),
        (Oid.FLOAT8, -1, pa.float64()),
        (Oid.BOOL, -1, pa.bool_()),
        (Oid.TEXT, -1, pa.string()),
        (Oid.VARCHAR, 14, pa.string()),
        (Oid.BPCHAR, 9, pa.string()),
        (Oid.CHAR, -1, pa.string()),
        (Oid.BYTEA, -1, pa.binary()),
        (Oid.DATE, -1, pa.date32()),
        (Oid.TIME, 3, pa.string()),  # Delta has no time type
        (Oid.TIMESTAMP, -1, pa.timestamp("us")),
        (Oid.TIMESTAMPTZ, 0, pa.timestamp("us", tz="UTC")),
        (Oid.UUID, -1, pa.string()),
        (Oid.JSON, -1, pa.string()),
        (Oid.JSONB, -1, pa.string()),
        (Oid.NUMERIC, NUM_10_2, pa.decimal128(10, 2)),
        (Oid.NUMERIC, numeric_typmod(38, 0), pa.decimal128(38, 0)),
        (Oid.NUMERIC, numeric_typmod(39, 2), pa.string()),
        (Oid.NUMERIC, numeric_typmod(5, -2), pa.string()),  # PostgreSQL 15+ negative scale
        (Oid.NUMERIC, -1, pa.string()),
        (Oid.INTERVAL, -1, pa.string()),  # no Delta interval type: exact ISO text
        (Oid.MONEY, -1, pa.decimal128(19, 2)),
        (1007, -1, pa.list_(pa.int32())),  # int4[]
        (1231, NUM_10_2, pa.list_(pa.decimal128(10, 2))),  # numeric(10,2)[]
        (869, -1, pa.string()),  # inet: exact text
        (99999, -1, pa.string()),
    ],
)
def test_arrow_type(oid: int, typmod: int, expected: pa.DataType) -> None:
    assert arrow_type(oid, typmod) == expected


def test_type_names_and_oids() -> None:
    assert type_name(23) == "int4"
    assert type_name(Oid.TIMESTAMPTZ) == "timestamptz"
    assert type_name(12345) == "oid:12345"
    assert OID.NUMERIC == 1700
    assert numeric_precision_scale(-1) is None
    assert numeric_precision_scale(NUM_10_2) == (10, 2)
    assert numeric_precision_scale(numeric_typmod(5, -2)) == (5, -2)


# ---------------------------------------------------------------------------------------------
# Debezium JSON values
# ---------------------------------------------------------------------------------------------

TS = datetime(2026, 1, 1, 10, 0, 0, 123456)
TS_MICROS = 1767261600123456


@pytest.mark.parametrize(
    ("value", "oid", "typmod", "expected"),
    [
        (None, Oid.INT4, -1, None),
        (7, Oid.INT2, -1, 7),
        (-(2**63), Oid.INT8, -1, -(2**63)),
        (1.5, Oid.FLOAT8, -1, 1.5),
        (math.nan, Oid.FLOAT8, -1, "NaN"),
        (math.inf, Oid.FLOAT4, -1, "Infinity"),
        (-math.inf, Oid.FLOAT8, -1, "-Infinity"),
        (True, Oid.BOOL, -1, True),
        ("héllo", Oid.TEXT, -1, "héllo"),
        (b"\x00\xff", Oid.BYTEA, -1, "AP8="),
        (b"", Oid.BYTEA, -1, ""),
        (Decimal("1.50"), Oid.NUMERIC, NUM_10_2, "AJY="),  # unscaled 150 = 0x0096
        (Decimal("-1.50"), Oid.NUMERIC, NUM_10_2, "/2o="),  # -150 = 0xff6a
        (Decimal("1.5"), Oid.NUMERIC, NUM_10_2, "AJY="),  # rescaled to the column's scale
        (Decimal("0.00"), Oid.NUMERIC, NUM_10_2, "AA=="),
        (Decimal("1.27"), Oid.NUMERIC, NUM_10_2, "fw=="),
        (Decimal("1.28"), Oid.NUMERIC, NUM_10_2, "AIA="),
        (Decimal("-1.28"), Oid.NUMERIC, NUM_10_2, "gA=="),
        ("1.50", Oid.NUMERIC, numeric_typmod(60, 2), "AJY="),  # text fallback, same encoding
        ("123.4500", Oid.NUMERIC, -1, {"scale": 4, "value": "EtZE"}),
        ("-7", Oid.NUMERIC, -1, {"scale": 0, "value": "+Q=="}),
        (date(2026, 1, 1), Oid.DATE, -1, 20454),
        (date(1969, 12, 31), Oid.DATE, -1, -1),
        ("10:00:00.5", Oid.TIME, -1, 36_000_500_000),
        ("10:00:00.5", Oid.TIME, 3, 36_000_500),
        ("24:00:00", Oid.TIME, -1, 86_400_000_000),
        (TS, Oid.TIMESTAMP, -1, TS_MICROS),
        (TS, Oid.TIMESTAMP, 6, TS_MICROS),
        (TS.replace(microsecond=123000), Oid.TIMESTAMP, 3, 1767261600123),
        (datetime(1969, 12, 31, 23, 59, 59, 999999), Oid.TIMESTAMP, -1, -1),
        (datetime(2026, 1, 1, 10, 0, 0, 123456, UTC), Oid.TIMESTAMPTZ, -1, "2026-01-01T10:00:00.123456Z"),
        (datetime(2026, 1, 1, 10, tzinfo=UTC), Oid.TIMESTAMPTZ, -1, "2026-01-01T10:00:00.000000Z"),
        (datetime(2026, 1, 1, 10, 0, 0, 120000, UTC), Oid.TIMESTAMPTZ, 3, "2026-01-01T10:00:00.120Z"),
        (datetime(2026, 1, 1, 10, tzinfo=UTC), Oid.TIMESTAMPTZ, 0, "2026-01-01T10:00:00Z"),
        (datetime(1, 1, 1, tzinfo=UTC), Oid.TIMESTAMPTZ, 0, "0001-01-01T00:00:00Z"),
        (
            datetime(2026, 1, 1, 15, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
            Oid.TIMESTAMPTZ,
            0,
            "2026-01-01T10:00:00Z",
        ),
        ("6ba7b810-9dad-11d1-80b4-00c04fd430c8", Oid.UUID, -1, "6ba7b810-9dad-11d1-80b4-00c04fd430c8"),
        (uuid.UUID(int=1), Oid.UUID, -1, "00000000-0000-0000-0000-000000000001"),
        ('{"a": 1}', Oid.JSONB, -1, '{"a": 1}'),
        # interval.handling.mode=string: the exact ISO 8601 text, however large.
        ("P1D", Oid.INTERVAL, -1, "P1D"),
        ("P1Y2M3DT4H5M6.5S", Oid.INTERVAL, -1, "P1Y2M3DT4H5M6.5S"),
        ("P-1DT2H", Oid.INTERVAL, -1, "P-1DT2H"),
        ("P-178000000Y", Oid.INTERVAL, -1, "P-178000000Y"),
        (Decimal("1.50"), Oid.MONEY, -1, "AJY="),
        ([1, None, 3], 1007, -1, [1, None, 3]),
        ([date(2026, 1, 1)], 1182, -1, [20454]),
        ("10.0.0.1/8", 869, -1, "10.0.0.1/8"),
    ],
)  # fmt: skip
def test_debezium_value_golden(value: Any, oid: int, typmod: int, expected: Any) -> None:
    assert debezium_value(value, oid, typmod) == expected


@pytest.mark.parametrize(
    ("value", "oid", "typmod"),
    [
        (Decimal("NaN"), Oid.NUMERIC, NUM_10_2),
        ("NaN", Oid.NUMERIC, -1),
        ("Infinity", Oid.NUMERIC, numeric_typmod(60, 2)),
        (Decimal("1.505"), Oid.NUMERIC, NUM_10_2),
        ("10:00:00.000001", Oid.TIME, 3),
        (datetime(2026, 1, 1, 0, 0, 0, 1), Oid.TIMESTAMP, 3),
        (datetime(2026, 1, 1), Oid.TIMESTAMPTZ, -1),
    ],
)
def test_debezium_value_refuses_lossy_encodings(value: Any, oid: int, typmod: int) -> None:
    with pytest.raises(ValueConversionError):
        debezium_value(value, oid, typmod)


def decode_twos_complement(b64: str) -> int:
    return int.from_bytes(base64.b64decode(b64), "big", signed=True)


@given(fixed_decimals())
def test_debezium_decimal_round_trip(case: tuple[Decimal, int, int]) -> None:
    value, precision, scale = case
    encoded = debezium_value(value, Oid.NUMERIC, numeric_typmod(precision, scale))
    raw = base64.b64decode(encoded)
    unscaled = decode_twos_complement(encoded)
    assert (
        Decimal((0 if unscaled >= 0 else 1, tuple(map(int, str(abs(unscaled)))), -scale)) == value
    )
    # Minimal length, like Java's BigInteger.toByteArray().
    assert len(raw) == unscaled.bit_length() // 8 + 1 or (
        unscaled < 0 and len(raw) == (-unscaled - 1).bit_length() // 8 + 1
    )


@given(st.decimals(allow_nan=False, allow_infinity=False).map(pg_decimal))
def test_debezium_variable_scale_round_trip(text: str) -> None:
    encoded = debezium_value(text, Oid.NUMERIC, -1)
    unscaled = decode_twos_complement(encoded["value"])
    assert Decimal(unscaled).scaleb(-encoded["scale"]) == Decimal(text) or (
        Decimal((0 if unscaled >= 0 else 1, tuple(map(int, str(abs(unscaled)))), -encoded["scale"]))
        == Decimal(text)
    )


@given(timestamps())
def test_debezium_timestamp_micros_match_arrow(dt: datetime) -> None:
    # MicroTimestamp is the same number Arrow stores for timestamp[us].
    stored = pa.array([dt], pa.timestamp("us")).cast(pa.int64())[0].as_py()
    assert debezium_value(dt, Oid.TIMESTAMP, -1) == stored


@given(st.dates())
def test_debezium_date_days_match_arrow(d: date) -> None:
    assert debezium_value(d, Oid.DATE, -1) == pa.array([d]).cast(pa.int32())[0].as_py()


def test_debezium_encoder_is_per_column_function() -> None:
    encode = debezium_encoder(Oid.NUMERIC, NUM_10_2)
    assert encode(Decimal("1.50")) == "AJY="
    assert debezium_encoder(Oid.NUMERIC, NUM_10_2) is encode  # cached per (oid, typmod)


# ---------------------------------------------------------------------------------------------
# Connect schemas
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("oid", "typmod", "expected"),
    [
        (Oid.INT2, -1, {"type": "int16"}),
        (Oid.INT4, -1, {"type": "int32"}),
        (Oid.INT8, -1, {"type": "int64"}),
        (Oid.OID, -1, {"type": "int64"}),
        (Oid.FLOAT4, -1, {"type": "float"}),
        (Oid.FLOAT8, -1, {"type": "double"}),
        (Oid.BOOL, -1, {"type": "boolean"}),
        (Oid.TEXT, -1, {"type": "string"}),
        (Oid.VARCHAR, 14, {"type": "string"}),
        (Oid.BYTEA, -1, {"type": "bytes"}),
        (Oid.DATE, -1, {"type": "int32", "name": "io.debezium.time.Date", "version": 1}),
        (Oid.TIME, 3, {"type": "int32", "name": "io.debezium.time.Time", "version": 1}),
        (Oid.TIME, -1, {"type": "int64", "name": "io.debezium.time.MicroTime", "version": 1}),
        (Oid.TIMESTAMP, 0, {"type": "int64", "name": "io.debezium.time.Timestamp", "version": 1}),
        (Oid.TIMESTAMP, 3, {"type": "int64", "name": "io.debezium.time.Timestamp", "version": 1}),
        (Oid.TIMESTAMP, 4, {"type": "int64", "name": "io.debezium.time.MicroTimestamp", "version": 1}),
        (Oid.TIMESTAMP, -1, {"type": "int64", "name": "io.debezium.time.MicroTimestamp", "version": 1}),
        (Oid.TIMESTAMPTZ, -1, {"type": "string", "name": "io.debezium.time.ZonedTimestamp", "version": 1}),
        (Oid.UUID, -1, {"type": "string", "name": "io.debezium.data.Uuid", "version": 1}),
        (Oid.JSON, -1, {"type": "string", "name": "io.debezium.data.Json", "version": 1}),
        (Oid.JSONB, -1, {"type": "string", "name": "io.debezium.data.Json", "version": 1}),
        (
            Oid.NUMERIC,
            NUM_10_2,
            {
                "type": "bytes",
                "name": "org.apache.kafka.connect.data.Decimal",
                "version": 1,
                "parameters": {"scale": "2", "connect.decimal.precision": "10"},
            },
        ),
        (
            Oid.NUMERIC,
            -1,
            {
                "type": "struct",
                "fields": [
                    {"type": "int32", "optional": False, "field": "scale"},
                    {"type": "bytes", "optional": False, "field": "value"},
                ],
                "name": "io.debezium.data.VariableScaleDecimal",
                "version": 1,
                "doc": "Variable scaled decimal",
            },
        ),
        (869, -1, {"type": "string"}),
        (Oid.INTERVAL, -1, {"type": "string", "name": "io.debezium.time.Interval", "version": 1}),
        (1007, -1, {"type": "array", "items": {"type": "int32", "optional": True}}),
    ],
)  # fmt: skip
def test_connect_schema(oid: int, typmod: int, expected: dict[str, Any]) -> None:
    assert connect_schema(oid, typmod, field="c") == {**expected, "optional": True, "field": "c"}
    required = connect_schema(oid, typmod, field="k", optional=False)
    assert required["optional"] is False
    assert required["field"] == "k"


def test_connect_schema_returns_a_copy() -> None:
    first = connect_schema(Oid.NUMERIC, -1, field="n")
    first["fields"][0]["field"] = "mutated"
    first["name"] = "mutated"
    again = connect_schema(Oid.NUMERIC, -1, field="n")
    assert again["fields"][0]["field"] == "scale"
    assert again["name"] == "io.debezium.data.VariableScaleDecimal"


@given(timestamptzs(), st.sampled_from([-1, 0, 1, 3, 5, 6]))
def test_debezium_zoned_timestamp_round_trip(dt: datetime, typmod: int) -> None:
    precision = 6 if typmod < 0 else typmod
    encoded = debezium_value(dt, Oid.TIMESTAMPTZ, typmod)
    assert encoded.endswith("Z")
    assert datetime.fromisoformat(encoded) == dt  # same instant, never truncated
    fraction = encoded[20:-1] if len(encoded) > 20 else ""
    if dt.microsecond % 10 ** (6 - precision) == 0:
        assert len(fraction) == precision  # Debezium's fixed width for the column
    else:
        assert len(fraction) == 6


@pytest.mark.parametrize(
    ("text", "elements"),
    [
        ("{}", []),
        ("{1,NULL,3}", ["1", None, "3"]),
        ('{"a,b","q\\"x","NULL",NULL,""," sp","back\\\\slash"}', ["a,b", 'q"x', "NULL", None, "", " sp", "back\\slash"]),
        ('{"{\\"a\\": 1}"}', ['{"a": 1}']),
    ],
)  # fmt: skip
def test_parse_array_text(text: str, elements: list[str | None]) -> None:
    assert parse_array_text(text) == elements


@pytest.mark.parametrize("text", ["{{1,2},{3,4}}", "[0:1]={1,2}", "{1,2", '{"open}', "{1,,2}"])
def test_arrays_that_a_flat_list_cannot_hold_exactly_raise(text: str) -> None:
    with pytest.raises(ValueConversionError):
        text_parser(1007, -1)(text)


@given(
    st.lists(
        st.one_of(
            st.none(), st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
        ),
        max_size=8,
    )
)
def test_array_literal_round_trip(elements: list[str | None]) -> None:
    """Render a text[] the way PostgreSQL does and parse it back."""

    def render(e: str | None) -> str:
        if e is None:
            return "NULL"
        if e == "" or e.upper() == "NULL" or any(c in e for c in '{},"\\ \t\n'):
            return '"' + e.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return e

    assert parse_array_text("{" + ",".join(render(e) for e in elements) + "}") == elements


def test_money_parses_lc_monetary_c_output() -> None:
    parse = text_parser(Oid.MONEY, -1)
    assert parse("-$1,234.56") == Decimal("-1234.56")
    assert parse("$92,233,720,368,547,758.07") == Decimal("92233720368547758.07")
    arr = text_to_arrow(pa.array(["$1,000.00", None, "-$0.01"]), Oid.MONEY, -1)
    assert arr.to_pylist() == [Decimal("1000.00"), None, Decimal("-0.01")]
    with pytest.raises(ValueConversionError):
        parse("1.234,56 EUR")


def test_lossless_conversion_keeps_the_text_of_what_does_not_fit() -> None:
    values = pa.array(["1.50", "NaN", None, "Infinity"])
    typed, fallback = text_to_arrow_lossless(values, Oid.NUMERIC, NUM_10_2)
    assert typed.to_pylist() == [Decimal("1.50"), None, None, None]
    assert fallback is not None
    assert fallback.to_pylist() == [None, "NaN", None, "Infinity"]
    typed, fallback = text_to_arrow_lossless(pa.array(["2026-01-01"]), Oid.DATE, -1)
    assert fallback is None and typed.to_pylist() == [date(2026, 1, 1)]
    typed, fallback = text_to_arrow_lossless(pa.array(["{1}", "{{1},{2}}"]), 1007, -1)
    assert typed.to_pylist() == [[1], None] and fallback.to_pylist() == [None, "{{1},{2}}"]
