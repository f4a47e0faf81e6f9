"""Many tables changing at once: each is committed on its own schedule, concurrently, and
PostgreSQL is never told a change is durable before it is in Delta, in every table."""

from __future__ import annotations

import time

import psycopg
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from catalog import lake_layout as layout
from catalog.lake import Lake
from cdc.core.lsn import parse_lsn
from tests.plugins.lake import postgres_rows, running_pipeline, wait_caught_up

pytestmark = pytest.mark.postgres

TABLES = 50
PER_TRANSACTION = 5  # tables one writer transaction updates
COLUMNS = ["Order", "line", "at", "V", "note"]
KEY = ["Order", "line", "at"]


def quoted(i: int) -> str:
    return f'"Many"."Lines {i}"'


def create(conn: psycopg.Connection) -> None:
    conn.execute('CREATE SCHEMA "Many"')
    for i in range(TABLES):
        # A composite key of mixed types; "V" records the writer transaction's number.
        conn.execute(
            f'CREATE TABLE {quoted(i)} ("Order" bigint, line text, at date, "V" bigint, '
            'note text, PRIMARY KEY ("Order", line, at))'
        )
        conn.execute(
            f"INSERT INTO {quoted(i)} SELECT g, 'l' || (g % 3), date '2026-01-01' + g, -1, "
            "CASE WHEN g % 4 = 0 THEN NULL ELSE 'n' || g END FROM generate_series(1, 20) g"
        )
    conn.execute("CREATE TABLE public.many_log (k bigint, payload text)")  # keyless


def write(conn: psycopg.Connection, k: int) -> tuple[int, list[tuple[int, int]]]:
    """Writer transaction ``k``: updates one row in each of ``PER_TRANSACTION`` tables
    (round the ring), now and then deletes one or logs a keyless row. Returns the WAL
    position after its commit (at or past its end) and the (table, "Order") it set to k."""
    touched = []
    with conn.transaction():
        for j in range(PER_TRANSACTION):
            table = (k * PER_TRANSACTION + j) % TABLES
            order = k % 20 + 1
            conn.execute(
                f'UPDATE {quoted(table)} SET "V" = %s, note = %s WHERE "Order" = %s',
                [k, None if k % 3 == 0 else f"v{k}", order],
            )
            touched.append((table, order))
        if k % 17 == 0:
            conn.execute(f'DELETE FROM {quoted(k % TABLES)} WHERE "Order" = 20')
        if k % 5 == 0:
            conn.execute(
                "INSERT INTO public.many_log VALUES (%s, %s)", [k, None if k % 2 == 0 else "p"]
            )
    # The insert position, not pg_current_wal_lsn(): with synchronous_commit off (the test
    # server's) the written position may still be before the commit record.
    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return parse_lsn(row[0]), touched


def confirmed(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'test'"
    ).fetchone()
    assert row is not None and row[0] is not None
    return parse_lsn(row[0])


def in_lake(lake: str, table: int, k: int) -> bool:
    """Whether writer transaction ``k``'s update of ``table`` is in its Delta changelog."""
    uri = layout.changes_uri(lake, f"Many.Lines {table}")
    if not DeltaTable.is_deltatable(uri):
        return False
    values = DeltaTable(uri).to_pyarrow_table(columns=["V"]).column("V")
    return bool(pc.any(pc.equal(values, k)).as_py())


def test_many_tables_land_on_their_own_schedules_and_confirmation_waits_for_all(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    create(pg_conn)
    checked = 0
    with running_pipeline(pg_dsn, lake_dir, **{"batch.max_seconds": 0.3}) as pipeline:
        written: list[tuple[int, list[tuple[int, int]]]] = []
        deadline = time.monotonic() + 8
        k = 0
        while time.monotonic() < deadline:
            written.append(write(pg_conn, k))
            k += 1
            if k % 25 == 0:
                # The newest transaction wholly at or below the confirmed LSN: every one of
                # its changes must be in Delta already, whichever tables it touched.
                slot = confirmed(pg_conn)
                durable = [tx for tx in written if tx[0] <= slot]
                if durable:
                    end, touched = durable[-1]
                    number = written.index(durable[-1])
                    missing = [t for t, _ in touched if not in_lake(lake_dir, t, number)]
                    assert not missing, f"confirmed {slot} past transaction {number} (ends by "
                    f"{end}), whose changes to tables {missing} are not in Delta"
                    checked += 1
            time.sleep(0.01)
        wait_caught_up(pipeline, pg_dsn, timeout=120)
        metrics = dict(pipeline.metrics)
    assert checked >= 3, "the slot was never confirmed past a writer transaction"
    # Every table was committed several times, not once per flush of all of them.
    assert metrics["commits"] > 2 * TABLES
    # One Lake for every comparison: opening one sets up the views of all the tables.
    with Lake(lake_dir) as lake:
        for i in range(TABLES):
            got = lake.sql(f"SELECT {select(COLUMNS)} FROM {quoted(i)} ORDER BY 1, 2, 3")
            assert got.fetchall() == postgres_rows(pg_dsn, quoted(i), COLUMNS, KEY), quoted(i)
            changes = f'"Many"."Lines {i}_changes"'
            duplicates = lake.sql(
                f"SELECT _cdc_lsn, _cdc_seq FROM {changes} GROUP BY ALL HAVING count(*) > 1"
            ).fetchall()
            assert duplicates == [], quoted(i)
        logged = lake.sql("SELECT k, payload FROM public.many_log ORDER BY k").fetchall()
    assert logged == postgres_rows(pg_dsn, "public.many_log", ["k", "payload"], ["k"])


def select(columns: list[str]) -> str:
    return ", ".join(f'"{c}"' for c in columns)
