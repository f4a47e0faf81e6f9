"""Shared pieces of the benchmarks: child processes, slot polling, the machine's facts."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from cdc.lsn import format_lsn, parse_lsn

RESULTS_DIR = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on: ratios, not absolute times, carry over."""
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = (0.0, 0.0, 0.0)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def current_lsn(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return parse_lsn(row[0])


def create_slot(conn: psycopg.Connection, slot: str) -> None:
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])


def drop_slot(conn: psycopg.Connection, slot: str) -> None:
    conn.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
        [slot],
    )


def confirmed_lsn(conn: psycopg.Connection, slot: str) -> int:
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        [slot],
    ).fetchone()
    return parse_lsn(row[0]) if row and row[0] else 0


def wait_until(
    done: Callable[[], bool],
    proc: subprocess.Popen[bytes] | None,
    *,
    what: str,
    timeout: float = 1800,
    interval: float = 0.05,
) -> None:
    """Poll ``done`` until it holds; fail when ``proc`` exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while not done():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the child exited early with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: timed out")
        time.sleep(interval)


def wait_confirmed(
    conn: psycopg.Connection, slot: str, lsn: int, proc: subprocess.Popen[bytes] | None
) -> None:
    wait_until(
        lambda: confirmed_lsn(conn, slot) >= lsn,
        proc,
        what=f"slot {slot} confirmed past {format_lsn(lsn)}",
    )


def cdc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cdc", *args]


def spawn(argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        list(argv),
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop(proc: subprocess.Popen[bytes], *, timeout: float = 60) -> Any:
    """SIGTERM ``proc``, reap it; its ``rusage`` (``ru_maxrss`` is its peak RSS in KiB)."""
    if proc.returncode is not None:  # already reaped (it exited on its own)
        return None
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.05)


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0
