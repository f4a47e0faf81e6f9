"""Schema changes while streaming: the Delta table evolves in place, older rows stay readable."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from catalog import lake_layout as layout
from catalog.lake import Lake
from sinks.errors import IncompatibleSchemaChangeError
from tests.plugins.lake import assert_lake_matches_postgres, running_pipeline, wait_caught_up

# Each test runs on the compiled columnar capture path and on the pure one.
pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("capture_path")]


def test_added_dropped_renamed_and_widened_columns(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute(
        "CREATE TABLE items (id int PRIMARY KEY, name varchar(10), qty int, price numeric(8, 2), old text)"
    )
    pg_conn.execute(
        "INSERT INTO items SELECT g, 'item ' || g, g, g * 1.5, 'legacy' FROM generate_series(1, 3) g"
    )
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        pg_conn.execute("INSERT INTO items VALUES (4, 'four', 4, 6.00, 'x')")
        pg_conn.execute("ALTER TABLE items ADD COLUMN color text")
        pg_conn.execute(
            "INSERT INTO items (id, name, qty, price, color) VALUES (5, 'five', 5, 7.5, 'red')"
        )
        pg_conn.execute("UPDATE items SET color = 'blue' WHERE id = 1")
        pg_conn.execute("ALTER TABLE items DROP COLUMN old")
        pg_conn.execute("UPDATE items SET qty = 20 WHERE id = 2")
        pg_conn.execute("ALTER TABLE items RENAME COLUMN name TO title")
        pg_conn.execute("INSERT INTO items (id, title, qty, price) VALUES (6, 'six', 6, 1)")
        pg_conn.execute("ALTER TABLE items ALTER COLUMN qty TYPE bigint")
        pg_conn.execute(
            "INSERT INTO items (id, title, qty, price) VALUES (7, 'seven', 1099511627776, 2)"
        )
        pg_conn.execute("ALTER TABLE items ALTER COLUMN title TYPE text")
        pg_conn.execute("ALTER TABLE items ALTER COLUMN price TYPE numeric(14, 2)")
        pg_conn.execute(
            "INSERT INTO items (id, title, qty, price) VALUES (8, 'eight', 8, 123456789012.34)"
        )
        pg_conn.execute("UPDATE items SET price = price + 1 WHERE id = 3")
        wait_caught_up(pipeline, pg_dsn)

    # The current state has today's columns: the renamed one under its new name with the
    # values written under both names, and no dropped column.
    assert_lake_matches_postgres(
        pg_dsn, lake_dir, "public.items", ["id", "title", "qty", "price", "color"], ["id"]
    )
    with Lake(lake_dir) as lk:
        columns = [d[0] for d in lk.sql("SELECT * FROM public.items").description]
    assert columns == ["id", "title", "qty", "price", "color", "_cdc_fallback"]
    schema = pa.schema(DeltaTable(layout.changes_uri(lake_dir, "public.items")).schema().to_arrow())
    types = {f.name: str(f.type) for f in schema}
    assert types["qty"] == "int64" and types["price"] == "decimal128(14, 2)"
    with Lake(lake_dir) as lk:
        # Older rows stay readable, in the widened types, with their dropped column.
        history = lk.sql(
            "SELECT _cdc_op, qty, price, old FROM public.items_changes WHERE id = 1 "
            "ORDER BY _cdc_lsn, _cdc_seq"
        ).fetchall()
        assert [(op, q, str(p), o) for op, q, p, o in history[:1]] == [("r", 1, "1.50", "legacy")]
        # ALTER COLUMN TYPE rewrites the table without row events: the table was copied
        # again (op r) after it, in the new shape.
        assert history[-1][0] == "r" and history[-1][3] is None
        versions = lk.schema_versions("public.items")
    assert len(versions) >= 6
    assert [c.name for c in versions[-1].schema.columns] == ["id", "title", "qty", "price", "color"]

    listed = subprocess.run(
        [sys.executable, "-m", "cdc", "schemas", "public.items", "--lake", lake_dir],
        capture_output=True,
        text=True,
        env={"COLUMNS": "400", "PATH": ""},
    )
    assert listed.returncode == 0, listed.stderr
    assert "title text" in listed.stdout and "qty int8" in listed.stdout


def test_incompatible_type_change_stops_with_instructions_and_writes_nothing(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute("CREATE TABLE t (id int PRIMARY KEY, at date)")
    pg_conn.execute("INSERT INTO t VALUES (1, '2026-01-01')")
    with (
        pytest.raises(
            IncompatibleSchemaChangeError,
            match=r"t\.at changed from date32\[day\] to int32.*revert",
        ),
        running_pipeline(pg_dsn, lake_dir) as pipeline,
    ):
        pg_conn.execute("ALTER TABLE t ALTER COLUMN at TYPE int USING extract(year FROM at)::int")
        pg_conn.execute("INSERT INTO t VALUES (2, 2027)")
        pipeline.wait_flushed(10**12, timeout=5)  # runs until the sink refuses
    with Lake(lake_dir) as lk:
        assert lk.sql("SELECT count(*) FROM public.t_changes").fetchone() == (1,)
