"""Tables without a primary key, under every replica identity, and partitioned tables."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest

from catalog.lake import Lake
from cdc.postgres.check import check_source
from tests.plugins.lake import (
    assert_lake_matches_postgres,
    duplicate_positions,
    running_pipeline,
    wait_caught_up,
)

# Each test runs on the compiled columnar capture path and on the pure one.
pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("capture_path")]

KEYLESS = """
CREATE TABLE no_identity (a int, b text);
CREATE TABLE nothing (id int PRIMARY KEY, b text);
ALTER TABLE nothing REPLICA IDENTITY NOTHING;
CREATE TABLE full_rows (a int, b text);
ALTER TABLE full_rows REPLICA IDENTITY FULL;
CREATE TABLE by_index (code text NOT NULL, region int NOT NULL, qty int);
CREATE UNIQUE INDEX by_index_key ON by_index (code, region);
ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_key;
"""


def test_check_explains_every_key_problem_and_how_to_fix_it(
    pg_dsn: str, pg_conn: psycopg.Connection
) -> None:
    pg_conn.execute(KEYLESS)
    pg_conn.execute("CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY)")
    pg_conn.execute(
        "CREATE TABLE calc (id int PRIMARY KEY, x int, y int GENERATED ALWAYS AS (x * 2) STORED)"
    )
    pg_conn.execute("CREATE TABLE fine (id int PRIMARY KEY)")
    pg_conn.execute("CREATE TABLE parted (id int, at date) PARTITION BY RANGE (at)")
    findings = {(f.level, f.subject): f for f in check_source(pg_conn)}

    assert "ADD PRIMARY KEY" in findings[("error", "public.no_identity")].fix
    assert "UPDATE and DELETE fail" in findings[("error", "public.no_identity")].problem
    assert "NOTHING" in findings[("error", "public.nothing")].problem
    assert "every column" in findings[("warning", "public.full_rows")].problem
    assert "by_index_key" in findings[("info", "public.by_index")].problem
    assert "SET LOGGED" in findings[("error", "public.scratch")].fix
    assert "y" in findings[("warning", "public.calc")].problem
    assert ("info", "public.parted") in findings
    assert not any(subject == "public.fine" for _, subject in findings)

    # The command exits 1 when there is an error, and only checks the tables asked for.
    run = [sys.executable, "-m", "cdc", "check", "--source", pg_dsn]
    result = subprocess.run([*run, "--tables", "fine"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    result = subprocess.run(
        [*run, "--tables", "fine,no_identity"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "300", "PATH": ""},
    )
    assert result.returncode == 1 and "no_identity" in result.stdout


def test_keyless_tables_capture_what_postgresql_allows(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute(KEYLESS)
    pg_conn.execute("INSERT INTO by_index VALUES ('a', 1, 10), ('b', 1, 20)")
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        pg_conn.execute("INSERT INTO no_identity VALUES (1, 'x'), (1, 'x')")
        pg_conn.execute("INSERT INTO nothing VALUES (1, 'x')")
        for table in ("no_identity", "nothing"):
            with pytest.raises(
                psycopg.errors.ObjectNotInPrerequisiteState, match="replica identity"
            ):
                pg_conn.execute(f"UPDATE {table} SET b = 'y'")
        pg_conn.execute("UPDATE by_index SET qty = qty + 1 WHERE code = 'a'")
        pg_conn.execute("UPDATE by_index SET region = 2 WHERE code = 'b'")  # key change
        pg_conn.execute("INSERT INTO by_index VALUES ('c', 3, 30)")
        pg_conn.execute("DELETE FROM by_index WHERE code = 'c'")
        wait_caught_up(pipeline, pg_dsn)

    assert_lake_matches_postgres(
        pg_dsn, lake_dir, "public.by_index", ["code", "region", "qty"], ["code", "region"]
    )
    with Lake(lake_dir) as lk:
        # Insert-only tables keep every inserted row, duplicates included.
        assert lk.sql("SELECT count(*) FROM public.no_identity").fetchone() == (2,)
        assert lk.sql("SELECT id, b FROM public.nothing").fetchall() == [(1, "x")]
        keys = {t.qualified_name: t.key_columns for t in lk.tables()}
    assert keys["public.by_index"] == ("code", "region")
    assert keys["public.no_identity"] == () and keys["public.nothing"] == ("id",)


def test_partitioned_table_lands_as_one_table_including_later_partitions(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute(
        "CREATE TABLE events (id int, at date, note text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);"
        "CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');"
        "CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');"
    )
    pg_conn.execute("INSERT INTO events VALUES (1, '2025-05-01', 'old'), (2, '2026-05-01', 'new')")
    with running_pipeline(pg_dsn, lake_dir, **{"source.tables": ["events"]}) as pipeline:
        pg_conn.execute("INSERT INTO events VALUES (3, '2026-07-01', 'streamed')")
        # A partition created later, and an empty table attached as a partition later.
        pg_conn.execute(
            "CREATE TABLE events_2027 PARTITION OF events FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')"
        )
        pg_conn.execute("CREATE TABLE events_2028 (LIKE events)")
        pg_conn.execute(
            "ALTER TABLE events ATTACH PARTITION events_2028 FOR VALUES FROM ('2028-01-01') TO ('2029-01-01')"
        )
        pg_conn.execute(
            "INSERT INTO events VALUES (4, '2027-02-01', 'later'), (5, '2028-02-01', 'attached')"
        )
        pg_conn.execute(
            "UPDATE events SET note = 'moved', at = '2027-03-01' WHERE id = 2"
        )  # across partitions
        pg_conn.execute("DELETE FROM events WHERE id = 1")
        wait_caught_up(pipeline, pg_dsn)

    assert (
        assert_lake_matches_postgres(
            pg_dsn, lake_dir, "public.events", ["id", "at", "note"], ["id", "at"]
        )
        == 4
    )
    assert duplicate_positions(lake_dir, "public.events") == []
    with Lake(lake_dir) as lk:
        names = [t.qualified_name for t in lk.tables()]
    assert names == ["public.events"]  # no table per partition


def test_full_identity_without_a_key_keeps_identical_rows_apart(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute(KEYLESS)
    pg_conn.execute("INSERT INTO full_rows VALUES (1, 'x'), (1, 'x'), (1, 'x'), (2, NULL)")
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        pg_conn.execute("INSERT INTO full_rows VALUES (2, NULL), (3, 'y')")
        # Change and delete one of several identical rows.
        one_of = "ctid = (SELECT ctid FROM full_rows WHERE a = %s LIMIT 1)"
        pg_conn.execute(f"UPDATE full_rows SET b = 'z' WHERE {one_of}", [1])
        pg_conn.execute(f"DELETE FROM full_rows WHERE {one_of}", [2])
        pg_conn.execute("UPDATE full_rows SET a = 30 WHERE a = 3")
        wait_caught_up(pipeline, pg_dsn)

    expected = sorted(pg_conn.execute("SELECT a, b FROM full_rows").fetchall(), key=str)
    with Lake(lake_dir) as lk:
        actual = sorted(lk.sql("SELECT a, b FROM public.full_rows").fetchall(), key=str)
    assert actual == expected
    assert len(expected) == 5
