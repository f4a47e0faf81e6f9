"""`cdc capture` and `cdc sink` as a user runs them: processes, SIGTERM, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.plugins.kafka_pipeline import (
    cdc_process,
    stop_process,
    unique,
    wait_captured,
    wait_logged,
    wait_streaming,
    wait_sunk,
)
from tests.plugins.lake import assert_lake_matches_postgres, duplicate_positions


@pytest.mark.postgres
@pytest.mark.kafka
def test_capture_and_sink_commands_run_and_stop_cleanly_on_sigterm(
    pg_dsn: str, pg_conn: psycopg.Connection, kafka_broker: str, tmp_path: Path
) -> None:
    pg_conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(8, 2))")
    pg_conn.execute(
        "INSERT INTO items SELECT g, 'item ' || g, g * 1.5 FROM generate_series(1, 300) g"
    )
    prefix, name, lake = unique("cli"), unique("cli"), str(tmp_path / "lake")
    group = f"{prefix}-g"
    common = ["--kafka", kafka_broker, "--topic-prefix", prefix, "--name", name]
    capture = cdc_process("capture", "--source", pg_dsn, *common, "--partitions", "2")
    sink_log = tmp_path / "sink.log"
    sink = None
    try:
        wait_streaming(pg_dsn, name)
        sink = cdc_process("sink", "--lake", lake, "--group", group, *common, log=sink_log)
        wait_logged(sink_log, "starts at", sink)
        pg_conn.execute("UPDATE items SET price = price * 2 WHERE id <= 100")
        pg_conn.execute("DELETE FROM items WHERE id > 290")
        wait_captured(pg_dsn, name)
        wait_sunk(kafka_broker, prefix, group)
        sink_out, _ = stop_process(sink)
        capture_out, capture_err = stop_process(capture)
    finally:
        for proc in (capture, sink):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert "SIGTERM" in capture_err
    captured = json.loads(capture_out)
    assert captured["snapshot_rows"] == 300 and captured["events"] == 110
    assert captured["rows_written"] == 410  # acknowledged by Kafka
    sunk = json.loads(sink_out)
    assert sunk["rows_written"] == 410 and sunk["tombstones"] == 10 and sunk["dead_letters"] == 0
    assert_lake_matches_postgres(pg_dsn, lake, "public.items", ["id", "name", "price"], ["id"])
    assert duplicate_positions(lake, "public.items") == []


def test_missing_kafka_says_where_it_looked(tmp_path: Path) -> None:
    for command in (
        ["capture", "--source", "postgresql://u@127.0.0.1:1/db"],
        ["sink", "--lake", str(tmp_path)],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "cdc", *command],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"},
        )
        assert result.returncode == 1, result.stderr
        assert "--kafka" in result.stderr and "CDC_KAFKA__BOOTSTRAP" in result.stderr
        assert "Traceback" not in result.stderr
