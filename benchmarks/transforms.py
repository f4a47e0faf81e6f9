"""The cost of transforms: ``cdc run`` with a chain of three rules against ``cdc run`` with
none, on the same committed WAL.

Run it alone with ``python -m benchmarks.transforms`` (``python -m benchmarks`` runs it with
the rest). The table is capture's (``bigint`` key, ``timestamptz``, ``int``, 65-char
``text``); the rules are three ``[[transforms.rules]]`` entries, each on the table:

1. ``mask = { note = "hash" }`` (HMAC-SHA256 of every row's text);
2. ``filter = "kind >= 0"`` (a SQL predicate over every row, which every row passes, so
   both sides write the same rows);
3. ``rename_columns = { at = "changed_at" }``.

Two loads, as in :mod:`benchmarks.capture`: ``insert`` (``--rows`` rows in one committed
transaction) and ``update`` (``--rows`` updates of those rows in transactions of 10,000).
Every slot is created before the loads, so each run decodes the same WAL from the same
start; the two sides alternate, ``ROUNDS`` times each. A run is timed from the start of
the child process until the slot's ``confirmed_flush_lsn`` (advanced only after the Delta
commits) reaches the load's end, and its CPU time (user + system, from ``getrusage`` of the
reaped child) is recorded too.

Two ratios, each "without rules over with rules" from the best run of each side:
``wall_ratio`` (rows/s, as the other throughput measures) and ``ratio``, from CPU time,
which is the one judged against the target (>= 0.90: the rules cost at most 10%). Capture is
one CPU-bound process, so its CPU time is what the rules add to; wall time on a shared
machine swings by 2x between identical runs (the load average is recorded with each
result), which would hide a 10% difference.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import _common as c

TARGET = 0.90
ROUNDS = 3
TABLE = "public.tf"
PUBLICATION = "bench_tf"
LOADS = ("insert", "update")

RULES = """
[transforms]
hash_key = "benchmark-key"

[[transforms.rules]]
tables = ["public.tf"]
mask = { note = "hash" }

[[transforms.rules]]
tables = ["public.tf"]
filter = "kind >= 0"

[[transforms.rules]]
tables = ["public.tf"]
rename_columns = { at = "changed_at" }
"""


def _update(conn: psycopg.Connection, rows: int) -> None:
    per_txn = 10_000
    for low in range(1, rows + 1, per_txn):
        with conn.transaction():
            conn.execute(
                "UPDATE tf SET kind = kind + 1, note = md5(note) || '-u' WHERE id >= %s AND id < %s",
                [low, low + per_txn],
            )


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cdc_run(dsn: str, slot: str, end: int, lake: Path, config: Path | None) -> tuple[float, float]:
    """Wall seconds until ``end`` is confirmed, and CPU seconds of the whole child."""
    argv = ["run", "--source", dsn, "--lake", str(lake), "--name", slot]
    argv += ["--snapshot", "never", "--tables", TABLE]
    if config is not None:
        argv += ["--config", str(config)]
    cpu = _child_cpu()
    with psycopg.connect(dsn, autocommit=True) as conn:
        wall = c.time_child(
            c.cdc_command(*argv),
            lambda: c.confirmed_lsn(conn, slot) >= end,
            what=f"cdc run ({'rules' if config else 'no rules'})",
            env={"CDC_SOURCE__PUBLICATION": PUBLICATION, "CDC_SOURCE__SLOT": slot},
        )
    return wall, _child_cpu() - cpu


def measure_load(dsn: str, workdir: Path, load: str, rows: int) -> dict[str, Any]:
    """Create every slot, run ``load``, then time both sides over the same WAL."""
    config = workdir / "rules.toml"
    config.write_text(RULES)
    sides = {"plain": None, "rules": config}
    slots = {(side, r): f"bench_tf_{load}_{side}_{r}" for side in sides for r in range(ROUNDS)}
    with psycopg.connect(dsn, autocommit=True) as conn:
        if load == "insert":
            c.create_table(conn, TABLE, publication=PUBLICATION)
        for slot in slots.values():
            c.drop_slot(conn, slot)
            c.create_slot(conn, slot)
        started = time.perf_counter()
        if load == "insert":
            c.insert_rows(conn, TABLE, rows)
        else:
            _update(conn, rows)
        load_s = time.perf_counter() - started
        end = c.current_lsn(conn)
        conn.execute("CHECKPOINT")
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {side: [] for side in sides}
    cpus: dict[str, list[float]] = {side: [] for side in sides}
    for r in range(ROUNDS):
        for side, cfg in sides.items():
            lake = workdir / f"lake-{load}-{side}-{r}"
            wall, cpu = _cdc_run(dsn, slots[side, r], end, lake, cfg)
            times[side].append(wall)
            cpus[side].append(cpu)
    load_after = os.getloadavg()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for slot in slots.values():
            c.drop_slot(conn, slot)
    plain_s, rules_s = min(times["plain"]), min(times["rules"])
    result = {
        "measure": f"transforms_{load}",
        "changes": rows,
        "rules": 3,
        "load_s": round(load_s, 2),
        "plain_runs_s": [round(t, 2) for t in times["plain"]],
        "rules_runs_s": [round(t, 2) for t in times["rules"]],
        "plain_cpu_s": [round(t, 2) for t in cpus["plain"]],
        "rules_cpu_s": [round(t, 2) for t in cpus["rules"]],
        "plain_rows_per_s": round(rows / plain_s),
        "rules_rows_per_s": round(rows / rules_s),
        "wall_ratio": c.ratio(plain_s, rules_s),
        "ratio": c.ratio(min(cpus["plain"]), min(cpus["rules"])),
        "target": TARGET,
        "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
    }
    print(json.dumps(result), flush=True)
    return result


def run(dsn: str, workdir: Path, rows: int) -> list[dict[str, Any]]:
    return [measure_load(dsn, workdir, load, rows) for load in LOADS]


def main(argv: list[str] | None = None) -> int:
    return c.rows_ratio_main("python -m benchmarks.transforms", run, target=TARGET, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
