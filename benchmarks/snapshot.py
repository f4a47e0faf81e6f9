"""Initial snapshot: ``cdc run --snapshot initial`` into Delta against ``COPY ... TO STDOUT``.

Run it alone with ``python -m benchmarks.snapshot``. One table (``bigint`` key,
``timestamptz``, ``int``, 65-char ``text``, the shape of :mod:`benchmarks.capture`) is
loaded with ``--rows`` rows (1,000,000 by default) and checkpointed. Then, one after the
other, on that same table, each reader starts as a child process and is timed from its
start (process start-up included) until it is done:

* the physical limit: ``psql -d DSN -c "COPY public.snap TO STDOUT (FORMAT csv)"`` with
  its output sent to /dev/null, until it exits. CSV is what the snapshot itself asks the
  server for, so the server does the same work for both;
* ``cdc run --snapshot initial --tables public.snap`` into a fresh lake, until the
  pipeline's position file (``<lake>/_cdc/pipelines/<name>.json``, read with
  :class:`sinks.position_store.LakePositionStore`) says ``snapshot_done``. The pipeline saves that only
  after the final Delta commit of the copy, so every row is in the lake then. Polled every
  10 ms (a read of a small JSON file; at 50 ms the poll added 25 ms on average to a run
  of about 1.5 s); the process is then stopped with SIGTERM (not timed) and its slot
  dropped.

``rows_in_lake`` counts the rows of the changelog table afterwards (it must equal
``rows``). The ratio is ``cdc run`` rows/s over ``COPY`` rows/s; target >= 0.50. The
numbers are wall-clock times on a possibly shared machine: compare ratios, not absolutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from deltalake import DeltaTable

from benchmarks import _common as c
from catalog import lake_layout as layout

TARGET = 0.50
TABLE = "public.snap"
PIPELINE = "bench_snap"


def _load(conn: psycopg.Connection, rows: int) -> float:
    c.create_table(conn, TABLE)
    load_s = c.insert_rows(conn, TABLE, rows)
    # Hint bits and statistics set now, not during the first reader's scan.
    conn.execute("VACUUM (ANALYZE) snap")
    conn.execute("CHECKPOINT")
    return load_s


def _copy(dsn: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        ["psql", "-X", "-q", "-d", dsn, "-c", f"COPY {TABLE} TO STDOUT (FORMAT csv)"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return time.perf_counter() - started


def _cdc_run(dsn: str, lake: Path) -> float:
    return c.time_child(
        c.cdc_command(
            "run",
            *("--source", dsn, "--lake", str(lake), "--name", PIPELINE),
            *("--tables", TABLE, "--snapshot", "initial"),
        ),
        lambda: c.snapshot_done(lake, PIPELINE),
        what="cdc run snapshot",
        interval=0.01,
    )


def run(dsn: str, workdir: Path, rows: int) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        c.drop_slot(conn, PIPELINE)
        conn.execute(f"DROP PUBLICATION IF EXISTS {PIPELINE}")
        load_s = _load(conn, rows)
    copy_s = _copy(dsn)
    lake = workdir / "lake-snapshot"
    cdc_s = _cdc_run(dsn, lake)
    in_lake = DeltaTable(layout.changes_uri(str(lake), TABLE)).to_pyarrow_dataset().count_rows()
    with psycopg.connect(dsn, autocommit=True) as conn:
        c.drop_slot(conn, PIPELINE)
        conn.execute(f"DROP PUBLICATION IF EXISTS {PIPELINE}")
    if in_lake != rows:
        raise RuntimeError(f"the lake holds {in_lake} rows of {TABLE}, not {rows}")
    result = {
        "measure": "snapshot",
        "rows": rows,
        "rows_in_lake": in_lake,
        "load_s": round(load_s, 2),
        "copy_s": round(copy_s, 2),
        "cdc_run_s": round(cdc_s, 2),
        "copy_rows_per_s": round(rows / copy_s),
        "cdc_run_rows_per_s": round(rows / cdc_s),
        "ratio": c.ratio(copy_s, cdc_s),
        "target": TARGET,
    }
    print(json.dumps(result), flush=True)
    return [result]


def main(argv: list[str] | None = None) -> int:
    return c.rows_ratio_main("python -m benchmarks.snapshot", run, target=TARGET, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
