"""The maintenance jobs beside a live pipeline, against a real PostgreSQL: compaction after a
streaming run, and compact + merge + checkpoint in a loop while ``cdc run`` streams a
workload, then the lake compared with PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from catalog import lake_layout
from jobs.compact import compact
from jobs.errors import CommitConflictError
from jobs.maintenance import checkpoint
from jobs.merge import merge
from tests.plugins.lake import (
    assert_lake_matches_postgres,
    duplicate_positions,
    postgres_rows,
    running_pipeline,
    table_checksum,
    wait_caught_up,
)
from tests.plugins.workload import Transfers, create_accounts

pytestmark = pytest.mark.postgres

CHANGES_COLUMNS = ["id", "balance", "_cdc_op", "_cdc_lsn", "_cdc_seq", "_cdc_txid"]


def merged_rows(lake: str) -> list[tuple]:
    table = DeltaTable(lake_layout.current_uri(lake, "public.accounts")).to_pyarrow_table(
        columns=["id", "balance"]
    )
    return sorted(tuple(r.values()) for r in table.to_pylist())


def test_compaction_after_a_streaming_run_reduces_files_tenfold_and_keeps_the_data(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    create_accounts(pg_conn)
    with running_pipeline(pg_dsn, lake_dir, **{"batch.max_seconds": 0.05}) as pipeline:
        with Transfers(pg_dsn, seed=3):
            # Many small commits, as a busy pipeline makes (one per table per flush).
            deadline = time.monotonic() + 90
            while pipeline.metrics["commits"] < 40:
                assert time.monotonic() < deadline, pipeline.metrics
                time.sleep(0.1)
        wait_caught_up(pipeline, pg_dsn)

    uri = lake_layout.changes_uri(lake_dir, "public.accounts")
    before = pa.table(DeltaTable(uri).get_add_actions(flatten=True))
    per_partition_before = _files_per_partition(before)
    changes = table_checksum(lake_dir, "public.accounts_changes", CHANGES_COLUMNS)
    current = table_checksum(lake_dir, "public.accounts", ["id", "balance"])

    metrics = compact(lake_dir)
    after = pa.table(DeltaTable(uri).get_add_actions(flatten=True))
    per_partition_after = _files_per_partition(after)
    for partition, n in per_partition_before.items():
        if n >= 10:
            assert per_partition_after[partition] * 10 <= n, (partition, n, per_partition_after)
    assert max(per_partition_before.values()) >= 40
    assert metrics["files_before"] >= 10 * metrics["files_after"]
    assert table_checksum(lake_dir, "public.accounts_changes", CHANGES_COLUMNS) == changes
    assert table_checksum(lake_dir, "public.accounts", ["id", "balance"]) == current
    assert_lake_matches_postgres(pg_dsn, lake_dir, "public.accounts", ["id", "balance"], ["id"])


def _files_per_partition(adds: pa.Table) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in adds.column("partition._cdc_date").to_pylist():
        counts[str(value)] = counts.get(str(value), 0) + 1
    return counts


def _slot_caught_up(conn: psycopg.Connection, timeout: float = 60) -> None:
    """Wait until the slot of ``cdc run --name test`` has confirmed every commit so far."""
    target = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT confirmed_flush_lsn >= %s FROM pg_replication_slots WHERE slot_name = 'test'",
            [target[0] if target else None],
        ).fetchone()
        if row and row[0]:
            return
        time.sleep(0.1)
    raise AssertionError("cdc run did not catch up")


def test_compact_merge_and_checkpoint_in_a_loop_beside_cdc_run(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    create_accounts(pg_conn)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cdc",
            "run",
            "--source",
            pg_dsn,
            "--lake",
            lake_dir,
            "--name",
            "test",
            "--flush-seconds",
            "0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    conflicts = gave_up = rounds = 0
    try:
        deadline = time.monotonic() + 60
        while not DeltaTable.is_deltatable(lake_layout.changes_uri(lake_dir, "public.accounts")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.1)
        with Transfers(pg_dsn, seed=7) as workload:
            until = time.monotonic() + 12
            while time.monotonic() < until:
                for job in (
                    lambda: compact(lake_dir, min_files=2),
                    lambda: merge(lake_dir),
                    lambda: checkpoint(lake_dir),
                ):
                    try:
                        result = job()
                    except CommitConflictError:
                        gave_up += 1  # allowed: nothing was committed, the next run goes on
                        continue
                    conflicts += sum(
                        t.get("conflicts", 0) for t in result.get("tables", {}).values()
                    )
                rounds += 1
            assert workload.transactions > 100
        _slot_caught_up(pg_conn)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        proc.kill()
    assert rounds >= 3

    merge(lake_dir)
    expected = postgres_rows(pg_dsn, "public.accounts", ["id", "balance"], ["id"])
    assert merged_rows(lake_dir) == expected
    assert_lake_matches_postgres(pg_dsn, lake_dir, "public.accounts", ["id", "balance"], ["id"])
    assert duplicate_positions(lake_dir, "public.accounts") == []
    with psycopg.connect(pg_dsn) as conn:
        total = conn.execute("SELECT sum(balance) FROM accounts WHERE id <= 300").fetchone()
    assert total == (300 * 1000,)
    print(f"rounds={rounds} retried conflicts={conflicts} gave up={gave_up}")


def cdc_jobs(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cdc", "jobs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_one_shot_commands_print_metrics_and_exit_codes(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str, tmp_path: Path
) -> None:
    create_accounts(pg_conn)
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        pg_conn.execute("UPDATE accounts SET balance = 5 WHERE id <= 10")
        wait_caught_up(pipeline, pg_dsn)

    result = cdc_jobs("merge", "--lake", lake_dir)
    assert result.returncode == 0, result.stderr
    merged = json.loads(result.stdout)["tables"]["public.accounts"]
    assert merged["status"] == "merged" and merged["rows_inserted"] == 300
    for args in (
        ("compact", "--lake", lake_dir, "--min-files", "1", "--z-order"),
        ("checkpoint", "--lake", lake_dir, "--table", "public.accounts"),
        ("vacuum", "--lake", lake_dir, "--retain", "7d", "--dry-run"),
        ("retention", "--lake", lake_dir, "--keep", "30d"),
    ):
        result = cdc_jobs(*args)
        assert result.returncode == 0, (args, result.stderr)
        assert "duration_s" in json.loads(result.stdout)
    assert_lake_matches_postgres(pg_dsn, lake_dir, "public.accounts", ["id", "balance"], ["id"])

    # Terminal errors: a message and exit code 1, no traceback.
    result = cdc_jobs("vacuum", "--lake", lake_dir, "--retain", "1h")
    assert result.returncode == 1 and "--force" in result.stderr
    assert "Traceback" not in result.stderr
    result = cdc_jobs("merge", "--lake", lake_dir, "--table", "public.nope")
    assert result.returncode == 1 and "public.nope" in result.stderr
    result = cdc_jobs("retention", "--lake", lake_dir, "--keep", "soon")
    assert result.returncode == 2 and "invalid duration" in result.stderr

    # An object store that does not answer: temporary, exit 75 (a loopback port nobody
    # listens on stands in for it).
    store = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }
    result = cdc_jobs(
        "merge", "--lake", "s3://bucket/lake", env={"CDC_LAKE__STORAGE_OPTIONS": json.dumps(store)}
    )
    assert result.returncode == 75, result.stderr
    assert "s3://bucket/lake" in result.stderr and "Traceback" not in result.stderr


def test_schedule_runs_until_sigterm(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str, tmp_path: Path
) -> None:
    create_accounts(pg_conn)
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        wait_caught_up(pipeline, pg_dsn)
    config = tmp_path / "jobs.toml"
    config.write_text(
        f"lake = {json.dumps(lake_dir)}\n"
        '[[jobs]]\njob = "merge"\nevery = "1s"\n'
        '[[jobs]]\njob = "checkpoint"\nevery = "1s"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdc", "jobs", "schedule", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
    )
    try:
        deadline = time.monotonic() + 60
        current = lake_layout.current_uri(lake_dir, "public.accounts")
        while not DeltaTable.is_deltatable(current):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert json.loads(out)["runs"]["merge"] >= 1
    assert "SIGTERM" in err and "job merge finished" in err
    assert merged_rows(lake_dir) == [(i, 1000) for i in range(1, 301)]
