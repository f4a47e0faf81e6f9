"""Every PostgreSQL type, written in PostgreSQL and read back through DuckDB.

Each cell either equals PostgreSQL's value, or (when its Delta type cannot hold it) is NULL
with PostgreSQL's exact text in ``_cdc_fallback``. Types stored as text hold PostgreSQL's
exact text. Rows are captured twice: by the snapshot and by streaming; and both ways: by the
embedded pipeline, and through Kafka (capture, broker, sink) into the lake.
"""

from __future__ import annotations

import math
import struct
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.types.datetime import (
    DateLoader,
    IntervalLoader,
    TimeLoader,
    TimestampLoader,
    TimestamptzLoader,
)

from catalog.lake import Lake
from cdc.postgres.replication import session_conninfo
from tests.plugins.kafka_pipeline import running_through_kafka
from tests.plugins.lake import running_pipeline, wait_caught_up

# Each test runs on the compiled columnar capture path and on the pure one.
pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("capture_path")]

SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0);
CREATE DOMAIN price AS numeric(10, 2);
CREATE DOMAIN short_text AS varchar(5);
CREATE TYPE pair AS (a int, b text);
CREATE TABLE zoo (
    id int PRIMARY KEY,
    i2 smallint, i4 integer, i8 bigint,
    n_10_2 numeric(10, 2), n_free numeric, n_wide numeric(50, 5),
    cash money, r4 real, r8 double precision, flag bool,
    t text, vc varchar(5), ch char(3), raw bytea,
    d date, tm time, tmtz timetz, ts timestamp, tstz timestamptz, span interval,
    u uuid, j json, jb jsonb,
    a_int int[], a_text text[], a_num numeric(10, 2)[], a_ts timestamptz[],
    feeling mood, pos positive_int, cost price, code short_text,
    ip inet, net cidr, mac macaddr,
    pt point, seg lseg, bx box, circ circle, poly polygon,
    doc tsvector, r int4range, tr tstzrange, rec pair,
    doubled bigint GENERATED ALWAYS AS (i4::bigint * 2) STORED
);
"""

# Column values per row; missing columns are NULL. Quoting is SQL's.
ROWS: list[dict[str, str]] = [
    {
        "i2": "-32768",
        "i4": "-2147483648",
        "i8": "-9223372036854775808",
        "n_10_2": "-99999999.99",
        "n_free": "0.00000000000000000001",
        "n_wide": "1e40",
        "cash": "'-1234.56'",
        "r4": "'NaN'",
        "r8": "'-Infinity'",
        "flag": "true",
        "t": "'ünïcödé, \"quotes\" and\nnewline'",
        "vc": "''",
        "ch": "'a'",
        "raw": "'\\x00ff0a'",
        "d": "'0001-01-01'",
        "tm": "'00:00:00'",
        "tmtz": "'10:00:00+02'",
        "ts": "'0001-01-01 00:00:00'",
        "tstz": "'2026-06-01 12:00:00.5+05:30'",
        "span": "'1 year 2 months 3 days 04:05:06.5'",
        "u": "gen_random_uuid()",
        "j": '\'{"a": [1, "x,y"]}\'',
        "jb": "'{\"b\": null}'",
        "a_int": "'{1,NULL,3}'",
        "a_text": "ARRAY['a,b', 'q\"x', 'NULL', NULL, '', 'back\\slash']",
        "a_num": "'{1.50,NULL}'",
        "a_ts": "ARRAY['2026-01-01 10:00:00+00'::timestamptz]",
        "feeling": "'happy'",
        "pos": "7",
        "cost": "12.30",
        "code": "'abc'",
        "ip": "'192.168.0.1/24'",
        "net": "'10.0.0.0/8'",
        "mac": "'08:00:2b:01:02:03'",
        "pt": "'(1.5,2)'",
        "seg": "'[(0,0),(1,1)]'",
        "bx": "'((0,0),(1,1))'",
        "circ": "'<(0,0),2>'",
        "poly": "'((0,0),(1,0),(1,1))'",
        "doc": "to_tsvector('simple', 'the quick fox')",
        "r": "'[1,10)'",
        "tr": "'[2026-01-01 00:00+00,infinity)'",
        "rec": "ROW(1, 'x, y')::pair",
    },
    {
        "i2": "32767",
        "i4": "2147483647",
        "i8": "9223372036854775807",
        "n_10_2": "'NaN'",
        "n_free": "'NaN'",
        "n_wide": "-0.00001",
        "cash": "'92233720368547758.07'",
        "r4": "'Infinity'",
        "r8": "1.1",
        "flag": "false",
        "t": "''",
        "vc": "'12345'",
        "ch": "'  '",
        "raw": "''",
        "d": "'infinity'",
        "tm": "'24:00:00'",
        "tmtz": "'23:59:59.999999-12'",
        "ts": "'9999-12-31 23:59:59.999999'",
        "tstz": "'-infinity'",
        "span": "'-1 day +2 hours'",
        "j": "'[]'",
        "jb": "'\"text\"'",
        "a_int": "'{{1,2},{3,4}}'",
        "a_text": "'{}'",
        "a_num": "'[0:1]={1,2}'",
        "pos": "1",
        "cost": "-0.01",
    },
    {
        "n_free": "'-Infinity'",
        "d": "'4713-01-01 BC'",
        "ts": "'infinity'",
        "tstz": "'10000-01-01 00:00:00+00'",
        # Valid in PostgreSQL; as Debezium's microseconds it is beyond int64.
        "span": "'-178000000 years'",
        "r4": "1.1",
        "r8": "'NaN'",
    },
]
COLUMNS = [c for c in ROWS[0]]


class _Unloadable:
    """A PostgreSQL value Python's types cannot hold (infinity dates, year 10000...)."""


def _lenient(loader: type) -> type:
    class Lenient(loader):  # type: ignore[misc, valid-type]
        def load(self, data: Any) -> Any:
            try:
                return super().load(data)
            except psycopg.DataError:
                return _Unloadable()

    return Lenient


def postgres_cells(dsn: str) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, str]]]:
    """Per id: native Python values, and PostgreSQL's text forms (under our session GUCs)."""
    # Native values through psycopg's own defaults (it cannot load ISO 8601 intervals).
    with psycopg.connect(dsn) as conn:
        for name, loader in [
            ("date", DateLoader),
            ("time", TimeLoader),
            ("timestamp", TimestampLoader),
            ("timestamptz", TimestamptzLoader),
            ("interval", IntervalLoader),
        ]:
            conn.adapters.register_loader(name, _lenient(loader))
        native = conn.execute(f"SELECT id, {', '.join(COLUMNS)} FROM zoo").fetchall()
    with psycopg.connect(session_conninfo(dsn)) as conn:
        texts = conn.execute(
            f"SELECT id, {', '.join(f'{c}::text' for c in COLUMNS)} FROM zoo"
        ).fetchall()
    return (
        {r[0]: dict(zip(COLUMNS, r[1:], strict=True)) for r in native},
        {r[0]: dict(zip(COLUMNS, r[1:], strict=True)) for r in texts},
    )


def same(lake: Any, pg: Any, pg_text: str | None) -> bool:
    if isinstance(lake, float) and isinstance(pg, float):
        # psycopg reads real (float4) text into a double; the lake holds the float32.
        as_float32 = struct.unpack("f", struct.pack("f", pg))[0]
        return (math.isnan(lake) and math.isnan(pg)) or lake in (pg, as_float32)
    if isinstance(lake, list) and isinstance(pg, list):
        return len(lake) == len(pg) and all(
            same(a, b, None if b is None else str(b)) for a, b in zip(lake, pg, strict=True)
        )
    if isinstance(lake, str):
        # Stored as text: PostgreSQL's exact text form (uuid, json, inet, interval, ...).
        # char(n) keeps its padding, which a ::text cast would strip.
        return lake == pg or lake == (pg_text if pg_text is not None else str(pg))
    if isinstance(lake, Decimal) and isinstance(pg, str):  # psycopg loads money as '$1.00'
        return lake == Decimal(pg.replace("$", "").replace(",", ""))
    return lake == pg


@pytest.mark.parametrize("path", ["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def test_every_type_arrives_exactly_or_with_its_exact_text(
    path: str,
    pg_dsn: str,
    pg_conn: psycopg.Connection,
    lake_dir: str,
    request: pytest.FixtureRequest,
) -> None:
    pg_conn.execute(SCHEMA)

    def insert(first_id: int) -> None:
        for i, row in enumerate(ROWS):
            names = ", ".join(["id", *row])
            values = ", ".join([str(first_id + i), *row.values()])
            pg_conn.execute(f"INSERT INTO zoo ({names}) VALUES ({values})".replace("%", "%%"))

    insert(1)  # captured by the snapshot
    if path == "embedded":
        with running_pipeline(pg_dsn, lake_dir) as pipeline:
            insert(101)  # captured by streaming
            wait_caught_up(pipeline, pg_dsn)
    else:
        bootstrap = request.getfixturevalue("kafka_broker")
        with running_through_kafka(pg_dsn, bootstrap, lake_dir) as caught_up:
            insert(101)
            caught_up()

    native, texts = postgres_cells(pg_dsn)
    with Lake(lake_dir) as lk:
        result = lk.sql(f"SELECT id, {', '.join(COLUMNS)}, _cdc_fallback FROM zoo_changes")
        lake_rows = {r[0]: r for r in result.fetchall()}
        lake_columns = [d[0] for d in lk.sql("SELECT * FROM zoo").description]
    assert sorted(lake_rows) == sorted(native) and len(native) == 2 * len(ROWS)
    # Generated columns are not published by PostgreSQL before version 18.
    assert "doubled" not in lake_columns

    fallbacks_seen = set()
    for row_id, lake_row in lake_rows.items():
        fallback = lake_row[-1] or {}
        for name, lake_value in zip(COLUMNS, lake_row[1:-1], strict=True):
            pg_value, pg_text = native[row_id][name], texts[row_id][name]
            if name in fallback:
                fallbacks_seen.add((row_id % 100, name))
                assert lake_value is None, (row_id, name)
                assert fallback[name] == pg_text, (row_id, name, fallback[name], pg_text)
            else:
                if isinstance(pg_value, _Unloadable):  # only text-stored types may hold these
                    assert lake_value == pg_text, (row_id, name, lake_value, pg_text)
                else:
                    assert same(lake_value, pg_value, pg_text), (row_id, name, lake_value, pg_value)
    # Exactly the unrepresentable values took the fallback, in both capture paths.
    assert fallbacks_seen == {
        (2, "n_10_2"), (2, "d"), (2, "tstz"), (2, "a_int"), (2, "a_num"),
        (3, "d"), (3, "ts"), (3, "tstz"),
    }  # fmt: skip
    assert all(
        len(lake_rows[i][-1] or {}) == len(lake_rows[i + 100][-1] or {}) for i in range(1, 4)
    )
