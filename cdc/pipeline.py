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
from deltalake import DeltaTable

from catalog import lake_layout as layout
from cdc import pgoutput
from cdc.assembler import TransactionCommitted
from cdc.config import Settings
from cdc.errors import (
    ConfigError,
    PrerequisiteError,
    SourceConnectionError,
    TerminalCdcError,
)
from cdc.introspect import describe_relations, describe_tables
from cdc.lsn import format_lsn, parse_lsn
from cdc.position import CapturePosition, PositionStore
from cdc.replication import ReplicationConnection, session_conninfo
from cdc.slots import (
    check_prerequisites,
    check_slot_usable,
    drop_slot,
    ensure_publication,
    get_slot,
)
from cdc.snapshot import SnapshotReader
from cdc.streaming import StreamingSource
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
            return describe_relations(self.connection(), [rel.relation_id]).get(rel.relation_id)
        except psycopg.OperationalError as e:
            self.close()
            raise SourceConnectionError(f"catalog lookup failed: {e}") from e

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
    ) -> None:
        self.settings = settings
        self.dsn = settings.source_dsn()
        self.stop = stop or threading.Event()
        self.progress = progress
        self.lake = layout.normalize_root(settings.lake.path)
        self.storage_options = settings.lake.storage_options or None
        self.sink = DeltaChangelogSink(
            self.lake,
            app_id=f"cdc-lakehouse:{settings.name}",
            batch=settings.batch,
            storage_options=self.storage_options,
        )
        self.store = PositionStore(self.lake, settings.name, storage_options=self.storage_options)
        self.catalog = _SourceCatalog(self.dsn)
        self.position: CapturePosition | None = None
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
                    f"slot {settings.slot_name!r} exists but the lake {self.lake} has no record "
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
        for schema_name, table in tables:
            uri = layout.changes_uri(self.lake, f"{schema_name}.{table}")
            if DeltaTable.is_deltatable(uri, storage_options=self.storage_options):
                dt = DeltaTable(uri, storage_options=self.storage_options)
                dt.delete(f"{layout.OP} = 'r' AND {layout.LSN} = {lsn}")

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

    def _durable_lsn(self, source: StreamingSource) -> int:
        """The newest LSN that PostgreSQL may forget: everything before it is in Delta."""
        position = source.position
        if self.sink.pending_rows:
            return position.flushed_lsn
        durable = position.committed_lsn
        if not source.in_transaction:
            # Idle: the server has sent everything up to its WAL end and we hold nothing,
            # so confirming it keeps the slot from pinning WAL of unrelated activity.
            durable = max(durable, position.server_wal_end)
        return durable

    def stream(self, position: CapturePosition, conn: ReplicationConnection | None) -> None:
        source = StreamingSource(
            self.dsn,
            slot=self.settings.slot_name,
            publication=self.settings.publication_name,
            position=position,
            describe=self.catalog.describe,
        )
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
                    for item in source.read(timeout=0.2):
                        if isinstance(item, TransactionCommitted):
                            continue
                        self.metrics["events"] += 1
                        try:
                            self.sink.add(item)
                        except SinkBackpressure:
                            self._flush()
                            self.sink.add(item)
                    if self.sink.flush_due():
                        self._flush()
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
