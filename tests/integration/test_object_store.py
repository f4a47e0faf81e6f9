"""Lakes on an object store (a local S3 API server, moto): the commands a user runs, the
``Lake`` API, and crashes, all against ``s3://`` with the options in
``CDC_LAKE__STORAGE_OPTIONS``."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import psycopg
import pytest

from catalog.lake import Lake
from tests.integration.kafka_helpers import wait_captured, wait_streaming
from tests.plugins.cli import cdc, run_cdc
from tests.plugins.lake import assert_lake_matches_postgres
from tests.plugins.s3 import ConditionIgnoringProxy, S3Lake

pytestmark = [pytest.mark.postgres, pytest.mark.s3]

# Mixed-case quoted names, a composite key of mixed types, a keyless table, NULLs.
SCHEMA = """
CREATE SCHEMA "Sales";
CREATE TABLE "Sales"."Order Lines" (
    "Order" bigint, line text, at date, qty int, note text, PRIMARY KEY ("Order", line, at)
);
CREATE TABLE public.events (kind text, payload jsonb);
"""
LINES = '"Sales"."Order Lines"'
LINE_COLUMNS = ["Order", "line", "at", "qty", "note"]
LINE_KEY = ["Order", "line", "at"]


def write_lines(conn: psycopg.Connection, start: int, n: int) -> None:
    conn.execute(
        f"INSERT INTO {LINES} SELECT g, 'l' || (g %% 3), date '2026-01-01' + (g %% 30)::int, g, "
        "CASE WHEN g %% 4 = 0 THEN NULL ELSE 'n' || g END "
        "FROM generate_series(%s::bigint, %s::bigint) g",
        [start, start + n - 1],
    )
    conn.execute("INSERT INTO public.events SELECT 'k' || g, NULL FROM generate_series(1, 5) g")


def run_process(lake: S3Lake, *args: str, log: Path) -> subprocess.Popen[bytes]:
    import os

    env = {**os.environ, **lake.env(), "COLUMNS": "300", "CDC_BATCH__MAX_SECONDS": "0.3"}
    return subprocess.Popen(cdc(*args), stdout=subprocess.DEVNULL, stderr=log.open("ab"), env=env)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_cdc_run_on_s3_and_every_command_reads_the_lake(
    pg_dsn: str, pg_conn: psycopg.Connection, s3_lake: S3Lake, tmp_path: Path
) -> None:
    pg_conn.execute(SCHEMA)
    write_lines(pg_conn, 1, 300)  # the snapshot
    log = tmp_path / "run.log"
    proc = run_process(s3_lake, "run", "--source", pg_dsn, "--name", "objrun", log=log)
    try:
        wait_streaming(pg_dsn, "objrun", timeout=90)
        write_lines(pg_conn, 1000, 200)  # streamed
        pg_conn.execute(f'UPDATE {LINES} SET qty = -qty, note = NULL WHERE "Order" % 5 = 0')
        pg_conn.execute(f'DELETE FROM {LINES} WHERE "Order" % 7 = 0')
        wait_captured(pg_dsn, "objrun", timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0, log.read_text()[-3000:]

    env = s3_lake.env()
    options = s3_lake.storage_options
    rows = assert_lake_matches_postgres(
        pg_dsn, s3_lake.uri, LINES, LINE_COLUMNS, LINE_KEY, storage_options=options
    )
    assert rows > 400

    tables = ok(run_cdc("tables", env=env))
    assert "Sales.Order Lines" in tables and "public.events" in tables
    assert "Order" in ok(run_cdc("schemas", env=env))
    count = ok(run_cdc("query", 'SELECT count(*) AS n FROM "Sales"."Order Lines"', env=env))
    assert str(rows) in count

    # Every job, on the store: then the lake still equals PostgreSQL.
    ok(run_cdc("jobs", "compact", "--min-files", "2", env=env))
    ok(run_cdc("jobs", "merge", env=env))
    ok(run_cdc("jobs", "checkpoint", env=env))
    ok(run_cdc("jobs", "vacuum", "--retain", "0h", "--force", env=env))
    ok(run_cdc("jobs", "retention", "--keep", "3650d", env=env))
    assert_lake_matches_postgres(
        pg_dsn, s3_lake.uri, LINES, LINE_COLUMNS, LINE_KEY, storage_options=options
    )
    with Lake(s3_lake.uri, storage_options=options) as lake:
        names = [t.qualified_name for t in lake.tables()]
        assert names == ["Sales.Order Lines", "public.events"]
        assert lake.current("public.events").num_rows == 2 * 5  # keyless: insert-only
        assert [v.version for v in lake.schema_versions("Sales.Order Lines")] == [1]


def test_writers_refuse_a_store_that_ignores_conditional_writes(
    s3_lake: S3Lake, pg_dsn: str
) -> None:
    from catalog.commit_safety import commit_safety

    assert commit_safety(s3_lake.uri, s3_lake.storage_options).safe  # moto honours them
    assert commit_safety("/some/dir").safe and commit_safety("gs://b/lake").safe
    with ConditionIgnoringProxy(s3_lake.server) as proxy:
        unsafe = {**s3_lake.storage_options, "AWS_ENDPOINT_URL": proxy.endpoint}
        env = {**s3_lake.env(), "CDC_LAKE__STORAGE_OPTIONS": json.dumps(unsafe)}
        for args in (
            ("run", "--source", pg_dsn, "--name", "unsafe"),
            ("sink", "--kafka", "127.0.0.1:1", "--name", "unsafe"),
            ("jobs", "merge"),
        ):
            result = run_cdc(*args, env=env)
            assert result.returncode == 1, (args, result.stderr[-2000:])
            message = " ".join(result.stderr.split())
            assert "offers no safe commit" in message, message
            assert "conditional_put=etag" in message and "AWS_S3_ALLOW_UNSAFE_RENAME" in message
        # The user may accept the risk for a single writer, by name; never set for them.
        accepted = {**unsafe, "AWS_S3_ALLOW_UNSAFE_RENAME": "true"}
        env["CDC_LAKE__STORAGE_OPTIONS"] = json.dumps(accepted)
        result = run_cdc("jobs", "checkpoint", env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "Only ONE writer" in " ".join(result.stderr.split())
