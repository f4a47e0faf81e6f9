"""Failures tell the truth: what cannot pass stops the pipeline with exit 1 and a message
that says what to change; what may pass is retried, and nothing is lost meanwhile."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import psycopg
import pytest
from confluent_kafka.admin import AdminClient
from deltalake import DeltaTable

from catalog import lake_layout
from cdc.core.errors import TerminalError
from cdc.core.lsn import parse_lsn
from cdc.core.settings import load_settings
from cdc.pipeline import run_capture
from cdc.postgres.errors import SlotLostError
from sinks import disk_sync
from sinks.errors import TerminalSinkError
from tests.plugins.failures import (
    Role,
    backend_pids,
    cdc_command,
    drop_slot_now,
    dsn_as,
    start_cdc,
    wait_slot_active,
)
from tests.plugins.lake import assert_lake_matches_postgres, running_pipeline, wait_caught_up

pytestmark = pytest.mark.postgres

COLUMNS = ["region", "id", "body"]
KEY = ["region", "id"]


def create_items(conn: psycopg.Connection, owner: str | None = None) -> None:
    """A composite key of mixed types, and a nullable column."""
    conn.execute(
        "CREATE TABLE public.items (region text, id bigint, body text, PRIMARY KEY (region, id))"
    )
    conn.execute(
        "INSERT INTO public.items SELECT r, g, CASE WHEN g % 3 = 0 THEN NULL ELSE 'b' || g END "
        "FROM generate_series(1, 50) g, unnest(ARRAY['eu', 'us']) r"
    )
    if owner is not None:
        conn.execute(f"ALTER TABLE public.items OWNER TO {owner}")


def insert_items(conn: psycopg.Connection, first: int, count: int) -> None:
    conn.execute(
        "INSERT INTO public.items SELECT 'eu', g, NULL FROM generate_series(%s::bigint, %s::bigint) g",
        [first, first + count - 1],
    )


def test_a_wrong_password_exits_1_at_once_and_never_shows_the_password(
    password_role: Role, pg_conn: psycopg.Connection, tmp_path: Path
) -> None:
    create_items(pg_conn, owner=password_role.name)
    wrong = "wrong-Pa55word-xyz"
    dsn = dsn_as(pg_conn.info.dsn, password_role.name, wrong)
    lake = tmp_path / "lake"
    started = time.monotonic()
    result = cdc_command(
        "run", "--source", dsn, "--lake", str(lake), "--tables", "public.items", timeout=60
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert "password authentication failed" in result.stderr
    assert repr(password_role.name) in result.stderr and "127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr
    for output in (result.stdout, result.stderr):
        assert wrong not in output and password_role.password not in output
    for path in lake.rglob("*") if lake.exists() else ():
        if path.is_file():
            assert wrong.encode() not in path.read_bytes(), path

    # The same role with its password gets past the login (set-up of the slot and so on).
    ok = cdc_command("check", "--source", password_role.dsn, "--tables", "public.items", timeout=60)
    assert "password authentication failed" not in ok.stderr, ok.stderr


def test_a_role_without_replication_is_terminal_and_named(
    no_replication_role: Role, pg_conn: psycopg.Connection, tmp_path: Path
) -> None:
    create_items(pg_conn, owner=no_replication_role.name)
    result = cdc_command(
        "run",
        "--source",
        no_replication_role.dsn,
        "--lake",
        str(tmp_path / "lake"),
        "--tables",
        "public.items",
    )
    assert result.returncode == 1, result.stderr
    assert repr(no_replication_role.name) in result.stderr
    assert "REPLICATION" in result.stderr and "Traceback" not in result.stderr


def test_a_slot_dropped_under_cdc_run_stops_it_naming_the_slot(
    pg_dsn: str, pg_conn: psycopg.Connection, tmp_path: Path
) -> None:
    create_items(pg_conn)
    lake = tmp_path / "lake"
    name = "dropme"
    proc = start_cdc(
        "run", "--source", pg_dsn, "--lake", str(lake), "--tables", "public.items", "--name", name
    )
    try:
        wait_slot_active(pg_conn, name, proc=proc)
        insert_items(pg_conn, 1000, 10)
        # An operator drops the slot (the pipeline reconnects within a second, so this
        # retries until the drop wins the race).
        drop_slot_now(pg_conn, name)
        dropped_at = time.monotonic()
        _out, err = proc.communicate(timeout=60)
        stopped_after = time.monotonic() - dropped_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    assert stopped_after < 30
    assert f"replication slot {name!r}" in err
    state = lake_layout.join(str(lake), lake_layout.INTERNAL_DIR, "pipelines", f"{name}.json")
    assert state in err and lake_layout.table_dir(str(lake), "public.items") in err
    # Never re-created behind the user's back.
    assert not pg_conn.execute(
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", [name]
    ).fetchone()


def test_a_lost_slot_is_terminal_in_process_too(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    """Restarting after the slot vanished: refused at set-up, not re-created."""
    create_items(pg_conn)
    with running_pipeline(pg_dsn, lake_dir, **{"source.tables": ["public.items"]}) as pipeline:
        wait_caught_up(pipeline, pg_dsn)
    drop_slot_now(pg_conn, "test")
    with (
        pytest.raises(SlotLostError, match="'test'"),
        running_pipeline(pg_dsn, lake_dir, **{"source.tables": ["public.items"]}),
    ):
        pass
    assert not pg_conn.execute("SELECT 1 FROM pg_replication_slots").fetchone()


def test_a_terminated_catalog_backend_reconnects(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    create_items(pg_conn)
    with running_pipeline(pg_dsn, lake_dir, **{"source.tables": ["public.items"]}) as pipeline:
        wait_caught_up(pipeline, pg_dsn)
        for round_ in range(3):
            lookups = backend_pids(pg_conn)
            assert lookups, "the catalog connection is open while streaming"
            for pid in lookups:
                pg_conn.execute("SELECT pg_terminate_backend(%s)", [pid])
            # A new column: the next change's Relation message needs a catalog lookup on
            # the terminated connection.
            pg_conn.execute(f"ALTER TABLE public.items ADD COLUMN extra{round_} int")
            insert_items(pg_conn, 2000 + 100 * round_, 20)
            pg_conn.execute("UPDATE public.items SET body = 'x' WHERE id % 7 = 0")
            wait_caught_up(pipeline, pg_dsn)
        assert pipeline.metrics["reconnects"] >= 1
    assert_lake_matches_postgres(pg_dsn, lake_dir, "public.items", COLUMNS, KEY)


def test_a_failing_delta_store_is_retried_without_confirming_then_resumes(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    create_items(pg_conn)
    changes = Path(lake_layout.changes_uri(lake_dir, "public.items"))
    aside = changes.with_name("changes.aside")
    caplog.set_level(logging.WARNING, logger="cdc.pipeline")
    with running_pipeline(pg_dsn, lake_dir, **{"source.tables": ["public.items"]}) as pipeline:
        wait_caught_up(pipeline, pg_dsn)
        # The table's path stops working: a file where its directory was (we run as root,
        # so permissions would not stop the writer).
        changes.rename(aside)
        changes.write_bytes(b"not a directory")
        insert_items(pg_conn, 3000, 30)
        # Right after the insert's commit record: confirming anything at or past its start
        # would make PostgreSQL skip the transaction. (An idle pipeline may confirm the WAL
        # end a keepalive reports while the insert is still being written: that is safe,
        # since a slot skips only the transactions committed before the LSN.)
        committed = parse_lsn(
            pg_conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]  # type: ignore[index]
        )
        pg_conn.execute("DELETE FROM public.items WHERE region = 'us' AND id < 10")
        deadline = time.monotonic() + 30
        while pipeline.metrics["retries"] < 2:
            assert time.monotonic() < deadline, "the failing flush was not retried"
            time.sleep(0.1)
        time.sleep(1)
        confirmed = pg_conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'test'"
        ).fetchone()
        assert confirmed is not None and parse_lsn(confirmed[0]) < committed
        assert pipeline.position is not None and pipeline.position.flushed_lsn < committed
        changes.unlink()
        aside.rename(changes)
        wait_caught_up(pipeline, pg_dsn)
    retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retried and str(changes) in retried[0], retried
    assert_lake_matches_postgres(pg_dsn, lake_dir, "public.items", COLUMNS, KEY)


def test_changes_are_confirmed_only_after_the_lakes_disk_sync(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit in the page cache is lost by a power cut: PostgreSQL may forget a change
    only once the sync that follows its Delta commit has finished."""
    create_items(pg_conn)
    real_sync = disk_sync.filesystem_sync()
    held = threading.Event()  # set: syncs wait until `released` is set
    released = threading.Event()
    syncs_held = []

    def sync(fd: int) -> None:
        if held.is_set():
            syncs_held.append(fd)
            released.wait(60)
        real_sync(fd)

    monkeypatch.setattr(disk_sync, "filesystem_sync", lambda: sync)
    changes = lake_layout.changes_uri(lake_dir, "public.items")
    with running_pipeline(pg_dsn, lake_dir, **{"source.tables": ["public.items"]}) as pipeline:
        wait_caught_up(pipeline, pg_dsn)
        held.set()
        insert_items(pg_conn, 4000, 25)
        committed = parse_lsn(
            pg_conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]  # type: ignore[index]
        )
        deadline = time.monotonic() + 30
        while DeltaTable(changes).to_pyarrow_dataset().count_rows() < 100 + 25:
            assert time.monotonic() < deadline, "the insert did not reach Delta"
            time.sleep(0.1)
        time.sleep(1)  # flushes and confirmations go on meanwhile
        assert syncs_held, "no sync was asked for after the commit"
        confirmed = pg_conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'test'"
        ).fetchone()
        assert confirmed is not None and parse_lsn(confirmed[0]) < committed
        released.set()
        wait_caught_up(pipeline, pg_dsn)
    assert_lake_matches_postgres(pg_dsn, lake_dir, "public.items", COLUMNS, KEY)


@pytest.mark.kafka
def test_a_kafka_record_too_large_stops_capture_at_once(
    pg_dsn: str, pg_conn: psycopg.Connection, kafka_broker: str
) -> None:
    create_items(pg_conn)
    prefix = f"toolarge{time.monotonic_ns()}"
    settings = load_settings(
        **{
            "source.dsn": pg_dsn,
            "source.tables": ["public.items"],
            "kafka.bootstrap": kafka_broker,
            "kafka.topic_prefix": prefix,
            "kafka.producer": {"message.max.bytes": 4096},
            "name": prefix,
            "batch.max_seconds": 0.2,
        }
    )
    stop = threading.Event()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            run_capture(settings, stop=stop)
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        wait_slot_active(pg_conn, prefix, timeout=90)
        # Random text: compression cannot bring it under the limit.
        pg_conn.execute(
            "INSERT INTO public.items SELECT 'eu', 9999, string_agg(md5(g::text), '') "
            "FROM generate_series(1, 1000) g"
        )
        sent = time.monotonic()
        thread.join(30)
        stopped_after = time.monotonic() - sent
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert failure, "capture kept going"
    error = failure[0]
    assert isinstance(error, TerminalError) and isinstance(error, TerminalSinkError), error
    assert stopped_after < 20, stopped_after
    assert "items" in str(error)
    # Nothing after the last delivered change was confirmed: the slot still holds the row.
    slot = pg_conn.execute(
        "SELECT confirmed_flush_lsn < pg_current_wal_insert_lsn() FROM pg_replication_slots "
        "WHERE slot_name = %s",
        [prefix],
    ).fetchone()
    assert slot is not None and slot[0]
    AdminClient({"bootstrap.servers": kafka_broker}).delete_topics(
        [f"{prefix}.public.items"], operation_timeout=5
    )
