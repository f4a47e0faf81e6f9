"""PostgreSQL type mapping: text form -> Python value -> Arrow / Debezium JSON.

One table (``_FIXED_SPECS``, plus ``_MODIFIED_SPECS`` for the types whose mapping depends on
the type modifier) says, for every built-in type we handle, how a column of that type
is stored in Arrow/Delta, how one value's text form is parsed, how a parsed value is encoded
in a Debezium-compatible change event, and which Kafka Connect schema describes it.

Values arrive as PostgreSQL's *text* output: pgoutput's text format while streaming, and
``COPY ... (FORMAT csv)`` for snapshots. The parsers rely on the session settings our
connections always make; with other settings the text differs and parsing fails or, worse,
means something else:

* ``DateStyle=ISO``: dates and timestamps look like ``2026-01-01 10:00:00.5``. Under
  ``DateStyle=SQL`` or ``German`` the same bytes would be read day-first or not at all.
* ``TimeZone=UTC``: ``timestamptz`` is printed as ``...+00``, the fastest form to parse.
  Other offsets are still converted to UTC correctly; the historical second-level ones
  (``+05:53:28``) make the snapshot path fall back to the per-value parser.
* ``IntervalStyle=iso_8601``: intervals land as their ISO 8601 text.
* ``lc_monetary=C``: ``money`` looks like ``-$1,234.56``.
* ``extra_float_digits=3``: on PostgreSQL 12+ any positive value selects the shortest text
  that reads back to the exact same float, so ``float4``/``float8`` round-trip exactly.
  With ``extra_float_digits <= 0`` PostgreSQL rounds floats on output and data is lost
  before it reaches us.
* ``bytea_output=hex``: ``bytea`` looks like ``\\x0aff``; the ``escape`` form is rejected.

Lossless contract
-----------------
A value is never rounded, clamped, truncated or turned into null to fit its Arrow type. When
the text cannot be represented exactly, the parser raises
:class:`~cdc.core.errors.ValueConversionError` naming the type, the value and the reason, and the
callers (the assembler while streaming, :func:`text_to_arrow_lossless` for snapshots) keep
the exact text in the row's ``_cdc_fallback`` map instead, with NULL in the typed column.
That happens for:

* ``numeric(p, s)`` stored as ``decimal128(p, s)``: ``NaN`` (PostgreSQL allows it there);
* ``date``/``timestamp``/``timestamptz``: ``infinity``/``-infinity``, BC dates and years above
  9999 (outside both Python's ``datetime`` and PostgreSQL's 4-digit ISO form);
* arrays that are multi-dimensional or have explicit bounds (a flat list cannot hold them);
* text that is not the PostgreSQL output for the type at all (wrong GUCs, corrupt data).

Types stored as ``string`` keep PostgreSQL's exact text and never need the fallback:
unconstrained ``numeric``, ``numeric`` wider than 38 digits, ``time`` (Delta has no time
type), ``timetz``, ``interval``, ``uuid``, ``json``, ``jsonb``, and every type not listed in
:class:`Oid` (enums, ranges, network, geometric and composite types, ``tsvector``...).
Domains are resolved to their base type by :mod:`cdc.postgres.introspect` before they reach here.

``float4`` is the one deliberate approximation: Arrow stores IEEE float32, which is what
PostgreSQL stores too. The parser returns the nearest Python float (a double) to the text, so
that JSON shows ``1.1`` rather than ``1.100000023841858``; Arrow rounds it to float32.

Debezium JSON deviations
------------------------
:func:`debezium_value` follows Debezium's defaults (``decimal.handling.mode=precise``,
``time.precision.mode=adaptive``, ``binary.handling.mode=bytes``) as serialised by Kafka's
``JsonConverter``, except for ``interval``: it is the ISO 8601 text of Debezium's
``interval.handling.mode=string`` (``io.debezium.time.Interval``), because the default
microsecond count is approximate and overflows int64 for values PostgreSQL accepts. Float
``NaN``/``Infinity``/``-Infinity`` cannot be written as standard JSON numbers, so they are
emitted as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``.
``numeric`` ``NaN``/``Infinity`` raise :class:`~cdc.core.errors.ValueConversionError`, as Debezium's
precise mode itself refuses them.
"""

from __future__ import annotations

import binascii
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import IntEnum
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import pyarrow as pa
import pyarrow.compute as pc

from cdc.core.errors import ValueConversionError

if TYPE_CHECKING:
    from cdc.core.table_schema import ColumnSchema

__all__ = [
    "ARRAY_ELEMENT_OIDS",
    "OID",
    "Oid",
    "arrow_type",
    "connect_schema",
    "debezium_encoder",
    "debezium_value",
    "numeric_precision_scale",
    "parse_array_text",
    "temporal_precision",
    "text_parser",
    "text_to_arrow",
    "text_to_arrow_lossless",
    "texts_to_arrow_lossless",
    "type_name",
]


class Oid(IntEnum):
    """OIDs of the built-in types with a dedicated mapping (``pg_type.oid``, stable forever)."""

    BOOL = 16
    BYTEA = 17
    CHAR = 18  # the one-byte internal type "char", not char(n) (that is BPCHAR)
    INT8 = 20
    INT2 = 21
    INT4 = 23
    TEXT = 25
    OID = 26
    JSON = 114
    FLOAT4 = 700
    FLOAT8 = 701
    BPCHAR = 1042
    VARCHAR = 1043
    DATE = 1082
    TIME = 1083
    TIMESTAMP = 1114
    TIMESTAMPTZ = 1184
    NUMERIC = 1700
    UUID = 2950
    JSONB = 3802
    MONEY = 790
    INTERVAL = 1186
    TIMETZ = 1266


#: Alias, so callers can write ``OID.INT4``.
OID = Oid

Parser: TypeAlias = Callable[[str], Any]
Encoder: TypeAlias = Callable[[Any], Any]

_UTC: Final = UTC
_EPOCH_NAIVE: Final = datetime(1970, 1, 1)
_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()
_ONE_MICROSECOND: Final = timedelta(microseconds=1)
_MIN_DATE: Final = date(1, 1, 1)
_MIN_DATETIME: Final = datetime(1, 1, 1)
_MAX_ARROW_DECIMAL128_PRECISION: Final = 38
_DEFAULT_TEMPORAL_PRECISION: Final = 6  # PostgreSQL keeps microseconds when no (p) is given
# Smallest double that rounds to float32 infinity: the midpoint between FLT_MAX (2**128 -
# 2**104) and 2**128, which round-half-to-even sends up. Anything at or above it overflows.
_FLOAT32_OVERFLOW: Final = float(2**128 - 2**103)
# datetime.fromisoformat silently truncates fractions beyond microseconds. PostgreSQL never
# prints them, but text that has them must fail rather than lose digits. Only text longer
# than PostgreSQL's longest UTC output can have them, so the hot path pays one len().
_SUBMICROSECOND: Final = re.compile(r"\.\d{7}")
_MAX_TIMESTAMP_LEN: Final = len("9999-12-31 23:59:59.999999")
_MAX_TIMESTAMPTZ_UTC_LEN: Final = len("9999-12-31 23:59:59.999999+00")


# ---------------------------------------------------------------------------------------------
# Type modifiers
# ---------------------------------------------------------------------------------------------


def numeric_precision_scale(type_modifier: int) -> tuple[int, int] | None:
    """``(precision, scale)`` of ``numeric(p, s)``, or None when unconstrained (typmod -1).

    PostgreSQL stores ``((p << 16) | (s & 0x7ff)) + VARHDRSZ``. Since PostgreSQL 15 the scale
    may be negative or exceed the precision, so its 11 low bits are sign-extended; for older
    servers (0 <= s <= 1000) that gives the same result as ``x & 0xffff``.

    >>> numeric_precision_scale(655366)  # numeric(10, 2)
    (10, 2)
    """
    if type_modifier < 4:  # -1 (no modifier); anything below VARHDRSZ is not a valid typmod
        return None
    x = type_modifier - 4
    precision = (x >> 16) & 0xFFFF
    scale = ((x & 0x7FF) ^ 0x400) - 0x400
    return precision, scale


def temporal_precision(type_modifier: int) -> int:
    """Fractional-second digits of ``time(p)``/``timestamp(p)``: the typmod, or 6 if none."""
    if 0 <= type_modifier <= 6:
        return type_modifier
    return _DEFAULT_TEMPORAL_PRECISION


def _decimal128_shape(type_modifier: int) -> tuple[int, int] | None:
    """``(p, s)`` when the column fits Arrow decimal128 exactly, else None (stored as text)."""
    ps = numeric_precision_scale(type_modifier)
    if ps is None:
        return None
    p, s = ps
    # Negative scale or scale > precision (PostgreSQL 15+) are legal in PostgreSQL but not
    # worth a lossy-looking Arrow shape; their exact text form is kept instead.
    if 1 <= p <= _MAX_ARROW_DECIMAL128_PRECISION and 0 <= s <= p:
        return p, s
    return None


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _error(type_label: str, text: str, why: str) -> ValueConversionError:
    shown = text if len(text) <= 80 else text[:77] + "..."
    return ValueConversionError(f"cannot convert {type_label} value {shown!r}: {why}")


def _temporal_error(type_label: str, text: str, target: str) -> ValueConversionError:
    """Explain why a date/time text failed, naming the usual PostgreSQL-only cases."""
    low = text.strip().lower()
    if low in ("infinity", "-infinity", "+infinity"):
        why = f"PostgreSQL '{low}' has no {target} equivalent"
    elif low.endswith(" bc"):
        why = f"BC dates are outside the supported range (year 1..9999) of {target}"
    elif len(low) > 4 and low[:5].isdigit():
        why = f"years above 9999 are outside the supported range of {target}"
    elif low.startswith("24:00:00"):
        why = f"24:00:00 (end of day) has no {target} equivalent"
    else:
        why = f"not PostgreSQL ISO output for {type_label} (DateStyle=ISO, TimeZone=UTC)"
    return _error(type_label, text, why)


# ---------------------------------------------------------------------------------------------
# Scalar parsers (hot path: one call per value; built once per column)
# ---------------------------------------------------------------------------------------------


def _int_parser(type_label: str, lo: int, hi: int) -> Parser:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise _error(type_label, text, "not an integer") from None
        if lo <= v <= hi:
            return v
        raise _error(type_label, text, f"outside the {type_label} range [{lo}, {hi}]")

    return parse


def _parse_float8(text: str) -> float:
    # float() reads PostgreSQL's 'NaN', 'Infinity' and '-Infinity' as-is.
    try:
        return float(text)
    except ValueError:
        raise _error("float8", text, "not a floating-point number") from None


def _parse_float4(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise _error("float4", text, "not a floating-point number") from None
    # Finite text past float32's range would silently become infinity in Arrow.
    if (v >= _FLOAT32_OVERFLOW or v <= -_FLOAT32_OVERFLOW) and not math.isinf(v):
        raise _error("float4", text, "outside the float32 range")
    return v


_BOOL_TEXT: Final = {"t": True, "f": False}


def _parse_bool(text: str) -> bool:
    try:
        return _BOOL_TEXT[text]
    except KeyError:
        raise _error("bool", text, "expected PostgreSQL's 't' or 'f'") from None


def _parse_bytea(text: str) -> bytes:
    if text[:2] == "\\x":
        try:
            return bytes.fromhex(text[2:])
        except ValueError:
            pass
    raise _error("bytea", text, "expected hex format '\\x...' (bytea_output=hex)")


def _parse_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise _temporal_error("date", text, "Arrow date32") from None


def _submicrosecond_error(type_label: str, text: str) -> ValueConversionError:
    return _error(type_label, text, "more than 6 fractional digits would be truncated")


# Delta Lake has no time-of-day type, so `time` is stored as its exact text, which DuckDB
# casts with ::TIME. Validated here so the events' MicroTime encoding cannot fail later.
_TIME_TEXT: Final = re.compile(r"(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?")


def _time_text_micros(text: str) -> int:
    m = _TIME_TEXT.fullmatch(text)
    if m is None:
        raise _error("time", text, "not PostgreSQL time output (HH:MM:SS[.ffffff])")
    hours, minutes, seconds = int(m[1]), int(m[2]), int(m[3])
    micros = int((m[4] or "").ljust(6, "0"))
    total = ((hours * 60 + minutes) * 60 + seconds) * 1_000_000 + micros
    if minutes > 59 or seconds > 59 or total > 86_400_000_000:  # 24:00:00 is valid
        raise _error("time", text, "outside 00:00:00..24:00:00")
    return total


def _parse_time(text: str) -> str:
    _time_text_micros(text)
    return text


def _parse_timestamp(text: str) -> datetime:
    # fromisoformat (3.11+) reads PostgreSQL's ISO output, with 0-6 fractional digits.
    if len(text) > _MAX_TIMESTAMP_LEN and _SUBMICROSECOND.search(text):
        raise _submicrosecond_error("timestamp", text)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise _temporal_error("timestamp", text, "Arrow timestamp[us]") from None
    if dt.tzinfo is None:
        return dt
    # pyarrow would silently shift an aware value to UTC and drop the offset.
    raise _error(
        "timestamp", text, "has a UTC offset but the column is timestamp without time zone"
    )


def _parse_timestamptz(text: str) -> datetime:
    if len(text) > _MAX_TIMESTAMPTZ_UTC_LEN and _SUBMICROSECOND.search(text):
        raise _submicrosecond_error("timestamptz", text)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise _temporal_error("timestamptz", text, "Arrow timestamp[us, tz=UTC]") from None
    tz = dt.tzinfo
    if tz is _UTC:  # the TimeZone=UTC case: '+00' parses to the timezone.utc singleton
        return dt
    if tz is None:
        # pyarrow would silently read a naive value as UTC; PostgreSQL always prints an offset.
        raise _error("timestamptz", text, "has no UTC offset")
    try:
        return dt.astimezone(_UTC)
    except OverflowError:
        raise _error("timestamptz", text, "is outside year 1..9999 once converted to UTC") from None


def _decimal_parser(precision: int, scale: int) -> Parser:
    label = f"numeric({precision},{scale})"
    max_integer_digits = precision - scale
    # |d| < 10**(p-s) <=> at most p-s integer digits. Decimal comparisons are exact.
    bound = Decimal(f"1E{max_integer_digits}")

    def exact_check(text: str, d: Decimal) -> Decimal:
        """The slow, exact path: explains the failure, or accepts an unusual but exact form."""
        if not d.is_finite():
            raise _error(label, text, f"{text} has no decimal128({precision},{scale}) equivalent")
        sign, digits, exponent = d.as_tuple()
        if isinstance(exponent, int) and exponent < -scale:
            # Extra trailing zeros ('1.500' for scale 2) are harmless, as in Arrow's cast.
            extra = -scale - exponent
            if any(digits[-extra:]):
                raise _error(label, text, f"more than {scale} fractional digits would be rounded")
            d = Decimal((sign, digits[:-extra] or (0,), -scale))
        if not -bound < d < bound:
            raise _error(label, text, f"more than {max_integer_digits} integer digits")
        return d

    def parse(text: str) -> Decimal:
        try:
            d = Decimal(text)  # construction is exact: no context rounding
        except InvalidOperation:
            raise _error(label, text, "not a number") from None
        # Fast path for PostgreSQL's plain '[-]digits[.digits]' output: count the fractional
        # digits in the text. Any other spelling (exponent, padding) takes the exact path.
        dot = text.find(".")
        if (
            d.is_finite()
            and -bound < d < bound
            and (dot < 0 or len(text) - dot - 1 <= scale)
            and "e" not in text
            and "E" not in text
        ):
            return d
        return exact_check(text, d)

    return parse


# ---------------------------------------------------------------------------------------------
# Vectorized conversions (snapshot path). Each returns the converted array, or raises
# pa.ArrowInvalid, in which case the exact scalar parser re-does the chunk: it either finds the
# offending value and raises ValueConversionError, or handles a form Arrow does not parse.
# ---------------------------------------------------------------------------------------------

_Vectorized: TypeAlias = Callable[[pa.Array, pa.DataType], pa.Array]


class _NeedsScalar(Exception):
    """A vectorized result cannot be trusted; redo the chunk with the scalar parser."""


def _vec_cast(arr: pa.Array, target: pa.DataType) -> pa.Array:
    # Arrow's string->int/float/decimal casts are strict: overflow, a lost decimal digit or
    # 'NaN' into decimal128 all raise ArrowInvalid (checked with pyarrow 26), never wrap.
    return pc.cast(arr, target)


def _vec_oid(arr: pa.Array, target: pa.DataType) -> pa.Array:
    # Through uint32 so that a negative or > 2**32-1 oid is rejected like the scalar path.
    return pc.cast(pc.cast(arr, pa.uint32()), target)


def _vec_float4(arr: pa.Array, target: pa.DataType) -> pa.Array:
    # Parse as double then narrow, exactly like the scalar path (float() then Arrow's
    # double->float32), so both paths agree bit for bit.
    wide = pc.cast(arr, pa.float64())
    narrow = pc.cast(wide, target)
    # double->float32 silently overflows to infinity; count infinities before and after.
    if pc.sum(pc.is_inf(narrow)).as_py() != pc.sum(pc.is_inf(wide)).as_py():
        raise _NeedsScalar
    return narrow


def _vec_bool(arr: pa.Array, target: pa.DataType) -> pa.Array:
    is_true = pc.equal(arr, "t")
    # Any non-null value other than 't'/'f' must fail, not become False.
    recognised = pc.or_(is_true, pc.equal(arr, "f"))
    if not pc.all(recognised, min_count=0).as_py():  # nulls skipped; they stay null
        raise _NeedsScalar
    return is_true


def _check_min(result: pa.Array, as_int: pa.DataType, minimum: int) -> pa.Array:
    # Arrow parses year 0000, which Python's date/datetime (and PostgreSQL's ISO output,
    # which says '0001 BC') do not have; send such data to the scalar path's error. Compared
    # as integers: turning an out-of-range Arrow scalar into a Python date would overflow.
    lowest = pc.min(result.cast(as_int)).as_py()
    if lowest is not None and lowest < minimum:
        raise _NeedsScalar
    return result


_MIN_DAYS: Final = _MIN_DATE.toordinal() - _EPOCH_ORDINAL  # 0001-01-01 as date32
_MIN_MICROS: Final = (_MIN_DATETIME - _EPOCH_NAIVE) // _ONE_MICROSECOND  # as timestamp[us]


def _vec_date(arr: pa.Array, target: pa.DataType) -> pa.Array:
    return _check_min(pc.cast(arr, target), pa.int32(), _MIN_DAYS)


def _vec_timestamp(arr: pa.Array, target: pa.DataType) -> pa.Array:
    # Arrow reads 'YYYY-MM-DD HH:MM:SS[.ffffff]' and rejects any zone offset for a naive type.
    return _check_min(pc.cast(arr, target), pa.int64(), _MIN_MICROS)


def _vec_timestamptz(arr: pa.Array, target: pa.DataType) -> pa.Array:
    # Arrow reads '+00', '+05:30' and '-03' offsets and converts to UTC; it rejects text with
    # no offset (instead of assuming UTC) and PostgreSQL's rare '+HH:MM:SS' offsets.
    return _check_min(pc.cast(arr, target), pa.int64(), _MIN_MICROS)


def _vec_string(arr: pa.Array, target: pa.DataType) -> pa.Array:
    return arr if arr.type == target else pc.cast(arr, target)


# ---------------------------------------------------------------------------------------------
# Debezium encoders (value as produced by text_parser -> JsonConverter JSON value)
# ---------------------------------------------------------------------------------------------


def _identity(value: Any) -> Any:
    return value


def _encode_float(value: float) -> Any:
    if value != value:
        return "NaN"
    if value == math.inf:
        return "Infinity"
    if value == -math.inf:
        return "-Infinity"
    return value


def _encode_bytes(value: bytes) -> str:
    return binascii.b2a_base64(value, newline=False).decode()


def _twos_complement_b64(n: int) -> str:
    """Base64 of Java's ``BigInteger.toByteArray()``: minimal big-endian two's complement."""
    # For n < 0 the sign bit needs room for ~n = -n-1, hence (n + 1) for negatives.
    length = (n + (n < 0)).bit_length() // 8 + 1
    return binascii.b2a_base64(n.to_bytes(length, "big", signed=True), newline=False).decode()


def _as_decimal(value: Any, label: str) -> Decimal:
    d = value if isinstance(value, Decimal) else Decimal(str(value))
    if not d.is_finite():
        # Debezium's precise mode refuses these too (SpecialValueDecimal throws).
        raise _error(label, str(value), "NaN/Infinity cannot be encoded as a Connect Decimal")
    return d


def _unscaled(d: Decimal) -> tuple[int, int]:
    """``(unscaled, scale)`` of a finite Decimal, exactly (no context arithmetic)."""
    # 'f' formatting is exact and never uses an exponent; Decimal('1E+2') gives '100'.
    text = format(d, "f")
    dot = text.find(".")
    if dot < 0:
        return int(text), 0
    return int(text[:dot] + text[dot + 1 :]), len(text) - dot - 1


def _fixed_decimal_encoder(scale: int) -> Encoder:
    label = f"numeric(scale {scale})"

    def encode(value: Any) -> str:
        n, k = _unscaled(_as_decimal(value, label))
        if k <= scale:
            n *= 10 ** (scale - k)
        else:
            factor = 10 ** (k - scale)
            if n % factor:
                raise _error(label, str(value), f"has more than {scale} fractional digits")
            n //= factor
        return _twos_complement_b64(n)

    return encode


def _encode_variable_decimal(value: Any) -> dict[str, Any]:
    n, k = _unscaled(_as_decimal(value, "numeric"))
    return {"scale": k, "value": _twos_complement_b64(n)}


def _encode_date(value: date) -> int:
    return value.toordinal() - _EPOCH_ORDINAL


def _encode_micro_time(value: str) -> int:
    return _time_text_micros(value)


def _encode_milli_time(value: str) -> int:
    micros = _time_text_micros(value)
    if micros % 1000:
        raise _error("time", value, "has sub-millisecond digits in a time(p<=3) column")
    return micros // 1000


def _timestamp_micros(value: datetime) -> int:
    # timedelta // timedelta is exact integer arithmetic (no float rounding far from 1970).
    return (value - _EPOCH_NAIVE) // _ONE_MICROSECOND


def _encode_micro_timestamp(value: datetime) -> int:
    return _timestamp_micros(value)


def _encode_milli_timestamp(value: datetime) -> int:
    micros = _timestamp_micros(value)
    if micros % 1000:
        raise _error("timestamp", str(value), "has sub-millisecond digits in a p<=3 column")
    return micros // 1000


def _zoned_timestamp_encoder(precision: int) -> Encoder:
    # Debezium formats with exactly `precision` fractional digits (1..6); for precision 0 it
    # uses ISO_OFFSET_DATE_TIME, which prints no fraction for a whole second. A digit beyond
    # the precision (impossible from PostgreSQL) is kept by printing all six, never dropped.
    padding = "." + "0" * precision if precision else ""
    dropped = "0" * (6 - precision)

    def encode(value: datetime) -> str:
        if value.tzinfo is not _UTC:
            if value.tzinfo is None:
                raise _error("timestamptz", str(value), "expected an aware datetime")
            value = value.astimezone(_UTC)
        # isoformat() pads the year to 4 digits (strftime('%Y') does not) and, for UTC, ends
        # in '+00:00': 'YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00'.
        text = value.isoformat()[:-6]
        if len(text) == 19:  # whole second: isoformat omits the fraction
            return text + padding + "Z"
        if text[20 + precision :] == dropped:
            return text[: 20 + precision if precision else 19] + "Z"
        return text + "Z"

    return encode


def _encode_str(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


#: The encoder of types whose parsed value is already its Debezium value (integers,
#: booleans...): compiled encoders may leave the call out.
IDENTITY_ENCODER: Final[Encoder] = _identity
#: The encoder of text types (a ``str`` stays as it is): compiled encoders may call it only
#: for values of another class.
TEXT_ENCODER: Final[Encoder] = _encode_str


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Spec:
    """Everything about one column type, resolved for one type modifier."""

    arrow: pa.DataType
    parser: Parser
    vectorized: _Vectorized | None  # None: scalar parser per value (no exact Arrow kernel)
    encoder: Encoder
    schema: dict[str, Any]  # Connect schema minus "field"/"optional"


def _int_spec(label: str, arrow: pa.DataType, bits: int, connect: str) -> _Spec:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return _Spec(arrow, _int_parser(label, lo, hi), _vec_cast, _identity, {"type": connect})


def _string_spec(schema: dict[str, Any] | None = None) -> _Spec:
    # `str` returns its str argument unchanged: the cheapest possible identity parser.
    return _Spec(pa.string(), str, _vec_string, _encode_str, schema or {"type": "string"})


def _named(connect_type: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"type": connect_type, "name": name, "version": 1, **extra}


_VARIABLE_SCALE_DECIMAL_SCHEMA: Final = {
    "type": "struct",
    "fields": [
        {"type": "int32", "optional": False, "field": "scale"},
        {"type": "bytes", "optional": False, "field": "value"},
    ],
    "name": "io.debezium.data.VariableScaleDecimal",
    "version": 1,
    "doc": "Variable scaled decimal",
}


def _numeric_spec(type_modifier: int) -> _Spec:
    ps = numeric_precision_scale(type_modifier)
    if ps is None:
        # Unconstrained: every value may have its own scale, so keep the exact text.
        return _Spec(
            pa.string(), str, _vec_string, _encode_variable_decimal, _VARIABLE_SCALE_DECIMAL_SCHEMA
        )
    p, s = ps
    schema = _named(
        "bytes",
        "org.apache.kafka.connect.data.Decimal",
        parameters={"scale": str(s), "connect.decimal.precision": str(p)},
    )
    if _decimal128_shape(type_modifier) is None:
        # Wider than decimal128 (or an exotic PG15+ scale): exact text in Arrow, but still a
        # Connect Decimal in events, as Debezium's precise mode has no precision limit.
        return _Spec(pa.string(), str, _vec_string, _fixed_decimal_encoder(s), schema)
    return _Spec(
        pa.decimal128(p, s), _decimal_parser(p, s), _vec_cast, _fixed_decimal_encoder(s), schema
    )


def _time_spec(type_modifier: int) -> _Spec:
    if temporal_precision(type_modifier) <= 3:
        enc, schema = _encode_milli_time, _named("int32", "io.debezium.time.Time")
    else:
        enc, schema = _encode_micro_time, _named("int64", "io.debezium.time.MicroTime")
    return _Spec(pa.string(), _parse_time, None, enc, schema)


def _timestamp_spec(type_modifier: int) -> _Spec:
    if temporal_precision(type_modifier) <= 3:
        enc, schema = _encode_milli_timestamp, _named("int64", "io.debezium.time.Timestamp")
    else:
        enc, schema = _encode_micro_timestamp, _named("int64", "io.debezium.time.MicroTimestamp")
    return _Spec(pa.timestamp("us"), _parse_timestamp, _vec_timestamp, enc, schema)


def _timestamptz_spec(type_modifier: int) -> _Spec:
    return _Spec(
        pa.timestamp("us", tz="UTC"),
        _parse_timestamptz,
        _vec_timestamptz,
        _zoned_timestamp_encoder(temporal_precision(type_modifier)),
        _named("string", "io.debezium.time.ZonedTimestamp"),
    )


_MONEY_CHARS: Final = str.maketrans("", "", "$,")


def _parse_money(text: str) -> Decimal:
    # lc_monetary=C (set by our sessions) prints '-$1,234.56': two fraction digits, '$' and
    # thousands separators, which carry no information.
    try:
        d = Decimal(text.translate(_MONEY_CHARS))
    except InvalidOperation:
        raise _error("money", text, "not PostgreSQL money output under lc_monetary=C") from None
    if d.as_tuple().exponent != -2 or not d.is_finite():
        raise _error("money", text, "expected exactly two fraction digits (lc_monetary=C)")
    return d


def _vec_money(arr: pa.Array, target: pa.DataType) -> pa.Array:
    plain = pc.replace_substring(pc.replace_substring(arr, "$", ""), ",", "")
    return pc.cast(plain, target)


_MONEY_SCHEMA: Final = _named(
    "bytes",
    "org.apache.kafka.connect.data.Decimal",
    parameters={"scale": "2", "connect.decimal.precision": "19"},
)

# ISO 8601 interval output (IntervalStyle=iso_8601): every field may carry its own sign.
_ISO_INTERVAL: Final = re.compile(
    r"P(?:(?P<years>-?\d+)Y)?(?:(?P<months>-?\d+)M)?(?:(?P<days>-?\d+)D)?"
    r"(?:T(?:(?P<hours>-?\d+)H)?(?:(?P<minutes>-?\d+)M)?(?:(?P<seconds>-?\d+(?:\.\d+)?)S)?)?"
)


def _parse_interval(text: str) -> str:
    # Validates the form only: the value itself stays exact text, in the lake and in events.
    if _ISO_INTERVAL.fullmatch(text) is None:
        raise _error("interval", text, "not ISO 8601 interval output (IntervalStyle=iso_8601)")
    return text


#: Debezium's ``interval.handling.mode=string``: the interval as ISO 8601 text. Its default,
#: ``numeric`` (``MicroDuration``, microseconds counting a month as 365.25/12 days), is
#: approximate and overflows int64 for intervals beyond about 292,000 years, which
#: PostgreSQL accepts (``-178000000 years``).
_INTERVAL_SCHEMA: Final = {"type": "string", "name": "io.debezium.time.Interval", "version": 1}


# Array types whose elements have a mapping of their own: array OID -> element OID
# (pg_type.typelem; built-in OIDs never change).
ARRAY_ELEMENT_OIDS: Final[dict[int, int]] = {
    1000: Oid.BOOL,
    1001: Oid.BYTEA,
    1002: Oid.CHAR,
    1005: Oid.INT2,
    1007: Oid.INT4,
    1016: Oid.INT8,
    1009: Oid.TEXT,
    1015: Oid.VARCHAR,
    1014: Oid.BPCHAR,
    1021: Oid.FLOAT4,
    1022: Oid.FLOAT8,
    1231: Oid.NUMERIC,
    1182: Oid.DATE,
    1183: Oid.TIME,
    1115: Oid.TIMESTAMP,
    1185: Oid.TIMESTAMPTZ,
    2951: Oid.UUID,
    199: Oid.JSON,
    3807: Oid.JSONB,
    1028: Oid.OID,
    791: Oid.MONEY,
    1187: Oid.INTERVAL,
    1270: Oid.TIMETZ,
}


def parse_array_text(text: str) -> list[str | None]:
    """Split a one-dimensional PostgreSQL array literal into element texts (None for NULL).

    Handles quoting (``"a,b"``), backslash escapes and the difference between ``NULL`` and
    ``"NULL"``. Multi-dimensional arrays and arrays with explicit bounds (``[0:1]={...}``)
    raise :class:`ValueConversionError`: a flat Arrow list cannot hold their shape, so the
    caller keeps their exact text instead.

    >>> parse_array_text('{1,NULL,"a,b","NULL"}')
    ['1', None, 'a,b', 'NULL']
    """
    if not (text.startswith("{") and text.endswith("}")):
        raise _error("array", text, "arrays with explicit bounds have no list equivalent")
    if text == "{}":
        return []
    out: list[str | None] = []
    i, end = 1, len(text) - 1
    while True:
        if i >= end:
            raise _error("array", text, "malformed array literal")
        ch = text[i]
        if ch == "{":
            raise _error("array", text, "multi-dimensional arrays have no flat list equivalent")
        if ch == '"':
            buf: list[str] = []
            i += 1
            while i < end and text[i] != '"':
                if text[i] == "\\":
                    i += 1
                buf.append(text[i])
                i += 1
            if i >= end:
                raise _error("array", text, "unterminated quoted element")
            out.append("".join(buf))
            i += 1
        else:
            j = text.find(",", i, end)
            j = end if j < 0 else j
            item = text[i:j]
            out.append(None if item == "NULL" else item)
            i = j
        if i == end:
            return out
        if text[i] != ",":
            raise _error("array", text, "malformed array literal")
        i += 1


def _array_spec(element: _Spec) -> _Spec:
    parse_element, encode_element = element.parser, element.encoder

    def parse(text: str) -> list[Any]:
        return [None if e is None else parse_element(e) for e in parse_array_text(text)]

    def encode(value: list[Any]) -> list[Any]:
        return [None if e is None else encode_element(e) for e in value]

    schema = {"type": "array", "items": {**element.schema, "optional": True}}
    return _Spec(pa.list_(element.arrow), parse, None, encode, schema)


_FIXED_SPECS: Final[dict[int, _Spec]] = {
    Oid.BOOL: _Spec(pa.bool_(), _parse_bool, _vec_bool, _identity, {"type": "boolean"}),
    Oid.BYTEA: _Spec(pa.binary(), _parse_bytea, None, _encode_bytes, {"type": "bytes"}),
    Oid.CHAR: _string_spec(),
    Oid.INT2: _int_spec("int2", pa.int16(), 16, "int16"),
    Oid.INT4: _int_spec("int4", pa.int32(), 32, "int32"),
    Oid.INT8: _int_spec("int8", pa.int64(), 64, "int64"),
    # oid is unsigned 32-bit; int64 holds all of it (Debezium also maps it to INT64).
    Oid.OID: _Spec(
        pa.int64(), _int_parser("oid", 0, 2**32 - 1), _vec_oid, _identity, {"type": "int64"}
    ),
    Oid.TEXT: _string_spec(),
    Oid.JSON: _string_spec(_named("string", "io.debezium.data.Json")),
    Oid.JSONB: _string_spec(_named("string", "io.debezium.data.Json")),
    Oid.FLOAT4: _Spec(pa.float32(), _parse_float4, _vec_float4, _encode_float, {"type": "float"}),
    Oid.FLOAT8: _Spec(pa.float64(), _parse_float8, _vec_cast, _encode_float, {"type": "double"}),
    Oid.BPCHAR: _string_spec(),
    Oid.VARCHAR: _string_spec(),
    Oid.DATE: _Spec(
        pa.date32(), _parse_date, _vec_date, _encode_date, _named("int32", "io.debezium.time.Date")
    ),
    Oid.UUID: _string_spec(_named("string", "io.debezium.data.Uuid")),
    # money's range (+-92233720368547758.07) fits decimal(19, 2) exactly.
    Oid.MONEY: _Spec(
        pa.decimal128(19, 2), _parse_money, _vec_money, _fixed_decimal_encoder(2), _MONEY_SCHEMA
    ),
    # Delta has no interval or time-with-zone type: the exact ISO / PostgreSQL text is kept.
    Oid.INTERVAL: _Spec(pa.string(), _parse_interval, None, _encode_str, _INTERVAL_SCHEMA),
    Oid.TIMETZ: _string_spec(_named("string", "io.debezium.time.ZonedTime")),
}

#: Types whose mapping depends on the type modifier.
_MODIFIED_SPECS: Final[dict[int, Callable[[int], _Spec]]] = {
    Oid.NUMERIC: _numeric_spec,
    Oid.TIME: _time_spec,
    Oid.TIMESTAMP: _timestamp_spec,
    Oid.TIMESTAMPTZ: _timestamptz_spec,
}

# Any other type (arrays, enums, intervals, ranges, domains, extensions...) keeps PostgreSQL's
# exact text form: lossless, and a later mapping can still parse it.
_FALLBACK_SPEC: Final = _string_spec()


@lru_cache(maxsize=4096)
def _spec(type_oid: int, type_modifier: int) -> _Spec:
    fixed = _FIXED_SPECS.get(type_oid)
    if fixed is not None:
        return fixed
    build = _MODIFIED_SPECS.get(type_oid)
    if build is not None:
        return build(type_modifier)
    element = ARRAY_ELEMENT_OIDS.get(type_oid)
    if element is not None:
        # An array column's typmod is its elements' (numeric(10,2)[] has numeric's).
        return _array_spec(_spec(element, type_modifier))
    return _FALLBACK_SPEC


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def type_name(type_oid: int) -> str:
    """PostgreSQL's ``typname`` for a mapped type (``"int4"``), else ``"oid:<n>"``."""
    try:
        return Oid(type_oid).name.lower()
    except ValueError:
        return f"oid:{type_oid}"


def arrow_type(type_oid: int, type_modifier: int) -> pa.DataType:
    """The Arrow (and so Delta) type a column of this PostgreSQL type is stored as."""
    return _spec(type_oid, type_modifier).arrow


def text_parser(type_oid: int, type_modifier: int) -> Parser:
    """A function turning one text value into the Python value matching :func:`arrow_type`.

    Build it once per column; it is called per value. It raises
    :class:`~cdc.core.errors.ValueConversionError` for text it cannot convert exactly. It is never
    called for SQL NULL (the caller handles None).
    """
    return _spec(type_oid, type_modifier).parser


def debezium_encoder(type_oid: int, type_modifier: int) -> Encoder:
    """The per-column function behind :func:`debezium_value`, for hot loops.

    Unlike :func:`debezium_value` it does not accept None: check for SQL NULL first.
    """
    return _spec(type_oid, type_modifier).encoder


def debezium_value(value: Any, type_oid: int, type_modifier: int) -> Any:
    """Encode a parsed value as Debezium's JsonConverter would put it in ``after``.

    >>> debezium_value(Decimal("1.50"), Oid.NUMERIC, (10 << 16 | 2) + 4)
    'AJY='
    >>> debezium_value(date(2026, 1, 1), Oid.DATE, -1)
    20454
    """
    if value is None:
        return None
    return _spec(type_oid, type_modifier).encoder(value)


def connect_schema(
    type_oid: int, type_modifier: int, *, field: str, optional: bool = True
) -> dict[str, Any]:
    """The Kafka Connect JSON schema fragment Debezium emits for a column of this type."""
    schema = dict(_spec(type_oid, type_modifier).schema)
    if "fields" in schema:  # copy the nested list so callers may mutate the result
        schema["fields"] = [dict(f) for f in schema["fields"]]
    if "parameters" in schema:
        schema["parameters"] = dict(schema["parameters"])
    schema["optional"] = optional
    schema["field"] = field
    return schema


def text_to_arrow(
    values: pa.Array | pa.ChunkedArray, type_oid: int, type_modifier: int
) -> pa.Array | pa.ChunkedArray:
    """Convert a string array (PostgreSQL text forms, nulls allowed) to :func:`arrow_type`.

    The snapshot path: ``COPY ... CSV`` -> ``pyarrow.csv`` (all columns read as strings) ->
    here. Exact Arrow casts do the work where they exist; a chunk an Arrow cast rejects is
    redone with :func:`text_parser`, which raises :class:`~cdc.core.errors.ValueConversionError`
    for the first unconvertible value (with its row number) or converts a form Arrow does not
    parse. The result equals ``pa.array([text_parser(v) ...], type=arrow_type(...))``.
    """
    spec = _spec(type_oid, type_modifier)
    label = _column_label(type_oid, type_modifier)
    if isinstance(values, pa.ChunkedArray):
        chunks = []
        offset = 0
        for chunk in values.chunks:
            chunks.append(_convert_chunk(chunk, spec, label, offset))
            offset += len(chunk)
        return pa.chunked_array(chunks, type=spec.arrow)
    return _convert_chunk(values, spec, label, 0)


def text_to_arrow_lossless(
    values: pa.Array | pa.ChunkedArray, type_oid: int, type_modifier: int
) -> tuple[pa.Array, pa.Array | None]:
    """Like :func:`text_to_arrow`, but a value the Arrow type cannot hold exactly becomes
    null in the typed array and keeps its exact text in the second array.

    Returns ``(typed, fallback)``; ``fallback`` is a string array that is null wherever the
    value converted (so a real SQL NULL is null in both), or ``None`` when every value
    converted. This is how ``numeric`` NaN, ``infinity`` dates or a multi-dimensional array
    reach the lake without being rounded, clamped or dropped.

    >>> typed, fallback = text_to_arrow_lossless(pa.array(["1", "NaN"]), Oid.NUMERIC, (5 << 16 | 0) + 4)
    >>> typed.to_pylist(), fallback.to_pylist()
    ([Decimal('1'), None], [None, 'NaN'])
    """
    if isinstance(values, pa.ChunkedArray):
        # combine_chunks copies even a single chunk (8 MB of text per snapshot chunk).
        values = values.chunk(0) if values.num_chunks == 1 else values.combine_chunks()
    try:
        return text_to_arrow(values, type_oid, type_modifier), None
    except ValueConversionError:
        pass  # rare: redo the batch value by value, keeping what does not fit as text
    spec = _spec(type_oid, type_modifier)
    parse = spec.parser
    typed: list[Any] = []
    fallback: list[str | None] = []
    for text in values.to_pylist():
        value = None
        kept = None
        if text is not None:
            try:
                value = parse(text)
            except ValueConversionError:
                kept = text
        typed.append(value)
        fallback.append(kept)
    return pa.array(typed, type=spec.arrow), pa.array(fallback, type=pa.string())


def texts_to_arrow_lossless(
    texts: Sequence[pa.Array | pa.ChunkedArray], columns: Sequence[ColumnSchema], *, rows: int
) -> tuple[list[pa.Array], pa.Array | None]:
    """:func:`text_to_arrow_lossless` for each column of a table, with the texts of the
    values that have no typed form gathered per row into one ``map<string, string>`` array
    (column name -> exact text; null for rows where every value converted), the shape of
    the changelog's ``_cdc_fallback``. The map is ``None`` when every value converted.

    >>> from cdc.core.table_schema import ColumnSchema
    >>> typed, fallback = texts_to_arrow_lossless(
    ...     [pa.array(["1", "NaN"])], [ColumnSchema("n", Oid.NUMERIC, (5 << 16) + 4)], rows=2)
    >>> fallback.to_pylist()
    [None, [('n', 'NaN')]]
    """
    typed: list[pa.Array] = []
    fallbacks: dict[str, list[str | None]] = {}
    for text, column in zip(texts, columns, strict=True):
        values, fallback = text_to_arrow_lossless(text, column.type_oid, column.type_modifier)
        typed.append(values)
        if fallback is not None:
            fallbacks[column.name] = fallback.to_pylist()
    if not fallbacks:
        return typed, None
    maps = [
        {name: t[i] for name, t in fallbacks.items() if t[i] is not None} or None
        for i in range(rows)
    ]
    return typed, pa.array(maps, type=pa.map_(pa.string(), pa.string()))


def _column_label(type_oid: int, type_modifier: int) -> str:
    name = type_name(type_oid)
    return name if type_modifier < 0 else f"{name} (typmod {type_modifier})"


def _convert_chunk(arr: pa.Array, spec: _Spec, label: str, offset: int) -> pa.Array:
    if pa.types.is_null(arr.type):  # pyarrow.csv infers null for an all-empty column
        return pa.nulls(len(arr), type=spec.arrow)
    if pa.types.is_dictionary(arr.type):  # pyarrow.csv's auto_dict_encode
        arr = arr.dictionary_decode()
    if pa.types.is_string_view(arr.type):
        arr = arr.cast(pa.string())
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        raise TypeError(f"text_to_arrow expects a string array for {label}, got {arr.type}")
    if spec.vectorized is not None:
        try:
            return spec.vectorized(arr, spec.arrow)
        except (pa.ArrowInvalid, _NeedsScalar):
            pass  # the scalar path below either raises a precise error or converts exactly
    return _convert_scalar(arr, spec, offset)


def _convert_scalar(arr: pa.Array, spec: _Spec, offset: int) -> pa.Array:
    parse = spec.parser
    out: list[Any] = []
    append = out.append
    for i, text in enumerate(arr.to_pylist()):
        if text is None:
            append(None)
            continue
        try:
            append(parse(text))
        except ValueConversionError as e:
            raise ValueConversionError(f"{e} (row {offset + i} of the batch)") from e
    return pa.array(out, type=spec.arrow)
