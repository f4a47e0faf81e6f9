"""Current-state query time as the changelog grows from 100k to 2M changes, before and after
``cdc jobs merge``.

Run it with ``python -m benchmarks.current_state`` (a few minutes; ``--quick`` for a smoke
run). It builds a synthetic lake in a temporary directory: a table keyed by a BIGINT with an
INTEGER and a 40-character VARCHAR, whose first 1,000,000 changes insert one key each and
whose later changes update (some leaving the VARCHAR "unchanged TOAST"), delete or re-insert
random keys, appended in commits of 50,000 changes. So the table holds 100k rows at 100k
changes and about 900k at 2M. At each size it times, on one DuckDB connection with the lake's views:

* ``before_merge_s``: the current-state view computed from the changelog alone (what the
  view is before any merge), fetched whole as Arrow;
* ``merge_s``: ``cdc jobs merge`` folding the changes since the previous size;
* ``after_merge_s``: the view over the merged table plus the changes after its watermark
  (none, right after the merge);
* ``plain_scan_s``: a plain scan of the merged table's source columns, fetched as Arrow;
* ``tail_s``: the view again after 10,000 more changes land unmerged.

Each time is the median of ``--repeat`` runs (after one warm-up). The claim under test:
before the merge the time grows with the changelog; after it the view stays within 1.5x a
plain scan of the merged table (``ratio``). ``overhead_s`` (view minus plain scan) is the
part that does not depend on history: reading the changelog's Delta log and its newest
file, and planning the view; it dominates the ratio of small tables. Results go to
``benchmarks/results/current_state.json``; the exit status is 1 when a ratio exceeds 1.5.

The numbers are wall-clock times on a shared machine: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import write_deltalake

from catalog import lake_layout as layout
from catalog.current_state import current_state_sql, quote_literal
from catalog.duckdb_views import open_duckdb, register_views
from catalog.schema_registry import SchemaRegistry
from cdc.core.table_schema import ColumnSchema, TableSchema
from jobs.merge import merge

RESULTS = Path(__file__).parent / "results" / "current_state.json"
LIMIT = 1.5
SIZES = (100_000, 500_000, 1_000_000, 2_000_000)
KEYS = 1_000_000
COMMIT_ROWS = 50_000
TAIL = 10_000
TABLE = "public.bench"
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


def _changes(start: int, n: int, *, seed: int) -> pa.Table:
    """``n`` changes at LSNs ``start..start+n-1``: the first ``KEYS`` LSNs insert every key
    once (up to ``KEYS``); later ones update (60%, a third of them leaving the note unchanged), delete (20%)
    or re-insert (20%) a random key. A delete/re-insert of a key that is not there is
    harmless for the measurement: the view treats it like any change."""
    lsn = pa.array(range(start, start + n), pa.int64())
    if start < KEYS:
        assert start + n <= KEYS, "the insert phase is written in whole commits"
        ids = lsn
        ops = pa.array(["c"] * n)
        unchanged = pa.nulls(n, pa.list_(pa.string()))
    else:
        roll = pc.random(n, initializer=seed)
        ids = pc.cast(pc.floor(pc.multiply(pc.random(n, initializer=seed + 1), KEYS)), pa.int64())
        ops = pc.if_else(pc.less(roll, 0.6), "u", pc.if_else(pc.less(roll, 0.8), "d", "c")).cast(
            pa.string()
        )
        toast = pc.and_(pc.equal(ops, "u"), pc.less(roll, 0.2))
        unchanged = pc.if_else(
            toast,
            pa.scalar(["note"], pa.list_(pa.string())),
            pa.scalar(None, pa.list_(pa.string())),
        )
    note_values = pc.binary_join_element_wise(
        "note-", pc.cast(lsn, pa.string()), "-" + "x" * 28, ""
    )
    is_delete = pc.equal(ops, "d")
    note = pc.if_else(
        pc.or_(is_delete, pc.is_valid(unchanged)), pa.scalar(None, pa.string()), note_values
    )
    qty = pc.if_else(
        is_delete, pa.scalar(None, pa.int32()), pc.cast(pc.bit_wise_and(lsn, 1023), pa.int32())
    )
    # Ten thousand changes a minute of commit time: the 2M changes span several days.
    ts = pa.array(
        [EPOCH + timedelta(milliseconds=6 * i) for i in range(start, start + n)],
        pa.timestamp("us", "UTC"),
    )
    return pa.table(
        {
            "id": ids,
            "qty": qty,
            "note": note,
            layout.OP: ops,
            layout.LSN: lsn,
            layout.SEQ: pa.array([0] * n, pa.int64()),
            layout.TXID: lsn,
            layout.COMMIT_TS: ts,
            layout.INGESTED_AT: ts,
            layout.UNCHANGED_TOAST: unchanged,
            layout.DATE: pc.cast(ts, pa.date32()),
        }
    )


def _append(lake: str, start: int, n: int) -> int:
    uri = layout.changes_uri(lake, TABLE)
    end = start + n
    while start < end:
        step = min(COMMIT_ROWS, end - start)
        write_deltalake(
            uri,
            _changes(start, step, seed=start),
            mode="append",
            partition_by=list(layout.PARTITION_COLUMNS),
        )
        start += step
    return end


def _fetch(con: duckdb.DuckDBPyConnection, sql: str) -> Callable[[], Any]:
    """Run ``sql`` and fetch its whole result as Arrow, as ``Lake.current`` does."""
    return lambda: con.sql(sql).to_arrow_table()


def _time(run: Callable[[], Any], repeat: int) -> float:
    run()  # warm-up: file system cache, DuckDB's metadata cache
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _side_by_side(runs: dict[str, Callable[[], Any]], repeat: int) -> dict[str, dict[str, float]]:
    """Median wall-clock and CPU seconds of each query, the queries interleaved round by
    round so that a burst of load on a shared machine hits them alike. CPU time (all of the
    process's threads) counts the work done, which other processes' load barely changes."""
    for run in runs.values():
        run()  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            c, t = time.process_time(), time.perf_counter()
            run()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {
        name: {"wall_s": statistics.median(wall[name]), "cpu_s": statistics.median(cpu[name])}
        for name in runs
    }


def measure(lake: str, sizes: tuple[int, ...], repeat: int) -> list[dict[str, Any]]:
    SchemaRegistry(lake).register(
        TableSchema(
            "public",
            "bench",
            (
                ColumnSchema("id", 20, is_key=True),
                ColumnSchema("qty", 23),
                ColumnSchema("note", 25),
            ),
        )
    )
    con = open_duckdb()
    rows: list[dict[str, Any]] = []
    written = 0
    current = layout.current_uri(lake, TABLE)
    for size in sizes:
        written = _append(lake, written, size - written)
        [info] = register_views(con, lake)
        types = {
            str(r[0]): str(r[1])
            for r in con.execute(
                f"DESCRIBE SELECT * FROM delta_scan({quote_literal(info.changes_uri)})"
            ).fetchall()
        }
        changelog_only = current_state_sql(info.changes_view, types, info.key_columns)
        before = _time(_fetch(con, changelog_only), repeat)

        started = time.perf_counter()
        merge(lake)
        merge_s = time.perf_counter() - started

        register_views(con, lake)  # the view now reads the merged table
        view = f"SELECT * FROM {info.current_view}"
        plain = f"SELECT id, qty, note FROM delta_scan({quote_literal(current)})"
        timed = _side_by_side({"view": _fetch(con, view), "scan": _fetch(con, plain)}, repeat)
        after, scan = timed["view"]["wall_s"], timed["scan"]["wall_s"]
        live_rows = con.sql(f"SELECT count(*) FROM {info.current_view}").fetchone()
        row = {
            "changes": size,
            "live_rows": live_rows[0] if live_rows else None,
            "before_merge_s": round(before, 4),
            "merge_s": round(merge_s, 3),
            "after_merge_s": round(after, 4),
            "plain_scan_s": round(scan, 4),
            "ratio": round(after / scan, 3),
            "cpu_ratio": round(timed["view"]["cpu_s"] / timed["scan"]["cpu_s"], 3),
            "overhead_s": round(after - scan, 4),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    # The same view with an unmerged tail: cost grows with the tail, not the history.
    written = _append(lake, written, TAIL)
    register_views(con, lake)
    timed = _side_by_side({"view": _fetch(con, view), "scan": _fetch(con, plain)}, repeat)
    tail = {
        "tail_changes": TAIL,
        "tail_s": round(timed["view"]["wall_s"], 4),
        "tail_plain_scan_s": round(timed["scan"]["wall_s"], 4),
        "tail_ratio": round(timed["view"]["wall_s"] / timed["scan"]["wall_s"], 3),
        "tail_cpu_ratio": round(timed["view"]["cpu_s"] / timed["scan"]["cpu_s"], 3),
        "tail_load_average": [round(x, 2) for x in os.getloadavg()],
    }
    rows[-1].update(tail)
    print(json.dumps(tail), flush=True)
    con.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per query (median)")
    parser.add_argument("--quick", action="store_true", help="100k and 200k changes only")
    parser.add_argument(
        "--sizes",
        type=lambda text: tuple(int(x) for x in text.split(",")),
        help="changelog sizes to measure, e.g. 1000000 (1M rows, then a 1%% unmerged tail)",
    )
    parser.add_argument("--lake", help="build the lake here (default: a temporary directory)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sizes = args.sizes or ((100_000, 200_000) if args.quick else SIZES)
    with tempfile.TemporaryDirectory(prefix="cdc-bench-") as tmp:
        lake = args.lake or os.path.join(tmp, "lake")
        rows = measure(lake, sizes, args.repeat)
    result = {
        "benchmark": "current_state",
        "claim": f"after merge, view time <= {LIMIT}x a plain scan of the merged table",
        "limit": LIMIT,
        "passed": all(r["ratio"] <= LIMIT for r in rows),
        "runs": rows,
        "machine": {
            "python": platform.python_version(),
            "duckdb": duckdb.__version__,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}; passed={result['passed']}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
