"""Freshness: how long after its PostgreSQL commit a row shows in the DuckDB current-state view.

Run it alone with ``python -m benchmarks.freshness`` (``--seconds`` of steady state per
configuration, 30 by default; ``--no-kafka`` skips Kafka mode). For each sink flush
interval (``--flush-seconds``: 1.0, the default of ``BatchSettings.max_seconds``, and 0.25):

* ``freshness_embedded``: ``cdc run --snapshot never --flush-seconds F`` as a child process
  into a fresh lake;
* ``freshness_kafka``: ``cdc capture`` (default options) and one ``cdc sink --flush-seconds
  F`` child process, through a memory-only Tansu broker.

Load: a fresh table ``public.fresh`` (``bigint`` primary key, ``timestamptz``, 100-char
``text``). A writer *process* (not a thread: the prober's Python work must not delay its
timestamps) commits ``rate / 100`` rows every 10 ms, one autocommit ``INSERT ... SELECT
generate_series`` per transaction, paced against a monotonic schedule (a late transaction
is sent at once, so the schedule does not drift; ``writer_max_behind_s`` says how late it
got). Ids run 1, 2, 3..., so transaction ``k`` holds a known id range. Per transaction it
records ``time.time()`` right after ``COMMIT`` returned. Its session runs with
``synchronous_commit = on`` (``--synchronous-commit``), PostgreSQL's default: the throwaway
server of :class:`~cdc.cli.local_postgres.LocalPostgres` turns it off, and then the WAL of a
commit reaches the walsender only at the WAL writer's next flush (``wal_writer_delay``,
200 ms), which a production server does not add.

Visibility: the benchmark process (the prober) holds one :class:`catalog.Lake` on the lake
(DuckDB ``threads=1``) and runs ``SELECT id FROM public.fresh WHERE id > W`` on the
current-state view, ``W`` being the largest id up to which every id was seen. It runs the
query as soon as the next Delta version's ``_delta_log/<version>.json`` exists (checked
every 5 ms; the view cannot change before), and every 5 s regardless; ``--probe-every S``
polls every S seconds instead, as a naive reader would. Each id gets the wall time at which
the query that first returned it *finished*, so the query time counts as part of "visible
in the view". The key filter reaches the Delta scan (files below ``W`` are skipped by
their statistics): a probe costs the Delta log replay plus the newest file. A full read of
the view (its cost grows with the changelog until ``cdc jobs merge``) is timed separately
at the end (``view_full_query_s``, ``SELECT count(*)`` over ``view_rows`` rows).

Latency of a transaction = the latest first-seen time of its ids - its commit time (in
Kafka mode its rows travel in several partitions and may land in different Delta
commits). The clock starts when the first row is visible; transactions committed in the
next ``--warmup`` seconds (5: consumer-group join, topic discovery, backlog) are not
sampled, those committed in the following ``--seconds`` are. Then the writer stops and the
prober waits until every sampled transaction is visible.

Each result has p50, p99, max and mean latency over the sampled transactions
(``samples``), the writer's achieved rate in the window (rows committed / window length),
and where the time went, from ``_cdc_ingested_at`` (when the sink started the flush that
wrote the row) and the Delta commit timestamps:

* ``to_flush``: commit -> flush start (replication, decoding, Kafka, and the batch waiting
  for its flush interval); ``flush_every_s`` is the mean time between flush starts;
* ``flush``: flush start -> its Delta commit (Parquet write and log commit);
* ``commit_to_visible``: Delta commit -> seen (the probe's detection delay and query time;
  ``probe_query_*`` is the query alone).

Also the Delta commits and data files written per minute in the window (the small-files
cost of the interval). Target: p99 <= 1.0 s in embedded mode (the exit status is 0 when
some measured interval meets it); Kafka mode is informational.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import multiprocessing
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
from deltalake import DeltaTable

from benchmarks import _common as c
from catalog import Lake
from catalog import lake_layout as layout
from catalog.errors import QueryError
from cdc.core.settings import BatchSettings

TARGET = 1.0
#: The flush interval the target is for: the default (``BatchSettings.max_seconds``). The
#: other intervals show the trade-off and have no target of their own.
TARGET_FLUSH_S = BatchSettings().max_seconds
TABLE = "public.fresh"
VIEW = '"public"."fresh"'
TICK = 0.01  # the writer commits one transaction every 10 ms
PAYLOAD = "x" * 100
FLUSH_INTERVALS = (1.0, 0.5, 0.25)
WARMUP = 5.0
WATCH_TICK = 0.005  # how often the prober looks for the next Delta log file
FALLBACK_QUERY = 5.0  # and queries anyway when no new version appeared for this long
READY_TIMEOUT = 60.0  # first row visible (Kafka mode: group join + topic discovery)
DRAIN_TIMEOUT = 60.0  # every sampled transaction visible after the writer stopped


# -- the writer (a child process) -----------------------------------------------------------


def _writer(
    dsn: str, batch: int, synchronous_commit: str, stop: EventType, out: Connection
) -> None:
    """Insert ``batch`` rows per transaction every ``TICK`` s until ``stop``; send back
    ``(commit wall times, seconds behind schedule)`` per transaction."""
    commits: list[float] = []
    behind: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SET synchronous_commit = {synchronous_commit}")
        insert = (
            "INSERT INTO fresh (id, committed_at, payload) "
            "SELECT g, clock_timestamp(), %s FROM generate_series(%s::bigint, %s::bigint) g"
        )
        start = time.monotonic()
        k = 0
        while not stop.is_set():
            due = start + k * TICK
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
                now = time.monotonic()
            conn.execute(insert, [PAYLOAD, k * batch + 1, (k + 1) * batch], prepare=True)
            commits.append(time.time())
            behind.append(now - due)
            k += 1
    out.send((commits, behind))
    out.close()


# -- child processes ------------------------------------------------------------------------


class _Child:
    """A ``cdc`` child process whose stderr is drained (a full pipe would stall it) and
    whose last lines are kept for the error message."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = c.spawn(argv, env=env)
        self.tail: collections.deque[bytes] = collections.deque(maxlen=40)
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.tail.append(line)

    def check(self, what: str) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{what} exited early with status {self.proc.returncode}:\n{self}")

    def stop(self) -> None:
        c.stop(self.proc)
        self._thread.join(5)

    def __str__(self) -> str:
        return b"".join(self.tail).decode(errors="replace")[-3000:]


def _slot_active(conn: psycopg.Connection, slot: str) -> bool:
    row = conn.execute(
        "SELECT active FROM pg_replication_slots WHERE slot_name = %s", [slot]
    ).fetchone()
    return bool(row and row[0])


def _reset_table(conn: psycopg.Connection) -> None:
    conn.execute("DROP TABLE IF EXISTS fresh")
    conn.execute(
        "CREATE TABLE fresh (id bigint PRIMARY KEY, committed_at timestamptz, payload text)"
    )


def _cleanup(conn: psycopg.Connection, name: str) -> None:
    c.wait_until(
        lambda: not _slot_active(conn, name), None, what=f"slot {name} released", timeout=30
    )
    c.drop_slot(conn, name)
    conn.execute(f"DROP PUBLICATION IF EXISTS {name}")


# -- the prober -----------------------------------------------------------------------------


class _Prober:
    """Queries the current-state view for the ids above the contiguous watermark ``W``.

    With ``every=None`` it queries as soon as the next Delta version's log file exists (a
    ``stat`` every ``WATCH_TICK``), and at least every ``FALLBACK_QUERY`` seconds; with a
    number, every ``every`` seconds whatever happened.
    """

    def __init__(self, lake: Lake, every: float | None) -> None:
        self.lake = lake
        self.every = every
        self.log_dir = Path(layout.changes_uri(lake.root, TABLE)) / "_delta_log"
        self.next_version = 0
        self.last_query = 0.0
        self.first_seen = np.full(1 << 16, np.nan)
        self.watermark = 0  # every id in 1..watermark has been seen
        self.top = 0  # the largest id seen
        self.query_s: list[tuple[float, float]] = []  # (finished at, seconds)
        self.empty_after_commit = 0  # a new Delta version, yet nothing new in the view

    def _version_file(self, version: int) -> Path:
        return self.log_dir / f"{version:020d}.json"

    def step(self) -> int:
        """Wait for the next reason to query, and query; how many ids were new (-1: no
        view yet)."""
        if self.every is not None:
            time.sleep(max(0.0, self.last_query + self.every - time.monotonic()))
            return self.probe()
        while True:
            if self._version_file(self.next_version).exists():
                while self._version_file(self.next_version + 1).exists():
                    self.next_version += 1
                self.next_version += 1
                new = self.probe()
                self.empty_after_commit += new == 0
                return new
            if time.monotonic() - self.last_query >= FALLBACK_QUERY:
                return self.probe()
            time.sleep(WATCH_TICK)

    def probe(self) -> int:
        """One query; returns how many ids it saw for the first time (-1: no view yet)."""
        self.last_query = time.monotonic()
        started = time.time()
        query = f"SELECT id FROM {VIEW} WHERE id > {self.watermark}"
        try:
            ids = self.lake.query(query)
        except QueryError:
            # The view appears with the sink's first Delta commit (version 0).
            self.lake.refresh()
            try:
                ids = self.lake.query(query)
            except QueryError:
                return -1
        seen_at = time.time()
        self.query_s.append((seen_at, seen_at - started))
        if ids.num_rows == 0:
            return 0
        idx = ids.column(0).to_numpy(zero_copy_only=False).astype(np.int64)
        top = int(idx.max())
        if top >= len(self.first_seen):
            grown = np.full(max(top + 1, 2 * len(self.first_seen)), np.nan)
            grown[: len(self.first_seen)] = self.first_seen
            self.first_seen = grown
        new = idx[np.isnan(self.first_seen[idx])]
        self.first_seen[new] = seen_at
        self.top = max(self.top, top)
        tail = np.isnan(self.first_seen[self.watermark + 1 : self.top + 1])
        self.watermark = self.top if not tail.any() else self.watermark + int(tail.argmax())
        return len(new)


def _pct(values: np.ndarray, q: float) -> float:
    return round(float(np.percentile(values, q)), 3) if len(values) else math.nan


def _analyse(
    lake: Lake,
    prober: _Prober,
    *,
    commits: np.ndarray,
    behind: np.ndarray,
    sampled: np.ndarray,
    batch: int,
    window: tuple[float, float],
    rate: int,
) -> dict[str, Any]:
    """Latencies of the ``sampled`` transactions and where they went."""
    seconds = window[1] - window[0]
    lo, hi = int(sampled[0]) * batch + 1, (int(sampled[-1]) + 1) * batch + 1
    committed = commits[sampled]
    seen = prober.first_seen[lo:hi].reshape(len(sampled), batch).max(axis=1)
    latency = seen - committed
    lake.connection.execute("RESET threads")
    # When the sink started the flush that wrote each row (one value per flush).
    rows = lake.query(
        f"SELECT id, epoch_us({layout.INGESTED_AT}) AS t FROM public.fresh_changes "
        f"WHERE id >= {lo} AND id < {hi}"
    )
    ingested = np.full(hi - lo, np.nan)
    ingested[rows.column("id").to_numpy() - lo] = rows.column("t").to_numpy() / 1e6
    flush_start = ingested.reshape(len(sampled), batch).max(axis=1)
    # The Delta commit of each flush: the first WRITE commit at or after its start.
    dt = DeltaTable(layout.changes_uri(lake.root, TABLE))
    writes = [h for h in dt.history() if h.get("operation") == "WRITE"]
    commit_at = np.sort(np.array([h["timestamp"] / 1000 for h in writes]))
    starts = np.unique(flush_start)
    flush_s = commit_at[np.minimum(np.searchsorted(commit_at, starts), len(commit_at) - 1)] - starts
    landed = commit_at[np.minimum(np.searchsorted(commit_at, flush_start), len(commit_at) - 1)]
    full_view = []
    for _ in range(3):
        t0 = time.perf_counter()
        view_rows = lake.query(f"SELECT count(*) FROM {VIEW}").column(0)[0].as_py()
        full_view.append(time.perf_counter() - t0)
    probe_s = np.array([s for at, s in prober.query_s if window[0] <= at < window[1]])
    commits_in_window = int(((commit_at >= window[0]) & (commit_at < window[1])).sum())
    adds = pa.table(dt.get_add_actions(flatten=True))
    mtime = adds.column("modification_time").cast(pa.int64()).to_numpy() / 1000
    files_in_window = int(((mtime >= window[0]) & (mtime < window[1])).sum())
    return {
        "rate_target": rate,
        "rate_achieved": round(len(sampled) * batch / seconds),
        "writer_rows_per_txn": batch,
        "writer_max_behind_s": round(float(behind[sampled].max()), 3),
        "p50_s": _pct(latency, 50),
        "p99_s": _pct(latency, 99),
        "max_s": round(float(latency.max()), 3),
        "mean_s": round(float(latency.mean()), 3),
        "samples": len(sampled),
        "to_flush_p50_s": _pct(flush_start - committed, 50),
        "to_flush_p99_s": _pct(flush_start - committed, 99),
        "flush_p50_s": _pct(flush_s, 50),
        "flush_p99_s": _pct(flush_s, 99),
        "flush_every_s": round(float(np.diff(starts).mean()), 3) if len(starts) > 1 else None,
        "commit_to_visible_p50_s": _pct(seen - landed, 50),
        "commit_to_visible_p99_s": _pct(seen - landed, 99),
        "probe_every_s": prober.every,
        "probe_queries_per_s": round(len(probe_s) / seconds, 1),
        "probe_empty_after_commit": prober.empty_after_commit,
        "probe_query_p50_s": _pct(probe_s, 50),
        "probe_query_p99_s": _pct(probe_s, 99),
        "delta_commits_per_min": round(commits_in_window * 60 / seconds, 1),
        "data_files_per_min": round(files_in_window * 60 / seconds, 1),
        "view_rows": view_rows,
        "view_full_query_s": round(statistics.median(full_view), 3),
        # A busy machine (other jobs) shows here before it shows in the latencies.
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
    }


@dataclass(frozen=True)
class Load:
    """How one configuration is driven and observed."""

    seconds: float = 30.0  # the measured window
    warmup: float = WARMUP  # from the first visible row to the window
    rate: int = 5000  # rows/s the writer inserts
    probe_every: float | None = None  # None: query on each new Delta version
    synchronous_commit: str = "on"  # the writer's session setting


def _measure(
    dsn: str,
    lake_dir: Path,
    name: str,
    children: list[tuple[str, list[str], dict[str, str]]],
    load: Load,
) -> dict[str, Any]:
    """Start ``children`` (what, argv, env), run the load, probe; the measured facts."""
    batch = max(1, round(load.rate * TICK))
    ctx = multiprocessing.get_context("spawn")
    stop_writer = ctx.Event()
    receive, send = ctx.Pipe(duplex=False)
    started: list[_Child] = []
    writer = None

    def check_children() -> None:
        for child in started:
            child.check(name)
        if writer is not None and writer.exitcode not in (None, 0):
            raise RuntimeError(f"{name}: the writer exited with status {writer.exitcode}")

    with psycopg.connect(dsn, autocommit=True) as conn:
        _reset_table(conn)
        try:
            for what, argv, env in children:
                child = _Child(argv, env)
                started.append(child)
                if what in ("run", "capture"):
                    # --snapshot never streams from the slot's creation: write only after it.
                    c.wait_until(
                        lambda: _slot_active(conn, name), child.proc, what=f"{what} streaming"
                    )
            writer = ctx.Process(
                target=_writer, args=(dsn, batch, load.synchronous_commit, stop_writer, send)
            )
            writer.start()
            send.close()
            with Lake(str(lake_dir)) as lake:
                # One thread: the probe is small, and the pipeline needs the cores.
                lake.connection.execute("SET threads TO 1")
                prober = _Prober(lake, load.probe_every)
                deadline = time.monotonic() + READY_TIMEOUT
                while prober.step() <= 0:  # until the first row is visible
                    check_children()
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name}: no row visible after {READY_TIMEOUT} s")
                ready = time.time()
                window = (ready + load.warmup, ready + load.warmup + load.seconds)
                while time.time() < window[1]:
                    prober.step()
                stop_writer.set()
                commits_l, behind_l = receive.recv()
                writer.join()
                commits, behind = np.array(commits_l), np.array(behind_l)
                sampled = np.flatnonzero((commits >= window[0]) & (commits < window[1]))
                if len(sampled) == 0:
                    raise RuntimeError(f"{name}: no transaction committed in the window")
                last_id = (int(sampled[-1]) + 1) * batch
                deadline = time.monotonic() + DRAIN_TIMEOUT
                while prober.watermark < last_id:
                    prober.step()
                    check_children()
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"{name}: ids {prober.watermark + 1}..{last_id} not visible after "
                            f"{DRAIN_TIMEOUT} s"
                        )
                for child in reversed(started):
                    child.stop()
                facts = _analyse(
                    lake,
                    prober,
                    commits=commits,
                    behind=behind,
                    sampled=sampled,
                    batch=batch,
                    window=window,
                    rate=load.rate,
                )
                facts["writer_synchronous_commit"] = load.synchronous_commit
                return facts
        except BaseException:
            stop_writer.set()
            for child in started:
                if child.proc.returncode is None:
                    child.proc.kill()
                    child.proc.wait()
            for child in started:
                print(f"{name}: last output of {child.proc.args!r}:\n{child}", file=sys.stderr)
            raise
        finally:
            if writer is not None:
                writer.join(10)
                if writer.is_alive():
                    writer.kill()
            for child in started:
                if child.proc.returncode is None:
                    child.stop()
            _cleanup(conn, name)


def measure_embedded(dsn: str, workdir: Path, flush: float, load: Load) -> dict[str, Any]:
    """``cdc run`` into a fresh lake, committing every ``flush`` seconds."""
    name = f"fresh_emb_{round(flush * 1000)}"
    lake = workdir / f"lake-{name}"
    run_argv = c.cdc_command(
        "run",
        "--source",
        dsn,
        "--lake",
        str(lake),
        "--name",
        name,
        "--tables",
        TABLE,
        "--snapshot",
        "never",
        "--flush-seconds",
        str(flush),
    )
    facts = _measure(dsn, lake, name, [("run", run_argv, {})], load)
    target = TARGET if flush == TARGET_FLUSH_S else None
    return {"measure": "freshness_embedded", "flush_interval_s": flush, **facts, "target": target}


def measure_kafka(
    dsn: str, workdir: Path, bootstrap: str, flush: float, load: Load
) -> dict[str, Any]:
    """``cdc capture`` (default options) and one ``cdc sink`` committing every ``flush`` s."""
    name = f"fresh_kafka_{round(flush * 1000)}"
    lake = workdir / f"lake-{name}"
    capture = c.cdc_command(
        "capture",
        "--source",
        dsn,
        "--kafka",
        bootstrap,
        "--name",
        name,
        "--tables",
        TABLE,
        "--snapshot",
        "never",
    )
    sink = c.cdc_command(
        "sink",
        "--kafka",
        bootstrap,
        "--lake",
        str(lake),
        "--name",
        name,
        "--flush-seconds",
        str(flush),
    )
    # A consumer group joins in ~3 s with a 6 s session timeout (Tansu).
    sink_env = {"CDC_KAFKA__CONSUMER": json.dumps({"session.timeout.ms": 6000})}
    facts = _measure(dsn, lake, name, [("capture", capture, {}), ("sink", sink, sink_env)], load)
    return {"measure": "freshness_kafka", "flush_interval_s": flush, **facts, "target": None}


def run(
    dsn: str,
    workdir: Path,
    *,
    seconds: float,
    rate: int = 5000,
    bootstrap: str | None = None,
    flush_intervals: tuple[float, ...] = FLUSH_INTERVALS,
    warmup: float = WARMUP,
    probe_every: float | None = None,
    synchronous_commit: str = "on",
) -> list[dict[str, Any]]:
    """Embedded mode for each flush interval, then Kafka mode when ``bootstrap`` is given;
    prints one JSON line per result."""
    load = Load(seconds, warmup, rate, probe_every, synchronous_commit)
    results: list[dict[str, Any]] = []
    for flush in flush_intervals:
        results.append(measure_embedded(dsn, workdir, flush, load))
        print(json.dumps(results[-1]), flush=True)
    if bootstrap is not None:
        for flush in flush_intervals:
            results.append(measure_kafka(dsn, workdir, bootstrap, flush, load))
            print(json.dumps(results[-1]), flush=True)
    return results


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=30.0, help="measured steady state")
    parser.add_argument("--warmup", type=float, default=WARMUP)
    parser.add_argument("--rate", type=int, default=5000, help="rows/s the writer inserts")
    parser.add_argument(
        "--flush-seconds",
        type=float,
        nargs="+",
        default=list(FLUSH_INTERVALS),
        help="sink flush intervals to measure",
    )
    parser.add_argument(
        "--probe-every",
        type=float,
        default=None,
        help="query the view every N s instead of on each new Delta version",
    )
    parser.add_argument(
        "--synchronous-commit",
        default="on",
        choices=["on", "off", "local"],
        help="the writer's synchronous_commit (the local server defaults to off)",
    )
    parser.add_argument("--no-kafka", action="store_true", help="embedded mode only")


def main(argv: list[str] | None = None) -> int:
    return c.standalone_main(
        "python -m benchmarks.freshness",
        lambda dsn, workdir, args: run(
            dsn,
            workdir,
            seconds=args.seconds,
            rate=args.rate,
            bootstrap=args.bootstrap,
            flush_intervals=tuple(args.flush_seconds),
            warmup=args.warmup,
            probe_every=args.probe_every,
            synchronous_commit=args.synchronous_commit,
        ),
        # Success: the default interval meets the target in embedded mode.
        passed=lambda results: all(
            r["p99_s"] <= TARGET for r in results if r.get("target") is not None
        ),
        argv=argv,
        arguments=_arguments,
        kafka=lambda args: not args.no_kafka,
    )


if __name__ == "__main__":
    sys.exit(main())
