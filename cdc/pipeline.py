"""The embedded pipeline: capture and the Delta writer in one process, no Kafka.

Delivery: PostgreSQL is told an LSN is flushed only after the Delta commits covering every
change up to it have succeeded, and the sink drops changes at or below each table's
recorded (lsn, seq) watermark. A crash at any point therefore loses nothing (the slot
replays from the last confirmed LSN) and duplicates nothing (the replay is filtered).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg

from catalog import lake_layout as layout
from cdc import pgoutput, pgtypes
from cdc.assembler import TransactionCommitted
from cdc.config import Settings
from cdc.errors import (
    ConfigError,
    PrerequisiteError,
    SourceConnectionError,
    TerminalCdcError,
    ValueConversionError,
)
from cdc.events import ChangeEvent
from cdc.incremental_snapshot import IncrementalSnapshots
from cdc.introspect import current_column_texts, describe_relation_message, describe_tables
from cdc.lsn import format_lsn, parse_lsn
from cdc.position import CapturePosition, PositionStore
from cdc.replication import ReplicationConnection, session_conninfo
from cdc.slots import (
    check_prerequisites,
    check_slot_usable,
    drop_slot,
    ensure_publication,
    get_slot,
    publishes_all_tables,
)
from cdc.snapshot import SnapshotReader
from cdc.streaming import StreamingSource, StreamItem
from cdc.table_schema import TableSchema
from sinks.delta_changelog import DeltaChangelogSink
from sinks.errors import SinkBackpressure, TransientSinkError

log = logging.getLogger(__name__)

#: How long a failing Delta commit is retried before the pipeline stops with the error.
FLUSH_RETRY_SECONDS = 120.0


class _Stopped(Exception):
    """The stop event was set while the initial snapshot was copying."""


class SnapshotProgress(Protocol):
    """Receives snapshot progress (the CLI draws a progress bar from it)."""

    def table_started(self, name: str, estimated_rows: int | None) -> None: ...
    def rows_copied(self, name: str, rows: int) -> None: ...
    def table_done(self, name: str, rows: int) -> None: ...


class CaptureSink(Protocol):
    """Where capture writes: the sink contract plus the snapshot hooks.

    :class:`~sinks.delta_changelog.DeltaChangelogSink` (embedded mode) and
    :class:`~cdc.kafka_producer.KafkaEventSink` (``cdc capture``) implement it.
    """

    def add(self, event: ChangeEvent) -> None: ...
    def flush(self) -> dict[str, Any]: ...
    def flush_due(self) -> bool: ...
    @property
    def pending_rows(self) -> int: ...
    def ensure_table(self, table: TableSchema) -> None: ...
    def add_snapshot(
        self, table: TableSchema, batch: Any, *, lsn: int, first_seq: int, read_at: datetime
    ) -> None: ...
    def discard_snapshot(
        self, tables: list[tuple[str, str]], lsn: int, *, slot_dropped: bool = False
    ) -> None:
        """Undo the rows an interrupted snapshot at ``lsn`` wrote, before it is redone.

        ``slot_dropped``: the snapshot's slot is gone, so no change after ``lsn`` will ever
        correct what the partial copy holds (the initial snapshot's case).
        """
        ...


class PositionStoreLike(Protocol):
    """Keeps the slot-and-snapshot part of a :class:`CapturePosition` (``path`` names it)."""

    path: str

    def load(self) -> CapturePosition | None: ...
    def save(self, position: CapturePosition) -> None: ...


class _SourceCatalog:
    """A regular connection for catalog lookups, reopened after it breaks."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection | None = None

    def connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                self._conn = psycopg.connect(session_conninfo(self.dsn), autocommit=True)
            except psycopg.OperationalError as e:
                raise SourceConnectionError(f"cannot connect to the source: {e}") from e
        return self._conn

    def describe(self, rel: pgoutput.Relation) -> TableSchema | None:
        try:
            return describe_relation_message(self.connection(), rel)
        except psycopg.OperationalError as e:
            self.close()
            raise SourceConnectionError(f"catalog lookup failed: {e}") from e

    def fill_unchanged_toast(self, event: ChangeEvent) -> None:
        """Re-read the TOASTed values a key-changing UPDATE did not send (see
        :func:`cdc.introspect.current_column_texts`), so no row lands with a hole."""
        table = event.table
        after = event.after or ()
        position = {c.name: i for i, c in enumerate(table.columns)}
        key = {k: after[position[k]] for k in table.key_columns}
        try:
            texts = current_column_texts(self.connection(), table, key, event.unchanged_toast)
        except psycopg.OperationalError as e:
            self.close()
            raise SourceConnectionError(f"re-reading TOASTed values failed: {e}") from e
        if texts is None:
            return  # the row is gone again; its delete follows in the stream
        values = list(after)
        fallback = dict(event.fallback or {})
        for name, text in texts.items():
            column = table.columns[position[name]]
            try:
                values[position[name]] = (
                    None
                    if text is None
                    else pgtypes.text_parser(column.type_oid, column.type_modifier)(text)
                )
            except ValueConversionError:
                fallback[name] = text  # type: ignore[assignment]
        event.after = tuple(values)
        event.fallback = fallback or None
        event.unchanged_toast = ()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class EmbeddedPipeline:
    """PostgreSQL -> Delta in one process. Use :func:`run_embedded` unless you need the parts."""

    def __init__(
        self,
        settings: Settings,
        *,
        stop: threading.Event | None = None,
        progress: SnapshotProgress | None = None,
        sink: CaptureSink | None = None,
        store: PositionStoreLike | None = None,
    ) -> None:
        """``sink`` and ``store`` default to the lake's Delta changelog writer and the lake's
        pipeline state; ``cdc capture`` passes Kafka ones instead."""
        self.settings = settings
        self.dsn = settings.source_dsn()
        self.stop = stop or threading.Event()
        self.progress = progress
        self.lake = layout.normalize_root(settings.lake.path)
        self.storage_options = settings.lake.storage_options or None
        self.sink: CaptureSink = sink or DeltaChangelogSink(
            self.lake,
            app_id=f"cdc-lakehouse:{settings.name}",
            batch=settings.batch,
            storage_options=self.storage_options,
        )
        self.store: PositionStoreLike = store or PositionStore(
            self.lake, settings.name, storage_options=self.storage_options
        )
        self.catalog = _SourceCatalog(self.dsn)
        self.position: CapturePosition | None = None
        self._held: list[StreamItem] = []
        self._snapshots: IncrementalSnapshots | None = None
        self._all_tables = False
        self.metrics: dict[str, Any] = {
            "snapshot_rows": 0,
            "events": 0,
            "rows_written": 0,
            "commits": 0,
            "reconnects": 0,
        }

    # -- start-up ---------------------------------------------------------------------------

    def prepare(self) -> tuple[CapturePosition, ReplicationConnection | None]:
        """Publication, slot and initial snapshot; returns the position to stream from.

        Returns the replication connection that created the slot, when it did, so streaming
        starts on it.
        """
        try:
            return self._prepare()
        except psycopg.OperationalError as e:
            raise SourceConnectionError(f"lost the source during set-up: {e}") from e
        except psycopg.errors.InsufficientPrivilege as e:
            raise PrerequisiteError(
                f"the connecting role lacks a privilege: {e}. Publications FOR ALL TABLES need "
                "a superuser; per-table publications need table ownership (or --tables)"
            ) from e
        except psycopg.Error as e:
            raise TerminalCdcError(f"set-up failed: {e}") from e

    def _prepare(self) -> tuple[CapturePosition, ReplicationConnection | None]:
        settings = self.settings
        conn = self.catalog.connection()
        check_prerequisites(conn)
        tables = ensure_publication(conn, settings.publication_name, tables=settings.source.tables)
        self._all_tables = publishes_all_tables(conn, settings.publication_name)
        slot = get_slot(conn, settings.slot_name)
        if slot is not None:
            check_slot_usable(slot, conn)
        position = self.store.load()

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
            raise TerminalCdcError(
                f"slot {settings.slot_name!r} was dropped after this pipeline streamed from it; "
                "changes made since then are not recoverable from PostgreSQL. To start over, "
                f"delete {self.store.path} and the pipeline's tables in the lake"
            )
        return self._create_slot_and_snapshot(tables)

    def _create_slot_and_snapshot(
        self, tables: list[tuple[str, str]]
    ) -> tuple[CapturePosition, ReplicationConnection]:
        settings = self.settings
        position = CapturePosition(slot=settings.slot_name)
        # Saved before the slot exists, so a crash right after creating it is recognised.
        self.store.save(position)
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
        self.store.save(position)
        log.info("created slot %s at %s", settings.slot_name, format_lsn(created.consistent_point))
        if settings.snapshot == "initial":
            try:
                self._snapshot(tables, created.snapshot_name, position)
            except BaseException:
                repl.close()
                raise
            position.snapshotted = {f"{schema}.{table}" for schema, table in tables}
        position.snapshot_done = True
        self.store.save(position)
        return position, repl

    def _snapshot(
        self, tables: list[tuple[str, str]], snapshot_name: str | None, position: CapturePosition
    ) -> None:
        schemas = describe_tables(self.catalog.connection(), tables)
        read_at = datetime.now(UTC)
        lsn = position.snapshot_lsn
        with SnapshotReader(self.dsn, snapshot_name) as reader:
            for key in tables:
                schema = schemas.get(key)
                if schema is None:
                    continue  # dropped since the publication was read
                name = schema.qualified_name
                self.sink.ensure_table(schema)
                if self.progress:
                    self.progress.table_started(name, reader.estimate_rows(schema))
                copied = 0
                for batch in reader.read_table(schema):
                    if self.stop.is_set():
                        raise _Stopped
                    self._add_snapshot(schema, batch, lsn=lsn, first_seq=copied, read_at=read_at)
                    copied += batch.num_rows
                    if self.progress:
                        self.progress.rows_copied(name, batch.num_rows)
                if self.progress:
                    self.progress.table_done(name, copied)
                self.metrics["snapshot_rows"] += copied
        self._flush()

    def _add_snapshot(self, schema: TableSchema, batch: Any, **kwargs: Any) -> None:
        try:
            self.sink.add_snapshot(schema, batch, **kwargs)
        except SinkBackpressure:
            self._flush()
            self.sink.add_snapshot(schema, batch, **kwargs)

    def _discard_partial_snapshot(self, tables: list[tuple[str, str]], lsn: int) -> None:
        self.sink.discard_snapshot(tables, lsn, slot_dropped=True)

    # -- streaming --------------------------------------------------------------------------

    def _flush(self) -> None:
        """Flush the sink, retrying transient failures for up to ``FLUSH_RETRY_SECONDS``.

        Giving up is safe: nothing unflushed was confirmed to PostgreSQL, so a restarted
        pipeline receives it again.
        """
        delay = 0.2
        give_up_at = time.monotonic() + FLUSH_RETRY_SECONDS
        while True:
            try:
                result = self.sink.flush()
            except TransientSinkError as e:
                if time.monotonic() + delay > give_up_at:
                    raise
                log.warning("flush failed, retrying in %.1fs: %s", delay, e)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            self.metrics["rows_written"] += result["rows"]
            self.metrics["commits"] += result["commits"]
            return

    def _handle(self, item: StreamItem) -> None:
        """Hand one stream item to the sink."""
        if isinstance(item, TransactionCommitted):
            return
        self.metrics["events"] += 1
        if item.unchanged_toast and item.op == "c":
            # Only a key change produces these: the new key has no earlier row to take the
            # unchanged values from.
            self.catalog.fill_unchanged_toast(item)
        if self._snapshots is not None:
            self._snapshots.observe(item)
        try:
            self.sink.add(item)
        except SinkBackpressure:
            self._flush()
            self.sink.add(item)

    def _registered_schema(self, name: str) -> TableSchema | None:
        """The table's last recorded shape, to compare the first change after a restart with."""
        registry = getattr(self.sink, "registry", None)
        return registry.latest(name) if registry is not None else None

    def _durable_lsn(self, source: StreamingSource) -> int:
        """The newest LSN that PostgreSQL may forget: everything before it is in Delta."""
        position = source.position
        if self.sink.pending_rows or self._held:
            # Held items (see IncrementalSnapshots) are received but not in the sink yet.
            return position.flushed_lsn
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
        source = StreamingSource(
            self.dsn,
            slot=self.settings.slot_name,
            publication=self.settings.publication_name,
            position=position,
            describe=self.catalog.describe,
            spill_dir=self.settings.source.spill_dir,
        )
        snapshots = IncrementalSnapshots(
            dsn=self.dsn,
            slot=self.settings.slot_name,
            publication=self.settings.publication_name,
            position=position,
            save=self.store.save,
            sink=self.sink,
            flush=self._flush,
            add_snapshot=self._add_snapshot,
            connection=self.catalog.connection,
            baseline=self._registered_schema,
            all_tables=self._all_tables,
        )
        initial_rows = self.metrics["snapshot_rows"]
        self._snapshots = snapshots
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
                    items, self._held = self._held or source.read(timeout=0.2), []
                    for item in items:
                        self._handle(item)
                    if self.sink.flush_due():
                        self._flush()
                    snapshots.poll_publication()
                    if snapshots.queued:
                        self._held = snapshots.run(source, self._handle)
                        self.metrics["snapshot_rows"] = snapshots.copied_rows + initial_rows
                    source.confirm(self._durable_lsn(source))
                except SourceConnectionError as e:
                    connected = False
                    source.close()
                    self.catalog.close()
                    self.metrics["reconnects"] += 1
                    log.warning("source connection lost (%s); reconnecting in %.1fs", e, delay)
                    # What was received is made durable now, so the replay after the
                    # reconnect is filtered instead of re-buffered.
                    self._flush()
                    self.stop.wait(delay)
                    delay = min(delay * 2, 30.0)
            self._flush()
            if connected:
                source.confirm(self._durable_lsn(source))
        finally:
            source.close()

    def wait_flushed(self, lsn: int, *, timeout: float) -> bool:
        """Wait until everything up to ``lsn`` is durable in Delta; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.position is not None and self.position.flushed_lsn >= lsn:
                return True
            time.sleep(0.05)
        return False

    def run(self) -> dict[str, Any]:
        try:
            position, conn = self.prepare()
        except _Stopped:
            log.warning("stopped during the initial snapshot; the next run starts it again")
            self.catalog.close()
            return dict(self.metrics, snapshot_interrupted=True)
        self.position = position
        try:
            self.stream(position, conn)
        finally:
            self.catalog.close()
        self.metrics["flushed_lsn"] = format_lsn(position.flushed_lsn)
        return dict(self.metrics)


def current_wal_lsn(dsn: str) -> int:
    """The server's WAL insert position: once flushed past it, every commit made so far is
    in the lake.

    The insert position, not ``pg_current_wal_lsn()`` (the write position), because with
    ``synchronous_commit=off`` a commit can return before its record is written.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    return parse_lsn(row[0]) if row else 0


def run_embedded(
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    progress: SnapshotProgress | None = None,
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
    return EmbeddedPipeline(settings, stop=stop, progress=progress).run()
