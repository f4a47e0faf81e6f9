"""Shared pieces of the benchmarks: child processes, slot polling, the machine's facts."""

from __future__ import annotations

import argparse
import compileall
import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from cdc.cli.local_postgres import LocalPostgres
from cdc.core.lsn import format_lsn, parse_lsn
from cdc.postgres.slots import ensure_publication
from sinks.position_store import LakePositionStore

RESULTS_DIR = Path(__file__).parent / "results"
#: Our packages, whose start-up every measure times.
PACKAGES = ("cdc", "sinks", "catalog", "jobs", "transforms")


def compile_sources() -> None:
    """Write the bytecode of our packages, as ``pip install`` does for an installed package.

    An editable install has none until Python writes it on a first import, and it never
    does with ``PYTHONDONTWRITEBYTECODE`` set (as in some shells and CI images): every
    ``cdc`` child would then compile our sources again as it starts, 0.05-0.15 s of CPU
    that no installed copy pays. ``compileall`` writes it whatever that variable says.
    """
    root = Path(__file__).resolve().parent.parent
    for package in PACKAGES:
        compileall.compile_dir(root / package, quiet=1)


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


def snapshot_done(lake: Path, pipeline: str) -> bool:
    """Whether ``pipeline``'s position file in ``lake`` says its initial snapshot is done
    (it is saved only after the snapshot's last Delta commit)."""
    try:
        position = LakePositionStore(str(lake), pipeline).load()
    except (OSError, ValueError):  # not there yet, or caught mid-replace
        return False
    return position is not None and position.snapshot_done


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
            err = proc.stderr.read().decode(errors="replace")[-3000:] if proc.stderr else ""
            raise RuntimeError(
                f"{what}: the child exited early with status {proc.returncode}:\n{err}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: timed out")
        time.sleep(interval)


def cdc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cdc", *args]


def spawn(argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        list(argv),
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def peak_rss_mib(pid: int) -> float:
    """The peak resident set size of the live process ``pid`` (``VmHWM``), in MiB.

    Not ``ru_maxrss`` from ``wait4``: Linux folds the parent's peak into the child's at
    ``exec``, so a child of a big benchmark process would report the parent's size.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds the live process ``pid`` has used so far (its threads
    included; not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen[bytes], *, timeout: float = 60) -> None:
    """SIGTERM ``proc`` (a clean stop flushes and confirms) and reap it; SIGKILL after
    ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def time_child(
    argv: Sequence[str],
    done: Callable[[], bool],
    *,
    what: str,
    env: dict[str, str] | None = None,
    interval: float = 0.05,
    before_stop: Callable[[int], None] | None = None,
) -> float:
    """Seconds from starting ``argv`` until ``done()`` holds; then the child is stopped
    with SIGTERM (not timed). ``before_stop(pid)`` runs while the child is still alive.

    Raises:
        RuntimeError: the child exited early or did not stop cleanly; the message carries
            the end of its stderr.
    """
    started = time.perf_counter()
    proc = spawn(argv, env)
    try:
        wait_until(done, proc, what=what, interval=interval)
        seconds = time.perf_counter() - started
        if before_stop is not None:
            before_stop(proc.pid)
    except BaseException:
        proc.kill()
        raise
    finally:
        stop(proc)
    if proc.returncode != 0:
        err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
        raise RuntimeError(f"{what}: exited with status {proc.returncode}:\n{err}")
    return seconds


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0


# -- the benchmark table ---------------------------------------------------------------------
# One shape for every measure: a bigint key, a timestamptz, an int and a 65-character text.
WIDE_ROW_SQL = (
    "SELECT g, now(), g %% 1000, md5(g::text) || '-' || md5((g * 7)::text) "
    "FROM generate_series(%s::bigint, %s::bigint) g"
)


def create_table(conn: psycopg.Connection, table: str, *, publication: str | None = None) -> None:
    """(Re)create ``table`` (``schema.name``) empty, and publish it when ``publication`` is set."""
    conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.execute(
        f"CREATE TABLE {table} (id bigint PRIMARY KEY, at timestamptz, kind int, note text)"
    )
    if publication is not None:
        ensure_publication(conn, publication, tables=[table])


def insert_rows(conn: psycopg.Connection, table: str, rows: int, *, first_id: int = 1) -> float:
    """Insert ``rows`` rows in one committed transaction; its duration in seconds."""
    started = time.perf_counter()
    with conn.transaction():
        conn.execute(f"INSERT INTO {table} {WIDE_ROW_SQL}", [first_id, first_id + rows - 1])
    return time.perf_counter() - started


def pg_recvlogical(dsn: str, *, slot: str, publication: str, end: int) -> float:
    """Seconds ``pg_recvlogical`` takes to read ``slot`` up to ``end`` into /dev/null.

    It asks for the pgoutput options ``cdc`` itself asks for on PostgreSQL 14+ (protocol 2,
    streaming on), so the server does the same work for both readers: a large transaction
    is streamed to both, not spilled to disk for one of them.
    """
    started = time.perf_counter()
    subprocess.run(
        [
            "pg_recvlogical",
            "-d",
            dsn,
            "--slot",
            slot,
            "--start",
            "-o",
            "proto_version=2",
            "-o",
            "streaming=on",
            "-o",
            f"publication_names={publication}",
            "-f",
            "/dev/null",
            "--no-loop",
            "--endpos",
            format_lsn(end),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return time.perf_counter() - started


# -- running one measure alone ---------------------------------------------------------------
Measure = Callable[[str, Path, argparse.Namespace], list[dict[str, Any]]]


def standalone_main(
    prog: str,
    measure: Measure,
    *,
    passed: Callable[[list[dict[str, Any]]], bool],
    argv: list[str] | None = None,
    rows: int | None = None,
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    server_settings: dict[str, str] | None = None,
    kafka: bool | Callable[[argparse.Namespace], bool] = False,
) -> int:
    """The ``python -m benchmarks.<measure>`` entry point of every measure module.

    Parses ``argv`` (``--rows`` when ``rows`` is given, as its default, plus what
    ``arguments`` adds), starts a throwaway PostgreSQL server (with ``server_settings``)
    and, when ``kafka`` is true (or returns true for the parsed arguments), a memory-only
    Tansu broker whose address is ``args.bootstrap`` (``None`` otherwise), then calls
    ``measure(dsn, workdir, args)`` in a temporary directory. Exit status 0 when
    ``passed(results)``, else 1.
    """
    parser = argparse.ArgumentParser(prog=prog)
    if rows is not None:
        parser.add_argument("--rows", type=int, default=rows)
    if arguments is not None:
        arguments(parser)
    args = parser.parse_args(argv)
    compile_sources()
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(LocalPostgres(settings=server_settings))
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="cdc-bench-"))
        args.bootstrap = None
        if kafka(args) if callable(kafka) else kafka:
            from tests.plugins.kafka import TansuBroker

            args.bootstrap = stack.enter_context(TansuBroker()).bootstrap
        results = measure(pg.dsn, Path(tmp), args)
    return 0 if passed(results) else 1


def rows_ratio_main(
    prog: str,
    run: Callable[[str, Path, int], list[dict[str, Any]]],
    *,
    target: float,
    argv: list[str] | None = None,
) -> int:
    """:func:`standalone_main` for a measure of ``--rows`` rows (1,000,000 by default)
    whose results are ratios that must reach ``target``."""
    return standalone_main(
        prog,
        lambda dsn, workdir, args: run(dsn, workdir, args.rows),
        passed=lambda results: all(r["ratio"] >= target for r in results),
        argv=argv,
        rows=1_000_000,
    )
