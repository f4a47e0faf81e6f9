"""PostgreSQL -> Delta -> DuckDB in one process, against a real PostgreSQL server."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from deltalake import DeltaTable

from catalog import lake_layout as layout
from catalog.lake import Lake
from cdc.core.errors import ConfigError
from cdc.core.settings import load_settings
from cdc.pipeline import CapturePipeline
from cdc.postgres.errors import PrerequisiteError
from cdc.postgres.slots import ensure_publication, get_slot
from sinks.delta_changelog import DeltaChangelogSink
from sinks.position_store import LakePositionStore
from tests.plugins.failures import SnapshotHook
from tests.plugins.lake import (
    assert_lake_matches_postgres,
    duplicate_positions,
    running_pipeline,
    wait_caught_up,
)

# Each test runs on the compiled columnar capture path and on the pure one.
pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("capture_path")]

TYPES_COLUMNS = [
    "id",
    "small",
    "big",
    "price",
    "ratio",
    "flag",
    "label",
    "code",
    "born",
    "seen",
    "local_ts",
    "blob",
    "ident",
    "doc",
    "meta",
]

SCHEMA = """
CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL, balance numeric(12, 2));
CREATE TABLE line_items (
    order_id int, line int, sku text, qty int, PRIMARY KEY (order_id, line)
);
CREATE TABLE types (
    id bigint PRIMARY KEY, small smallint, big bigint, price numeric(10, 3), ratio float8,
    flag bool, label varchar(20), code char(3), born date, seen timestamptz,
    local_ts timestamp, blob bytea, ident uuid, doc jsonb, meta json
);
"""


def insert_types(conn: psycopg.Connection, start: int, n: int) -> None:
    conn.execute(
        "INSERT INTO types SELECT g, (g %% 30000)::smallint, g::bigint * 1000000007, g / 7.0, g / 3.0, "
        "g %% 2 = 0, 'label ' || g, 'c' || (g %% 10), date '2020-01-01' + g, "
        "timestamptz '2026-01-01 00:00:00.123456+00' + g * interval '1 minute', "
        "timestamp '1999-12-31 23:59:59' + g * interval '1 second', "
        "decode(md5(g::text), 'hex'), md5(g::text)::uuid, "
        "jsonb_build_object('g', g, 'tags', jsonb_build_array('a,b', 'q\"x')), "
        "json_build_object('n', g) FROM generate_series(%s::int, %s::int) g",
        [start, start + n - 1],
    )


def test_changes_of_every_kind_land_and_current_state_equals_postgres(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute(SCHEMA)
    pg_conn.execute(
        "INSERT INTO accounts SELECT g, 'owner ' || g, g * 10 FROM generate_series(1, 50) g"
    )
    insert_types(pg_conn, 1, 20)

    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        insert_types(pg_conn, 21, 30)
        pg_conn.execute("UPDATE types SET label = NULL, doc = '{\"z\": []}' WHERE id % 4 = 0")
        pg_conn.execute("UPDATE types SET id = id + 1000 WHERE id = 5")  # key change
        pg_conn.execute("DELETE FROM types WHERE id % 9 = 0")
        with pg_conn.transaction():
            pg_conn.execute(
                "INSERT INTO line_items SELECT g / 3, g % 3, 'sku' || g, g FROM generate_series(0, 89) g"
            )
            pg_conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id <= 10")
            pg_conn.execute("DELETE FROM line_items WHERE line = 2")
        pg_conn.execute("TRUNCATE accounts")
        pg_conn.execute("INSERT INTO accounts VALUES (7, 'after truncate', 1.25), (8, 'x', NULL)")
        pg_conn.execute("UPDATE line_items SET qty = qty * 2 WHERE order_id = 3")
        wait_caught_up(pipeline, pg_dsn)

    assert (
        assert_lake_matches_postgres(pg_dsn, lake_dir, "public.types", TYPES_COLUMNS, ["id"]) == 45
    )
    assert (
        assert_lake_matches_postgres(
            pg_dsn, lake_dir, "public.accounts", ["id", "owner", "balance"], ["id"]
        )
        == 2
    )
    assert (
        assert_lake_matches_postgres(
            pg_dsn,
            lake_dir,
            "public.line_items",
            ["order_id", "line", "sku", "qty"],
            ["order_id", "line"],
        )
        == 60
    )
    with Lake(lake_dir) as lk:
        ops = dict(
            lk.sql("SELECT _cdc_op, count(*) FROM public.accounts_changes GROUP BY 1").fetchall()
        )
        assert ops == {"r": 50, "u": 10, "t": 1, "c": 2}
        # The key change is a delete of the old key and an insert of the new one.
        moved = lk.sql(
            "SELECT _cdc_op, id FROM public.types_changes WHERE id IN (5, 1005) ORDER BY _cdc_lsn, _cdc_seq"
        ).fetchall()
        assert moved == [("r", 5), ("d", 5), ("c", 1005)]
        for table in ("public.types", "public.accounts", "public.line_items"):
            assert duplicate_positions(lake_dir, table) == []


def test_rows_written_during_the_snapshot_arrive_exactly_once(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute("CREATE TABLE events (id bigint PRIMARY KEY, payload text)")
    pg_conn.execute(
        "INSERT INTO events SELECT g, repeat('x', 200) FROM generate_series(1, 200000) g"
    )
    writing = threading.Event()
    stop = threading.Event()

    def writer() -> None:
        next_id = 1_000_000
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute(
                    "INSERT INTO events SELECT g, 'live' FROM generate_series(%s, %s) g",
                    [next_id, next_id + 49],
                )
                conn.execute(
                    "UPDATE events SET payload = 'touched' WHERE id = %s", [next_id // 1000]
                )
                next_id += 50
                writing.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        writing.wait(10)
        with running_pipeline(pg_dsn, lake_dir, wait_streaming=False) as pipeline:
            time.sleep(2)
            stop.set()
            thread.join()
            wait_caught_up(pipeline, pg_dsn)
    finally:
        stop.set()
        thread.join()

    total = assert_lake_matches_postgres(
        pg_dsn, lake_dir, "public.events", ["id", "payload"], ["id"]
    )
    assert total > 200000
    with Lake(lake_dir) as lk:
        # Every row was either copied by the snapshot or streamed as an insert, never both.
        twice = lk.sql(
            "SELECT id FROM public.events_changes WHERE _cdc_op IN ('r', 'c') "
            "GROUP BY id HAVING count(*) <> 1 LIMIT 5"
        ).fetchall()
        assert twice == []
        streamed = lk.sql(
            "SELECT count(*) FROM public.events_changes WHERE _cdc_op = 'c'"
        ).fetchone()
        assert streamed and streamed[0] > 0
    assert duplicate_positions(lake_dir, "public.events") == []


def test_restart_resumes_without_loss_or_duplicates(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    pg_conn.execute("INSERT INTO t SELECT g, 0 FROM generate_series(1, 100) g")
    for round_ in range(3):
        with running_pipeline(pg_dsn, lake_dir) as pipeline:
            pg_conn.execute("UPDATE t SET v = v + 1 WHERE id <= %s", [30 * (round_ + 1)])
            pg_conn.execute("INSERT INTO t VALUES (%s, -1)", [1000 + round_])
            wait_caught_up(pipeline, pg_dsn)
        # Changes made while the pipeline is down arrive on the next start.
        pg_conn.execute("DELETE FROM t WHERE id = %s", [round_ + 1])
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        wait_caught_up(pipeline, pg_dsn)
        assert pipeline.metrics["snapshot_rows"] == 0
    assert_lake_matches_postgres(pg_dsn, lake_dir, "public.t", ["id", "v"], ["id"])
    assert duplicate_positions(lake_dir, "public.t") == []


def test_connection_loss_reconnects_with_backoff(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        pg_conn.execute("INSERT INTO t SELECT g, 'a' FROM generate_series(1, 100) g")
        wait_caught_up(pipeline, pg_dsn)
        for _ in range(2):
            deadline = time.monotonic() + 20
            while not (
                killed := pg_conn.execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                    "WHERE slot_name = 'test' AND active_pid IS NOT NULL"
                ).fetchall()
            ):
                assert time.monotonic() < deadline, "the pipeline never reconnected"
                time.sleep(0.05)
            assert killed == [(True,)]
            pg_conn.execute("UPDATE t SET v = 'b' WHERE id % 2 = 0")
            pg_conn.execute(
                "INSERT INTO t SELECT g, 'c' FROM generate_series(101 + %s, 110 + %s) g",
                [_ * 10, _ * 10],
            )
            wait_caught_up(pipeline, pg_dsn, timeout=60)
        assert pipeline.metrics["reconnects"] >= 2
    assert_lake_matches_postgres(pg_dsn, lake_dir, "public.t", ["id", "v"], ["id"])
    assert duplicate_positions(lake_dir, "public.t") == []


def test_setup_is_idempotent_and_refuses_a_different_table_set(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute(
        'CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE "Odd ""Name""" (id int PRIMARY KEY)'
    )
    tables = ["a", '"Odd ""Name"""']
    assert ensure_publication(pg_conn, "p1", tables=tables) == [
        ("public", 'Odd "Name"'),
        ("public", "a"),
    ]
    assert ensure_publication(pg_conn, "p1", tables=list(reversed(tables))) == [
        ("public", 'Odd "Name"'),
        ("public", "a"),
    ]
    # A shorter list never drops a table from the publication.
    assert len(ensure_publication(pg_conn, "p1", tables=["a"])) == 2
    with pytest.raises(ConfigError, match="switching"):
        ensure_publication(pg_conn, "p1", tables=None)
    pg_conn.execute("CREATE TABLE c (id int PRIMARY KEY)")
    assert ("public", "c") in ensure_publication(pg_conn, "p1", tables=[*tables, "c"])

    pg_conn.execute('INSERT INTO "Odd ""Name""" VALUES (1)')
    for _ in range(2):  # the second run finds slot, publication and state in place
        with running_pipeline(pg_dsn, lake_dir, **{"source.tables": tables}) as pipeline:
            wait_caught_up(pipeline, pg_dsn)
    assert get_slot(pg_conn, "test") is not None
    assert_lake_matches_postgres(pg_dsn, lake_dir, 'public."Odd ""Name"""', ["id"], ["id"])


def test_existing_slot_without_lake_state_is_refused(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        wait_caught_up(pipeline, pg_dsn)
    other_lake = lake_dir + "-other"
    pipeline = CapturePipeline(
        load_settings(**{"source.dsn": pg_dsn, "lake.path": other_lake, "name": "test"})
    )
    with pytest.raises(ConfigError, match="no record"):
        pipeline.prepare()


def test_interrupted_snapshot_is_redone_from_scratch(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute(
        "CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (id int PRIMARY KEY)"
    )
    pg_conn.execute("INSERT INTO a SELECT g, md5(g::text) FROM generate_series(1, 30000) g")
    pg_conn.execute("INSERT INTO b SELECT g FROM generate_series(1, 100) g")
    settings = load_settings(
        **{"source.dsn": pg_dsn, "lake.path": lake_dir, "name": "test", "batch.max_rows": 5000}
    )
    pipeline = CapturePipeline(settings)

    class Crash(Exception):
        pass

    class CrashInSecondTable(SnapshotHook):
        def rows_copied(self, name: str, rows: int) -> None:
            if name == "public.b":
                raise Crash

    pipeline.progress = CrashInSecondTable()
    with pytest.raises(Crash):
        pipeline.prepare()
    pipeline.source.close()
    position = LakePositionStore(lake_dir, "test").load()
    assert position is not None and not position.snapshot_done
    # Table a's copy was committed (it is written as it is read) before the crash.
    assert DeltaTable(layout.changes_uri(lake_dir, "public.a")).to_pyarrow_table().num_rows == 30000

    pg_conn.execute("UPDATE a SET v = 'changed' WHERE id <= 10")
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        wait_caught_up(pipeline, pg_dsn)
        assert pipeline.metrics["snapshot_rows"] == 30100
    assert_lake_matches_postgres(pg_dsn, lake_dir, "public.a", ["id", "v"], ["id"])
    assert_lake_matches_postgres(pg_dsn, lake_dir, "public.b", ["id"], ["id"])
    with Lake(lake_dir) as lk:
        # The first attempt's rows were discarded, not kept beside the second's.
        assert lk.sql("SELECT count(*) FROM public.a_changes").fetchone() == (30000,)


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", ["copying", "recording the watermark"])
def test_a_crash_inside_a_streamed_table_copy_is_redone_without_duplicates(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str, crash_at: str
) -> None:
    """The copy of one table dies while delta-rs is writing it (nothing committed), or
    after its rows are committed but before the commit of its watermark. Either way the next
    run discards what is there and copies again: every row exactly once."""
    pg_conn.execute(
        'CREATE TABLE "Mixed Case" (k text, n int, v text, PRIMARY KEY (k, n));'
        "CREATE TABLE keyless (v text)"
    )
    pg_conn.execute(
        """INSERT INTO "Mixed Case" SELECT 'k' || (g % 7), g, CASE WHEN g % 4 = 0 THEN NULL
        ELSE md5(g::text) END FROM generate_series(1, 20000) g"""
    )
    pg_conn.execute(
        "INSERT INTO keyless SELECT NULLIF(g % 3, 0)::text FROM generate_series(1, 50) g"
    )
    settings = load_settings(**{"source.dsn": pg_dsn, "lake.path": lake_dir, "name": "test"})

    class WatermarkCrash(DeltaChangelogSink):
        def _transactions(self, buf: Any) -> Any:
            if "Mixed" in buf.qualified_name:
                raise _Crash("killed before the watermark")
            return super()._transactions(buf)

    class CopyCrash(SnapshotHook):
        def rows_copied(self, name: str, rows: int) -> None:
            if "Mixed" in name:
                raise _Crash("killed while copying")

    if crash_at == "copying":
        pipeline = CapturePipeline(settings, progress=CopyCrash())
    else:
        sink = WatermarkCrash(lake_dir, app_id="cdc-lakehouse:test", batch=settings.batch)
        pipeline = CapturePipeline(settings, sink=sink)
    with pytest.raises(_Crash, match="killed"):
        pipeline.prepare()
    pipeline.source.close()
    position = LakePositionStore(lake_dir, "test").load()
    assert position is not None and not position.snapshot_done
    mixed = DeltaTable(layout.changes_uri(lake_dir, "public.Mixed Case"))
    assert mixed.to_pyarrow_table().num_rows == (0 if crash_at == "copying" else 20000)
    assert mixed.transaction_version("cdc-lakehouse:test:lsn") is None  # no watermark either way

    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        wait_caught_up(pipeline, pg_dsn)
        assert pipeline.metrics["snapshot_rows"] == 20050
    assert_lake_matches_postgres(
        pg_dsn, lake_dir, 'public."Mixed Case"', ["k", "n", "v"], ["k", "n"]
    )
    with Lake(lake_dir) as lk:
        # The first attempt's rows were discarded, not kept beside the second's.
        changes = 'public."Mixed Case_changes"'
        assert lk.sql(f"SELECT count(*) FROM {changes}").fetchone() == (20000,)
        assert lk.sql(
            f"SELECT count(DISTINCT (_cdc_lsn, _cdc_seq)), max(_cdc_seq) FROM {changes}"
        ).fetchone() == (20000, 19999)
        assert lk.sql("SELECT count(*) FROM public.keyless_changes").fetchone() == (50,)


def test_a_signal_during_a_table_copy_stops_it_at_the_next_batch(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    """The signal handler (cdc run's sets the stop event) runs while delta-rs is writing a
    table: the copy stops at its next batch, not when the table is done."""
    pg_conn.execute("CREATE TABLE big (id bigint PRIMARY KEY, v text)")
    pg_conn.execute(
        "INSERT INTO big SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 300000) g"
    )
    pipeline = CapturePipeline(
        load_settings(**{"source.dsn": pg_dsn, "lake.path": lake_dir, "name": "test"})
    )
    batches: list[int] = []

    class SignalAtFirstBatch(SnapshotHook):
        def rows_copied(self, name: str, rows: int) -> None:
            batches.append(rows)
            if len(batches) == 1:
                os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: pipeline.stop.set())
    try:
        pipeline.progress = SignalAtFirstBatch()
        assert pipeline.run()["snapshot_interrupted"] is True
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert 1 <= len(batches) < 4 and sum(batches) < 300000
    changes = DeltaTable(layout.changes_uri(lake_dir, "public.big"))
    assert changes.to_pyarrow_table().num_rows == 0


def test_snapshot_never_streams_only(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pg_conn.execute("INSERT INTO t VALUES (1), (2)")
    with running_pipeline(pg_dsn, lake_dir, snapshot="never") as pipeline:
        pg_conn.execute("INSERT INTO t VALUES (3)")
        wait_caught_up(pipeline, pg_dsn)
    with Lake(lake_dir) as lk:
        assert lk.sql("SELECT id FROM public.t").fetchall() == [(3,)]


def test_values_survive_the_trip_unchanged(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute(SCHEMA)
    pg_conn.execute(
        "INSERT INTO types (id, small, big, price, ratio, flag, label, code, born, seen, local_ts, blob, ident, doc, meta) VALUES "
        "(1, -32768, -9223372036854775808, -9999999.999, 'NaN', true, '', 'a', '0001-01-01', "
        " '0001-01-01 00:00:00+00', '9999-12-31 23:59:59.999999', '', %s, '{\"a\": [1, \"x,y\"]}', '[]'),"
        "(2, 32767, 9223372036854775807, 9999999.999, 'Infinity', false, 'ünï ''\"\\ code', '  ', "
        " '9999-12-31', '2026-06-01 12:00:00.5+05:30', '2000-01-01', '\\x00ff0a', NULL, 'null', 'null'),"
        "(3, 0, 0, 0, '-Infinity', NULL, E'line\\nbreak, comma', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
        [str(uuid.uuid4())],
    )
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        pg_conn.execute(
            "INSERT INTO types SELECT id + 10, small, big, price, ratio, flag, label, code, born, seen, "
            "local_ts, blob, ident, doc, meta FROM types WHERE id <= 3"
        )
        wait_caught_up(pipeline, pg_dsn)
    # Snapshot (ids 1-3) and streaming (ids 11-13) carry the same values.
    assert (
        assert_lake_matches_postgres(pg_dsn, lake_dir, "public.types", TYPES_COLUMNS, ["id"]) == 6
    )


def test_stop_during_the_snapshot_exits_cleanly_and_the_next_run_redoes_it(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    pg_conn.execute("INSERT INTO a SELECT generate_series(1, 100); INSERT INTO b VALUES (1)")
    pipeline = CapturePipeline(
        load_settings(**{"source.dsn": pg_dsn, "lake.path": lake_dir, "name": "test"})
    )

    class StopAfterFirstTable(SnapshotHook):
        def table_done(self, name: str, rows: int) -> None:
            pipeline.stop.set()  # what SIGTERM does

    pipeline.progress = StopAfterFirstTable()
    assert pipeline.run()["snapshot_interrupted"] is True
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        wait_caught_up(pipeline, pg_dsn)
        assert pipeline.metrics["snapshot_rows"] == 101
    assert_lake_matches_postgres(pg_dsn, lake_dir, "public.a", ["id"], ["id"])
    assert_lake_matches_postgres(pg_dsn, lake_dir, "public.b", ["id"], ["id"])


def test_missing_privileges_are_explained(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    role = f"r_{uuid.uuid4().hex[:8]}"
    pg_conn.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
    try:
        pg_conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        dsn = psycopg.conninfo.make_conninfo(pg_dsn, user=role)
        pipeline = CapturePipeline(
            load_settings(**{"source.dsn": dsn, "lake.path": lake_dir, "name": "test"})
        )
        with pytest.raises(PrerequisiteError, match="superuser"):
            pipeline.prepare()  # FOR ALL TABLES needs a superuser

        pg_conn.execute(f"ALTER TABLE t OWNER TO {role}")
        pg_conn.execute("CREATE TABLE secret (id int PRIMARY KEY)")
        pg_conn.execute("CREATE PUBLICATION test FOR TABLE t, secret")
        pipeline = CapturePipeline(
            load_settings(
                **{
                    "source.dsn": dsn,
                    "lake.path": lake_dir,
                    "name": "test",
                    "source.tables": ["t", "secret"],
                }
            )
        )
        with pytest.raises(PrerequisiteError, match=r"GRANT SELECT ON public\.secret"):
            pipeline.prepare()
    finally:
        pg_conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = 'test' AND NOT active"
        )
        pg_conn.execute("DROP PUBLICATION IF EXISTS test")
        pg_conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
