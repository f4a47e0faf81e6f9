"""kill -9 in scaled-out mode: capture, then a sink worker, killed again and again while a
workload runs. Afterwards the lake equals PostgreSQL and no change is in it twice."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from catalog.lake import Lake
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
from tests.plugins.lake import assert_lake_matches_postgres, duplicate_positions
from tests.plugins.workload import Workload, create_bank

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.slow]


def kill_9(proc: subprocess.Popen[bytes]) -> None:
    assert proc.poll() is None, (proc.stderr.read() if proc.stderr else b"").decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_lake_equals_bank(dsn: str, lake: str) -> None:
    assert (
        assert_lake_matches_postgres(dsn, lake, "public.accounts", ["id", "balance"], ["id"]) == 500
    )
    assert_lake_matches_postgres(dsn, lake, "public.ledger", ["id", "account", "amount"], ["id"])
    for table in ("public.accounts", "public.ledger"):
        assert duplicate_positions(lake, table) == []
    with Lake(lake) as lk:
        # Money is conserved: the current state is a consistent whole.
        assert lk.sql("SELECT sum(balance) FROM public.accounts").fetchone() == (500 * 1000,)


def test_kill_9_capture_again_and_again(
    pg_dsn: str, pg_conn: psycopg.Connection, kafka_broker: str, tmp_path: Path
) -> None:
    create_bank(pg_conn)
    prefix, name, lake = unique("kc"), unique("kc"), str(tmp_path / "lake")
    group = f"{prefix}-g"
    sink_settings = settings(
        kafka_broker, prefix, name, **{"lake.path": lake, "kafka.group": group}
    )
    rng = random.Random(4)
    capture_args = [
        "capture",
        "--source",
        pg_dsn,
        "--kafka",
        kafka_broker,
        "--topic-prefix",
        prefix,
        "--name",
        name,
        # Long enough that each kill lands while sent changes still wait for their
        # confirmation, which the re-send assertion at the end relies on.
        "--flush-seconds",
        "1.5",
    ]
    sinks = (sink_thread(sink_settings, "sink-a"), sink_thread(sink_settings, "sink-b"))
    with background(*sinks), Workload(pg_dsn, seed=7) as workload:
        for round_ in range(4):
            log = tmp_path / f"capture-{round_}.log"
            log.write_text("")
            proc = cdc_process(*capture_args, log=log)
            # Killed while streaming, not during the initial snapshot (which a loaded
            # machine can stretch past the sleep): a killed snapshot is redone at a new
            # position, so it re-sends nothing that the sinks could drop.
            wait_logged(log, "streaming from slot", proc)
            time.sleep(rng.uniform(2.0, 4.0))
            kill_9(proc)
            for s in sinks:
                s.check()
        workload.stop.set()
        workload.thread.join(30)
        assert workload.transactions > 50
        # A last, clean capture sends what the killed ones left behind.
        capture = capture_thread(settings(kafka_broker, prefix, name, **{"source.dsn": pg_dsn}))
        with background(capture):
            wait_streaming(pg_dsn, name, capture, *sinks)
            wait_captured(pg_dsn, name, capture, *sinks)
            wait_sunk(kafka_broker, prefix, group, capture, *sinks)
    assert_lake_equals_bank(pg_dsn, lake)
    # The restarted captures re-sent what their predecessors had sent but not confirmed:
    # the sinks received more changes than they wrote, and dropped the rest by position.
    metrics = [s.result for s in sinks if s.result is not None]
    received = sum(m["messages"] - m["tombstones"] for m in metrics)
    assert received > sum(m["rows_written"] for m in metrics)


def test_kill_9_a_sink_again_and_again_the_other_takes_over(
    pg_dsn: str, pg_conn: psycopg.Connection, kafka_broker: str, tmp_path: Path
) -> None:
    create_bank(pg_conn)
    prefix, name, lake = unique("ks"), unique("ks"), str(tmp_path / "lake")
    group = f"{prefix}-g"
    capture = capture_thread(settings(kafka_broker, prefix, name, **{"source.dsn": pg_dsn}))
    steady = sink_thread(
        settings(kafka_broker, prefix, name, **{"lake.path": lake, "kafka.group": group}),
        "steady-sink",
    )
    sink_args = [
        "sink",
        "--kafka",
        kafka_broker,
        "--lake",
        lake,
        "--group",
        group,
        "--topic-prefix",
        prefix,
        "--name",
        name,
    ]
    rng = random.Random(9)
    with background(capture):
        wait_streaming(pg_dsn, name, capture)
        with background(steady), Workload(pg_dsn, seed=11) as workload:
            for round_ in range(4):
                log = tmp_path / f"sink-{round_}.log"
                log.write_text("")
                proc = cdc_process(*sink_args, log=log)
                # Killed while it owns partitions and commits them: once it was assigned
                # some, after a random part of a few flush intervals.
                wait_logged(log, "starts at", proc)
                time.sleep(rng.uniform(0.5, 3.0))
                kill_9(proc)
                assert "commits" not in log.read_text()  # no clean exit printed metrics
                capture.check()
                steady.check()
            workload.stop.set()
            workload.thread.join(30)
            assert workload.transactions > 50
            wait_captured(pg_dsn, name, capture, steady)
            # The killed worker's partitions come back to the steady one after its session
            # times out; it resumes them from the offsets recorded in Delta.
            wait_sunk(kafka_broker, prefix, group, capture, steady)
    assert_lake_equals_bank(pg_dsn, lake)
    # Each time the other worker joined, partitions moved (a death and the next join may
    # share one rebalance).
    assert steady.result is not None and steady.result["rebalances"] >= 5
