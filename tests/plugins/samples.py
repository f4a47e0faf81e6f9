"""Hand-built change events of one table with a column of every mapped type (no server).

``TYPES`` is the table, ``ROW_TEXT`` PostgreSQL's text output of each column and ``ROW``
what capture parses them into (so tests follow the type mapping wherever it stores a type);
:func:`event` builds a :class:`~cdc.core.events.ChangeEvent` of it at a fixed position.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from cdc.core import pgtypes
from cdc.core.events import ChangeEvent
from cdc.core.pgtypes import Oid
from cdc.core.table_schema import ColumnSchema, TableSchema

NUMERIC_10_2 = ((10 << 16) | 2) + 4
TIME_3 = 3
INT4_ARRAY = 1007

TYPES = TableSchema(
    "shop",
    "types",
    (
        ColumnSchema("id", Oid.INT8, -1, True),
        ColumnSchema("small", Oid.INT2),
        ColumnSchema("num", Oid.INT4),
        ColumnSchema("price", Oid.NUMERIC, NUMERIC_10_2),
        ColumnSchema("anynum", Oid.NUMERIC),
        ColumnSchema("f4", Oid.FLOAT4),
        ColumnSchema("f8", Oid.FLOAT8),
        ColumnSchema("flag", Oid.BOOL),
        ColumnSchema("label", Oid.VARCHAR),
        ColumnSchema("blob", Oid.BYTEA),
        ColumnSchema("born", Oid.DATE),
        ColumnSchema("at", Oid.TIME),
        ColumnSchema("at_ms", Oid.TIME, TIME_3),
        ColumnSchema("local", Oid.TIMESTAMP),
        ColumnSchema("local_ms", Oid.TIMESTAMP, 3),
        ColumnSchema("seen", Oid.TIMESTAMPTZ),
        ColumnSchema("ident", Oid.UUID),
        ColumnSchema("doc", Oid.JSONB),
        ColumnSchema("tags", INT4_ARRAY),
        ColumnSchema("note", Oid.TEXT),
    ),
)
# PostgreSQL's text output of each column; ROW holds what capture parses them into, so the
# test follows the type mapping wherever it stores a type.
ROW_TEXT = (
    "9007199254740993",  # not exactly representable as a double
    "-32768",
    "2147483647",
    "-12345678.90",
    "1.50000000000000000000000000000000000000001",
    "1.5",
    "Infinity",
    "t",
    'ünï "quoted" ,',
    "\\x00ff0a",
    "0001-01-01",
    "23:59:59.999999",
    "12:00:00.123",
    "9999-12-31 23:59:59.999999",
    "1969-07-20 20:17:40.5",
    "2026-06-01 06:30:00.5+00",
    "0b9c0f6e-4d1a-4f7e-9c1b-2f0e8d6a1b3c",
    '{"a": [1, "x,y"]}',
    "{1,NULL,-3}",
    "a note",
)
ROW = tuple(
    pgtypes.text_parser(c.type_oid, c.type_modifier)(text)
    for c, text in zip(TYPES.columns, ROW_TEXT, strict=True)
)
COMMIT_TS = datetime(2026, 1, 1, 10, 0, 0, 123456, tzinfo=UTC)


def event(
    op: str,
    before: tuple[Any, ...] | None = None,
    after: tuple[Any, ...] | None = None,
    *,
    table: TableSchema = TYPES,
    seq: int = 0,
    **kw: Any,
) -> ChangeEvent:
    """A change of ``table`` (``TYPES``) in transaction 771, at ``seq`` within it."""
    return ChangeEvent(
        op=op,  # type: ignore[arg-type]
        table=table,
        before=before,
        after=after,
        commit_lsn=0x16B374D848,
        seq=seq,
        txid=771,
        commit_ts=COMMIT_TS,
        lsn=0x16B374D000 + seq,
        **kw,
    )


# A composite key of mixed types with quoted, mixed-case names; a keyless table.
MIXED = TableSchema(
    "Shop",
    "Order Lines",
    (
        ColumnSchema("Order", Oid.INT4, -1, True),
        ColumnSchema("sku", Oid.TEXT, -1, True),
        ColumnSchema("at", Oid.TIMESTAMPTZ, -1, True),
        ColumnSchema("qty", Oid.INT2),
        ColumnSchema("price", Oid.NUMERIC, NUMERIC_10_2),
        ColumnSchema("ratio", Oid.FLOAT8),
        ColumnSchema("gift", Oid.BOOL),
        ColumnSchema("day", Oid.DATE),
        ColumnSchema("blob", Oid.BYTEA),
        ColumnSchema("Doc", Oid.JSONB),
    ),
)
KEYLESS = TableSchema(
    "public", "log", (ColumnSchema("line", Oid.TEXT), ColumnSchema("at", Oid.TIMESTAMPTZ))
)


def mixed_row(n: int, **overrides: Any) -> tuple[Any, ...]:
    values = {
        "Order": n,
        "sku": f"sku-{n} ünï",
        "at": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=n * 1001),
        "qty": n % 7 or None,
        "price": Decimal(n) / 100,
        "ratio": n / 3,
        "gift": n % 2 == 0,
        "day": date(2026, 1, 1) + timedelta(days=n),
        "blob": bytes([n % 256, 0, 255]),
        "Doc": orjson.dumps({"n": n}).decode(),
    }
    values.update(overrides)
    return tuple(values[c.name] for c in MIXED.columns)


def change(op: str, row: tuple[Any, ...], *, table: TableSchema, seq: int) -> ChangeEvent:
    """An event of ``op`` with ``row`` as its row image (``before`` for a delete)."""
    if op == "d":
        return event("d", before=row, table=table, seq=seq)
    return event(op, after=row, table=table, seq=seq)


def mixed(op: str, n: int, seq: int, **overrides: Any) -> ChangeEvent:
    return change(op, mixed_row(n, **overrides), table=MIXED, seq=seq)


# Only the column kinds the sink's pyarrow.json path types (integers, texts, booleans,
# timestamptz): a composite key of mixed types, quoted mixed-case names.
PLAIN = TableSchema(
    "Shop",
    "Plain Lines",
    (
        ColumnSchema("Order", Oid.INT4, -1, True),
        ColumnSchema("sku", Oid.TEXT, -1, True),
        ColumnSchema("Big", Oid.INT8),
        ColumnSchema("qty", Oid.INT2),
        ColumnSchema("gift", Oid.BOOL),
        ColumnSchema("at", Oid.TIMESTAMPTZ),
        ColumnSchema("Note", Oid.TEXT),
    ),
)


def plain_row(n: int, **overrides: Any) -> tuple[Any, ...]:
    values = {
        "Order": n,
        "sku": f"sku-{n} ünï \"q\" \\ {{'x': 1}}",
        "Big": n * 10**12,
        "qty": n % 7 or None,
        "gift": n % 2 == 0 if n % 3 else None,
        "at": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=n * 1001),
        "Note": f"note {n}" if n % 5 else None,
    }
    values.update(overrides)
    return tuple(values[c.name] for c in PLAIN.columns)


def plain(op: str, n: int, seq: int, **overrides: Any) -> ChangeEvent:
    return change(op, plain_row(n, **overrides), table=PLAIN, seq=seq)
