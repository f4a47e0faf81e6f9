"""Faults a production pipeline meets, under a running writer: PostgreSQL crashing and
restarting under Kafka capture, the lake's object store refusing writes for a while, and the
broker going away and coming back. Each time nothing is lost or duplicated."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

import psycopg
import pytest

from cdc.cli.local_postgres import LocalPostgres
from cdc.core.lsn import parse_lsn
from tests.plugins.kafka import TansuBroker
from tests.plugins.kafka_pipeline import (
    Background,
    background,
    capture_thread,
    settings,
    sink_thread,
    unique,
    wait_captured,
    wait_streaming,
    wait_sunk,
)
from tests.plugins.lake import (
    assert_lake_matches_postgres,
    duplicate_positions,
    running_pipeline,
    wait_caught_up,
)
from tests.plugins.s3 import S3Lake
from tests.plugins.workload import Workload, create_bank

pytestmark = pytest.mark.postgres

LEDGER = ("public.ledger", ["id", "account", "amount"], ["id"])
ACCOUNTS = ("public.accounts", ["id", "balance"], ["id"])


class ResilientWriter:
    """Transfers between accounts, one transaction each, that outlive a PostgreSQL crash:
    a lost connection is reopened. Only committed transactions count (``committed``)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.committed = 0
        self.errors = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=2) as conn:
                    while not self.stop.is_set():
                        i += 1
                        a, b = 1 + i % 500, 1 + (i * 7) % 500
                        with conn.transaction():
                            conn.execute(
                                "UPDATE accounts SET balance = balance - 1 WHERE id = %s", [a]
                            )
                            conn.execute(
                                "UPDATE accounts SET balance = balance + 1 WHERE id = %s", [b]
                            )
                            conn.execute(
                                "INSERT INTO ledger (account, amount) VALUES (%s, -1), (%s, 1)",
                                [a, b],
                            )
                        self.committed += 1
                        time.sleep(0.005)
            except psycopg.OperationalError:
                self.errors += 1  # the server went away: reconnect once it is back
                time.sleep(0.2)

    def __enter__(self) -> ResilientWriter:
        self.thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop.set()
        self.thread.join(30)


def crash_postgres(server: LocalPostgres) -> None:
    """Immediate shutdown (SIGQUIT to the postmaster): no checkpoint, crash recovery on the
    next start, as after a power cut of the server process."""
    pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGQUIT)
    deadline = time.monotonic() + 30
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, "postmaster did not stop on SIGQUIT"
        time.sleep(0.05)


def assert_bank(dsn: str, lake: str, storage_options: dict[str, str] | None = None) -> None:
    for table, columns, key in (ACCOUNTS, LEDGER):
        assert_lake_matches_postgres(
            dsn, lake, table, columns, key, storage_options=storage_options
        )
        assert duplicate_positions(lake, table, storage_options=storage_options) == []


class CrashablePostgres:
    """A private PostgreSQL server (the session's is shared) that can crash and restart on
    the same port and data directory."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="cdc-pg-crash-"))
        self.servers = [LocalPostgres(base_dir=self.base)]

    @property
    def dsn(self) -> str:
        return self.servers[0].dsn

    def crash_and_restart(self) -> None:
        crash_postgres(self.servers[-1])
        time.sleep(1)
        restarted = LocalPostgres(base_dir=self.base, port=self.servers[0].port)
        self.servers.append(restarted)
        restarted.start()

    def __enter__(self) -> CrashablePostgres:
        self.servers[0].start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in reversed(self.servers):
            server.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def crash_under(writer: ResilientWriter, postgres: CrashablePostgres, *workers: Background) -> None:
    """Crash and restart PostgreSQL under ``writer``, then wait until the writer committed
    again and stop it."""
    time.sleep(2)
    postgres.crash_and_restart()
    committed = writer.committed
    deadline = time.monotonic() + 60
    while writer.committed < committed + 50:
        assert time.monotonic() < deadline, "the writer did not reconnect"
        for w in workers:
            w.check()
        time.sleep(0.1)
    writer.stop.set()
    writer.thread.join(30)
    assert writer.errors >= 1  # it did see the crash


def test_postgres_crash_and_restart_under_cdc_run_and_a_writer(lake_dir: str) -> None:
    with CrashablePostgres() as postgres:
        dsn = postgres.dsn
        with psycopg.connect(dsn, autocommit=True) as conn:
            create_bank(conn)
        with running_pipeline(dsn, lake_dir) as pipeline, ResilientWriter(dsn) as writer:
            crash_under(writer, postgres)
            wait_caught_up(pipeline, dsn, timeout=120)
            assert pipeline.metrics["reconnects"] >= 1
        assert_bank(dsn, lake_dir)


@pytest.mark.kafka
def test_postgres_crash_and_restart_under_kafka_capture_and_a_writer(
    kafka_broker: str, tmp_path: Path
) -> None:
    with CrashablePostgres() as postgres:
        dsn = postgres.dsn
        with psycopg.connect(dsn, autocommit=True) as conn:
            create_bank(conn)
        prefix, name, lake = unique("pgc"), unique("pgc"), str(tmp_path / "lake")
        group = f"{prefix}-g"
        capture = capture_thread(settings(kafka_broker, prefix, name, **{"source.dsn": dsn}))
        sink = sink_thread(
            settings(kafka_broker, prefix, name, **{"lake.path": lake, "kafka.group": group})
        )
        with background(capture):
            wait_streaming(dsn, name, capture)
            with background(sink), ResilientWriter(dsn) as writer:
                crash_under(writer, postgres, capture, sink)
                wait_captured(dsn, name, capture, sink, timeout=120)
                wait_sunk(kafka_broker, prefix, group, capture, sink)
        assert capture.result is not None and capture.result["reconnects"] >= 1
        assert_bank(dsn, lake)


@pytest.mark.s3
def test_a_paused_object_store_stops_confirmation_then_resumes_without_loss(
    pg_dsn: str, pg_conn: psycopg.Connection, s3_lake: S3Lake, caplog: pytest.LogCaptureFixture
) -> None:
    create_bank(pg_conn)
    # Short request timeouts, so a hung store turns into errors (and retries) quickly.
    options = {
        **s3_lake.storage_options,
        "timeout": "3s",
        "connect_timeout": "2s",
        "max_retries": "1",
        "retry_timeout": "5s",
    }
    caplog.set_level(logging.WARNING)
    with (
        running_pipeline(pg_dsn, s3_lake.uri, **{"lake.storage_options": options}) as pipeline,
        Workload(pg_dsn, seed=13) as workload,
    ):
        wait_caught_up(pipeline, pg_dsn)
        before = parse_lsn(
            pg_conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]  # type: ignore[index]
        )
        s3_lake.server.pause()
        try:
            deadline = time.monotonic() + 90
            while pipeline.metrics["retries"] < 1:
                assert time.monotonic() < deadline, "the failing store was not retried"
                time.sleep(0.2)
            confirmed = pg_conn.execute(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                "WHERE slot_name = 'test'"
            ).fetchone()
            # Nothing written during the outage is confirmed to PostgreSQL.
            assert confirmed is not None and parse_lsn(confirmed[0]) <= before
        finally:
            s3_lake.server.resume()
        workload.stop.set()
        workload.thread.join(30)
        wait_caught_up(pipeline, pg_dsn, timeout=120)
    said = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert said, [r.getMessage() for r in caplog.records][-10:]
    # It says why: the table on the store that failed.
    bucket = s3_lake.uri.split("/")[2]
    assert any(bucket in m for m in said), said[:3]
    assert_bank(pg_dsn, s3_lake.uri, s3_lake.storage_options)


@pytest.mark.kafka
def test_the_broker_going_away_and_back_capture_and_sinks_wait_and_resume(
    pg_dsn: str, pg_conn: psycopg.Connection, tmp_path: Path
) -> None:
    create_bank(pg_conn)
    with TansuBroker() as broker:
        bootstrap = broker.bootstrap
        prefix, name, lake = unique("bk"), unique("bk"), str(tmp_path / "lake")
        group = f"{prefix}-g"
        capture = capture_thread(settings(bootstrap, prefix, name, **{"source.dsn": pg_dsn}))
        sinks = tuple(
            sink_thread(
                settings(bootstrap, prefix, name, **{"lake.path": lake, "kafka.group": group}),
                f"sink-{i}",
            )
            for i in range(2)
        )
        with background(capture):
            wait_streaming(pg_dsn, name, capture)
            with background(*sinks), Workload(pg_dsn, seed=17) as workload:
                time.sleep(3)
                broker.pause()  # a network cut: connections hang, nothing answers
                try:
                    time.sleep(8)
                    capture.check()
                    for s in sinks:
                        s.check()
                finally:
                    broker.resume()
                time.sleep(2)
                workload.stop.set()
                workload.thread.join(30)
                wait_captured(pg_dsn, name, capture, *sinks, timeout=120)
                wait_sunk(bootstrap, prefix, group, capture, *sinks, timeout=120)
    assert_bank(pg_dsn, lake)
