"""Peak memory of capture (``cdc run``) for one huge transaction: 200,000 rows vs 2,000,000.

Run it with ``python -m benchmarks.capture_memory`` (about two minutes). It starts a
throwaway PostgreSQL (:class:`cdc.local_postgres.LocalPostgres`) with
``logical_decoding_work_mem = 64MB``, so the server streams both transactions before they
commit (pgoutput protocol 2) and capture spills them to disk. For each size it creates a
slot, commits one INSERT transaction of that many rows, and runs ``cdc run --snapshot
never`` as a child process into a fresh lake until the slot is confirmed past the
transaction, then stops it with SIGTERM. The peak resident set size (``ru_maxrss`` from
``wait4``, the kernel's high-water mark for that one process) is the measurement; a
one-row transaction gives the fixed cost of the process for reference.

Capture is bounded when the 2M-row peak stays within 1.3 times the 200k-row peak (ten
times the rows). It prints one JSON line per measurement (``rows``, ``peak_rss_mib``,
``capture_seconds`` from the start of ``cdc run`` until the slot is confirmed,
``insert_seconds``, ``rows_in_lake``, and the server's ``pg_stat_replication_slots``
streaming counters), then the ratio, and writes everything to
``benchmarks/results/capture_memory.json``. The exit status is 1 when the ratio is above
the limit.

Hazard: the 2M-row transaction needs about 0.5 GB in the spill directory (the system
temporary directory, or ``--spill-dir``) and about 1 GB of WAL and table in the server's
directory under the temporary directory while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
from deltalake import DeltaTable

from catalog import lake_layout as layout
from cdc.local_postgres import LocalPostgres
from cdc.lsn import format_lsn, parse_lsn
from cdc.slots import ensure_publication

RESULTS = Path(__file__).parent / "results" / "capture_memory.json"
LIMIT = 1.3
SIZES = (200_000, 2_000_000)
TABLE = "public.events"


@dataclass
class Run:
    rows: int
    peak_rss_mib: float
    capture_seconds: float
    insert_seconds: float
    rows_in_lake: int
    streamed_transactions: int
    stream_blocks: int
    stream_mib: float


def _wait_confirmed(
    conn: psycopg.Connection, slot: str, lsn: int, proc: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + 1800
    while True:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            [slot],
        ).fetchone()
        if row and row[0] and parse_lsn(row[0]) >= lsn:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"cdc run exited early with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"slot {slot} not confirmed past {format_lsn(lsn)} in time")
        time.sleep(0.1)


def measure(dsn: str, rows: int, first_id: int, workdir: Path, spill_dir: str | None) -> Run:
    """Commit one ``rows``-row transaction, capture it with ``cdc run``, return its peak."""
    name = f"bench_{rows}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_publication(conn, name)
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [name])
        started = time.monotonic()
        with conn.transaction():
            # ~120 bytes a row on the wire: an int8 key, a timestamp, an int and short text.
            conn.execute(
                "INSERT INTO events SELECT g, now(), g %% 1000, md5(g::text) || '-' || md5((g * 7)::text) "
                "FROM generate_series(%s::bigint, %s::bigint) g",
                [first_id, first_id + rows - 1],
            )
        insert_seconds = time.monotonic() - started
        target = parse_lsn(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])  # type: ignore[index]

        lake = workdir / f"lake-{rows}"
        env = dict(os.environ)
        if spill_dir:
            env["CDC_SOURCE__SPILL_DIR"] = spill_dir
        started = time.monotonic()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cdc",
                "run",
                "--source",
                dsn,
                "--lake",
                str(lake),
                "--name",
                name,
                "--snapshot",
                "never",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_confirmed(conn, name, target, proc)
            capture_seconds = time.monotonic() - started
            proc.send_signal(signal.SIGTERM)
        except BaseException:
            proc.kill()
            raise
        finally:
            # wait4 reports the peak RSS of exactly this child (and of its own children).
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"cdc run exited with status {proc.returncode}")
        stats = conn.execute(
            "SELECT stream_txns, stream_count, stream_bytes FROM pg_stat_replication_slots "
            "WHERE slot_name = %s",
            [name],
        ).fetchone()
        conn.execute("SELECT pg_drop_replication_slot(%s)", [name])
        conn.execute(f"DROP PUBLICATION {name}")
    in_lake = DeltaTable(layout.changes_uri(str(lake), TABLE)).to_pyarrow_dataset().count_rows()
    if in_lake != rows:
        raise RuntimeError(f"{rows} rows committed but {in_lake} in the lake")
    assert stats is not None
    return Run(
        rows=rows,
        peak_rss_mib=round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
        capture_seconds=round(capture_seconds, 1),
        insert_seconds=round(insert_seconds, 1),
        rows_in_lake=in_lake,
        streamed_transactions=int(stats[0]),
        stream_blocks=int(stats[1]),
        stream_mib=round(int(stats[2]) / 2**20, 1),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.capture_memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--spill-dir", help="spill directory of cdc run (default: the temp dir)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    runs: list[Run] = []
    with (
        LocalPostgres(settings={"logical_decoding_work_mem": "64MB"}) as pg,
        tempfile.TemporaryDirectory(prefix="cdc-bench-") as tmp,
    ):
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz, kind int, note text)"
            )
        first_id = 1
        for rows in (1, *SIZES):
            run = measure(pg.dsn, rows, first_id, Path(tmp), args.spill_dir)
            first_id += rows
            runs.append(run)
            print(json.dumps(asdict(run)), flush=True)
    small, large = runs[1], runs[2]
    ratio = round(large.peak_rss_mib / small.peak_rss_mib, 3)
    result: dict[str, Any] = {
        "benchmark": "capture_memory",
        "description": "peak RSS of `cdc run` capturing one INSERT transaction",
        "logical_decoding_work_mem": "64MB",
        "limit": LIMIT,
        "ratio_2m_to_200k": ratio,
        "within_limit": ratio <= LIMIT,
        "runs": [asdict(r) for r in runs],
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratio_2m_to_200k": ratio, "limit": LIMIT, "output": str(args.output)}))
    return 0 if ratio <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
