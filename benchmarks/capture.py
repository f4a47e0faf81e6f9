"""Streaming capture: ``cdc run`` against ``pg_recvlogical`` on the same committed WAL.

Run it alone with ``python -m benchmarks.capture`` (``python -m benchmarks`` runs it with
the rest). Two loads on one table (``bigint`` key, ``timestamptz``, ``int``, 65-char
``text``), each measured the same way:

* ``insert``: one committed transaction inserting ``--rows`` rows (1,000,000 by default);
* ``update_mix``: ``--rows`` changes in transactions of 10,000: 80% updates, 10% inserts,
  10% deletes.

Both slots (one for ``pg_recvlogical``, one for ``cdc run``) are created before the load,
so both readers decode exactly the same WAL from the same start. Then, one after the
other, each reader starts as a child process and is timed from its start until it has
reached the load's end LSN: ``pg_recvlogical --endpos`` (pgoutput with the options ``cdc run``
uses: proto_version 2, streaming on; output to /dev/null) until it exits; ``cdc run --snapshot never`` into a fresh lake until the
slot's ``confirmed_flush_lsn`` (which it advances only after the Delta commits) reaches
the end. The ratio is ``cdc run`` rows/s over ``pg_recvlogical`` rows/s; target >= 0.70.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from deltalake import DeltaTable

from benchmarks import _common as c
from catalog import lake_layout as layout

TARGET = 0.70
LOADS = ("insert", "update_mix")
TABLE = "public.cap"
PUBLICATION = "bench_cap"


def _update_mix(conn: psycopg.Connection, changes: int) -> None:
    """``changes`` changes over the rows the insert load left, in 10,000-change transactions."""
    per_txn = 10_000
    upd, ins = per_txn * 8 // 10, per_txn // 10
    row = conn.execute("SELECT coalesce(max(id), 0) FROM cap").fetchone()
    assert row is not None
    next_id = int(row[0]) + 1
    low = 1
    for _ in range(max(1, changes // per_txn)):
        with conn.transaction():
            conn.execute(
                "UPDATE cap SET kind = kind + 1, at = now(), note = md5(note) || '-u' "
                "WHERE id >= %s AND id < %s",
                [low + ins, low + ins + upd],
            )
            conn.execute("DELETE FROM cap WHERE id >= %s AND id < %s", [low, low + ins])
            conn.execute(
                f"INSERT INTO cap {c.WIDE_ROW_SQL}",
                [next_id, next_id + ins - 1],
            )
        low += ins + upd
        next_id += ins


def _cdc_run(dsn: str, slot: str, end: int, lake: Path) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return c.time_child(
            c.cdc_command(
                "run",
                *("--source", dsn, "--lake", str(lake), "--name", slot),
                *("--snapshot", "never", "--tables", TABLE),
            ),
            lambda: c.confirmed_lsn(conn, slot) >= end,
            what="cdc run",
            env={"CDC_SOURCE__PUBLICATION": PUBLICATION, "CDC_SOURCE__SLOT": slot},
        )


def measure_load(dsn: str, workdir: Path, load: str, rows: int) -> dict[str, Any]:
    """Create both slots, run ``load``, then time each reader over the same WAL."""
    recv_slot, cdc_slot = f"bench_{load}_recv", f"bench_{load}_cdc"
    with psycopg.connect(dsn, autocommit=True) as conn:
        if load == "insert":
            c.create_table(conn, TABLE, publication=PUBLICATION)
        for slot in (recv_slot, cdc_slot):
            c.drop_slot(conn, slot)
            c.create_slot(conn, slot)
        if load == "insert":
            load_s = c.insert_rows(conn, TABLE, rows)
        else:
            started = time.perf_counter()
            _update_mix(conn, rows)
            load_s = time.perf_counter() - started
        end = c.current_lsn(conn)
        conn.execute("CHECKPOINT")
    recv_s = c.pg_recvlogical(dsn, slot=recv_slot, publication=PUBLICATION, end=end)
    lake = workdir / f"lake-{load}"
    cdc_s = _cdc_run(dsn, cdc_slot, end, lake)
    in_lake = DeltaTable(layout.changes_uri(str(lake), TABLE)).to_pyarrow_dataset().count_rows()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for slot in (recv_slot, cdc_slot):
            c.drop_slot(conn, slot)
    result = {
        "measure": f"capture_{load}",
        "changes": rows,
        "rows_in_lake": in_lake,
        "load_s": round(load_s, 2),
        "pg_recvlogical_s": round(recv_s, 2),
        "cdc_run_s": round(cdc_s, 2),
        "pg_recvlogical_rows_per_s": round(rows / recv_s),
        "cdc_run_rows_per_s": round(rows / cdc_s),
        "ratio": c.ratio(recv_s, cdc_s),
        "target": TARGET,
    }
    print(json.dumps(result), flush=True)
    return result


def run(dsn: str, workdir: Path, rows: int) -> list[dict[str, Any]]:
    return [measure_load(dsn, workdir, load, rows) for load in LOADS]


def main(argv: list[str] | None = None) -> int:
    return c.rows_ratio_main("python -m benchmarks.capture", run, target=TARGET, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
