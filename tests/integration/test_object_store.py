"""Lakes on an object store (a local S3 API server, moto): the commands a user runs, the
``Lake`` API, and crashes, all against ``s3://`` with the options in
``CDC_LAKE__STORAGE_OPTIONS``."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from catalog.lake import Lake
from tests.plugins.cli import cdc, run_cdc
from tests.plugins.kafka_pipeline import (
    background,
    capture_thread,
    cdc_process,
    settings,
    sink_thread,
    unique,
    wait_captured,
    wait_logged,
    wait_streaming,
    wait_sunk,
)
from tests.plugins.lake import assert_lake_matches_postgres, duplicate_positions, postgres_rows
from tests.plugins.s3 import ConditionIgnoringProxy, S3Lake
from tests.plugins.workload import Workload, create_bank

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


def assert_bank_on(lake: S3Lake, dsn: str) -> None:
    """The lake's bank equals PostgreSQL's (rows and every column), no change twice, and
    money is conserved in its current state."""
    options = lake.storage_options
    accounts = assert_lake_matches_postgres(
        dsn, lake.uri, "public.accounts", ["id", "balance"], ["id"], storage_options=options
    )
    assert accounts == 500
    assert_lake_matches_postgres(
        dsn, lake.uri, "public.ledger", ["id", "account", "amount"], ["id"], storage_options=options
    )
    for table in ("public.accounts", "public.ledger"):
        assert duplicate_positions(lake.uri, table, storage_options=options) == []
    with Lake(lake.uri, storage_options=options) as lk:
        assert lk.sql("SELECT sum(balance) FROM public.accounts").fetchone() == (500 * 1000,)


def assert_changelog_state_is_postgres(lake: S3Lake, dsn: str) -> None:
    """The latest change per key in the changelog (no merged table involved) equals
    PostgreSQL's rows, every column; and no change is in it twice."""
    for table, columns in (
        ("public.accounts", ["id", "balance"]),
        ("public.ledger", ["id", "account", "amount"]),
    ):
        select = ", ".join(columns)
        with Lake(lake.uri, storage_options=lake.storage_options) as lk:
            rows = lk.sql(
                f"SELECT {select} FROM (SELECT *, row_number() OVER (PARTITION BY id "
                f"ORDER BY _cdc_lsn DESC, _cdc_seq DESC) AS rn FROM {table}_changes) "
                "WHERE rn = 1 AND _cdc_op <> 'd' ORDER BY id"
            ).fetchall()
        assert rows == postgres_rows(dsn, table, columns, ["id"]), table
        assert duplicate_positions(lake.uri, table, storage_options=lake.storage_options) == []


def kill_9(proc: subprocess.Popen[bytes], log: Path) -> None:
    assert proc.poll() is None, log.read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_9_embedded_pipeline_on_s3_again_and_again(
    pg_dsn: str, pg_conn: psycopg.Connection, s3_lake: S3Lake, tmp_path: Path
) -> None:
    create_bank(pg_conn)
    rng = random.Random(15)
    args = ("run", "--source", pg_dsn, "--name", "s3kill", "--flush-seconds", "0.3")
    with Workload(pg_dsn, seed=3) as workload:
        for round_ in range(4):
            log = tmp_path / f"run-{round_}.log"
            proc = run_process(s3_lake, *args, log=log)
            time.sleep(rng.uniform(2.0, 4.0))
            kill_9(proc, log)
        assert workload.transactions > 50
    # A last, clean run catches up with everything the killed ones left behind.
    log = tmp_path / "run-last.log"
    proc = run_process(s3_lake, *args, log=log)
    try:
        wait_streaming(pg_dsn, "s3kill", timeout=90)
        wait_captured(pg_dsn, "s3kill", timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert_bank_on(s3_lake, pg_dsn)


@pytest.mark.kafka
def test_two_sinks_and_the_jobs_share_an_s3_lake_under_kill_9(
    pg_dsn: str, pg_conn: psycopg.Connection, kafka_broker: str, s3_lake: S3Lake, tmp_path: Path
) -> None:
    create_bank(pg_conn)
    prefix, name = unique("s3k"), unique("s3k")
    group = f"{prefix}-g"
    capture = capture_thread(settings(kafka_broker, prefix, name, **{"source.dsn": pg_dsn}))
    lake_settings = {
        "lake.path": s3_lake.uri,
        "lake.storage_options": s3_lake.storage_options,
        "kafka.group": group,
    }
    steady = sink_thread(settings(kafka_broker, prefix, name, **lake_settings), "steady-sink")
    sink_args = (
        "sink", "--kafka", kafka_broker, "--group", group, "--topic-prefix", prefix,
        "--name", name,
    )  # fmt: skip
    jobs_done = {"compact": 0, "merge": 0}
    stop_jobs = threading.Event()
    job_failures: list[str] = []

    def jobs_loop() -> None:
        # `cdc jobs compact` and `merge` again and again beside the two sinks. A job that
        # loses every conflict retry exits 75 (temporary): only other codes are failures.
        env = s3_lake.env()
        while not stop_jobs.is_set():
            for job, extra in (("compact", ("--min-files", "2")), ("merge", ())):
                result = run_cdc("jobs", job, *extra, env=env)
                if result.returncode == 0:
                    jobs_done[job] += 1
                elif result.returncode != 75:
                    job_failures.append(result.stderr[-2000:])

    rng = random.Random(21)
    jobs = threading.Thread(target=jobs_loop, daemon=True)
    with background(capture):
        wait_streaming(pg_dsn, name, capture)
        with background(steady), Workload(pg_dsn, seed=5) as workload:
            jobs.start()
            for round_ in range(3):
                log = tmp_path / f"sink-{round_}.log"
                log.write_text("")
                proc = cdc_process(*sink_args, env=s3_lake.env(), log=log)
                wait_logged(log, "starts at", proc, timeout=90)
                time.sleep(rng.uniform(1.0, 3.0))
                kill_9(proc, log)
                capture.check()
                steady.check()
            workload.stop.set()
            workload.thread.join(30)
            assert workload.transactions > 50
            wait_captured(pg_dsn, name, capture, steady)
            wait_sunk(kafka_broker, prefix, group, capture, steady, timeout=180)
            stop_jobs.set()
            jobs.join(120)
    assert not job_failures, job_failures[0]
    assert jobs_done["compact"] >= 1 and jobs_done["merge"] >= 1, jobs_done
    # Every change is in the changelog exactly once (compaction rewrote files under the
    # sinks' appends without losing or doubling one).
    assert_changelog_state_is_postgres(s3_lake, pg_dsn)
    # And the current state, merged while the sinks wrote (each merge capped at the oldest
    # partition's mark), then once more with everything landed.
    ok(run_cdc("jobs", "merge", env=s3_lake.env()))
    assert_bank_on(s3_lake, pg_dsn)
