"""The ``cdc`` command as a user runs it: real processes, signals and kill -9."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from catalog.lake import Lake
from tests.plugins.lake import (
    assert_lake_matches_postgres,
    duplicate_positions,
    running_pipeline,
    wait_caught_up,
)
from tests.plugins.workload import Workload, create_bank

pytestmark = pytest.mark.postgres


def cdc(*args: str) -> list[str]:
    return [sys.executable, "-m", "cdc", *args]


def cdc_run(dsn: str, lake: str, *, flush_seconds: float) -> list[str]:
    """``cdc run`` of the pipeline named ``test`` (the name the in-process helpers use)."""
    return cdc(
        "run",
        "--source",
        dsn,
        "--lake",
        lake,
        "--name",
        "test",
        "--flush-seconds",
        str(flush_seconds),
    )


def run_cdc(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(cdc(*args), capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_kill_9_mid_stream_again_and_again_loses_and_duplicates_nothing(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    create_bank(pg_conn)
    rng = random.Random(2026)
    with Workload(pg_dsn, seed=1) as workload:
        for _ in range(5):
            proc = subprocess.Popen(
                cdc_run(pg_dsn, lake_dir, flush_seconds=0.3),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(rng.uniform(1.5, 4.0))
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert workload.transactions > 50
    # A last, clean run catches up with everything the killed ones left behind.
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        wait_caught_up(pipeline, pg_dsn)
    assert (
        assert_lake_matches_postgres(pg_dsn, lake_dir, "public.accounts", ["id", "balance"], ["id"])
        == 500
    )
    assert_lake_matches_postgres(
        pg_dsn, lake_dir, "public.ledger", ["id", "account", "amount"], ["id"]
    )
    for table in ("public.accounts", "public.ledger"):
        assert duplicate_positions(lake_dir, table) == []
    with Lake(lake_dir) as lk:
        # Money is conserved in the lake too: the current state is a consistent whole.
        assert lk.sql("SELECT sum(balance) FROM public.accounts").fetchone() == (500 * 1000,)


def test_sigterm_flushes_and_exits_cleanly(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    create_bank(pg_conn)
    proc = subprocess.Popen(
        # Only the shutdown flush can write the changes.
        cdc_run(pg_dsn, lake_dir, flush_seconds=3600),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not pg_conn.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'test' AND active"
        ).fetchone():
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stderr.read() if proc.stderr else ""
            )
            time.sleep(0.1)
        pg_conn.execute("UPDATE accounts SET balance = 7 WHERE id <= 10")
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    metrics = json.loads(out)
    assert metrics["events"] >= 10 and metrics["snapshot_rows"] == 500
    assert "SIGTERM" in err
    assert_lake_matches_postgres(pg_dsn, lake_dir, "public.accounts", ["id", "balance"], ["id"])


def test_query_and_tables_print_results_and_errors_are_messages(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    create_bank(pg_conn)
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        wait_caught_up(pipeline, pg_dsn)
    result = run_cdc(
        "query",
        "--lake",
        lake_dir,
        "SELECT count(*) AS n, sum(balance) AS total FROM public.accounts",
    )
    assert result.returncode == 0, result.stderr
    assert "500" in result.stdout and "500000" in result.stdout
    result = run_cdc("tables", "--lake", lake_dir)
    assert result.returncode == 0, result.stderr
    assert "public.accounts" in result.stdout and "public.ledger" in result.stdout

    result = run_cdc("query", "--lake", lake_dir, "SELECT * FROM public.nope")
    assert result.returncode == 1
    assert "nope" in result.stderr and "Traceback" not in result.stderr


def test_missing_source_says_where_it_looked(tmp_path) -> None:
    result = run_cdc("run", "--lake", str(tmp_path / "lake"))
    assert result.returncode == 1
    assert "--source" in result.stderr and "CDC_SOURCE__DSN" in result.stderr


def test_unreachable_source_is_a_temporary_error(tmp_path) -> None:
    result = run_cdc("run", "--source", "postgresql://u@127.0.0.1:1/db", "--lake", str(tmp_path))
    assert result.returncode == 75
    assert "Traceback" not in result.stderr and "cannot connect" in result.stderr


@pytest.mark.slow
def test_demo_runs_to_completion(tmp_path) -> None:
    lake = tmp_path / "demo-lake"
    result = run_cdc("demo", "--seconds", "3", "--lake", str(lake), timeout=180)
    assert result.returncode == 0, result.stderr
    for title in ("Stock per store now", "Orders per hour", "Stock history of product 1"):
        assert title in result.stdout
    assert str(lake) in result.stdout
    # The demo compares each table's row count in PostgreSQL and in the lake.
    line = next(x for x in result.stdout.splitlines() if x.startswith("Rows per table"))
    for pair in line.split(":", 1)[1].split(","):
        pg_rows, lake_rows = pair.split()[-1].split("/")
        assert pg_rows == lake_rows
