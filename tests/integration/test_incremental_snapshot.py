"""Rows that reach a table without row events are copied while streaming goes on."""

from __future__ import annotations

import threading

import psycopg
import pytest

from catalog.lake import Lake
from tests.plugins.lake import (
    assert_lake_matches_postgres,
    duplicate_positions,
    running_pipeline,
    wait_caught_up,
)

pytestmark = pytest.mark.postgres


def busy(dsn: str, stop: threading.Event) -> threading.Thread:
    """Concurrent changes to the table being copied, before, during and after the copy."""

    def run() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            i = 0
            while not stop.is_set():
                conn.execute("UPDATE late SET v = v + 1 WHERE id = %s", [1 + i % 500])
                conn.execute("DELETE FROM late WHERE id = %s", [1000 + i])
                conn.execute("INSERT INTO late VALUES (%s, 0)", [100_000 + i])
                i += 1

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_table_added_to_the_publication_while_streaming(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute("CREATE TABLE early (id int PRIMARY KEY)")
    pg_conn.execute("CREATE TABLE late (id int PRIMARY KEY, v int)")
    pg_conn.execute("INSERT INTO late SELECT g, 0 FROM generate_series(1, 20000) g")
    stop = threading.Event()
    with running_pipeline(pg_dsn, lake_dir, **{"source.tables": ["early"]}) as pipeline:
        pg_conn.execute("INSERT INTO early VALUES (1)")
        writer = busy(pg_dsn, stop)
        try:
            pg_conn.execute("ALTER PUBLICATION test ADD TABLE late")
            pg_conn.execute("INSERT INTO early VALUES (2)")
            wait_caught_up(pipeline, pg_dsn)
        finally:
            stop.set()
            writer.join()
        wait_caught_up(pipeline, pg_dsn)
        assert pipeline.metrics["snapshot_rows"] > 19000  # less what the writer deleted

    assert_lake_matches_postgres(pg_dsn, lake_dir, "public.late", ["id", "v"], ["id"])
    assert duplicate_positions(lake_dir, "public.late") == []

    # Growing --tables on a restart adds the table to the publication and copies it too.
    pg_conn.execute("CREATE TABLE later (id int PRIMARY KEY)")
    pg_conn.execute("INSERT INTO later SELECT generate_series(1, 300)")
    with running_pipeline(pg_dsn, lake_dir, **{"source.tables": ["early", "late", "later"]}) as p:
        pg_conn.execute("DELETE FROM later WHERE id <= 100")
        wait_caught_up(p, pg_dsn)
    assert assert_lake_matches_postgres(pg_dsn, lake_dir, "public.later", ["id"], ["id"]) == 200


def test_columns_added_with_a_default_and_rewritten_types_reach_existing_rows(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute("CREATE TABLE stock (id int PRIMARY KEY, qty int)")
    pg_conn.execute("INSERT INTO stock SELECT g, g FROM generate_series(1, 1000) g")
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        pg_conn.execute("ALTER TABLE stock ADD COLUMN status text NOT NULL DEFAULT 'active'")
        pg_conn.execute("ALTER TABLE stock ADD COLUMN note text")  # no default: no copy needed
        pg_conn.execute("UPDATE stock SET qty = 0 WHERE id = 1")
        wait_caught_up(pipeline, pg_dsn)
        copied_once = pipeline.metrics["snapshot_rows"]
        pg_conn.execute(
            "ALTER TABLE stock ALTER COLUMN qty TYPE bigint USING qty::bigint * 1000000000"
        )
        pg_conn.execute("UPDATE stock SET status = 'sold' WHERE id = 2")
        wait_caught_up(pipeline, pg_dsn)
        assert pipeline.metrics["snapshot_rows"] == copied_once + 1000

    assert_lake_matches_postgres(
        pg_dsn, lake_dir, "public.stock", ["id", "qty", "status", "note"], ["id"]
    )
    with Lake(lake_dir) as lk:
        # The history keeps the values as they were, and the copies as 'r' rows.
        assert lk.sql(
            "SELECT qty FROM public.stock_changes WHERE id = 5 ORDER BY _cdc_lsn, _cdc_seq"
        ).fetchall() == [(5,), (5,), (5_000_000_000,)]


def test_a_copy_interrupted_by_a_crash_is_discarded_and_redone(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cdc.postgres import incremental_snapshot
    from sinks.position_store import LakePositionStore

    class Crash(Exception):
        pass

    real_read = incremental_snapshot.SnapshotReader.read_table

    def crashing_read(self, table):  # type: ignore[no-untyped-def]
        for batch in real_read(self, table):
            for i, start in enumerate(range(0, batch.num_rows, 1000)):
                if i == 5:
                    raise Crash  # after several flushed slices of the copy
                yield batch.slice(start, 1000)

    pg_conn.execute(
        "CREATE TABLE early (id int PRIMARY KEY); CREATE TABLE late (id int PRIMARY KEY)"
    )
    pg_conn.execute("INSERT INTO late SELECT generate_series(1, 20000)")
    options = {"source.tables": ["early"], "batch.max_rows": 1000}
    monkeypatch.setattr(incremental_snapshot.SnapshotReader, "read_table", crashing_read)
    with pytest.raises(Crash), running_pipeline(pg_dsn, lake_dir, **options) as pipeline:
        pg_conn.execute("ALTER PUBLICATION test ADD TABLE late")
        pipeline.wait_flushed(10**12, timeout=20)  # runs until the copy crashes
    position = LakePositionStore(lake_dir, "test").load()
    assert position is not None and "public.late" in position.pending_snapshots
    with Lake(lake_dir) as lk:
        assert lk.sql("SELECT count(*) FROM public.late_changes").fetchone()[0] >= 4000

    monkeypatch.undo()
    pg_conn.execute("DELETE FROM late WHERE id <= 10")
    with running_pipeline(pg_dsn, lake_dir, **options) as pipeline:
        wait_caught_up(pipeline, pg_dsn)
    assert assert_lake_matches_postgres(pg_dsn, lake_dir, "public.late", ["id"], ["id"]) == 19990
    with Lake(lake_dir) as lk:
        # The partial first copy is gone: each row was copied once, by the second copy.
        assert lk.sql(
            "SELECT count(*) FROM public.late_changes WHERE _cdc_op = 'r'"
        ).fetchone() == (19990,)
    position = LakePositionStore(lake_dir, "test").load()
    assert position is not None and not position.pending_snapshots
