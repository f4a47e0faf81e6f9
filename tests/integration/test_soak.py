"""The soak: ``cdc run`` for a long time under a steady writer, with ``cdc jobs compact`` and
``checkpoint`` beside it as a deployment runs them. Its memory (RSS) must stay flat, and at
the end the lake must equal PostgreSQL.

Run by ``make soak`` (20 minutes), never in CI: it is skipped unless ``CDC_SOAK_SECONDS``
says how long to run (``make soak CDC_SOAK_SECONDS=90`` for a short proof; the slope is
only judged from 10 minutes on). The RSS samples and their slope are printed and written
to ``$CDC_SOAK_REPORT`` (default ``soak-report.json`` in the working directory).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tests.plugins.cli import cdc_run, run_cdc
from tests.plugins.kafka_pipeline import wait_captured, wait_streaming
from tests.plugins.lake import assert_lake_matches_postgres, duplicate_positions
from tests.plugins.workload import create_bank

SECONDS = float(os.environ.get("CDC_SOAK_SECONDS") or 0)

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.soak,
    pytest.mark.skipif(SECONDS <= 0, reason="the soak runs with `make soak` (CDC_SOAK_SECONDS)"),
]

#: Transactions per second of the steady writer.
RATE = 40
#: RSS growth allowed after the warm-up, in MiB per minute. A leak of one event's worth of
#: memory per transaction (RATE/s) would be several MiB per minute.
MAX_SLOPE_MIB_PER_MIN = 1.0
#: Below this run time the warm-up (allocator arenas, the Delta snapshots' first growth)
#: dominates the slope: shorter runs prove the soak works and report, without judging.
JUDGED_FROM_SECONDS = 600


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(seconds, MiB)`` samples, in MiB per minute."""
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_m = sum(m for _, m in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    cov = sum((t - mean_t) * (m - mean_m) for t, m in samples)
    return cov / var * 60 if var else 0.0


def steady_writer(dsn: str, stop: threading.Event, counter: list[int]) -> None:
    """RATE transfers per second, each with two ledger rows; every 50th deletes ledger rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        i = 0
        next_at = time.monotonic()
        while not stop.is_set():
            i += 1
            a, b = 1 + i % 500, 1 + (i * 13) % 500
            with conn.transaction():
                conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id = %s", [a])
                conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s", [b])
                conn.execute(
                    "INSERT INTO ledger (account, amount) VALUES (%s, -1), (%s, 1)", [a, b]
                )
            if i % 50 == 0:
                conn.execute("DELETE FROM ledger WHERE id IN (SELECT min(id) FROM ledger)")
            counter[0] = i
            next_at += 1 / RATE
            time.sleep(max(0.0, next_at - time.monotonic()))


def maintenance(lake: str, stop: threading.Event, every: float, failures: list[str]) -> None:
    """`cdc jobs compact` and `checkpoint` every ``every`` seconds, as a deployment runs them:
    without them the live file count, and every Delta snapshot with it, grows without end."""
    while not stop.wait(every):
        for job in ("compact", "checkpoint"):
            result = run_cdc("jobs", job, "--lake", lake, timeout=300)
            if result.returncode not in (0, 75):  # 75: lost its conflict retries; next round
                failures.append(result.stderr[-2000:])


def test_cdc_run_memory_stays_flat_under_a_steady_writer(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str, tmp_path: Path
) -> None:
    create_bank(pg_conn)
    log = tmp_path / "soak.log"
    proc = subprocess.Popen(
        cdc_run(pg_dsn, lake_dir, flush_seconds=1.0),
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )
    stop = threading.Event()
    written = [0]
    writer = threading.Thread(target=steady_writer, args=(pg_dsn, stop, written), daemon=True)
    job_failures: list[str] = []
    jobs = threading.Thread(
        target=maintenance, args=(lake_dir, stop, max(30.0, SECONDS / 20), job_failures)
    )
    samples: list[tuple[float, float]] = []
    try:
        wait_streaming(pg_dsn, "test", timeout=90)
        writer.start()
        jobs.start()
        started = time.monotonic()
        interval = max(1.0, min(10.0, SECONDS / 60))
        while (elapsed := time.monotonic() - started) < SECONDS:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert writer.is_alive(), "the writer died"
            samples.append((elapsed, rss_mib(proc.pid)))
            time.sleep(interval)
        stop.set()
        writer.join(30)
        jobs.join(300)
        wait_captured(pg_dsn, "test", timeout=120)
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    assert proc.returncode == 0, log.read_text()[-3000:]

    # The first fifth is warm-up (imports, caches, the first Delta snapshots).
    steady = [s for s in samples if s[0] >= SECONDS / 5]
    slope = slope_per_minute(steady)
    report = {
        "seconds": SECONDS,
        "transactions": written[0],
        "rss_first_mib": round(steady[0][1], 1),
        "rss_last_mib": round(steady[-1][1], 1),
        "rss_max_mib": round(max(m for _, m in samples), 1),
        "rss_slope_mib_per_min": round(slope, 3),
        "samples": [(round(t, 1), round(m, 1)) for t, m in samples],
    }
    Path(os.environ.get("CDC_SOAK_REPORT", "soak-report.json")).write_text(
        json.dumps(report, indent=1)
    )
    print(f"\nsoak: {json.dumps({k: v for k, v in report.items() if k != 'samples'})}")
    assert written[0] > RATE * SECONDS * 0.5, "the writer fell far behind its rate"
    assert not job_failures, job_failures[0]
    if SECONDS >= JUDGED_FROM_SECONDS:
        assert slope < MAX_SLOPE_MIB_PER_MIN, report
    for table, columns in (
        ("public.accounts", ["id", "balance"]),
        ("public.ledger", ["id", "account", "amount"]),
    ):
        assert_lake_matches_postgres(pg_dsn, lake_dir, table, columns, ["id"])
        assert duplicate_positions(lake_dir, table) == []
