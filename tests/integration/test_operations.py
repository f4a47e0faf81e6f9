"""Operations against a real PostgreSQL and Delta lake: `cdc status`, `/metrics`, heartbeats,
the slot guard (a slot PostgreSQL really invalidates), slot commands, snapshot signals, and
no secret in any output."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from deltalake import DeltaTable

from catalog import lake_layout
from cdc.cli.local_postgres import LocalPostgres
from cdc.core.settings import load_settings
from cdc.metrics import Metrics
from cdc.operations import Operations
from cdc.pipeline import CapturePipeline
from cdc.postgres.errors import SlotLostError, SourceConnectionError
from cdc.postgres.replication import ReplicationConnection
from cdc.postgres.slots import slot_status
from tests.plugins.lake import (
    assert_lake_matches_postgres,
    running_pipeline,
    wait_caught_up,
)
from tests.plugins.metrics import free_port, sample, scrape, wait_for
from tests.plugins.postgres import temporary_database

pytestmark = pytest.mark.postgres

PASSWORD = "Pw-9f3kQz-secret"
TABLE = 'public."Order Lines"'
COLUMNS = ["order_id", "line", "sku", "qty"]


def cdc(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "cdc", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def with_password(dsn: str, conn: psycopg.Connection) -> str:
    """``dsn`` for a role with a password (trust auth ignores it: it is only in the DSN)."""
    conn.execute(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ops_user') THEN "
        f"CREATE ROLE ops_user LOGIN SUPERUSER REPLICATION PASSWORD '{PASSWORD}'; END IF; END $$"
    )
    head, _, rest = dsn.partition("://")
    return f"{head}://ops_user:{PASSWORD}@{rest.partition('@')[2]}"


def create_tables(conn: psycopg.Connection) -> None:
    # Composite key of mixed types, a keyless table, NULLs, quoted mixed-case names.
    conn.execute(
        f"CREATE TABLE {TABLE} (order_id bigint, line smallint, sku text, qty integer, "
        "PRIMARY KEY (order_id, line))"
    )
    conn.execute("CREATE TABLE public.events (payload text)")
    conn.execute("ALTER TABLE public.events REPLICA IDENTITY FULL")
    conn.execute(
        f"INSERT INTO {TABLE} SELECT g / 3, g % 3, 'sku' || g, NULLIF(g % 5, 0) "
        "FROM generate_series(1, 30) g"
    )
    conn.execute("INSERT INTO public.events VALUES ('a'), (NULL)")


@pytest.fixture
def cdc_run(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(30)


def start_run(procs: list, *args: str, log: Path) -> subprocess.Popen[str]:
    """``cdc ARGS`` in the background: stderr to ``log``, stdout beside it (``.out``)."""
    err = open(log, "w")  # noqa: SIM115 -- closed with the process
    out = open(log.with_suffix(".out"), "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdc", *args],
        stdout=out,
        stderr=err,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    procs.append(proc)
    return proc


def test_status_metrics_logs_and_no_secret_in_any_output(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str, tmp_path: Path, cdc_run: list
) -> None:
    dsn = with_password(pg_dsn, pg_conn)
    create_tables(pg_conn)
    port = free_port()
    log = tmp_path / "run.log"
    args = ["--source", dsn, "--lake", lake_dir, "--name", "ops", "--flush-seconds", "0.2"]
    proc = start_run(
        cdc_run,
        "--log-format",
        "json",
        "run",
        *args[:6],
        "--flush-seconds",
        "0.2",
        "--metrics-port",
        str(port),
        "--heartbeat-seconds",
        "0.5",
        log=log,
    )
    outputs: list[str] = []

    def slot_active() -> bool:
        s = slot_status(pg_conn, "ops")
        return s is not None and s.active

    wait_for(slot_active, what="the pipeline to stream")
    pg_conn.execute(f"UPDATE {TABLE} SET qty = NULL WHERE line = 1")
    pg_conn.execute(f"DELETE FROM {TABLE} WHERE order_id = 2")
    pg_conn.execute("INSERT INTO public.events VALUES ('b')")

    def metrics_landed() -> str | None:
        text = scrape(port)
        done = sample(text, "cdc_rows_written_total", table="public.events") == 3
        return text if done else None

    text = wait_for(metrics_landed, what="rows written in /metrics")
    outputs.append(text)
    # The snapshot and every streamed change are counted, per table and operation.
    assert sample(text, "cdc_snapshot_rows_total", table="public.Order Lines") == 30
    assert sample(text, "cdc_events_total", table="public.Order Lines", op="u") == 10
    assert sample(text, "cdc_events_total", table="public.Order Lines", op="d") == 3
    assert sample(text, "cdc_events_total", table="public.events", op="c") == 1
    assert (sample(text, "cdc_flush_duration_seconds_count") or 0) >= 1
    assert sample(text, "cdc_last_commit_age_seconds", table="public.events") is not None
    assert sample(text, "cdc_reconnects_total") == 0
    assert sample(text, "cdc_dead_letters_total") == 0
    wait_for(lambda: (sample(scrape(port), "cdc_heartbeats_total") or 0) >= 2, what="heartbeats")
    latency = wait_for(
        lambda: sample(scrape(port), "cdc_heartbeat_latency_seconds"), what="heartbeat latency"
    )
    assert 0 < latency < 5
    lag = sample(scrape(port), "cdc_replication_lag_bytes")
    assert lag is not None and lag >= 0

    status = cdc("status", "--source", dsn, "--lake", lake_dir, "--name", "ops", "--json")
    outputs += [status.stdout, status.stderr]
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["slot"]["active"] is True
    assert report["slot"]["wal_status"] in ("reserved", "extended")
    assert isinstance(report["slot"]["lag_bytes"], int)
    assert PASSWORD not in report["source"] and "***" in report["source"]
    tables = {t["table"]: t for t in report["tables"]}
    lines = tables["public.Order Lines"]
    assert lines["rows"] == 30 + 10 + 3
    assert lines["unmerged_changes"] == lines["rows"]  # no merge yet
    assert lines["lsn_watermark"] > 0 and lines["age_seconds"] >= 0
    assert report["snapshot"]["state"] == "done"
    assert report["rules"] == []
    # A lag limit the slot exceeds (any lag above zero bytes... or exactly zero) fails.
    pg_conn.execute("SELECT pg_switch_wal()")
    strict = cdc("status", "--source", dsn, "--lake", lake_dir, "--name", "ops", "--max-lag", "-1")
    outputs += [strict.stdout, strict.stderr]
    assert strict.returncode == 1 and "--max-lag" in strict.stdout

    # cdc jobs merge folds the changes: nothing is unmerged afterwards.
    pg_conn.execute("CREATE TABLE public.items (id int PRIMARY KEY, name text)")
    pg_conn.execute("INSERT INTO public.items VALUES (1, 'a'), (2, NULL)")
    pg_conn.execute("UPDATE public.items SET name = 'b' WHERE id = 2")
    wait_for(
        lambda: sample(scrape(port), "cdc_rows_written_total", table="public.items") == 3,
        what="public.items to land",
    )
    merged = cdc("jobs", "merge", "--lake", lake_dir)
    outputs += [merged.stdout, merged.stderr]
    assert merged.returncode == 0, merged.stderr
    after = json.loads(
        cdc("status", "--source", dsn, "--lake", lake_dir, "--name", "ops", "--json").stdout
    )
    unmerged = {t["table"]: t["unmerged_changes"] for t in after["tables"]}
    assert unmerged["public.items"] == 0
    assert unmerged["public.Order Lines"] == 0  # composite key
    assert unmerged["public.events"] == 3  # keyless: merge leaves it to the view
    assert {t["table"]: t["merge_watermark"] for t in after["tables"]}["public.items"]

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    stopped = cdc("status", "--source", dsn, "--lake", lake_dir, "--name", "ops")
    outputs += [stopped.stdout, stopped.stderr]
    assert stopped.returncode == 1 and "inactive" in stopped.stdout

    # An error that quotes the DSN still masks the password.
    bad = cdc("status", "--source", dsn.replace("127.0.0.1", "127.0.0.1:1"), "--lake", lake_dir)
    outputs += [bad.stdout, bad.stderr]
    assert bad.returncode != 0

    run_log = log.read_text()
    outputs += [run_log, log.with_suffix(".out").read_text()]
    # --log-format json: every log line is an object; flushes carry table and counts.
    records = [json.loads(line) for line in run_log.splitlines() if line.startswith("{")]
    assert records and all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    stopped_at = [r for r in records if r["message"].startswith("stopped at")]
    assert stopped_at and stopped_at[0]["events"] == 10 + 3 + 1 + 3 and stopped_at[0]["lsn"]
    assert any(r.get("slot") == "ops" and r.get("lsn") for r in records)  # "created slot"
    for path in Path(lake_dir).rglob("*"):
        if path.is_file() and path.suffix in (".json", ".crc", ""):
            outputs.append(path.read_text(errors="replace"))
    for text in outputs:
        assert PASSWORD not in text


def test_idle_database_slot_keeps_up_while_another_database_writes(
    pg_server: LocalPostgres, pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    create_tables(pg_conn)
    with running_pipeline(pg_dsn, lake_dir, name="idle") as pipeline:
        wait_caught_up(pipeline, pg_dsn)
        with (
            temporary_database(pg_server) as other_dsn,
            psycopg.connect(other_dsn, autocommit=True) as other,
        ):
            other.execute("CREATE TABLE busy (id serial PRIMARY KEY, v text)")
            for _ in range(20):  # about 10 MB of WAL in another database
                other.execute(
                    "INSERT INTO busy (v) SELECT repeat('x', 500) FROM generate_series(1, 1000)"
                )
            target = other.execute("SELECT pg_current_wal_lsn()::text").fetchone()

            def lag() -> int:
                slot = slot_status(pg_conn, "idle")
                assert slot is not None
                return slot.lag_bytes or 0

            def caught_up() -> bool:
                return lag() < 1024 * 1024

            wait_for(caught_up, timeout=30, what=f"slot to follow the server to {target}")
            assert lag() < 1024 * 1024


def lose_slot(dsn: str, slot: str) -> None:
    """Make PostgreSQL invalidate ``slot`` (the server has max_slot_wal_keep_size = 1MB)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS filler (v text)")
        for _ in range(3):
            conn.execute(
                "INSERT INTO filler SELECT repeat('x', 200) FROM generate_series(1, 20000)"
            )
            conn.execute("SELECT pg_switch_wal()")
        conn.execute("CHECKPOINT")
        state = slot_status(conn, slot)
        assert state is not None and state.wal_status == "lost", state


@pytest.fixture(scope="module")
def small_wal_server() -> Iterator[LocalPostgres]:
    with LocalPostgres(settings={"max_slot_wal_keep_size": "1MB"}) as server:
        yield server


def test_lost_slot_stops_then_resnapshots(
    small_wal_server: LocalPostgres, lake_dir: str, tmp_path: Path
) -> None:
    with temporary_database(small_wal_server) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        create_tables(conn)
        with running_pipeline(dsn, lake_dir, name="guarded") as pipeline:
            conn.execute(f"UPDATE {TABLE} SET sku = 'before gap' WHERE order_id = 1")
            wait_caught_up(pipeline, dsn)
        # While the pipeline is stopped: changes, then PostgreSQL drops the WAL they are in.
        conn.execute(f"DELETE FROM {TABLE} WHERE order_id = 3")
        conn.execute(f"UPDATE {TABLE} SET sku = 'in gap' WHERE order_id = 4")
        conn.execute("DELETE FROM public.events WHERE payload IS NULL")
        lose_slot(dsn, "guarded")

        status = cdc("status", "--source", dsn, "--lake", lake_dir, "--name", "guarded", "--json")
        assert status.returncode == 1
        assert json.loads(status.stdout)["slot"]["wal_status"] == "lost"

        settings = {"source.dsn": dsn, "lake.path": lake_dir, "name": "guarded"}
        with pytest.raises(SlotLostError, match="--on-slot-lost resnapshot"):
            CapturePipeline(load_settings(**settings)).run()
        run = cdc("run", "--source", dsn, "--lake", lake_dir, "--name", "guarded")
        assert run.returncode == 1 and "lost" in run.stderr

        with running_pipeline(
            dsn, lake_dir, name="guarded", **{"ops.on_slot_lost": "resnapshot"}
        ) as pipeline:
            conn.execute(f"UPDATE {TABLE} SET sku = 'after gap' WHERE order_id = 5")
            wait_caught_up(pipeline, dsn)
        assert_lake_matches_postgres(dsn, lake_dir, TABLE, COLUMNS, ["order_id", "line"])
        changes = DeltaTable(lake_layout.changes_uri(lake_dir, "public.Order Lines"))
        ops = changes.to_pyarrow_table(columns=["_cdc_op"]).column("_cdc_op").to_pylist()
        assert ops.count("t") == 1  # the gap, recorded once per table
        assert ops.count("r") == 30 + 30 - 3  # first copy, then the copy after the gap
        state = slot_status(conn, "guarded")
        assert state is not None and state.wal_status != "lost"


def test_slot_list_drop_and_snapshot_signal(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    create_tables(pg_conn)
    with running_pipeline(pg_dsn, lake_dir, name="sig") as pipeline:
        wait_caught_up(pipeline, pg_dsn)
        listed = cdc("slot", "list", "--source", pg_dsn, "--json")
        assert listed.returncode == 0, listed.stderr
        slots = {s["name"]: s for s in json.loads(listed.stdout)}
        assert slots["sig"]["active"] is True and slots["sig"]["plugin"] == "pgoutput"

        refused = cdc("slot", "drop", "sig", "--source", pg_dsn)
        assert refused.returncode == 1 and "--force" in refused.stderr
        assert slot_status(pg_conn, "sig") is not None

        signal_ = cdc(
            "snapshot",
            "--tables",
            '"Order Lines",public.events,public.not_there',
            "--source",
            pg_dsn,
            "--name",
            "sig",
        )
        assert signal_.returncode == 0, signal_.stderr

        def snapshot_reads(table: str) -> int:
            changes = DeltaTable(lake_layout.changes_uri(lake_dir, table))
            ops = changes.to_pyarrow_table(columns=["_cdc_op"]).column("_cdc_op")
            return int(ops.to_pylist().count("r"))

        def copied_twice() -> bool:
            return (
                snapshot_reads("public.Order Lines") == 60 and snapshot_reads("public.events") == 4
            )

        wait_for(copied_twice, what="the signalled re-copy of both tables")
        assert any(
            "public.not_there is not in publication" in r.getMessage() for r in caplog.records
        )
        assert_lake_matches_postgres(pg_dsn, lake_dir, TABLE, COLUMNS, ["order_id", "line"])
    dropped = cdc("slot", "drop", "sig", "--source", pg_dsn)
    assert dropped.returncode == 0, dropped.stderr
    assert slot_status(pg_conn, "sig") is None


def test_lag_warning_from_the_slot_guard(
    pg_dsn: str, pg_conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """A slot nobody reads falls behind: the guard warns once, and the metrics say so."""
    pg_conn.execute("SELECT pg_create_logical_replication_slot('stalled', 'pgoutput')")
    pg_conn.execute(
        "CREATE TABLE filler AS SELECT repeat('x', 100) AS v FROM generate_series(1, 5000)"
    )
    settings = load_settings(
        **{"source.dsn": pg_dsn, "name": "stalled", "ops.lag_warn_bytes": 100_000}
    )
    metrics = Metrics()
    ops = Operations(
        settings,
        connection=lambda: pg_conn,
        metrics=metrics,
        queue_snapshot=lambda name, key: None,
    )
    with caplog.at_level(logging.WARNING, logger="cdc.operations"):
        slot = ops.check_slot()
        ops.check_slot()
    assert slot is not None and slot.lag_bytes is not None and slot.lag_bytes > 100_000
    warnings = [r for r in caplog.records if "lags" in r.getMessage()]
    assert len(warnings) == 1  # once, not on every check
    assert warnings[0].lag_bytes == slot.lag_bytes  # type: ignore[attr-defined]
    get = metrics.registry.get_sample_value
    assert get("cdc_slot_lag_warning") == 1
    assert (get("cdc_replication_lag_bytes") or 0) >= slot.lag_bytes
    assert (get("cdc_slot_retained_wal_bytes") or 0) >= slot.lag_bytes


def steal_slot(dsn: str, slot: str) -> ReplicationConnection:
    """End the walsender that streams ``slot`` and hold the slot with a connection that
    never confirms anything (retried: the pipeline reconnects within a second)."""
    deadline = time.monotonic() + 30
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE slot_name = %s AND active_pid IS NOT NULL",
                [slot],
            )
            thief = ReplicationConnection(dsn)
            try:
                thief.start_replication(slot, slot)
                return thief
            except SourceConnectionError:
                thief.close()
                assert time.monotonic() < deadline, "could not take the slot over"
                time.sleep(0.05)


def test_slot_lost_while_running_is_resnapshotted(
    small_wal_server: LocalPostgres, lake_dir: str
) -> None:
    with temporary_database(small_wal_server) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        create_tables(conn)
        overrides = {
            "ops.on_slot_lost": "resnapshot",
            "ops.slot_check_seconds": 0.2,
            # Not FOR ALL TABLES: the WAL lose_slot writes must not be sent to the thief,
            # which never reads; a walsender blocked on a full socket cannot be ended, and
            # the CHECKPOINT that invalidates the slot would wait for it for ever.
            "source.tables": [TABLE, "public.events"],
        }
        with running_pipeline(dsn, lake_dir, name="mid", **overrides) as pipeline:
            wait_caught_up(pipeline, dsn)
            thief = steal_slot(dsn, "mid")  # the pipeline keeps reconnecting meanwhile
            try:
                conn.execute(f"DELETE FROM {TABLE} WHERE order_id = 6")
                lose_slot(dsn, "mid")  # the server also ends the thief's walsender
            finally:
                thief.close()
            wait_for(lambda: pipeline.metrics["snapshot_rows"] >= 30 + 27, what="re-snapshot")
            conn.execute(f"UPDATE {TABLE} SET sku = 'after' WHERE order_id = 7")
            wait_caught_up(pipeline, dsn)
        assert_lake_matches_postgres(dsn, lake_dir, TABLE, COLUMNS, ["order_id", "line"])
        changes = DeltaTable(lake_layout.changes_uri(lake_dir, "public.Order Lines"))
        ops = changes.to_pyarrow_table(columns=["_cdc_op"]).column("_cdc_op").to_pylist()
        assert ops.count("t") == 1
