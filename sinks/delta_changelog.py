"""The Delta changelog writer: batches change events per table, one commit per table per flush.

Exactly-once: every commit records, as deltalake app transactions, the position
``(commit_lsn, seq)`` of the last change it contains (app ids ``<app_id>:lsn`` and
``<app_id>:seq``). Before accepting an event the sink compares it with that watermark, so
changes that capture re-sends after a restart (PostgreSQL replays from the last flushed LSN)
are dropped instead of written twice. Because the watermark is per change and not per
transaction, a flush may split a large transaction across commits and a crash in between
still neither loses nor duplicates a row.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, SchemaMismatchError

from catalog import lake_layout as layout
from catalog.schema_registry import SchemaRegistry
from cdc import pgtypes
from cdc.config import BatchSettings
from cdc.events import ChangeEvent
from cdc.table_schema import TableSchema
from sinks.base import Sink
from sinks.errors import SinkBackpressure, TerminalSinkError, TransientSinkError

log = logging.getLogger(__name__)

Position = tuple[int, int]  # (commit_lsn, seq)
_NOTHING_WRITTEN: Position = (-1, -1)

_METADATA_FIELDS = [
    pa.field(layout.OP, pa.string(), nullable=False),
    pa.field(layout.LSN, pa.int64(), nullable=False),
    pa.field(layout.SEQ, pa.int64(), nullable=False),
    pa.field(layout.TXID, pa.int64()),
    pa.field(layout.COMMIT_TS, pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field(layout.INGESTED_AT, pa.timestamp("us", tz="UTC")),
    pa.field(layout.UNCHANGED_TOAST, pa.list_(pa.string())),
    pa.field(layout.DATE, pa.date32(), nullable=False),
]


def changelog_arrow_schema(table: TableSchema) -> pa.Schema:
    """The Arrow schema of ``table``'s changelog: its columns, then the metadata columns."""
    fields = [
        pa.field(c.name, pgtypes.arrow_type(c.type_oid, c.type_modifier)) for c in table.columns
    ]
    return pa.schema(fields + _METADATA_FIELDS)


@dataclass(slots=True)
class _Rows:
    """Events of one table under one schema version, kept row-wise until the flush."""

    schema: TableSchema
    values: list[tuple[Any, ...]] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    lsns: list[int] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    txids: list[int | None] = field(default_factory=list)
    commit_ts: list[datetime] = field(default_factory=list)
    unchanged: list[list[str] | None] = field(default_factory=list)

    def to_arrow(self, ingested_at: datetime) -> pa.Table:
        arrow_schema = changelog_arrow_schema(self.schema)
        n = len(self.ops)
        columns_out: list[pa.Array] = []
        # zip(*rows) transposes in C; one pa.array call per column keeps Arrow building
        # out of per-value Python.
        transposed = list(zip(*self.values, strict=True)) if n else []
        for i, col in enumerate(self.schema.columns):
            target = arrow_schema.field(i).type
            try:
                columns_out.append(pa.array(transposed[i], type=target))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
                raise TerminalSinkError(
                    f"{self.schema.qualified_name}.{col.name}: value does not fit {target}: {e}"
                ) from e
        commit_ts = pa.array(self.commit_ts, type=pa.timestamp("us", tz="UTC"))
        columns_out += [
            pa.array(self.ops, type=pa.string()),
            pa.array(self.lsns, type=pa.int64()),
            pa.array(self.seqs, type=pa.int64()),
            pa.array(self.txids, type=pa.int64()),
            commit_ts,
            pa.array([ingested_at] * n, type=pa.timestamp("us", tz="UTC")),
            pa.array(self.unchanged, type=pa.list_(pa.string())),
            pc.cast(commit_ts, pa.date32()),
        ]
        return pa.Table.from_arrays(columns_out, schema=arrow_schema)


@dataclass(slots=True)
class _TableBuffer:
    qualified_name: str
    uri: str
    written: Position  # the watermark recorded in Delta
    accepted: Position  # the newest position buffered or written
    parts: list[_Rows | pa.Table] = field(default_factory=list)
    schema: TableSchema | None = None  # the last schema seen, registered in the registry
    rows: int = 0
    bytes: int = 0
    oldest: float | None = None


class DeltaChangelogSink(Sink):
    """Writes change events to ``<root>/<schema>.<table>/changes`` Delta tables.

    Args:
        root: Lake root, a local path or an object-store URI.
        app_id: Identifies the writer in the app transactions (the pipeline name in embedded
            mode). Two pipelines writing one table must use different ids.
        batch: Flush limits (rows, bytes, seconds).
        storage_options: Passed to deltalake for object stores.

    Example:
        >>> sink = DeltaChangelogSink("./lake", app_id="shop")  # doctest: +SKIP
        >>> sink.add(event); sink.flush()  # doctest: +SKIP
        {'rows': 1, 'commits': 1, ...}
    """

    def __init__(
        self,
        root: str,
        *,
        app_id: str,
        batch: BatchSettings | None = None,
        storage_options: dict[str, str] | None = None,
    ) -> None:
        self.root = layout.normalize_root(root)
        self.app_id = app_id
        self.batch = batch or BatchSettings()
        self.storage_options = storage_options or None
        self.registry = SchemaRegistry(self.root, storage_options=self.storage_options)
        self._tables: dict[str, _TableBuffer] = {}
        self._pending_rows = 0
        self._pending_bytes = 0

    @property
    def _lsn_app(self) -> str:
        return f"{self.app_id}:lsn"

    @property
    def _seq_app(self) -> str:
        return f"{self.app_id}:seq"

    # -- watermarks -------------------------------------------------------------------------

    def _buffer(self, table: TableSchema) -> _TableBuffer:
        name = table.qualified_name
        buf = self._tables.get(name)
        if buf is None:
            uri = layout.changes_uri(self.root, name)
            written = self._read_watermark(uri)
            buf = _TableBuffer(name, uri, written, written)
            self._tables[name] = buf
        # Identity first: the assembler reuses one schema object per table version, so the
        # registry (which hashes the schema) is consulted only when the shape may change.
        if table is not buf.schema:
            if table != buf.schema:
                self.registry.register(table)
            buf.schema = table
        return buf

    def _read_watermark(self, uri: str) -> Position:
        if not DeltaTable.is_deltatable(uri, storage_options=self.storage_options):
            return _NOTHING_WRITTEN
        dt = DeltaTable(uri, storage_options=self.storage_options)
        lsn = dt.transaction_version(self._lsn_app)
        seq = dt.transaction_version(self._seq_app)
        if lsn is None:
            return _NOTHING_WRITTEN
        return (lsn, seq if seq is not None else -1)

    def ensure_table(self, table: TableSchema) -> None:
        """Create ``table``'s changelog if missing, so an empty source table is queryable."""
        buf = self._buffer(table)
        if buf.written == _NOTHING_WRITTEN:
            DeltaTable.create(
                buf.uri,
                schema=changelog_arrow_schema(table),
                partition_by=list(layout.PARTITION_COLUMNS),
                mode="ignore",
                storage_options=self.storage_options,
            )

    def watermark(self, table: TableSchema) -> Position:
        """The newest ``(commit_lsn, seq)`` of ``table`` that is written or buffered."""
        return self._buffer(table).accepted

    # -- adding -----------------------------------------------------------------------------

    def _check_capacity(self) -> None:
        if self._pending_rows >= self.batch.max_rows or self._pending_bytes >= self.batch.max_bytes:
            raise SinkBackpressure(
                f"{self._pending_rows} rows / {self._pending_bytes} bytes buffered: flush first"
            )

    def add(self, event: ChangeEvent) -> None:
        """Buffer ``event`` unless it is at or below the table's watermark (a replay)."""
        buf = self._buffer(event.table)
        position = (event.commit_lsn, event.seq)
        if position <= buf.accepted:
            return
        self._check_capacity()
        rows = buf.parts[-1] if buf.parts else None
        if not (isinstance(rows, _Rows) and rows.schema is event.table):
            rows = _Rows(event.table)
            buf.parts.append(rows)
        if event.op == "d":
            values = event.before
        elif event.op == "t":
            values = (None,) * len(event.table.columns)
        else:
            values = event.after
        rows.values.append(values)  # type: ignore[arg-type]
        rows.ops.append(event.op)
        rows.lsns.append(event.commit_lsn)
        rows.seqs.append(event.seq)
        rows.txids.append(event.txid)
        rows.commit_ts.append(event.commit_ts)
        rows.unchanged.append(list(event.unchanged_toast) if event.unchanged_toast else None)
        buf.accepted = position
        self._account(buf, 1, event.size_bytes)

    def add_snapshot(
        self,
        table: TableSchema,
        batch: pa.RecordBatch | pa.Table,
        *,
        lsn: int,
        first_seq: int,
        read_at: datetime,
    ) -> None:
        """Buffer snapshot rows (op ``r``) already in Arrow form, typed like the table.

        Snapshot rows of one table share ``lsn`` and take consecutive ``seq`` values from
        ``first_seq``, so they are ordered and deduplicated like streamed changes.
        """
        buf = self._buffer(table)
        n = batch.num_rows
        if n == 0:
            return
        if (lsn, first_seq + n - 1) <= buf.accepted:
            return
        self._check_capacity()
        arrow_schema = changelog_arrow_schema(table)
        commit_ts = pa.array([read_at] * n, type=pa.timestamp("us", tz="UTC"))
        columns = [batch.column(c.name) for c in table.columns] + [
            pa.array(["r"] * n, type=pa.string()),
            pa.array([lsn] * n, type=pa.int64()),
            pa.array(range(first_seq, first_seq + n), type=pa.int64()),
            pa.nulls(n, type=pa.int64()),
            commit_ts,
            pa.nulls(n, type=pa.timestamp("us", tz="UTC")),
            pa.nulls(n, type=pa.list_(pa.string())),
            pc.cast(commit_ts, pa.date32()),
        ]
        buf.parts.append(pa.Table.from_arrays(columns, schema=arrow_schema))
        buf.accepted = (lsn, first_seq + n - 1)
        self._account(buf, n, batch.nbytes)

    def _account(self, buf: _TableBuffer, rows: int, size: int) -> None:
        if buf.oldest is None:
            buf.oldest = time.monotonic()
        buf.rows += rows
        buf.bytes += size
        self._pending_rows += rows
        self._pending_bytes += size

    # -- flushing ---------------------------------------------------------------------------

    @property
    def pending_rows(self) -> int:
        return self._pending_rows

    def flush_due(self) -> bool:
        if self._pending_rows == 0:
            return False
        if self._pending_rows >= self.batch.max_rows or self._pending_bytes >= self.batch.max_bytes:
            return True
        oldest = min(
            (b.oldest for b in self._tables.values() if b.oldest is not None), default=None
        )
        return oldest is not None and time.monotonic() - oldest >= self.batch.max_seconds

    def flush(self) -> dict[str, Any]:
        """Write one Delta commit per table with buffered rows.

        Returns metrics: ``{"rows", "commits", "tables": {name: rows}, "duration_s"}``. On an
        error the tables already committed stay committed (their watermarks protect them
        from being written again) and the others keep their rows for the next flush.
        """
        started = time.monotonic()
        written: dict[str, int] = {}
        ingested_at = datetime.now(UTC)
        for buf in self._tables.values():
            if not buf.rows:
                continue
            data = pa.concat_tables(
                [p.to_arrow(ingested_at) if isinstance(p, _Rows) else p for p in buf.parts],
                promote_options="permissive",
            )
            self._commit(buf, data)
            written[buf.qualified_name] = buf.rows
            self._pending_rows -= buf.rows
            self._pending_bytes -= buf.bytes
            buf.written = buf.accepted
            buf.parts.clear()
            buf.rows = buf.bytes = 0
            buf.oldest = None
        return {
            "rows": sum(written.values()),
            "commits": len(written),
            "tables": written,
            "duration_s": round(time.monotonic() - started, 4),
        }

    def _commit(self, buf: _TableBuffer, data: pa.Table) -> None:
        lsn, seq = buf.accepted
        props = CommitProperties(
            app_transactions=[Transaction(self._lsn_app, lsn), Transaction(self._seq_app, seq)]
        )
        try:
            write_deltalake(
                buf.uri,
                data,
                mode="append",
                partition_by=list(layout.PARTITION_COLUMNS),
                schema_mode="merge",
                storage_options=self.storage_options,
                commit_properties=props,
            )
        except CommitFailedError as e:
            raise TransientSinkError(f"commit to {buf.uri} failed, retry: {e}") from e
        except SchemaMismatchError as e:
            raise TerminalSinkError(
                f"{buf.qualified_name}: the new rows do not fit the Delta table's schema: {e}"
            ) from e
        except (DeltaError, OSError) as e:
            raise TransientSinkError(f"writing {buf.uri} failed: {e}") from e
        log.debug("committed %d rows to %s up to %s", data.num_rows, buf.uri, buf.accepted)
