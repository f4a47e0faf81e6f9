"""Peak memory of capture (``cdc run``) for one huge transaction: 200,000 rows vs 2,000,000.

Run it alone with ``python -m benchmarks.capture_memory`` (``python -m benchmarks`` runs it
with the rest). PostgreSQL's ``logical_decoding_work_mem`` is 64MB (its default, set
explicitly), so the server streams both transactions before they commit (pgoutput
protocol 2) and capture spills them to disk. For each size it creates a slot, commits one
INSERT transaction of that many rows, and runs ``cdc run --snapshot never`` as a child
process into a fresh lake until the slot is confirmed past the transaction, then stops it
with SIGTERM. The peak resident set size (``VmHWM``, the kernel's high-water mark for that
one process, read just before the SIGTERM) is the measurement; a one-row transaction gives the
fixed cost of the process for reference.

Capture is bounded when the 2M-row peak stays within 1.3 times the 200k-row peak (ten
times the rows). The result carries each run (``rows``, ``peak_rss_mib``,
``capture_seconds`` from the start of ``cdc run`` until the slot is confirmed,
``insert_seconds``, ``rows_in_lake``, and the server's ``pg_stat_replication_slots``
streaming counters) and the ratio.

Hazard: the 2M-row transaction needs about 0.5 GB in the spill directory (the system
temporary directory, or ``CDC_SOURCE__SPILL_DIR``) and about 1 GB of WAL and table in the
server's directory under the temporary directory while it runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import psycopg
from deltalake import DeltaTable

from benchmarks import _common as c
from catalog import lake_layout as layout

LIMIT = 1.3
SIZES = (200_000, 2_000_000)
TABLE = "public.events"
SERVER_SETTINGS = {"logical_decoding_work_mem": "64MB"}


def measure(dsn: str, rows: int, first_id: int, workdir: Path) -> dict[str, Any]:
    """Capture one committed ``rows``-row INSERT with a fresh ``cdc run``; its peak RSS."""
    name = f"bench_mem_{rows}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        c.drop_slot(conn, name)
        c.create_slot(conn, name)
        insert_seconds = c.insert_rows(conn, TABLE, rows, first_id=first_id)
        end = c.current_lsn(conn)
        peaks: list[float] = []
        capture_seconds = c.time_child(
            c.cdc_command(
                "run",
                *("--source", dsn, "--lake", str(workdir / f"lake-{rows}")),
                *("--name", name, "--snapshot", "never", "--tables", TABLE),
            ),
            lambda: c.confirmed_lsn(conn, name) >= end,
            what="cdc run",
            env={"CDC_SOURCE__PUBLICATION": "bench_mem", "CDC_SOURCE__SLOT": name},
            before_stop=lambda pid: peaks.append(c.peak_rss_mib(pid)),
        )
        stats = conn.execute(
            "SELECT stream_txns, stream_count, stream_bytes FROM pg_stat_replication_slots "
            "WHERE slot_name = %s",
            [name],
        ).fetchone()
        c.drop_slot(conn, name)
    in_lake = (
        DeltaTable(layout.changes_uri(str(workdir / f"lake-{rows}"), TABLE))
        .to_pyarrow_dataset()
        .count_rows()
    )
    if in_lake != rows:
        raise RuntimeError(f"{rows} rows committed but {in_lake} in the lake")
    assert stats is not None
    return {
        "rows": rows,
        "peak_rss_mib": peaks[0],
        "capture_seconds": round(capture_seconds, 1),
        "insert_seconds": round(insert_seconds, 1),
        "rows_in_lake": in_lake,
        "streamed_transactions": int(stats[0]),
        "stream_blocks": int(stats[1]),
        "stream_mib": round(int(stats[2]) / 2**20, 1),
    }


def run(dsn: str, workdir: Path) -> list[dict[str, Any]]:
    """The one-row reference and both sizes; one result with the ratio of the peaks."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        c.create_table(conn, TABLE, publication="bench_mem")
        setting = conn.execute("SHOW logical_decoding_work_mem").fetchone()
    runs = []
    first_id = 1
    for rows in (1, *SIZES):
        runs.append(measure(dsn, rows, first_id, workdir))
        first_id += rows
        print(json.dumps(runs[-1]), flush=True)
    small, large = runs[1], runs[2]
    result = {
        "measure": "capture_memory",
        "logical_decoding_work_mem": setting[0] if setting else None,
        "peak_rss_mib_200k": small["peak_rss_mib"],
        "peak_rss_mib_2m": large["peak_rss_mib"],
        "ratio": round(large["peak_rss_mib"] / small["peak_rss_mib"], 3),
        "target": LIMIT,
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
    return [result]


def main(argv: list[str] | None = None) -> int:
    return c.standalone_main(
        "python -m benchmarks.capture_memory",
        lambda dsn, workdir, args: run(dsn, workdir),
        passed=lambda results: all(r["ratio"] <= LIMIT for r in results),
        argv=argv,
        server_settings=SERVER_SETTINGS,
    )


if __name__ == "__main__":
    sys.exit(main())
