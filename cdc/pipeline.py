"""The capture pipeline: set-up, snapshot and streaming from PostgreSQL into one sink.

``cdc run`` (:func:`run_embedded`) gives it the Delta changelog writer: capture and the
lake in one process, no Kafka. ``cdc capture`` (:func:`run_capture`) gives it the Kafka
producer sink and keeps its position in Kafka.

Delivery: PostgreSQL is told an LSN is flushed only after the sink has made every change up
to it durable (the Delta commits, or Kafka's acknowledgements), and the lake drops changes
at or below each table's recorded (lsn, seq) watermark. A crash at any point therefore loses nothing (the slot
replays from the last confirmed LSN) and duplicates nothing (the replay is filtered).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
import pyarrow as pa

from catalog import lake_layout as layout
from catalog.commit_safety import require_safe_commits
from catalog.errors import CatalogError
from cdc.core.errors import ConfigError, TransientError
from cdc.core.events import ChangeEvent
from cdc.core.lsn import format_lsn
from cdc.core.position import CapturePosition, CommittedTransactions
from cdc.core.settings import Settings
from cdc.core.table_schema import TableSchema
from cdc.metrics import EventCounts, Metrics
from cdc.operations import Operations
from cdc.postgres.columnar import ChangeBatch
from cdc.postgres.errors import SlotLostError, SourceConnectionError, postgres_error
from cdc.postgres.incremental_snapshot import IncrementalSnapshots
from cdc.postgres.introspect import describe_tables
from cdc.postgres.protocol import compiled
from cdc.postgres.protocol.assembler import TransactionCommitted
from cdc.postgres.replication import ReplicationConnection, session_conninfo
from cdc.postgres.slots import (
    check_prerequisites,
    check_slot_usable,
    drop_slot,
    ensure_publication,
    get_slot,
    publication_pushdown,
    publishes_all_tables,
    push_down_transforms,
    slot_status,
)
from cdc.postgres.snapshot import SnapshotReader
from cdc.postgres.source_queries import SourceQueries
from cdc.postgres.streaming import StreamingSource, StreamItem
from sinks.base import PositionStore, Sink, SnapshotProgress
from sinks.delta_append import local_path
from sinks.delta_changelog import DeltaChangelogSink
from sinks.disk_sync import LakeDiskSync
from sinks.errors import SinkBackpressureError
from sinks.position_store import LakePositionStore

if TYPE_CHECKING:
    from transforms import Transforms

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: How long a failing Delta commit (or position-store write) is retried before the
#: pipeline stops with the error.
FLUSH_RETRY_SECONDS = 120.0

#: Rows (and items) per read in columnar mode: a batch of a table costs a fixed ~0.1 ms of
#: Arrow building, so fewer, larger batches; memory stays bounded by it all the same.
COLUMNAR_MAX_ITEMS = 20_000

#: ``cdc capture`` takes the columnar path too (rows to Kafka from Arrow batches, see
#: KafkaProducerSink.add_changes); False: one event per change, decoded in Python.
KAFKA_COLUMNAR = True


class _Stopped(Exception):
    """The stop event was set while the initial snapshot was copying."""


class CapturePipeline:
    """PostgreSQL -> one sink. Use :func:`run_embedded` or :func:`run_capture` unless you
    need the parts."""

    def __init__(
        self,
        settings: Settings,
        *,
        stop: threading.Event | None = None,
        progress: SnapshotProgress | None = None,
        sink: Sink | None = None,
        store: PositionStore | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """``sink`` and ``store`` default to the lake's Delta changelog writer and the lake's
        pipeline state; ``cdc capture`` passes Kafka ones instead. ``metrics`` receives the
        Prometheus metrics (see :mod:`cdc.metrics`)."""
        self.settings = settings
        self.dsn = settings.source_dsn()
        self.stop = stop or threading.Event()
        self.progress = progress
        self.lake = layout.normalize_root(settings.lake.path)
        self.storage_options = settings.lake.storage_options or None
        # A lake on a local disk is synced before PostgreSQL may forget what it holds.
        self._local_lake = local_path(self.lake) if sink is None else None
        if sink is None:
            require_safe_commits(self.lake, self.storage_options, writer="cdc run")
        self.sink: Sink = sink or DeltaChangelogSink(
            self.lake,
            app_id=f"cdc-lakehouse:{settings.name}",
            batch=settings.batch,
            storage_options=self.storage_options,
        )
        # Rules are checked here, before anything connects; each is checked against its
        # tables in prepare(). Behind the wrapper, no sink ever sees an untransformed value.
        self.transforms: Transforms | None = None
        self.transform_status: dict[str, Any] = {"rules": [], "pushdown": None}
        if settings.transforms.rules:
            # Imported here: the rules (and DuckDB behind them) are not loaded without rules.
            from sinks.transformed import TransformingSink
            from transforms import Transforms

            self.transforms = Transforms(settings.transforms, source=settings.config_file)
            self.sink = TransformingSink(
                self.sink, self.transforms, max_seconds=settings.batch.max_seconds
            )
        self.store: PositionStore = store or LakePositionStore(
            self.lake, settings.name, storage_options=self.storage_options
        )
        self.source = SourceQueries(self.dsn)
        self.position: CapturePosition | None = None
        self._held: list[StreamItem] = []
        # The transactions handed to the sink whose end is not confirmed yet (_durable_lsn).
        self._commits = CommittedTransactions()
        self._snapshots: IncrementalSnapshots | None = None
        self._all_tables = False
        self._tables: list[tuple[str, str]] = []
        self.metrics: dict[str, Any] = {
            "snapshot_rows": 0,
            "events": 0,
            "rows_written": 0,
            "commits": 0,
            "reconnects": 0,
            "retries": 0,
        }
        # Operations (cdc.operations, cdc.metrics): per-table event counts kept in _handle
        # at the cost of an identity check, and the commit time of the newest change of
        # each table not yet flushed.
        self.prometheus = metrics
        self.event_counts = EventCounts()
        if metrics is not None:
            metrics.event_counts.append(self.event_counts)
        self._counted: Any = None
        self._op_counts: dict[str, int] = {}
        self._last_event: Any = None
        self._unflushed_commits: dict[str, datetime] = {}
        self._flushed_counts: dict[str, int] = {}
        self._snapshot_unflushed: dict[str, int] = {}

    # -- start-up ---------------------------------------------------------------------------

    def prepare(self) -> tuple[CapturePosition, ReplicationConnection | None]:
        """Publication, slot and initial snapshot; returns the position to stream from.

        Returns the replication connection that created the slot, when it did, so streaming
        starts on it.
        """
        try:
            return self._prepare()
        except psycopg.Error as e:
            # Publications FOR ALL TABLES need a superuser, per-table ones table ownership:
            # a privilege error names the role (postgres_error).
            raise postgres_error(e, doing="setting up capture", dsn=self.dsn) from e

    def _prepare(self) -> tuple[CapturePosition, ReplicationConnection | None]:
        settings = self.settings
        conn = self.source.connection()
        check_prerequisites(conn)
        tables = ensure_publication(conn, settings.publication_name, tables=settings.source.tables)
        self._tables = tables
        self._all_tables = publishes_all_tables(conn, settings.publication_name)
        if self.transforms is not None:
            self._prepare_transforms(conn, tables)
        slot = get_slot(conn, settings.slot_name)
        if slot is not None:
            check_slot_usable(slot, conn)
        position = self._retry(self.store.load, f"reading the pipeline state {self.store.path}")
        state = slot_status(conn, settings.slot_name) if slot is not None else None
        if state is not None and state.lost:
            if self.prometheus is not None:
                self.prometheus.slot_lost.inc()
            if settings.ops.on_slot_lost != "resnapshot":
                raise self._slot_lost(
                    "is lost (wal_status 'lost'): PostgreSQL removed WAL it still needed "
                    "(max_slot_wal_keep_size)"
                )
            log.warning(
                "slot %s is lost; dropping it to copy every table again (--on-slot-lost "
                "resnapshot)",
                settings.slot_name,
                extra={"slot": settings.slot_name},
            )
            drop_slot(conn, settings.slot_name)
            slot = None

        if position is not None and not position.snapshot_done:
            # The previous run died while creating the slot or copying: start that over.
            log.warning("the previous run stopped during the initial snapshot; redoing it")
            if slot is not None:
                drop_slot(conn, settings.slot_name)
                slot = None
            if position.consistent_point is not None:
                self._discard_partial_snapshot(tables, position.snapshot_lsn)
            position = None

        if slot is not None:
            if position is None and settings.snapshot == "initial":
                raise ConfigError(
                    f"slot {settings.slot_name!r} exists but {self.store.path} has no record "
                    "of it, so the rows it does not replay would be missing. Drop the slot "
                    f"(SELECT pg_drop_replication_slot('{settings.slot_name}')) to start with "
                    "a fresh snapshot, or pass --snapshot never to stream from the slot only"
                )
            position = position or CapturePosition(slot=settings.slot_name, snapshot_done=True)
            position.flushed_lsn = slot.confirmed_flush_lsn or 0
            return position, None

        if position is not None and position.snapshot_done:
            if settings.ops.on_slot_lost == "resnapshot" and settings.snapshot == "initial":
                # Asked for: the gap cannot be streamed, so each table's changelog gets a
                # truncate, then a fresh copy; the current state is right and history says
                # what happened (never silently, see _record_gap).
                return self._create_slot_and_snapshot(tables, resnapshot=True)
            # Never re-created otherwise: a new slot starts at the current WAL position, so
            # the changes made since the last confirmed one would be skipped in silence.
            raise self._slot_lost("was dropped after this pipeline streamed from it")
        return self._create_slot_and_snapshot(tables)

    def _slot_lost(self, what: str) -> SlotLostError:
        """The error for a slot that is gone, saying how to start over."""
        copied = (self.position.snapshotted if self.position else None) or set()
        names = sorted({f"{s}.{t}" for s, t in self._tables} | copied)
        from sinks.transformed import TransformingSink

        sink = self.sink
        if isinstance(sink, TransformingSink):  # the lake holds the routed names
            routes = sink.transforms
            names = sorted({".".join(routes.output_name(*n.split(".", 1))) for n in names})
            sink = sink.inner
        if isinstance(sink, DeltaChangelogSink):
            tables = ", ".join(layout.table_dir(self.lake, n) for n in names)
        else:
            tables = ", ".join(names)
        return SlotLostError(
            f"replication slot {self.settings.slot_name!r} {what}; the changes it held are "
            "not recoverable from PostgreSQL, and the pipeline does not re-create it on its "
            "own, since that would skip them in silence. To start over with a fresh "
            f"snapshot, stop the pipeline, delete its state {self.store.path} and its tables "
            f"in the lake ({tables or 'none yet'}), then run it again; or run it with "
            "--on-slot-lost resnapshot, which drops the slot, creates a new one and copies "
            "every table again, recording the gap in each changelog as a truncate"
        )

    def _prepare_transforms(self, conn: psycopg.Connection, tables: list[tuple[str, str]]) -> None:
        """Check every rule against the captured tables' shapes (a rule naming a missing
        column stops start-up), push down what the publication can leave out, log both."""
        assert self.transforms is not None
        schemas = describe_tables(conn, tables)
        self.transforms.validate(schemas.values())
        pushdown: dict[str, Any] = {"skipped": "the publication is not the pipeline's own"}
        if self.settings.source.publication is None:
            # Only operations every table skips can leave the publication's publish list.
            skipped = set("cudt")
            drops: dict[tuple[str, str], list[str]] = {}
            for key, schema in schemas.items():
                skipped &= self.transforms.skipped_operations(*key)
                plan = self.transforms.plan(schema)
                if plan is not None and plan.unread_drops:
                    drops[key] = list(plan.unread_drops)
            pushdown = push_down_transforms(
                conn, self.settings.publication_name, skipped_ops=skipped, column_drops=drops
            )
        self.transform_status = {"rules": self.transforms.describe(), "pushdown": pushdown}
        for rule in self.transforms.rules:
            log.info("transform rule %s: %s", rule.where, rule.describe())
        log.info("transforms pushed down to the publication: %s", pushdown)

    def _create_slot_and_snapshot(
        self, tables: list[tuple[str, str]], *, resnapshot: bool = False
    ) -> tuple[CapturePosition, ReplicationConnection]:
        settings = self.settings
        position = CapturePosition(slot=settings.slot_name)
        # Saved before the slot exists, so a crash right after creating it is recognised.
        self._save(position)
        repl = ReplicationConnection(self.dsn)
        created = repl.create_slot(
            settings.slot_name, export_snapshot=settings.snapshot == "initial"
        )
        if created is None:
            repl.close()
            raise SourceConnectionError(
                f"slot {settings.slot_name!r} was created concurrently by another process"
            )
        position.consistent_point = created.consistent_point
        position.flushed_lsn = created.consistent_point
        self._save(position)
        log.info(
            "created slot %s at %s",
            settings.slot_name,
            format_lsn(created.consistent_point),
            extra={"slot": settings.slot_name, "lsn": format_lsn(created.consistent_point)},
        )
        if settings.snapshot == "initial":
            try:
                self._snapshot(tables, created.snapshot_name, position, resnapshot=resnapshot)
            except BaseException:
                repl.close()
                raise
            position.snapshotted = {f"{schema}.{table}" for schema, table in tables}
        position.snapshot_done = True
        self._save(position)
        return position, repl

    def _snapshot(
        self,
        tables: list[tuple[str, str]],
        snapshot_name: str | None,
        position: CapturePosition,
        *,
        resnapshot: bool = False,
    ) -> None:
        with self.source.lookup("describing the tables to snapshot") as conn:
            schemas = describe_tables(conn, tables)
        read_at = datetime.now(UTC)
        lsn = position.snapshot_lsn
        copied: dict[str, int] = {}
        with SnapshotReader(self.dsn, snapshot_name) as reader:
            for key in tables:
                schema = schemas.get(key)
                if schema is None:
                    continue  # dropped since the publication was read
                name = schema.qualified_name
                estimate = reader.estimate_rows(schema) if self.progress else None
                # The COPY starts first: the server copies while the sink gets its table
                # ready (for the Delta sink, 0.03-0.05 s of creating it and starting the
                # write), and the reader thread drains it without the GIL meanwhile.
                with contextlib.closing(reader.start_table(schema)) as batches:
                    self.sink.ensure_table(schema)
                    if resnapshot:
                        self._record_gap(schema, lsn, read_at)
                    if self.progress:
                        self.progress.table_started(name, estimate)
                    with contextlib.closing(self._copied(name, batches, copied)) as rows:
                        written = self.sink.add_initial_snapshot(
                            schema, rows, lsn=lsn, read_at=read_at, flush=self._flush
                        )
                if written["commits"]:  # the sink wrote the rows as they came: as for a flush
                    self.metrics["rows_written"] += written["rows"]
                    self.metrics["commits"] += written["commits"]
                    self._flushed(written)
                if self.progress:
                    self.progress.table_done(name, copied.get(name, 0))
                self.metrics["snapshot_rows"] += copied.get(name, 0)
        self._flush()
        if self.progress:
            self.progress.snapshot_finished()

    def _copied(
        self, name: str, batches: Iterator[pa.Table], copied: dict[str, int]
    ) -> Generator[pa.Table, None, None]:
        """``batches`` of ``name``'s initial snapshot, counted in ``copied`` as they pass to
        the sink; raises _Stopped when the pipeline is asked to stop."""
        for batch in batches:
            if self.stop.is_set():
                raise _Stopped
            rows = batch.num_rows
            copied[name] = copied.get(name, 0) + rows
            self._snapshot_unflushed[name] = self._snapshot_unflushed.get(name, 0) + rows
            if self.prometheus is not None:
                self.prometheus.snapshot_rows.labels(name).inc(rows)
            if self.progress:
                self.progress.rows_copied(name, rows)
            yield batch

    def _record_gap(self, schema: TableSchema, snapshot_lsn: int, read_at: datetime) -> None:
        """A truncate just before a re-snapshot's rows (at ``snapshot_lsn``): rows deleted
        while the slot was lost leave the current state, and the changelog shows where
        streamed history has a gap. ``snapshot_lsn - 1`` is past every change the lost slot
        delivered (they committed before the new slot's consistent point)."""
        lsn = snapshot_lsn - 1
        self.sink.add(
            ChangeEvent(
                op="t",
                table=schema,
                before=None,
                after=None,
                commit_lsn=lsn,
                seq=0,
                txid=None,
                commit_ts=read_at,
                lsn=lsn,
            )
        )
        log.warning(
            "%s: recorded the gap of the lost slot as a truncate at %s before copying it again",
            schema.qualified_name,
            format_lsn(lsn),
            extra={"table": schema.qualified_name, "lsn": format_lsn(lsn)},
        )

    def _add_snapshot(self, schema: TableSchema, batch: Any, **kwargs: Any) -> None:
        # Counted per batch (initial and incremental snapshots both come through here).
        name, rows = schema.qualified_name, batch.num_rows
        self._snapshot_unflushed[name] = self._snapshot_unflushed.get(name, 0) + rows
        if self.prometheus is not None:
            self.prometheus.snapshot_rows.labels(name).inc(rows)
        try:
            self.sink.add_snapshot(schema, batch, **kwargs)
        except SinkBackpressureError:
            self._flush()
            self.sink.add_snapshot(schema, batch, **kwargs)

    def _discard_partial_snapshot(self, tables: list[tuple[str, str]], lsn: int) -> None:
        self.sink.discard_snapshot(tables, lsn, slot_dropped=True)

    # -- streaming --------------------------------------------------------------------------

    def _retry(self, call: Callable[[], _T], doing: str) -> _T:
        """``call()``, retrying transient failures with backoff for up to
        ``FLUSH_RETRY_SECONDS``; terminal ones, and the last transient one, are raised.

        Stops retrying at once when the pipeline is asked to stop. Giving up is safe:
        nothing unflushed was confirmed to PostgreSQL, so a restarted pipeline receives it
        again.
        """
        delay = 0.2
        give_up_at = time.monotonic() + FLUSH_RETRY_SECONDS
        while True:
            try:
                return call()
            except TransientError as e:
                if time.monotonic() + delay > give_up_at or self.stop.is_set():
                    raise
                self.metrics["retries"] += 1
                log.warning("%s failed, retrying in %.1fs: %s", doing, delay, e)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _save(self, position: CapturePosition) -> None:
        self._retry(lambda: self.store.save(position), f"saving {self.store.path}")

    def _flush(self, *, due_only: bool = False) -> None:
        """Flush the sink (only the tables that are due with ``due_only``), retrying
        transient failures (see :meth:`_retry`)."""
        call = self.sink.flush_due_tables if due_only else self.sink.flush
        result = self._retry(call, "flush")
        self.metrics["rows_written"] += result["rows"]
        self.metrics["commits"] += result["commits"]
        self._flushed(result)

    def _flushed(self, result: dict[str, Any]) -> None:
        """Metrics of one successful flush: rows per table and the newest commit landed."""
        if self._last_event is not None:
            self._unflushed_commits[self._counted.qualified_name] = self._last_event.commit_ts
        if self.sink.pending_rows and "tables" in result:
            # Some tables wait for their own schedule: only those written have landed.
            # (Behind transforms, names may differ; those land with the next full flush.)
            written = result["tables"]
            landed = {t: ts for t, ts in self._unflushed_commits.items() if t in written}
            for table in landed:
                del self._unflushed_commits[table]
        else:
            landed, self._unflushed_commits = self._unflushed_commits, {}
        copied, self._snapshot_unflushed = self._snapshot_unflushed, {}
        if "tables" not in result:
            # A sink that does not count per table (Kafka): the events and snapshot rows
            # handed to it since the previous flush are what it made durable.
            counts = self.event_counts.by_table()
            tables = {t: n - self._flushed_counts.get(t, 0) for t, n in counts.items()}
            for t, n in copied.items():
                tables[t] = tables.get(t, 0) + n
            result = dict(result, tables=tables)
            self._flushed_counts = counts
        m = self.prometheus
        if m is not None:
            m.flushed(result, seconds=float(result.get("duration_s") or 0.0))
            for table, commit_ts in landed.items():
                m.landed(table, commit_ts.timestamp())

    def _count(self, table: Any) -> None:
        """Make ``table`` the one _handle counts (it changed since the previous event)."""
        if self._last_event is not None:
            # The previous event was the newest of its table so far.
            self._unflushed_commits[self._counted.qualified_name] = self._last_event.commit_ts
        self._counted = table
        self._op_counts = self.event_counts.switch(table)

    def _handle(self, item: StreamItem) -> None:
        """Hand one stream item to the sink."""
        if isinstance(item, TransactionCommitted):
            self._commits.add(item.commit_lsn, item.end_lsn)
            return
        if isinstance(item, ChangeBatch):
            self._handle_batch(item)
            return
        if item.table is not self._counted:
            self._count(item.table)
        self._op_counts[item.op] += 1
        self._last_event = item
        if item.unchanged_toast and item.op == "c":
            # Only a key change produces these: the new key has no earlier row to take the
            # unchanged values from.
            self.source.fill_unchanged_toast(item)
        if self._snapshots is not None:
            self._snapshots.observe(item.table)
        try:
            self.sink.add(item)
        except SinkBackpressureError:
            self._flush()
            self.sink.add(item)

    def _handle_batch(self, batch: ChangeBatch) -> None:
        """Hand a columnar batch to the sink (columnar mode: the Delta or Kafka one).

        Its rows are plain inserts, updates and deletes: the key changes that need
        :meth:`SourceQueries.fill_unchanged_toast` come as events."""
        if batch.table is not self._counted:
            self._count(batch.table)
        counts = self._op_counts
        for op, n in batch.op_counts.items():
            counts[op] += n
        self._last_event = batch  # its commit_ts is the newest of the batch
        if self._snapshots is not None:
            self._snapshots.observe(batch.table)
        sink = self.sink
        if not sink.takes_changes:
            # The Kafka sink (see _columnar_sink) waits for room in its queue itself.
            sink.add_changes(  # type: ignore[attr-defined]
                batch.table, batch.changes, lsns=batch.lsns, texts=batch.texts
            )
            return
        add_changes = sink.add_changes  # type: ignore[attr-defined]
        try:
            add_changes(batch.table, batch.changes, size_bytes=batch.size_bytes)
        except SinkBackpressureError:
            self._flush()
            add_changes(batch.table, batch.changes, size_bytes=batch.size_bytes)

    def _columnar_sink(self) -> bool:
        """Whether the sink takes columnar batches: the Delta one (behind transforms or
        not), and the Kafka one (not wrapped: transforms take its events)."""
        if self.sink.takes_changes:
            return True
        # Only loaded by run_capture: `cdc run` does not pay for confluent_kafka's import.
        producer = sys.modules.get("cdc.kafka.producer")
        return (
            KAFKA_COLUMNAR
            and producer is not None
            and type(self.sink) is producer.KafkaProducerSink
        )

    def _durable_lsn(self, source: StreamingSource) -> int:
        """The newest LSN that PostgreSQL may forget: everything before it is in Delta.

        While some tables still hold rows, that is the end of the newest transaction that
        committed below the oldest pending change (``Sink.pending_since``): each table
        commits its rows in position order, so every change of such a transaction is
        durable, in every table.
        """
        position = source.position
        if self._held:
            # Held items (see IncrementalSnapshots) are received but not in the sink yet.
            return position.flushed_lsn
        pending = self.sink.pending_since()
        if pending is not None:
            end = self._commits.durable_end(pending)
            return position.flushed_lsn if end is None else max(position.flushed_lsn, end)
        self._commits.clear()
        durable = position.committed_lsn
        if not source.in_transaction:
            # Idle: the server has sent everything up to its WAL end and we hold nothing,
            # so confirming it keeps the slot from pinning WAL of unrelated activity.
            #
            # Streamed transactions that are still open (protocol 2: spilled, not yet
            # committed) do not hold this back, and need not. Confirming an LSN past their
            # first change does not make the server forget them: a slot skips only the
            # transactions that *committed* before its confirmed_flush_lsn ("Data
            # corresponding to the transactions committed before this LSN is not available
            # anymore", pg_replication_slots), and its restart_lsn, from where decoding
            # resumes, stays behind the oldest transaction still running. After a restart
            # the server therefore decodes such a transaction again and sends it in full,
            # from its first segment (or whole at its commit), which is why the spill is
            # simply dropped with the connection. PostgreSQL's own apply worker relies on
            # the same: it reports its latest received LSN as flushed whenever no committed
            # transaction awaits its local flush, open streamed ones included (worker.c,
            # send_feedback). A transaction whose StreamCommit arrived is another matter: it
            # is being handed on, and source.in_transaction stays true until its commit
            # item is returned.
            durable = max(durable, position.server_wal_end)
        return durable

    def stream(self, position: CapturePosition, conn: ReplicationConnection | None) -> None:
        # Batches go to the Delta and Kafka sinks as Arrow (to the Delta one through
        # transforms too); transforms in front of Kafka take events.
        columnar = compiled.enabled() and self._columnar_sink()
        source = StreamingSource(
            self.dsn,
            slot=self.settings.slot_name,
            publication=self.settings.publication_name,
            position=position,
            describe=self.source.describe,
            spill_dir=self.settings.source.spill_dir,
            columnar=columnar,
            max_items=COLUMNAR_MAX_ITEMS if columnar else 5000,
        )
        snapshots = IncrementalSnapshots(
            dsn=self.dsn,
            slot=self.settings.slot_name,
            publication=self.settings.publication_name,
            position=position,
            save=self._save,
            sink=self.sink,
            flush=self._flush,
            add_snapshot=self._add_snapshot,
            queries=self.source,
            baseline=self.sink.latest_schema,
            all_tables=self._all_tables,
        )
        initial_rows = self.metrics["snapshot_rows"]
        self._snapshots = snapshots
        ops = Operations(
            self.settings,
            connection=self.source.connection,
            metrics=self.prometheus,
            queue_snapshot=snapshots.queued.setdefault,
        )
        self.operations = ops
        disk_sync = LakeDiskSync(self._local_lake) if self._local_lake is not None else None

        def confirm(*, wait: bool = False) -> None:
            durable = self._durable_lsn(source)
            if disk_sync is not None:
                durable = disk_sync.durable_now(durable) if wait else disk_sync.durable(durable)
            source.confirm(durable)

        delay = 0.5
        connected = False
        try:
            while not self.stop.is_set():
                try:
                    if not connected:
                        # The slot-creating connection is used once; retries open new ones.
                        first, conn = conn, None
                        source.start(first)
                        connected = True
                        delay = 0.5
                        log.info(
                            "streaming from slot %s at %s",
                            self.settings.slot_name,
                            format_lsn(position.flushed_lsn),
                        )
                    items, self._held = self._held or source.read(timeout=0.2), []
                    for item in items:
                        self._handle(item)
                    if self.sink.flush_due():
                        self._flush(due_only=True)
                    snapshots.poll_publication()
                    ops.tick(source)
                    if snapshots.queued:
                        self._held = snapshots.run(source, self._handle)
                        self.metrics["snapshot_rows"] = snapshots.copied_rows + initial_rows
                    confirm()
                except SlotLostError as e:
                    raise self._slot_lost(f"is gone ({e})") from e
                except SourceConnectionError as e:
                    connected = False
                    source.close()
                    self.source.close()
                    self.metrics["reconnects"] += 1
                    if self.prometheus is not None:
                        self.prometheus.reconnects.inc()
                    try:
                        # A slot invalidated meanwhile refuses every START_REPLICATION: say
                        # so instead of retrying for ever.
                        ops.check_slot()
                    except SourceConnectionError:
                        pass  # the server is still away: the next attempt finds out again
                    except SlotLostError as lost:
                        raise self._slot_lost(f"is gone ({lost})") from lost
                    log.warning("source connection lost (%s); reconnecting in %.1fs", e, delay)
                    # What was received is made durable now, so the replay after the
                    # reconnect is filtered instead of re-buffered.
                    self._flush()
                    self.stop.wait(delay)
                    delay = min(delay * 2, 30.0)
            self._flush()
            if connected:
                confirm(wait=True)
        finally:
            source.close()
            if disk_sync is not None:
                disk_sync.close()

    def wait_flushed(self, lsn: int, *, timeout: float) -> bool:
        """Wait until everything up to ``lsn`` is durable in Delta; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.position is not None and self.position.flushed_lsn >= lsn:
                return True
            time.sleep(0.05)
        return False

    def run(self) -> dict[str, Any]:
        while True:
            try:
                position, conn = self.prepare()
            except _Stopped:
                log.warning("stopped during the initial snapshot; the next run starts it again")
                self.source.close()
                return dict(self.metrics, snapshot_interrupted=True)
            self.position = position
            try:
                self.stream(position, conn)
            except SlotLostError:
                if self.settings.ops.on_slot_lost != "resnapshot" or self.stop.is_set():
                    raise
                # prepare() sees the lost slot, drops it and copies every table again.
                log.warning("slot %s was lost while streaming", self.settings.slot_name)
                continue
            finally:
                self.source.close()
            break
        self.metrics["events"] = self.event_counts.total()
        self.metrics["flushed_lsn"] = format_lsn(position.flushed_lsn)
        log.info(
            "stopped at %s: %d events, %d rows written",
            self.metrics["flushed_lsn"],
            self.metrics["events"],
            self.metrics["rows_written"],
            extra={
                "lsn": self.metrics["flushed_lsn"],
                "events": self.metrics["events"],
                "rows_written": self.metrics["rows_written"],
                "snapshot_rows": self.metrics["snapshot_rows"],
            },
        )
        return dict(self.metrics)


def run_embedded(
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    progress: SnapshotProgress | None = None,
    metrics: Metrics | None = None,
) -> dict[str, Any]:
    """Capture ``settings.source`` into Delta tables under ``settings.lake`` until ``stop``.

    Creates the publication and slot if missing, copies existing rows once (op ``r``), then
    streams changes. Returns metrics: snapshot_rows, events, rows_written, commits,
    reconnects, flushed_lsn.

    Hazard: the slot keeps WAL on the server until this pipeline confirms it. A pipeline
    that stays stopped makes PostgreSQL keep WAL without bound; drop the slot of a pipeline
    you retire.

    Example:
        >>> stop = threading.Event()  # set it from another thread or a signal handler
        >>> run_embedded(load_settings(**{"source.dsn": dsn}), stop=stop)  # doctest: +SKIP
        {'snapshot_rows': 1000, 'events': 52, 'rows_written': 1052, ...}
    """
    return CapturePipeline(settings, stop=stop, progress=progress, metrics=metrics).run()


def transforms_status(settings: Settings) -> dict[str, Any]:
    """The configured rules (hash key left out) and what the publication leaves out for
    them (operations, columns), read from PostgreSQL; for ``cdc status``.

    Example:
        >>> transforms_status(load_settings("cdc.toml"))  # doctest: +SKIP
        {'rules': [{'index': 0, 'tables': ['crm.*'], ...}], 'pushdown': {'publish': [...], ...}}
    """
    from transforms import Transforms

    rules = (
        Transforms(settings.transforms, source=settings.config_file).describe()
        if settings.transforms.rules
        else []
    )
    dsn = settings.source_dsn()
    try:
        with psycopg.connect(session_conninfo(dsn), autocommit=True) as conn:
            pushdown = publication_pushdown(conn, settings.publication_name)
    except psycopg.Error as e:
        doing = f"reading publication {settings.publication_name}"
        raise postgres_error(e, doing=doing, dsn=dsn) from e
    return {"rules": rules, "pushdown": pushdown}


def _database_name(dsn: str) -> str:
    """The name of the database ``dsn`` connects to, as the server reports it."""
    try:
        with psycopg.connect(session_conninfo(dsn), autocommit=True) as conn:
            return str(conn.info.dbname)
    except psycopg.Error as e:
        raise postgres_error(e, doing="cannot connect to the source", dsn=dsn) from e


def run_capture(
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    progress: SnapshotProgress | None = None,
    metrics: Metrics | None = None,
) -> dict[str, Any]:
    """Capture ``settings.source`` into Kafka topics until ``stop`` is set.

    Set-up, snapshot and streaming are the embedded pipeline's (see
    :func:`cdc.pipeline.run_embedded`); events go to ``<prefix>.<schema>.<table>`` topics,
    table shapes to ``<prefix>.__schemas`` and the slot-and-snapshot state to
    ``<prefix>.__capture``. Returns metrics: snapshot_rows, events, rows_written (events
    acknowledged by Kafka), reconnects, flushed_lsn.

    Hazard: the slot keeps WAL on the server until capture confirms it; a capture that
    stays stopped makes PostgreSQL keep WAL without bound.

    Example:
        >>> settings = load_settings(**{"source.dsn": dsn, "kafka.bootstrap": "k:9092"})  # doctest: +SKIP
        >>> run_capture(settings, stop=stop)  # doctest: +SKIP
        {'snapshot_rows': 1000, 'events': 52, 'rows_written': 1052, ...}
    """
    # Here, not at the top: confluent_kafka takes about 50 ms to load, which `cdc run` (and
    # its snapshot's start-up) does not need.
    from catalog.kafka_schema_registry import KafkaSchemaRegistry
    from cdc.kafka.errors import wrap_kafka_error
    from cdc.kafka.position_store import KafkaPositionStore
    from cdc.kafka.producer import KafkaProducerSink, producer_config

    bootstrap = settings.kafka_bootstrap()
    dsn = settings.source_dsn()
    kafka = settings.kafka
    config = producer_config(settings)
    database = _database_name(dsn)
    registry = KafkaSchemaRegistry(
        bootstrap,
        prefix=settings.topic_prefix,
        client=kafka.client,
        producer=kafka.producer,
        consumer=kafka.consumer,
    )
    store = KafkaPositionStore.for_settings(settings)
    try:
        try:
            registry.create_topic(replication_factor=kafka.replication_factor)
        except CatalogError as e:
            raise wrap_kafka_error(e, "cannot create the schema registry topic") from e
        sink = KafkaProducerSink(
            config,
            prefix=settings.topic_prefix,
            database=database,
            registry=registry,
            format=kafka.format,
            partitions=kafka.partitions,
            replication_factor=kafka.replication_factor,
            tombstones=kafka.tombstones,
            batch=settings.batch,
        )
        pipeline = CapturePipeline(
            settings, stop=stop, progress=progress, sink=sink, store=store, metrics=metrics
        )
        try:
            return pipeline.run()
        finally:
            sink.close()
    finally:
        store.close()
        registry.close()
