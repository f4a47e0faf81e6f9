"""Kafka messages -> :class:`~cdc.core.events.ChangeEvent`. Pure: no IO.

Three kinds of messages are understood, in this order:

1. **Ours** (``cdc capture``): the ``cdc.schema_id`` header names the table schema in the
   schema registry, ``cdc.lsn``/``cdc.seq`` give the exact position. Values are decoded by
   the column types of that schema.
2. **Debezium with schemas** (``JsonConverter`` with ``schemas.enable=true``): the value is
   ``{"schema", "payload"}``; column types come from the Connect schema of ``after`` /
   ``before``, and are mapped to the PostgreSQL types Debezium made them from.
3. **Debezium without schemas**: column types are inferred from the JSON values (booleans,
   integers as ``int8``, other numbers as ``float8``, strings, objects and arrays as JSON
   text), or taken from the table's latest schema in the lake when it has one. Debezium's
   encoded values (days since 1970 for dates, base64 for decimals) cannot be recognised
   without a schema and land as they are.

Debezium's default encodings are decoded: ``precise`` decimals (base64 unscaled integers,
``VariableScaleDecimal``), ``adaptive`` times (``Date``, ``Time``, ``MicroTime``,
``Timestamp``, ``MicroTimestamp``, ``NanoTimestamp``, ``ZonedTimestamp``), ``bytes`` as
base64, ``NaN``/``Infinity`` as strings. Intervals: ``io.debezium.time.Interval`` (Debezium's
``interval.handling.mode=string``, which our capture writes) is ISO 8601 text and kept as it
is; ``MicroDuration`` (Debezium's default) becomes an ISO 8601 duration of the exact
microseconds (``PT90061.5S``): months have no fixed length, so Debezium's number cannot give
back PostgreSQL's ``P1Y2M`` text.

Positions: events of type 1 carry capture's ``(commit_lsn, seq)`` and are deduplicated by
it. Debezium's events have no such position: ``_cdc_lsn`` is ``source.lsn`` (the change's
WAL position) and ``_cdc_seq`` the Kafka offset, which orders every change of one key (one
key, one partition), and they are deduplicated by offset only.

Anything that does not fit raises :class:`UndecodableMessageError` with the reason; the worker
sends the message to the dead-letter queue.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Final, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from catalog.errors import CatalogError
from cdc.core import pgtypes
from cdc.core.codegen import compile_function
from cdc.core.events import ChangeEvent
from cdc.core.kafka_format import (
    HEADER_COMMIT_TS_US,
    HEADER_LSN,
    HEADER_SCHEMA_ID,
    HEADER_SEQ,
    remember_last,
)
from cdc.core.pgtypes import Oid
from cdc.core.table_schema import ColumnSchema, TableSchema
from sinks.errors import UndecodableMessageError

__all__ = [
    "DEBEZIUM_UNAVAILABLE",
    "ColumnRun",
    "ColumnarChanges",
    "Decoded",
    "EventDecoder",
    "Prepared",
    "UndecodableMessageError",
    "connect_column_type",
]

#: Debezium's default ``unavailable.value.placeholder``: a TOASTed value it did not get.
DEBEZIUM_UNAVAILABLE: Final = "__debezium_unavailable_value"

_OPS: Final = frozenset({"c", "u", "d", "r", "t"})
_EPOCH: Final = datetime(1970, 1, 1)
_EPOCH_UTC: Final = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DATE: Final = date(1970, 1, 1)
_INTERVAL_OID: Final = 1186  # Oid.INTERVAL, where the type mapping has it
_TIMETZ_OID: Final = 1266  # Oid.TIMETZ


class Decoded(NamedTuple):
    """A decoded message: the event, and whether its position is capture's exact one.

    (A named tuple: one is built per message, and a frozen dataclass costs twice as much.)
    """

    event: ChangeEvent
    exact_position: bool


#: Turns a schema id from a header into the table's shape (raises CatalogError if unknown).
SchemaLookup = Callable[[int], TableSchema]
#: The latest known shape of a table by qualified name (the lake's registry), or None.
KnownSchema = Callable[[str], TableSchema | None]
_Decode = Callable[[Any], Any]


# -- values ---------------------------------------------------------------------------------


#: What a column decoder raises for a value it refuses (its message says why). Anything else
#: out of a decoder, or out of a compiled row, is a bug and is not caught.
_BAD_VALUE = (ValueError, TypeError, ArithmeticError)


def _unscaled_to_decimal(raw: Any, scale: int) -> Decimal:
    if isinstance(raw, str):
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            # decimal.handling.mode=string sends the digits as text.
            return _plain_decimal(raw)
        return _scaled(int.from_bytes(data, "big", signed=True), scale)
    return _plain_decimal(raw)


def _scaled(unscaled: int, scale: int) -> Decimal:
    """``unscaled * 10**-scale`` exactly (Decimal arithmetic would round to 28 digits)."""
    digits = tuple(int(d) for d in str(abs(unscaled)))
    return Decimal((1 if unscaled < 0 else 0, digits, -scale))


def _plain_decimal(raw: Any) -> Decimal:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ValueError(f"expected a decimal, got {raw!r}")
    try:
        return Decimal(str(raw))
    except InvalidOperation:
        raise ValueError(f"{raw!r} is not a decimal") from None


def _variable_decimal(raw: Any) -> Decimal:
    if isinstance(raw, dict):
        return _unscaled_to_decimal(raw.get("value"), int(raw.get("scale", 0)))
    return _plain_decimal(raw)


def _int(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        raise ValueError(f"expected an integer, got {raw!r}")
    return raw


_FLOAT_WORDS: Final = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _float(raw: Any) -> float:
    if isinstance(raw, str) and raw in _FLOAT_WORDS:
        return _FLOAT_WORDS[raw]
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError(f"expected a number, got {raw!r}")
    return float(raw)


def _bool(raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise ValueError(f"expected true or false, got {raw!r}")
    return raw


def _str(raw: Any) -> Any:
    # Strings stay strings; anything else is kept as its JSON text (the column adapter
    # decides whether that fits).
    return raw


def _bytes(raw: Any) -> bytes:
    if not isinstance(raw, str):
        raise ValueError(f"expected base64 text, got {raw!r}")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{raw[:40]!r} is not base64") from None


def _date(raw: Any) -> date:
    return _EPOCH_DATE + timedelta(days=_int(raw))


def _time_of_day(micros: int) -> time | str:
    if micros == 86_400_000_000:
        return "24:00:00"  # PostgreSQL's end of day; only a text column can hold it
    if not 0 <= micros < 86_400_000_000:
        raise ValueError(f"{micros} microseconds is not a time of day")
    seconds, us = divmod(micros, 1_000_000)
    minutes, s = divmod(seconds, 60)
    h, m = divmod(minutes, 60)
    return time(h, m, s, us)


def _timestamp(micros: int) -> datetime:
    try:
        return _EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise ValueError(f"{micros} microseconds since 1970 is out of range") from None


def _zoned_timestamp(raw: Any) -> datetime:
    if not isinstance(raw, str):
        raise ValueError(f"expected an ISO 8601 timestamp, got {raw!r}")
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is not an ISO 8601 timestamp") from None
    if value.tzinfo is None:
        raise ValueError(f"{raw!r} has no UTC offset")
    return value.astimezone(UTC)


def _duration_text(raw: Any) -> str:
    micros = _int(raw)
    sign = "-" if micros < 0 else ""
    seconds, us = divmod(abs(micros), 1_000_000)
    fraction = f".{us:06d}".rstrip("0") if us else ""
    return f"PT{sign}{seconds}{fraction}S"


def _interval_text(raw: Any) -> str:
    # Our capture wrote microseconds (MicroDuration) before it wrote ISO text: messages of
    # that time still sit in topics and name a schema id whose interval is now text.
    return raw if isinstance(raw, str) else _duration_text(raw)


def _connect_decoder(schema: dict[str, Any]) -> _Decode:
    """The decoder of one Connect field schema: JSON value -> natural Python value."""
    name = schema.get("name")
    kind = schema.get("type")
    if name == "org.apache.kafka.connect.data.Decimal":
        scale = int((schema.get("parameters") or {}).get("scale", 0))
        return lambda raw: _unscaled_to_decimal(raw, scale)
    if name == "io.debezium.data.VariableScaleDecimal":
        return _variable_decimal
    if name == "io.debezium.time.Date":
        return _date
    if name == "io.debezium.time.Time":
        return lambda raw: _time_of_day(_int(raw) * 1000)
    if name == "io.debezium.time.MicroTime":
        return lambda raw: _time_of_day(_int(raw))
    if name == "io.debezium.time.NanoTime":
        return lambda raw: _time_of_day(_int(raw) // 1000)
    if name == "io.debezium.time.Timestamp":
        return lambda raw: _timestamp(_int(raw) * 1000)
    if name == "io.debezium.time.MicroTimestamp":
        return lambda raw: _timestamp(_int(raw))
    if name == "io.debezium.time.NanoTimestamp":
        return lambda raw: _timestamp(_int(raw) // 1000)
    if name == "io.debezium.time.ZonedTimestamp":
        return _zoned_timestamp
    if name == "io.debezium.time.MicroDuration":
        return _duration_text
    if name == "io.debezium.time.Interval":
        return _interval_text
    if kind in ("int8", "int16", "int32", "int64"):
        return _int
    if kind in ("float", "float32", "double", "float64"):
        return _float
    if kind == "boolean":
        return _bool
    if kind == "bytes":
        return _bytes
    if kind == "array":
        item = _connect_decoder(schema.get("items") or {})
        return lambda raw: _list(raw, item)
    if kind == "struct":
        fields = [(f["field"], _connect_decoder(f)) for f in schema.get("fields", [])]
        return lambda raw: _struct(raw, fields)
    return _str  # string, map, and names we do not know: kept as they are


def _list(raw: Any, item: _Decode) -> list[Any]:
    if not isinstance(raw, list):
        raise ValueError(f"expected an array, got {raw!r}")
    return [None if v is None else item(v) for v in raw]


def _struct(raw: Any, fields: list[tuple[str, _Decode]]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object, got {raw!r}")
    return {k: None if raw.get(k) is None else dec(raw[k]) for k, dec in fields}


# -- column adapters: natural Python value -> a value of the column's Arrow type ------------


def _adapter(arrow: pa.DataType) -> _Decode:
    if pa.types.is_string(arrow) or pa.types.is_large_string(arrow):
        return _as_text
    if pa.types.is_integer(arrow):
        bits = arrow.bit_width
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        if pa.types.is_unsigned_integer(arrow):
            lo, hi = 0, 2**bits - 1

        def as_int(value: Any) -> int:
            v = _int(value)
            if not lo <= v <= hi:
                raise ValueError(f"{v} is outside the {arrow} range")
            return v

        return as_int
    if pa.types.is_decimal(arrow):
        precision, scale = arrow.precision, arrow.scale

        def as_decimal(value: Any) -> Decimal:
            d = value if isinstance(value, Decimal) else _plain_decimal(value)
            if not d.is_finite():
                raise ValueError(f"{d} does not fit decimal({precision}, {scale})")
            exponent = d.as_tuple().exponent
            if (
                isinstance(exponent, int)
                and exponent < -scale
                and d != d.quantize(Decimal(1).scaleb(-scale))
            ):
                raise ValueError(f"{d} has more than {scale} fractional digits")
            if abs(d) >= Decimal(10) ** (precision - scale):
                raise ValueError(f"{d} has more than {precision - scale} integer digits")
            return d

        return as_decimal
    if pa.types.is_floating(arrow):
        return _float
    if pa.types.is_boolean(arrow):
        return _bool
    if pa.types.is_binary(arrow) or pa.types.is_large_binary(arrow):
        return lambda v: v if isinstance(v, bytes) else _bytes(v)
    if pa.types.is_date(arrow):
        return lambda v: v if isinstance(v, date) and not isinstance(v, datetime) else _date(v)
    if pa.types.is_time(arrow):

        def as_time(value: Any) -> time:
            if not isinstance(value, time):
                value = _time_of_day(_int(value))
            if not isinstance(value, time):
                raise ValueError(f"{value} does not fit {arrow}")
            return value

        return as_time
    if pa.types.is_timestamp(arrow):
        aware = arrow.tz is not None

        def as_timestamp(value: Any) -> datetime:
            if not isinstance(value, datetime):
                value = _zoned_timestamp(value) if isinstance(value, str) else _timestamp(value)
            if aware and value.tzinfo is None:
                raise ValueError(f"{value} has no time zone, the column is timestamptz")
            if not aware and value.tzinfo is not None:
                raise ValueError(f"{value} has a time zone, the column is timestamp")
            return value

        return as_timestamp
    if pa.types.is_list(arrow) or pa.types.is_large_list(arrow):
        item = _adapter(arrow.value_type)
        return lambda v: _list(v, item)
    return lambda v: v


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, bool | int | float):
        return orjson.dumps(value).decode() if not isinstance(value, float) else repr(value)
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, time):
        # PostgreSQL's output: the fraction without trailing zeros.
        text = value.strftime("%H:%M:%S")
        return text + f".{value.microsecond:06d}".rstrip("0") if value.microsecond else text
    return str(value)


# -- Connect schema -> PostgreSQL type ------------------------------------------------------

_NAMED_TYPES: Final[dict[str, tuple[int, int]]] = {
    "io.debezium.time.Date": (Oid.DATE, -1),
    "io.debezium.time.Time": (Oid.TIME, 3),
    "io.debezium.time.MicroTime": (Oid.TIME, -1),
    "io.debezium.time.NanoTime": (Oid.TIME, -1),
    "io.debezium.time.Timestamp": (Oid.TIMESTAMP, 3),
    "io.debezium.time.MicroTimestamp": (Oid.TIMESTAMP, -1),
    "io.debezium.time.NanoTimestamp": (Oid.TIMESTAMP, -1),
    "io.debezium.time.ZonedTimestamp": (Oid.TIMESTAMPTZ, -1),
    "io.debezium.time.ZonedTime": (_TIMETZ_OID, -1),
    "io.debezium.time.MicroDuration": (_INTERVAL_OID, -1),
    "io.debezium.time.Interval": (_INTERVAL_OID, -1),
    "io.debezium.data.Json": (Oid.JSONB, -1),
    "io.debezium.data.Uuid": (Oid.UUID, -1),
    "io.debezium.data.VariableScaleDecimal": (Oid.NUMERIC, -1),
}

_PLAIN_TYPES: Final[dict[str, int]] = {
    "int8": Oid.INT2,  # PostgreSQL has no one-byte integer
    "int16": Oid.INT2,
    "int32": Oid.INT4,
    "int64": Oid.INT8,
    "float": Oid.FLOAT4,
    "float32": Oid.FLOAT4,
    "double": Oid.FLOAT8,
    "float64": Oid.FLOAT8,
    "boolean": Oid.BOOL,
    "string": Oid.TEXT,
    "bytes": Oid.BYTEA,
}


def connect_column_type(schema: dict[str, Any]) -> tuple[int, int]:
    """``(type_oid, type_modifier)`` of the PostgreSQL column a Connect field schema
    describes, as Debezium's PostgreSQL connector writes them.

    >>> connect_column_type({"type": "int32", "name": "io.debezium.time.Date"})
    (1082, -1)
    >>> connect_column_type({"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal",
    ...                      "parameters": {"scale": "2", "connect.decimal.precision": "10"}})
    (1700, 655366)
    """
    name = schema.get("name")
    if name == "org.apache.kafka.connect.data.Decimal":
        params = schema.get("parameters") or {}
        scale = int(params.get("scale", 0))
        precision = params.get("connect.decimal.precision")
        if precision is not None and 0 <= scale <= int(precision):
            return Oid.NUMERIC, ((int(precision) << 16) | scale) + 4
        return Oid.NUMERIC, -1  # no precision: kept as exact text
    if name in _NAMED_TYPES:
        return _NAMED_TYPES[name]
    kind = schema.get("type")
    if kind == "array":
        element = connect_column_type(schema.get("items") or {})
        for array_oid, element_oid in getattr(pgtypes, "ARRAY_ELEMENT_OIDS", {}).items():
            if element_oid == element[0]:
                return array_oid, element[1]
        return Oid.JSONB, -1
    if kind in ("struct", "map"):
        return Oid.JSONB, -1  # kept as JSON text
    return _PLAIN_TYPES.get(str(kind), Oid.TEXT), -1


def _inferred_type(value: Any) -> tuple[int, int]:
    if isinstance(value, bool):
        return Oid.BOOL, -1
    if isinstance(value, int):
        return Oid.INT8, -1
    if isinstance(value, float):
        return Oid.FLOAT8, -1
    if isinstance(value, dict | list):
        return Oid.JSONB, -1
    return Oid.TEXT, -1


# -- the decoder ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Shape:
    """A table schema with its per-column decoders (reused: the sink groups rows by the
    schema object's identity)."""

    schema: TableSchema
    names: tuple[str, ...]
    positions: dict[str, int]
    decoders: tuple[_Decode, ...]
    connect_typed: bool  # decoders from Connect schemas (True) or only adapters (inferred)
    # The common case compiled: a complete row image without placeholders -> its values,
    # or None when the row needs the general path (EventDecoder._row). Raises on a value
    # its decoder refuses; the general path then reports it.
    fast: Callable[[Any], tuple[Any, ...] | None] | None = None
    qualified: str = ""  # schema.qualified_name, for the shapes of registered schemas
    # Positions of the columns the lake stores as text, by name (see _restore_texts).
    text_columns: dict[str, int] = dataclasses.field(default_factory=dict)
    # How the column-wise path types each column: (kind, Arrow type), see _column_kind.
    column_types: tuple[tuple[str, pa.DataType], ...] = ()


# What a column's decoder does with values of the usual JSON type, so the compiled row
# can take them as they are: (connect decoder, Arrow type test) -> the condition on v.
def _fast_condition(decode: _Decode, arrow: pa.DataType, i: int, ns: dict[str, Any]) -> str | None:
    kind = _column_kind(decode, arrow)
    if kind == "int":
        bits = arrow.bit_width
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        if pa.types.is_unsigned_integer(arrow):
            lo, hi = 0, 2**bits - 1
        ns[f"lo{i}"], ns[f"hi{i}"] = lo, hi
        return f"v.__class__ is int and lo{i} <= v <= hi{i}"
    if kind == "str":
        return "v.__class__ is str and v != U"
    if kind in ("float", "bool"):
        return f"v.__class__ is {kind}"
    return None


def _column_kind(decode: _Decode, arrow: pa.DataType) -> str:
    """How the column-wise path types a column whose Connect decoder is ``decode``:
    ``int``/``str``/``float``/``bool`` take JSON values of exactly that type as they are
    (as the compiled row does), ``zoned`` casts ZonedTimestamp texts in Arrow, and
    ``python`` (every other column, or a column with other JSON types in a batch) runs the
    column's own decoder per value, exactly as the per-message path does."""
    if decode is _int and pa.types.is_integer(arrow):
        return "int"
    if (decode is _str or decode is _interval_text) and (
        pa.types.is_string(arrow) or pa.types.is_large_string(arrow)
    ):
        return "str"
    if decode is _float and pa.types.is_floating(arrow):
        return "float"
    if decode is _bool and pa.types.is_boolean(arrow):
        return "bool"
    if (
        decode is _zoned_timestamp
        and pa.types.is_timestamp(arrow)
        and arrow.tz is not None
        and arrow.unit == "us"
    ):
        return "zoned"
    return "python"


def _compile_row(
    names: tuple[str, ...],
    conditions: list[str | None],
    decoders: tuple[_Decode, ...],
    constants: dict[str, Any],
    table: str,
) -> Callable[[Any], tuple[Any, ...] | None]:
    """The shape's compiled row (see :attr:`_Shape.fast`), as ``<generated cdc row decoder
    {table}>`` (see :mod:`cdc.core.codegen`)."""
    ns: dict[str, Any] = {**constants, "U": DEBEZIUM_UNAVAILABLE, "dict": dict}
    lines = [
        "def row(data):",
        f"    if data.__class__ is not dict or len(data) != {len(names)}:",
        "        return None",
    ]
    for i, (name, condition) in enumerate(zip(names, conditions, strict=True)):
        ns[f"n{i}"], ns[f"d{i}"] = name, decoders[i]
        lines.append(f"    v = data.get(n{i}, U)")  # missing: the general path says so
        lines.append(f"    if v is None: x{i} = None")
        if condition is not None:
            lines.append(f"    elif {condition}: x{i} = v")
        lines.append("    elif v == U: return None")
        lines.append(f"    else: x{i} = d{i}(v)")
    values = "".join(f"x{i}, " for i in range(len(names)))
    lines.append(f"    return ({values})")
    row: Callable[[Any], tuple[Any, ...] | None] = compile_function(
        "\n".join(lines) + "\n", name="row", kind="row decoder", label=table, namespace=ns
    )
    return row


def _shape(schema: TableSchema, field_schemas: Sequence[dict[str, Any]] | None) -> _Shape:
    decoders = []
    conditions: list[str | None] = []
    column_types: list[tuple[str, pa.DataType]] = []
    ns: dict[str, Any] = {}
    for i, column in enumerate(schema.columns):
        field = (
            field_schemas[i]
            if field_schemas is not None
            else pgtypes.connect_schema(column.type_oid, column.type_modifier, field=column.name)
        )
        decode = _connect_decoder(field)
        arrow = pgtypes.arrow_type(column.type_oid, column.type_modifier)
        adapt = _adapter(arrow)
        composed = _compose(decode, adapt)
        if decode is _zoned_timestamp and pa.types.is_timestamp(arrow):
            composed = remember_last(composed, str)
        decoders.append(composed)
        conditions.append(_fast_condition(decode, arrow, i, ns))
        column_types.append((_column_kind(decode, arrow), arrow))
    names = schema.column_names
    fast = _compile_row(names, conditions, tuple(decoders), ns, schema.qualified_name)
    return _Shape(
        schema,
        names,
        {n: i for i, n in enumerate(names)},
        tuple(decoders),
        True,
        fast,
        schema.qualified_name,
        _text_columns(schema),
        tuple(column_types),
    )


def _text_columns(schema: TableSchema) -> dict[str, int]:
    return {
        c.name: i
        for i, c in enumerate(schema.columns)
        if pa.types.is_string(pgtypes.arrow_type(c.type_oid, c.type_modifier))
    }


def _compose(decode: _Decode, adapt: _Decode) -> _Decode:
    return lambda raw: adapt(decode(raw))


class _Headers:
    """Parses the integer headers, remembering the last text of the schema id, commit LSN
    and commit time headers (a transaction's messages share them)."""

    __slots__ = ("lsn", "lsn_raw", "sid", "sid_raw")

    def __init__(self) -> None:
        self.sid_raw: bytes | None = None
        self.sid = 0
        self.lsn_raw: bytes | None = None
        self.lsn = 0

    def schema_id(self, raw: bytes | None) -> int | None:
        if raw is None:
            return None
        if raw != self.sid_raw:
            self.sid = _parse_header(raw, HEADER_SCHEMA_ID)
            self.sid_raw = raw
        return self.sid

    def commit_lsn(self, raw: bytes | None) -> int | None:
        if raw is None:
            return None
        if raw != self.lsn_raw:
            self.lsn = _parse_header(raw, HEADER_LSN)
            self.lsn_raw = raw
        return self.lsn


def _parse_header(raw: bytes, name: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise UndecodableMessageError(f"header {name} is not an integer: {raw[:40]!r}") from None


def _header_int(raw: bytes | None, name: str) -> int | None:
    return None if raw is None else _parse_header(raw, name)


def _position_headers(
    headers: Sequence[tuple[str, bytes | str | None]] | None,
) -> tuple[bytes | None, bytes | None, bytes | None, bytes | None]:
    """``cdc.schema_id``, ``cdc.lsn``, ``cdc.seq``, ``cdc.commit_ts_us`` (None: absent),
    as bytes."""
    sid = lsn = seq = ts = None
    for name, value in headers or ():
        if value is None:
            continue
        if name == HEADER_SCHEMA_ID:
            sid = value
        elif name == HEADER_LSN:
            lsn = value
        elif name == HEADER_SEQ:
            seq = value
        elif name == HEADER_COMMIT_TS_US:
            ts = value
    return (
        sid.encode() if isinstance(sid, str) else sid,
        lsn.encode() if isinstance(lsn, str) else lsn,
        seq.encode() if isinstance(seq, str) else seq,
        ts.encode() if isinstance(ts, str) else ts,
    )


# -- column-wise decoding ---------------------------------------------------------------------

_ROW_OPS: Final = frozenset({"c", "r", "u", "d"})
_NONE_TYPE: Final = type(None)
_SIMPLE_TYPES: Final[dict[str, frozenset[type]]] = {
    "int": frozenset({int, _NONE_TYPE}),
    "str": frozenset({str, _NONE_TYPE}),
    "float": frozenset({float, _NONE_TYPE}),
    "bool": frozenset({bool, _NONE_TYPE}),
    "zoned": frozenset({str, _NONE_TYPE}),
}
#: The ZonedTimestamp texts whose Arrow cast gives exactly what datetime.fromisoformat(...)
#: .astimezone(UTC) gives (years 1-9999, at most microseconds, an offset in hours and
#: minutes); other texts take the per-value decoder.
_ZONED_TEXT: Final = (
    r"^(000[1-9]|00[1-9]\d|0[1-9]\d\d|[1-9]\d{3})-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    r"T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)$"
)
_TS_RANGE: Final = (-62_135_596_800_000_000, 253_402_300_799_999_999)  # years 1-9999, in us
_UTC_MICROS: Final = pa.timestamp("us", tz="UTC")
_ROW_OP_VALUES: Final = pa.array(sorted(_ROW_OPS), type=pa.string())


class Prepared(NamedTuple):
    """A message of ours the column-wise path can take (see :meth:`EventDecoder.prepare`):
    a complete row image of a known schema version at an exact position."""

    shape: _Shape
    op: str
    row: dict[str, Any]  # ``after``, or ``before`` for a delete
    commit_lsn: int
    seq: int
    txid: int | None
    commit_ts_us: int
    size: int

    @property
    def table_name(self) -> str:
        """The qualified name of the table the message is of."""
        return self.shape.qualified


@dataclass(slots=True)
class ColumnRun:
    """Consecutive messages of one partition and one schema version, in ascending
    ``(commit_lsn, seq)`` order, gathered for :meth:`EventDecoder.columns`.

    ``items`` holds what the caller needs to handle each message again on its own (the
    Kafka message), should the run not type column-wise."""

    shape: _Shape
    ops: list[str] = dataclasses.field(default_factory=list)
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    lsns: list[int] = dataclasses.field(default_factory=list)
    seqs: list[int] = dataclasses.field(default_factory=list)
    txids: list[int | None] = dataclasses.field(default_factory=list)
    commit_ts_us: list[int] = dataclasses.field(default_factory=list)
    offsets: list[int] = dataclasses.field(default_factory=list)
    items: list[Any] = dataclasses.field(default_factory=list)
    size: int = 0

    @property
    def schema(self) -> TableSchema:
        return self.shape.schema

    def fits(self, prepared: Prepared) -> bool:
        """Whether ``prepared`` continues this run (same schema version, a later position:
        a position at or below the last one, such as a capture replay, starts a new run)."""
        if prepared.shape is not self.shape:
            return False
        if not self.lsns:
            return True
        lsn = self.lsns[-1]
        return prepared.commit_lsn > lsn or (
            prepared.commit_lsn == lsn and prepared.seq > self.seqs[-1]
        )

    def halves(self) -> tuple[ColumnRun, ColumnRun]:
        """The first and the second half of the run, each a run of its own."""
        mid = len(self.offsets) // 2
        first, second = ColumnRun(self.shape), ColumnRun(self.shape)
        for part, cut in ((first, slice(None, mid)), (second, slice(mid, None))):
            part.ops, part.rows = self.ops[cut], self.rows[cut]
            part.lsns, part.seqs, part.txids = self.lsns[cut], self.seqs[cut], self.txids[cut]
            part.commit_ts_us, part.offsets = self.commit_ts_us[cut], self.offsets[cut]
            part.items = self.items[cut]
        # (Sizes only count towards the batch's byte limit: shared in proportion.)
        first.size = self.size * mid // max(len(self.offsets), 1)
        second.size = self.size - first.size
        return first, second

    def append(self, prepared: Prepared, offset: int, item: Any) -> None:
        self.ops.append(prepared.op)
        self.rows.append(prepared.row)
        self.lsns.append(prepared.commit_lsn)
        self.seqs.append(prepared.seq)
        self.txids.append(prepared.txid)
        self.commit_ts_us.append(prepared.commit_ts_us)
        self.offsets.append(offset)
        self.items.append(item)
        self.size += prepared.size


class ColumnarChanges(NamedTuple):
    """A run typed column by column: one array per column of ``schema`` (the row image of
    each change: ``before`` for a delete, ``after`` otherwise), and the per-change
    metadata, ready for :func:`sinks.delta_changelog.changelog_table`."""

    schema: TableSchema
    values: list[pa.Array]
    ops: pa.Array
    lsns: pa.Array
    seqs: pa.Array
    txids: pa.Array
    commit_ts: pa.Array
    offsets: pa.Array
    size_bytes: int


def _within_range(micros: pa.Array) -> bool:
    """Whether microseconds since 1970 (nulls aside) are all within Python's datetimes."""
    lo, hi = pc.min_max(micros).values()
    return (lo.as_py() is None) or (lo.as_py() >= _TS_RANGE[0] and hi.as_py() <= _TS_RANGE[1])


def _typed_column(values: list[Any], kind: str, decode: _Decode, arrow: pa.DataType) -> pa.Array:
    """One column of a run as ``arrow``, equal to what the per-message path gives (its
    decoder per value, then ``pa.array`` at the flush). Raises what the decoder or Arrow
    raises for a value that does not fit (the caller then decodes message by message)."""
    simple = _SIMPLE_TYPES.get(kind)
    if simple is not None and set(map(type, values)) <= simple:
        if kind != "zoned":
            # Exactly the JSON type the column takes as it is: Arrow range-checks integers.
            return pa.array(values, type=arrow)
        return _zoned_column(pa.array(values, type=pa.string()), arrow, decode)
    return pa.array([None if v is None else decode(v) for v in values], type=arrow)


def _zoned_column(texts: pa.Array, arrow: pa.DataType, decode: _Decode) -> pa.Array:
    """ZonedTimestamp texts as ``arrow``: cast in Arrow where that gives exactly what the
    decoder gives, else the decoder per value (which raises for a text it refuses)."""
    if pc.all(pc.match_substring_regex(texts, _ZONED_TEXT)).as_py() is not False:
        cast = texts.cast(arrow)
        if _within_range(cast.cast(pa.int64())):  # a zone may shift it out of years 1-9999
            return cast
    return pa.array([None if v is None else decode(v) for v in texts.to_pylist()], type=arrow)


#: The Arrow type pyarrow.json parses a column of each kind as (see _column_kind): exactly
#: the JSON type the compiled row takes as it is. Other kinds are not typed by pyarrow.json.
_JSON_KINDS: Final[dict[str, pa.DataType]] = {
    "int": pa.int64(),
    "str": pa.string(),
    "bool": pa.bool_(),
    "zoned": pa.string(),
}
#: Capture's envelope around the row images (cdc.core.events.envelope_payload), field by
#: field: with ``unexpected_field_behavior="error"`` anything else in a message (another
#: producer's fields, ``cdc_fallback``, a row column the schema does not have) fails the
#: parse, and the run takes the message-by-message path.
_SOURCE_TYPE: Final = pa.struct(
    [
        ("version", pa.string()),
        ("connector", pa.string()),
        ("name", pa.string()),
        ("ts_ms", pa.int64()),
        ("snapshot", pa.string()),
        ("db", pa.string()),
        ("sequence", pa.string()),
        ("schema", pa.string()),
        ("table", pa.string()),
        ("txId", pa.int64()),
        ("lsn", pa.int64()),
        ("xmin", pa.int64()),
        ("ts_us", pa.int64()),
        ("ts_ns", pa.int64()),
    ]
)
_TRANSACTION_TYPE: Final = pa.struct(
    [("id", pa.string()), ("total_order", pa.int64()), ("data_collection_order", pa.int64())]
)
#: Each value is parsed as ``{"v": <value>}``: a value that is not exactly one JSON value
#: (two objects, nothing) breaks its line instead of shifting the rows after it.
_JSON_OPEN: Final = b'{"v":'
_JSON_SEPARATOR: Final = b'}\n{"v":'
_JSON_CLOSE: Final = b"}"


def _json_schema(shape: _Shape) -> pa.Schema | None:
    """The explicit pyarrow.json schema of messages of ``shape`` (None: a column of a kind
    pyarrow.json does not type exactly)."""
    fields = []
    for name, (kind, _arrow) in zip(shape.names, shape.column_types, strict=True):
        json_type = _JSON_KINDS.get(kind)
        if json_type is None:
            return None
        fields.append(pa.field(name, json_type))
    row = pa.struct(fields)
    envelope = pa.struct(
        [
            ("before", row),
            ("after", row),
            ("source", _SOURCE_TYPE),
            ("op", pa.string()),
            ("ts_ms", pa.int64()),
            ("transaction", _TRANSACTION_TYPE),
        ]
    )
    return pa.schema([("v", envelope)])


def _header_column(pairs: tuple[Any, ...], name: str) -> pa.Array | None:
    """One of capture's integer headers of every message of a run, as int64 (None: a name
    other than ``name``, a missing value or one Arrow does not parse as an integer)."""
    names, raws = zip(*pairs, strict=True)
    if set(names) != {name}:
        return None
    texts = pa.array(raws, type=pa.binary())
    if texts.null_count:
        return None
    # Arrow's integer parsing is stricter than int() (no sign, spaces or underscores):
    # what it refuses takes the per-message path, which says what is wrong.
    return texts.cast(pa.string()).cast(pa.int64())


def _ascending(lsns: pa.Array, seqs: pa.Array) -> bool:
    """Whether the ``(lsn, seq)`` positions ascend strictly (what a run needs)."""
    if len(lsns) < 2:
        return True
    prev_l, next_l = lsns[:-1], lsns[1:]
    later = pc.or_(
        pc.greater(next_l, prev_l),
        pc.and_(pc.equal(next_l, prev_l), pc.greater(seqs[1:], seqs[:-1])),
    )
    return bool(pc.all(later).as_py())


def _all_equal(values: pa.Array, expected: str) -> bool:
    return values.null_count == 0 and bool(pc.all(pc.equal(values, expected)).as_py())


class EventDecoder:
    """Decodes Kafka messages into change events, caching table shapes across messages.

    Args:
        lookup: Resolves a ``cdc.schema_id`` header (the Kafka schema registry's ``get``).
            Without it, messages with that header cannot be decoded.
        known: The latest shape of a table in the lake, used to type schemaless Debezium
            messages consistently with what the table already holds.

    Example:
        >>> decoder = EventDecoder(registry.get)  # doctest: +SKIP
        >>> decoded = decoder.decode(key=m.key(), value=m.value(), headers=m.headers(),
        ...                          offset=m.offset())  # doctest: +SKIP
        >>> decoded.event.op, decoded.exact_position  # doctest: +SKIP
        ('c', True)
    """

    def __init__(self, lookup: SchemaLookup | None = None, *, known: KnownSchema | None = None):
        self._lookup = lookup
        self._known = known
        self._by_id: dict[int, _Shape] = {}
        self._by_connect: dict[bytes, _Shape] = {}
        self._inferred: dict[str, _Shape] = {}
        self._latest: dict[str, _Shape] = {}  # the shape each table's last event had
        self._headers = _Headers()
        # The last commit time header and its datetime (a transaction's events share it).
        self._commit_ts: tuple[bytes | None, datetime | None] = (None, None)
        # The last commit time header and its microseconds (the column-wise path).
        self._ts_us: tuple[bytes | None, int] = (None, 0)
        # The explicit pyarrow.json schema of each shape's envelope (None: not JSON-typable).
        self._json_schemas: dict[int, pa.Schema | None] = {}

    def decode(
        self,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | str | None]] | None = None,
        offset: int = 0,
    ) -> Decoded | None:
        """The event in a message, or None for a tombstone (a null value).

        Raises:
            UndecodableMessageError: the message is not a change event, names an unknown
                schema, or its values do not fit their columns. The text says which.
        """
        if value is None:
            return None
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as e:
            raise UndecodableMessageError(f"value is not JSON: {e}") from None
        value_schema = None
        if isinstance(doc, dict) and "payload" in doc and "schema" in doc:
            value_schema, doc = doc["schema"], doc["payload"]
            if doc is None:
                return None  # a tombstone written through a schema-wrapping converter
        envelope = _check_envelope(doc)
        meta = _position_headers(headers)
        schema_id = self._headers.schema_id(meta[0])
        source = envelope["source"]
        if schema_id is not None:
            shape = self._registered(schema_id, source["schema"], source["table"])
            qualified = shape.qualified
        else:
            qualified = f"{source['schema']}.{source['table']}"
            if envelope["op"] == "t":
                # A truncate has no row to take a shape from: use the table's latest one.
                found = self._latest.get(qualified)
                if found is None and self._known is not None:
                    known = self._known(qualified)
                    found = _shape(known, None) if known is not None else None
                if found is None:
                    return None  # a table the lake has never seen: nothing to truncate
                shape = found
            elif isinstance(value_schema, dict):
                shape = self._from_connect(value_schema, key, qualified)
            else:
                shape = self._inferred_shape(envelope, key, qualified)
        self._latest[qualified] = shape
        return self._event(shape, envelope, meta, offset, len(value))

    # -- column-wise ----------------------------------------------------------------------

    def prepare(
        self, value: bytes | None, headers: Sequence[tuple[str, bytes | str | None]] | None
    ) -> Prepared | None:
        """The message parsed for the column-wise path, or None when it needs :meth:`decode`.

        Taken: messages of ours (schema id, commit LSN, seq and commit time headers) of a
        schema id already known, ops ``c``/``r``/``u``/``d`` with exactly the schema's
        columns in the row image (``after``, or ``before`` for a delete, and nothing in the
        other), integer ``source.lsn``/``txId`` and no ``cdc_fallback``. Everything else
        (tombstones, truncates, TOAST-partial rows, fallback texts, a new schema id, a
        malformed message) returns None, so that :meth:`decode` decides, as it always did,
        what the message is or why it is a dead letter. Never raises for bad input.
        """
        if value is None:
            return None
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
        if doc.__class__ is not dict:
            return None
        if "payload" in doc and "schema" in doc:
            doc = doc["payload"]
            if doc.__class__ is not dict:
                return None
        op = doc.get("op")
        source = doc.get("source")
        if op.__class__ is not str or op not in _ROW_OPS or source.__class__ is not dict:
            return None
        if headers.__class__ is list and len(headers) == 4:
            # Capture's four headers, in the order it writes them: no search needed.
            (n0, sid), (n1, lsn_raw), (n2, seq_raw), (n3, ts_raw) = headers
            if (
                n0 != HEADER_SCHEMA_ID
                or n1 != HEADER_LSN
                or n2 != HEADER_SEQ
                or n3 != HEADER_COMMIT_TS_US
                or not (
                    sid.__class__ is bytes
                    and lsn_raw.__class__ is bytes
                    and seq_raw.__class__ is bytes
                    and ts_raw.__class__ is bytes
                )
            ):
                sid, lsn_raw, seq_raw, ts_raw = _position_headers(headers)
        else:
            sid, lsn_raw, seq_raw, ts_raw = _position_headers(headers)
        if sid is None or lsn_raw is None or seq_raw is None or ts_raw is None:
            return None
        try:
            shape = self._by_id.get(self._headers.schema_id(sid))  # type: ignore[arg-type]
            if shape is None:
                return None  # decode() looks it up (and caches it for the next message)
            commit_lsn = self._headers.commit_lsn(lsn_raw)
            seq = _parse_header(seq_raw, HEADER_SEQ)
            cached = self._ts_us
            if cached[0] == ts_raw:
                ts_us = cached[1]
            else:
                ts_us = _parse_header(ts_raw, HEADER_COMMIT_TS_US)
                self._ts_us = (ts_raw, ts_us)
        except UndecodableMessageError:
            return None
        schema = shape.schema
        if source.get("schema") != schema.schema or source.get("table") != schema.table:
            return None
        lsn, txid = source.get("lsn"), source.get("txId")
        if (lsn is not None and lsn.__class__ is not int) or (
            txid is not None and txid.__class__ is not int
        ):
            return None
        if doc.get("cdc_fallback") is not None:
            return None
        if op == "d":
            row, other = doc.get("before"), doc.get("after")
        else:
            row, other = doc.get("after"), doc.get("before")
        if other is not None or row.__class__ is not dict or row.keys() != shape.positions.keys():
            return None
        self._latest[shape.qualified] = shape
        return Prepared(shape, op, row, commit_lsn, seq, txid, ts_us, len(value))  # type: ignore[arg-type]

    def columns(self, run: ColumnRun) -> ColumnarChanges | None:
        """``run`` typed column by column, or None when some value needs the per-message
        path (a value a decoder refuses, Debezium's unavailable placeholder, a commit time
        out of range): the caller then hands each message of the run to :meth:`decode`, which
        gives the same rows, or the dead letter with its reason."""
        shape = run.shape
        rows = run.rows
        values = []
        try:
            for name, decode, (kind, arrow) in zip(
                shape.names, shape.decoders, shape.column_types, strict=True
            ):
                column = [row[name] for row in rows]
                if DEBEZIUM_UNAVAILABLE in column:
                    return None
                values.append(_typed_column(column, kind, decode, arrow))
            micros = pa.array(run.commit_ts_us, type=pa.int64())
            if not _within_range(micros):
                return None
            return ColumnarChanges(
                shape.schema,
                values,
                ops=pa.array(run.ops, type=pa.string()),
                lsns=pa.array(run.lsns, type=pa.int64()),
                seqs=pa.array(run.seqs, type=pa.int64()),
                txids=pa.array(run.txids, type=pa.int64()),
                commit_ts=micros.cast(_UTC_MICROS),
                offsets=pa.array(run.offsets, type=pa.int64()),
                size_bytes=run.size,
            )
        except _BAD_VALUE:
            return None

    def columns_of_values(
        self,
        values: Sequence[bytes | None],
        headers: Sequence[Any],
        offsets: Sequence[int],
        *,
        table: str,
    ) -> ColumnarChanges | None:
        """Consecutive messages of one partition of ``table``, typed column-wise straight
        from their JSON bytes with ``pyarrow.json`` (one parse of the concatenated values,
        without the GIL, on Arrow's threads), or None when the run needs
        :meth:`prepare`/:meth:`columns` or :meth:`decode`.

        Taken, all or nothing: what :meth:`prepare` takes (capture's four headers in its
        order, one schema id already known, ``c``/``r``/``u``/``d`` with exactly the
        schema's columns in the row image and nothing in the other, integer
        ``source.lsn``/``txId``, no ``cdc_fallback``), in ascending ``(commit_lsn, seq)``
        order, of a schema whose columns are integers, texts, booleans or ZonedTimestamps,
        in exactly capture's envelope. A missing key and a null are the same to
        pyarrow.json, so the rows with a null in their image are read again with orjson to
        tell an unchanged TOAST value (absent) from a NULL. Never raises for bad input:
        every message of a run it does not take gives the rows, or the dead letter, of the
        message-by-message path.
        """
        n = len(values)
        if n == 0 or len(headers) != n or len(offsets) != n:
            return None
        try:
            if set(map(len, headers)) != {4}:
                return None
            sid_pairs, lsn_pairs, seq_pairs, ts_pairs = zip(*headers, strict=True)
            sids = set(sid_pairs)
            if len(sids) != 1:
                return None
            [(name, sid_raw)] = sids
            if name != HEADER_SCHEMA_ID or sid_raw.__class__ is not bytes:
                return None
            shape = self._by_id.get(int(sid_raw))
            if shape is None or shape.qualified != table:
                return None
            schema = self._json_schemas.get(id(shape), False)
            if schema is False:
                schema = self._json_schemas[id(shape)] = _json_schema(shape)
            if schema is None:
                return None
            lsns = _header_column(lsn_pairs, HEADER_LSN)
            seqs = _header_column(seq_pairs, HEADER_SEQ)
            micros = _header_column(ts_pairs, HEADER_COMMIT_TS_US)
            if lsns is None or seqs is None or micros is None:
                return None
            if not _ascending(lsns, seqs) or not _within_range(micros):
                return None
            joined = _JSON_SEPARATOR.join(values)  # type: ignore[arg-type]
            if joined.count(b"\n") != n - 1:
                return None  # a newline in a value: lines would not be messages
            parsed = pj.read_json(
                pa.BufferReader(_JSON_OPEN + joined + _JSON_CLOSE),
                parse_options=pj.ParseOptions(
                    explicit_schema=schema, unexpected_field_behavior="error"
                ),
            )
            if parsed.num_rows != n or parsed.schema.names != ["v"]:
                return None
            envelope = parsed.column(0).combine_chunks()
            changes = self._envelope_columns(shape, envelope, values, lsns, seqs, micros, offsets)
        except (*_BAD_VALUE, pa.ArrowException):
            # Arrow's parse and cast errors (ArrowInvalid is a ValueError, a text that is not
            # UTF-8 a UnicodeDecodeError), or a value a decoder refuses.
            return None
        if changes is not None:
            self._latest[shape.qualified] = shape  # as decode() and prepare() note it
        return changes

    def _envelope_columns(
        self,
        shape: _Shape,
        envelope: pa.StructArray,
        values: Sequence[bytes | None],
        lsns: pa.Array,
        seqs: pa.Array,
        micros: pa.Array,
        offsets: Sequence[int],
    ) -> ColumnarChanges | None:
        """:meth:`columns_of_values` after the parse: the checks of :meth:`prepare`, column
        by column, and the typed columns."""
        if envelope.null_count:
            return None
        op = envelope.field("op")
        source = envelope.field("source")
        if op.null_count or source.null_count:
            return None
        if not pc.all(pc.is_in(op, value_set=_ROW_OP_VALUES)).as_py():
            return None
        schema = shape.schema
        if not _all_equal(source.field("schema"), schema.schema) or not _all_equal(
            source.field("table"), schema.table
        ):
            return None
        before, after = envelope.field("before"), envelope.field("after")
        deletes = pc.equal(op, "d")
        if pc.any(deletes).as_py():
            if not (
                pc.all(pc.equal(before.is_valid(), deletes)).as_py()
                and pc.all(pc.not_equal(after.is_valid(), deletes)).as_py()
            ):
                return None
            images = [
                pc.if_else(deletes, before.field(i), after.field(i))
                for i in range(len(shape.names))
            ]
        else:
            if before.null_count != len(before) or after.null_count:
                return None
            images = [after.field(i) for i in range(len(shape.names))]
        nulls = None
        for column in images:
            if column.null_count:
                nulls = column.is_null() if nulls is None else pc.or_(nulls, column.is_null())
        if nulls is not None:
            # Null or absent? Only the message itself can say (absent: unchanged TOAST).
            positions = shape.positions.keys()
            ops = op.to_pylist()
            for i in pc.indices_nonzero(nulls).to_pylist():
                doc = orjson.loads(values[i])
                row = doc.get("before" if ops[i] == "d" else "after")
                if row.__class__ is not dict or row.keys() != positions:
                    return None
        typed = []
        for column, decode, (kind, arrow) in zip(
            images, shape.decoders, shape.column_types, strict=True
        ):
            if kind in ("str", "zoned") and pc.any(pc.equal(column, DEBEZIUM_UNAVAILABLE)).as_py():
                return None  # Debezium's placeholder: the per-message path knows it
            if kind == "zoned":
                typed.append(_zoned_column(column, arrow, decode))
            else:
                typed.append(column if column.type == arrow else column.cast(arrow))
        return ColumnarChanges(
            schema,
            typed,
            ops=op,
            lsns=lsns,
            seqs=seqs,
            txids=source.field("txId"),
            commit_ts=micros.cast(_UTC_MICROS),
            offsets=pa.array(offsets, type=pa.int64()),
            size_bytes=sum(map(len, values)),  # type: ignore[arg-type]
        )

    # -- shapes -------------------------------------------------------------------------

    def _registered(self, schema_id: int, schema_name: str, table: str) -> _Shape:
        shape = self._by_id.get(schema_id)
        if shape is None:
            if self._lookup is None:
                raise UndecodableMessageError(f"schema id {schema_id}: no schema registry to ask")
            try:
                schema = self._lookup(schema_id)
            except CatalogError as e:
                raise UndecodableMessageError(f"unknown schema id {schema_id}: {e}") from None
            shape = _shape(schema, None)
            self._by_id[schema_id] = shape
        schema = shape.schema
        if schema.schema != schema_name or schema.table != table:
            qualified = f"{schema_name}.{table}"
            if schema.qualified_name != qualified:
                raise UndecodableMessageError(
                    f"schema id {schema_id} is table {schema.qualified_name}, but the "
                    f"event is for {qualified}"
                )
        return shape

    def _from_connect(self, value_schema: dict[str, Any], key: bytes | None, name: str) -> _Shape:
        row_fields = None
        for field in value_schema.get("fields") or []:
            if isinstance(field, dict) and field.get("field") in ("after", "before"):
                row_fields = field.get("fields")
                if row_fields:
                    break
        if not isinstance(row_fields, list) or not all(
            isinstance(f, dict) and isinstance(f.get("field"), str) for f in row_fields
        ):
            raise UndecodableMessageError("the Connect schema has no before/after struct")
        key_names = _key_columns(key)
        cache_key = orjson.dumps([name, row_fields, sorted(key_names)], option=orjson.OPT_SORT_KEYS)
        shape = self._by_connect.get(cache_key)
        if shape is None:
            columns = tuple(
                ColumnSchema(f["field"], *connect_column_type(f), is_key=f["field"] in key_names)
                for f in row_fields
            )
            schema, table = name.split(".", 1)
            shape = _shape(TableSchema(schema, table, columns), row_fields)
            self._by_connect[cache_key] = shape
        return shape

    def _inferred_shape(self, envelope: dict[str, Any], key: bytes | None, name: str) -> _Shape:
        row = envelope.get("after") or envelope.get("before") or {}
        key_names = _key_columns(key)
        shape = self._inferred.get(name)
        if shape is not None and all(c in shape.positions for c in row):
            return shape
        base = shape.schema if shape is not None else (self._known(name) if self._known else None)
        columns = list(base.columns) if base is not None else []
        present = {c.name for c in columns}
        for column, value in row.items():
            if column not in present:
                oid, typmod = _inferred_type(value)
                columns.append(ColumnSchema(column, oid, typmod, is_key=column in key_names))
                present.add(column)
        schema_name, table = name.split(".", 1)
        schema = TableSchema(schema_name, table, tuple(columns))
        if base is not None and base == schema:
            schema = base
        decoders = tuple(
            _adapter(pgtypes.arrow_type(c.type_oid, c.type_modifier)) for c in schema.columns
        )
        names = schema.column_names
        shape = _Shape(
            schema,
            names,
            {n: i for i, n in enumerate(names)},
            decoders,
            False,
            text_columns=_text_columns(schema),
        )
        self._inferred[name] = shape
        return shape

    # -- events -------------------------------------------------------------------------

    def _row(
        self, shape: _Shape, data: Any, what: str, *, partial: bool
    ) -> tuple[tuple[Any, ...], tuple[str, ...]]:
        if not isinstance(data, dict):
            raise UndecodableMessageError(f"'{what}' is not an object: {str(data)[:80]}")
        values: list[Any] = [None] * len(shape.names)
        unknown = [c for c in data if c not in shape.positions]
        if unknown:
            raise UndecodableMessageError(
                f"'{what}' has columns {unknown} that table schema "
                f"{shape.schema.qualified_name} (id {shape.schema.schema_id()}) does not have"
            )
        for column, raw in data.items():
            if raw is None or raw == DEBEZIUM_UNAVAILABLE:
                continue
            i = shape.positions[column]
            try:
                values[i] = shape.decoders[i](raw)
            except _BAD_VALUE as e:
                raise UndecodableMessageError(
                    f"{shape.schema.qualified_name}.{column}: {e}"
                ) from None
        missing: list[str] = []
        if partial:
            # Columns our capture leaves out (or Debezium marks unavailable) are TOASTed
            # values PostgreSQL did not resend: unchanged, not NULL.
            missing = [n for n in shape.names if n not in data or data[n] == DEBEZIUM_UNAVAILABLE]
        return tuple(values), tuple(missing)

    def _event(
        self,
        shape: _Shape,
        envelope: dict[str, Any],
        meta: tuple[bytes | None, bytes | None, bytes | None, bytes | None],
        offset: int,
        size: int,
    ) -> Decoded:
        op = envelope["op"]
        source = envelope["source"]
        before = after = None
        unchanged: tuple[str, ...] = ()
        raw = envelope.get("before")
        if raw is not None:
            before = self._fast_row(shape, raw)
            if before is None:
                before, _ = self._row(shape, raw, "before", partial=False)
        raw = envelope.get("after")
        if raw is not None:
            after = self._fast_row(shape, raw)
            if after is None:
                after, unchanged = self._row(shape, raw, "after", partial=op != "r")
        if op in ("c", "r") and after is None:
            raise UndecodableMessageError(f"op {op!r} without 'after'")
        if op == "u" and after is None:
            raise UndecodableMessageError("op 'u' without 'after'")
        if op == "d" and before is None:
            raise UndecodableMessageError("op 'd' without 'before'")
        lsn = _optional_int(source.get("lsn"), "source.lsn")
        commit_lsn = self._headers.commit_lsn(meta[1])
        seq = _header_int(meta[2], HEADER_SEQ)
        exact = commit_lsn is not None and seq is not None
        if not exact:
            commit_lsn, seq = lsn or 0, offset
        fallback = envelope.get("cdc_fallback")
        if fallback is not None and not (
            isinstance(fallback, dict) and all(isinstance(v, str) for v in fallback.values())
        ):
            raise UndecodableMessageError("'cdc_fallback' is not an object of texts")
        if fallback and shape.text_columns:
            if op == "d":
                before, fallback = _restore_texts(shape, before, fallback)
            else:
                after, fallback = _restore_texts(shape, after, fallback)
        event = ChangeEvent(
            op=op,
            table=shape.schema,
            before=before,
            after=after,
            commit_lsn=commit_lsn,  # type: ignore[arg-type]
            seq=seq,  # type: ignore[arg-type]
            txid=_optional_int(source.get("txId"), "source.txId"),
            commit_ts=self._event_commit_ts(meta[3], source),
            lsn=lsn if lsn is not None else commit_lsn,  # type: ignore[arg-type]
            unchanged_toast=unchanged,
            fallback=fallback or None,
            size_bytes=size,
        )
        return Decoded(event, exact)

    @staticmethod
    def _fast_row(shape: _Shape, data: Any) -> tuple[Any, ...] | None:
        """The row by the compiled path, or None when it needs :meth:`_row` (which also
        reports any value the compiled path failed on)."""
        if shape.fast is None:
            return None
        try:
            return shape.fast(data)
        except _BAD_VALUE:  # _row decodes it again and says what is wrong
            return None

    def _event_commit_ts(self, header: bytes | None, source: dict[str, Any]) -> datetime:
        if header is not None:
            cached = self._commit_ts
            if cached[0] == header and cached[1] is not None:
                return cached[1]
            value = _commit_ts(_parse_header(header, HEADER_COMMIT_TS_US), source)
            self._commit_ts = (header, value)
            return value
        return _commit_ts(None, source)


def _restore_texts(
    shape: _Shape, values: tuple[Any, ...] | None, fallback: dict[str, str]
) -> tuple[tuple[Any, ...] | None, dict[str, str]]:
    """Put fallback texts of columns the lake stores as text back into the row.

    An event carries a value its Debezium encoding cannot hold (``numeric`` ``NaN`` in a
    Connect Decimal) as null plus its text in ``cdc_fallback``; where the lake's column is
    text anyway (unconstrained or wide ``numeric``), the embedded path stores that text in
    the column itself, and so must the sink, or the same value would land in two forms.
    """
    if values is None:
        return values, fallback
    restored = list(values)
    rest: dict[str, str] = {}
    for name, text in fallback.items():
        i = shape.text_columns.get(name)
        if i is None or restored[i] is not None:
            rest[name] = text
        else:
            restored[i] = text
    return tuple(restored), rest


def _check_envelope(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise UndecodableMessageError(f"not a change event: a JSON {type(doc).__name__}")
    op = doc.get("op")
    if op not in _OPS:
        raise UndecodableMessageError(f"not a change event: 'op' is {op!r}")
    source = doc.get("source")
    if not isinstance(source, dict):
        raise UndecodableMessageError("not a change event: no 'source' object")
    schema, table = source.get("schema"), source.get("table")
    if schema.__class__ is str and table.__class__ is str and schema and table:
        return doc  # the common case, without the loop below
    for field in ("schema", "table"):
        if not isinstance(source.get(field), str) or not source[field]:
            raise UndecodableMessageError(f"not a change event: no 'source.{field}'")
    return doc


def _key_columns(key: bytes | None) -> set[str]:
    if not key:
        return set()
    try:
        doc = orjson.loads(key)
    except orjson.JSONDecodeError:
        raise UndecodableMessageError(f"key is not JSON: {key[:60]!r}") from None
    if isinstance(doc, dict) and "payload" in doc and "schema" in doc:
        doc = doc["payload"]
    return set(doc) if isinstance(doc, dict) else set()


def _optional_int(raw: Any, what: str) -> int | None:
    if raw is None or raw.__class__ is int:
        return raw
    try:
        return _int(raw)
    except ValueError as e:
        raise UndecodableMessageError(f"{what}: {e}") from None


def _commit_ts(micros: int | None, source: dict[str, Any]) -> datetime:
    """The commit time: the ``cdc.commit_ts_us`` header's ``micros``, else the source's."""
    if micros is None:
        micros = _optional_int(source.get("ts_us"), "source.ts_us")
    if micros is None:
        millis = _optional_int(source.get("ts_ms"), "source.ts_ms")
        if millis is None:
            raise UndecodableMessageError("no commit time: 'source.ts_ms' is missing")
        micros = millis * 1000
    try:
        return _EPOCH_UTC + timedelta(microseconds=micros)
    except OverflowError:
        raise UndecodableMessageError(f"commit time {micros} us is out of range") from None
