"""The Delta changelog writer: batches change events per table, one commit per table per flush.

Exactly-once: every commit records, as deltalake app transactions, the position
``(commit_lsn, seq)`` of the last change it contains (app ids ``<app_id>:lsn`` and
``<app_id>:seq``). Before accepting an event the sink compares it with that watermark, so
changes that capture re-sends after a restart (PostgreSQL replays from the last flushed LSN)
are dropped instead of written twice. Because the watermark is per change and not per
transaction, a flush may split a large transaction across commits and a crash in between
still neither loses nor duplicates a row.

An initial snapshot does not go through the buffers:
:meth:`DeltaChangelogSink.add_initial_snapshot` writes each table's rows as they are read, in
one streamed write, then records the watermark.

Kafka mode (``cdc sink``) adds *streams*: a stream is one topic-partition (``"<topic>:<p>"``),
and :meth:`DeltaChangelogSink.add` takes it with the message's offset. Each commit then
records, per stream it covers, the offset of the last message handled
(``<app_id>:<stream>:offset``) and the stream's own ``(commit_lsn, seq)`` watermark
(``<app_id>:<stream>:lsn`` and ``:seq``). The watermark is per stream and not per table
because the partitions of one table advance independently: a position is only comparable
with earlier positions of the same partition, where capture wrote the changes in commit
order. A worker that took over a partition from another (a zombie, say) is detected before
it commits: the offset recorded in Delta must still be the one it started from, and a
concurrent commit of the same stream makes Delta's conflict check fail the later commit.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import (
    ColumnProperties,
    CommitProperties,
    DeltaTable,
    Transaction,
    WriterProperties,
    write_deltalake,
)
from deltalake.exceptions import (
    CommitFailedError,
    DeltaError,
    DeltaProtocolError,
    SchemaMismatchError,
    TableNotFoundError,
)

from catalog import lake_layout as layout
from catalog.current_state import PARTITIONS_APP_ID, partition_app_id
from catalog.schema_registry import SchemaRegistry
from cdc.core import pgtypes
from cdc.core.events import ChangeEvent
from cdc.core.settings import BatchSettings
from cdc.core.table_schema import TableSchema
from sinks.base import Sink
from sinks.delta_append import LocalAppender, local_path, open_appender
from sinks.errors import (
    SinkBackpressureError,
    SinkError,
    StreamFencedError,
    TerminalSinkError,
    TransientSinkError,
)
from sinks.schema_evolution import cast_columns, plan_evolution, widen_in_place

log = logging.getLogger(__name__)

Position = tuple[int, int]  # (commit_lsn, seq)
_FALLBACK_TYPE = pa.map_(pa.string(), pa.string())
_NOTHING_WRITTEN: Position = (-1, -1)
#: Commit threads when ``BatchSettings.commit_threads`` is not set, by where the lake is.
LOCAL_COMMIT_THREADS = 4
REMOTE_COMMIT_THREADS = 16
#: How soon to look again when every commit thread is taken (see _commit_room).
_BUSY_POLL_SECONDS = 0.01
#: Weight of the newest sample in the moving averages of commit times and call intervals.
_AVERAGE_WEIGHT = 0.2
#: How often (seconds) a caller waiting for a snapshot write wakes up (to run signal handlers).
_JOIN_POLL_SECONDS = 0.1

_METADATA_FIELDS = [
    pa.field(layout.OP, pa.string(), nullable=False),
    pa.field(layout.LSN, pa.int64(), nullable=False),
    pa.field(layout.SEQ, pa.int64(), nullable=False),
    pa.field(layout.TXID, pa.int64()),
    pa.field(layout.COMMIT_TS, pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field(layout.INGESTED_AT, pa.timestamp("us", tz="UTC")),
    pa.field(layout.UNCHANGED_TOAST, pa.list_(pa.string())),
    pa.field(layout.FALLBACK, _FALLBACK_TYPE),
    pa.field(layout.DATE, pa.date32(), nullable=False),
]


@contextmanager
def delta_errors(what: str) -> Iterator[None]:
    """Class the errors of a Delta or object-store call made while doing ``what``.

    A conflicting commit, an object store that did not answer, a disk that is full or a
    directory made read-only may all pass: transient. A protocol this deltalake cannot
    write, a table gone or rows that do not fit the table's schema will not: terminal.
    """
    try:
        yield
    except CommitFailedError as e:
        raise TransientSinkError(f"{what}: the commit conflicted, retry: {e}") from e
    except (SchemaMismatchError, pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise TerminalSinkError(f"{what}: the rows do not fit the Delta table: {e}") from e
    except DeltaProtocolError as e:
        raise TerminalSinkError(f"{what}: unsupported Delta protocol: {e}") from e
    except TableNotFoundError as e:
        raise TerminalSinkError(f"{what}: the Delta table is gone: {e}") from e
    except (DeltaError, OSError) as e:
        raise TransientSinkError(f"{what}: {e}") from e


@functools.lru_cache(maxsize=4096)  # built for every batch: hundreds of tables, few shapes each
def changelog_arrow_schema(table: TableSchema) -> pa.Schema:
    """The Arrow schema of ``table``'s changelog: its columns, then the metadata columns."""
    fields = [
        pa.field(c.name, pgtypes.arrow_type(c.type_oid, c.type_modifier)) for c in table.columns
    ]
    return pa.schema(fields + _METADATA_FIELDS)


def _shared_timestamps(values: list[datetime]) -> pa.Array:
    """``pa.array(values)`` for timestamps that repeat in runs (one per transaction):
    each distinct one is converted once, then repeated by index."""
    distinct: dict[datetime, int] = {}
    indices = [distinct.setdefault(ts, len(distinct)) for ts in values]
    return pa.array(list(distinct), type=pa.timestamp("us", tz="UTC")).take(
        pa.array(indices, type=pa.int32())
    )


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
    fallback: list[dict[str, str] | None] = field(default_factory=list)

    def to_arrow(self, ingested_at: datetime) -> pa.Table:
        arrow_schema = changelog_arrow_schema(self.schema)
        n = len(self.ops)
        columns_out: list[pa.Array] = []
        values = self.values
        for i, col in enumerate(self.schema.columns):
            target = arrow_schema.field(i).type
            try:
                # One list per column, then one pa.array call: Arrow building stays out of
                # per-value Python. (zip(*values) is several times slower at 100k rows.)
                columns_out.append(pa.array([row[i] for row in values], type=target))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
                raise TerminalSinkError(
                    f"{self.schema.qualified_name}.{col.name}: value does not fit {target}: {e}"
                ) from e
        commit_ts = _shared_timestamps(self.commit_ts)
        columns_out += [
            pa.array(self.ops, type=pa.string()),
            pa.array(self.lsns, type=pa.int64()),
            pa.array(self.seqs, type=pa.int64()),
            pa.array(self.txids, type=pa.int64()),
            commit_ts,
            pa.repeat(pa.scalar(ingested_at, type=pa.timestamp("us", tz="UTC")), n),
            pa.array(self.unchanged, type=pa.list_(pa.string())),
            pa.array(self.fallback, type=_FALLBACK_TYPE),
            pc.cast(commit_ts, pa.date32()),
        ]
        return pa.Table.from_arrays(columns_out, schema=arrow_schema)


@dataclass(slots=True)
class _Changes:
    """Changes of one table already in changelog form (see :meth:`DeltaChangelogSink.add_changes`);
    only the ingestion time is left to fill in at the flush."""

    data: pa.Table

    def to_arrow(self, ingested_at: datetime) -> pa.Table:
        index = self.data.schema.get_field_index(layout.INGESTED_AT)
        stamp = pa.repeat(pa.scalar(ingested_at, type=pa.timestamp("us", tz="UTC")), len(self.data))
        return self.data.set_column(index, self.data.schema.field(index), stamp)


def changelog_table(
    table: TableSchema,
    values: list[pa.Array],
    *,
    ops: pa.Array,
    lsns: pa.Array,
    seqs: pa.Array,
    txids: pa.Array,
    commit_ts: pa.Array,
    unchanged_toast: pa.Array | None = None,
    fallback: pa.Array | None = None,
) -> pa.Table:
    """Assemble changes already typed column by column into ``table``'s changelog shape.

    ``values`` holds one array per column of ``table``, typed like
    :func:`changelog_arrow_schema` (for a delete, the old row; for a truncate, nulls). The
    metadata arrays are per row: op (``c``/``u``/``d``/``t``), commit LSN, seq, txid and
    commit time; ``unchanged_toast`` (list of column names) and ``fallback`` (map of column
    name to exact text) may be left out when no row has one. The ingestion time is set when
    the rows are flushed, and the date partition comes from the commit time.

    Example:
        >>> data = changelog_table(schema, [pa.array([1])], ops=pa.array(["c"]),
        ...     lsns=pa.array([16], pa.int64()), seqs=pa.array([0], pa.int64()),
        ...     txids=pa.array([700], pa.int64()),
        ...     commit_ts=pa.array([ts], pa.timestamp("us", tz="UTC")))  # doctest: +SKIP
        >>> sink.add_changes(schema, data)  # doctest: +SKIP
    """
    arrow_schema = changelog_arrow_schema(table)
    n = len(ops)
    commit_ts = commit_ts.cast(pa.timestamp("us", tz="UTC"))
    columns = [
        *values,
        ops.cast(pa.string()),
        lsns.cast(pa.int64()),
        seqs.cast(pa.int64()),
        txids.cast(pa.int64()),
        commit_ts,
        pa.nulls(n, type=pa.timestamp("us", tz="UTC")),
        unchanged_toast if unchanged_toast is not None else pa.nulls(n, pa.list_(pa.string())),
        fallback if fallback is not None else pa.nulls(n, type=_FALLBACK_TYPE),
        pc.cast(commit_ts, pa.date32()),
    ]
    return pa.Table.from_arrays(columns, schema=arrow_schema)


def _snapshot_rows(
    table: TableSchema,
    batch: pa.RecordBatch | pa.Table,
    lsn: int,
    first_seq: int,
    read_at: datetime,
) -> pa.Table:
    """Snapshot rows in changelog form: op ``r`` at ``(lsn, first_seq..)``, read at ``read_at``."""
    n = batch.num_rows
    arrow_schema = changelog_arrow_schema(table)
    # Metadata columns are built in Arrow from scalars (no per-row Python objects).
    commit_ts = pa.scalar(read_at, type=pa.timestamp("us", tz="UTC"))
    seqs = pc.cumulative_sum(  # first_seq, first_seq + 1, ...
        pa.repeat(pa.scalar(1, type=pa.int64()), n),
        start=pa.scalar(first_seq - 1, type=pa.int64()),
    )
    columns = [batch.column(c.name) for c in table.columns] + [
        pa.repeat(pa.scalar("r", type=pa.string()), n),
        pa.repeat(pa.scalar(lsn, type=pa.int64()), n),
        seqs,
        pa.nulls(n, type=pa.int64()),
        pa.repeat(commit_ts, n),
        pa.nulls(n, type=pa.timestamp("us", tz="UTC")),
        pa.nulls(n, type=pa.list_(pa.string())),
        batch.column(layout.FALLBACK)
        if layout.FALLBACK in batch.column_names
        else pa.nulls(n, type=_FALLBACK_TYPE),
        pa.repeat(commit_ts.cast(pa.date32()), n),
    ]
    return pa.Table.from_arrays(columns, schema=arrow_schema)


def _snapshot_writer_properties() -> WriterProperties:
    """Parquet settings of the initial snapshot's write, which encodes the whole table while
    the COPY runs and so competes with it (and with PostgreSQL) for the CPU.

    LZ4_RAW instead of delta-rs's default Snappy: measured on the snapshot benchmark's
    table (1M rows, a 65-character text), 0.32-0.36 s of CPU against 0.44-0.49 s, and
    files a little smaller (72.7 MB against 74.3 MB). ``_cdc_seq`` counts up by one: the
    delta encoding stores it in almost nothing, where a dictionary is tried for every
    file and abandoned. Dictionaries, and statistics per page, stay as they are for every
    other column: the constant metadata columns shrink to nothing with them, and
    readers skip files by the statistics. ZSTD level 1 would halve the files (37 MB) for
    Snappy's CPU; no compression at all saves 0.05 s more than LZ4_RAW but writes 9%
    more. LZ4_RAW is read by DuckDB, delta-rs, pyarrow and Spark from 3.4.
    """
    return WriterProperties(
        compression="LZ4_RAW",
        column_properties={
            layout.SEQ: ColumnProperties(dictionary_enabled=False, encoding="DELTA_BINARY_PACKED")
        },
    )


def stream_app_id(app_id: str, stream: str, kind: str) -> str:
    """The app-transaction id of a stream's ``kind`` (``offset``, ``lsn`` or ``seq``).

    >>> stream_app_id("cdc-lakehouse:shop", "shop.public.orders:2", "offset")
    'cdc-lakehouse:shop:shop.public.orders:2:offset'
    """
    return f"{app_id}:{stream}:{kind}"


@dataclass(slots=True)
class _StreamMark:
    """What one stream (topic-partition) has brought to one table."""

    written: Position  # the stream's watermark recorded in Delta
    accepted: Position  # the newest position of the stream buffered or written
    offset_written: int | None  # the offset recorded in Delta when we last looked or wrote
    offset_accepted: int | None  # the newest offset handled (buffered, or dropped as replay)


Part: TypeAlias = _Rows | _Changes | pa.Table


@dataclass(slots=True)
class _InFlight:
    """One table's commit running in a commit thread: the rows taken out of its buffer
    for it, and the positions it records (they become the written ones when it lands)."""

    parts: list[Part]
    rows: int
    bytes: int
    oldest: float
    first_lsn: int
    accepted: Position
    marks: dict[str, tuple[Position, int | None]]  # stream -> (accepted, offset_accepted)
    future: Future[None] | None = None


@dataclass(slots=True)
class _TableBuffer:
    qualified_name: str
    uri: str
    written: Position  # the watermark recorded in Delta
    accepted: Position  # the newest position buffered or written
    parts: list[Part] = field(default_factory=list)
    schema: TableSchema | None = None  # the last schema seen, registered in the registry
    rows: int = 0
    bytes: int = 0
    oldest: float | None = None  # monotonic time the oldest buffered row arrived
    first_lsn: int = 0  # the smallest commit LSN buffered (meaningful while rows > 0)
    streams: dict[str, _StreamMark] = field(default_factory=dict)  # Kafka mode only
    # The incoming Arrow schema last checked against the Delta table, and the conversions
    # that check decided on (see sinks.schema_evolution); re-checked when it changes.
    checked_schema: pa.Schema | None = None
    incoming_casts: dict[str, pa.DataType] = field(default_factory=dict)
    # The table as of this sink's last commit, kept between commits: opening it again
    # replays its log, which costs about as much as the commit itself. Dropped whenever
    # something else may have changed the table (an error, a widening, a discard).
    table: DeltaTable | None = None
    # On a local disk, the appender that commits its rows instead of delta-rs (see
    # sinks.delta_append), dropped with ``table``.
    appender: LocalAppender | None = None
    inflight: _InFlight | None = None  # its commit running now (one at a time per table)
    # The last commit failed without saying whether it landed (see DeltaChangelogSink._write).
    in_doubt: bool = False


def _average(average: float | None, sample: float) -> float:
    """An exponential moving average (the first sample when there is none yet)."""
    return sample if average is None else average + _AVERAGE_WEIGHT * (sample - average)


def _forget_table(buf: _TableBuffer) -> None:
    """Drop what is kept of ``buf``'s table: something may have changed it."""
    buf.table = None
    buf.appender = None


def _after(data: pa.Table, position: Position) -> pa.Table:
    """The rows of ``data`` after ``position`` (``(commit_lsn, seq)``)."""
    if position == _NOTHING_WRITTEN:
        return data
    lsn, seq = position
    lsns, seqs = data.column(layout.LSN), data.column(layout.SEQ)
    newer = pc.or_(pc.greater(lsns, lsn), pc.and_(pc.equal(lsns, lsn), pc.greater(seqs, seq)))
    return data.filter(newer)


def _accept(
    buf: _TableBuffer,
    mark: _StreamMark | None,
    position: Position,
    offset: int | None,
    *,
    dedupe: bool,
) -> None:
    """Move the watermark to ``position``, just buffered: the table's, or in Kafka mode the
    stream's (with the offset handled)."""
    if mark is None:
        buf.accepted = position
        return
    if dedupe:
        mark.accepted = position
    if offset is not None:
        mark.offset_accepted = offset


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
        self._active: dict[str, _TableBuffer] = {}  # the tables with rows buffered
        self._inflight: dict[str, _TableBuffer] = {}  # the tables with a commit running
        self._pool: ThreadPoolExecutor | None = None
        self._last_buffer: _TableBuffer | None = None
        self._pending_rows = 0
        self._pending_bytes = 0
        self._partition_counts: dict[str, int] = {}
        self._local = local_path(self.root) is not None
        # Recent commit time and interval between flush_due_tables calls (see _commit_room).
        self._commit_seconds: float | None = None
        self._call_interval: float | None = None
        self._last_due_call: float | None = None

    @property
    def _lsn_app(self) -> str:
        return f"{self.app_id}:lsn"

    @property
    def _seq_app(self) -> str:
        return f"{self.app_id}:seq"

    @property
    def takes_changes(self) -> bool:
        return True

    # -- watermarks -------------------------------------------------------------------------

    def _buffer_named(self, name: str) -> _TableBuffer:
        buf = self._tables.get(name)
        if buf is None:
            uri = layout.changes_uri(self.root, name)
            written = self._read_watermark(uri)
            buf = _TableBuffer(name, uri, written, written)
            self._tables[name] = buf
        return buf

    def _buffer(self, table: TableSchema) -> _TableBuffer:
        buf = self._last_buffer
        if buf is not None and buf.schema is table:  # most events: the table of the last
            return buf
        buf = self._buffer_named(table.qualified_name)
        self._last_buffer = buf
        # Identity first: the assembler reuses one schema object per table version, so the
        # registry (which hashes the schema) is consulted only when the shape may change.
        if table is not buf.schema:
            if table != buf.schema:
                self.registry.register(table)
            buf.schema = table
        return buf

    def _read_watermark(self, uri: str) -> Position:
        with delta_errors(f"reading the watermark of {uri}"):
            if not DeltaTable.is_deltatable(uri, storage_options=self.storage_options):
                return _NOTHING_WRITTEN
            dt = DeltaTable(uri, storage_options=self.storage_options)
            lsn = dt.transaction_version(self._lsn_app)
            seq = dt.transaction_version(self._seq_app)
        if lsn is None:
            return _NOTHING_WRITTEN
        return (lsn, seq if seq is not None else -1)

    def set_partition_count(self, topic: str, partitions: int) -> None:
        """Kafka mode: ``topic`` has ``partitions`` partitions. Every commit of a table fed
        by it records the count and each partition's mark under the ids of
        :func:`catalog.current_state.partition_app_id`, so that ``cdc jobs merge`` can cap
        its watermark at the oldest partition's (a table written by several partitions is
        not appended in position order)."""
        self._partition_counts[topic] = partitions

    def ensure_table(self, table: TableSchema) -> None:
        """Create ``table``'s changelog if missing, so an empty source table is queryable."""
        buf = self._buffer(table)
        if buf.written == _NOTHING_WRITTEN:
            with delta_errors(f"creating {buf.uri}"):
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

    def _stream(self, buf: _TableBuffer, stream: str) -> _StreamMark:
        mark = buf.streams.get(stream)
        if mark is None:
            written: Position = _NOTHING_WRITTEN
            offset = None
            with delta_errors(f"reading the watermark of {stream} in {buf.uri}"):
                if DeltaTable.is_deltatable(buf.uri, storage_options=self.storage_options):
                    dt = DeltaTable(buf.uri, storage_options=self.storage_options)
                    lsn = dt.transaction_version(stream_app_id(self.app_id, stream, "lsn"))
                    seq = dt.transaction_version(stream_app_id(self.app_id, stream, "seq"))
                    offset = dt.transaction_version(stream_app_id(self.app_id, stream, "offset"))
                    if lsn is not None:
                        written = (lsn, seq if seq is not None else -1)
            mark = _StreamMark(written, written, offset, offset)
            buf.streams[stream] = mark
        return mark

    def committed_offset(self, qualified_name: str, stream: str) -> int | None:
        """The offset of the last message of ``stream`` that ``qualified_name``'s changelog
        covers, as recorded in Delta when this sink first looked (None: nothing yet).

        The first look is also what the sink expects to find at its next commit: a worker
        asks this when it is assigned a partition, so another writer that commits the
        partition afterwards makes that commit fail with :class:`StreamFencedError`.
        """
        return self._stream(self._buffer_named(qualified_name), stream).offset_written

    def discard_snapshot(
        self, tables: list[tuple[str, str]], lsn: int, *, slot_dropped: bool = False
    ) -> None:
        """Delete the snapshot rows (op ``r`` at ``lsn``) an interrupted snapshot wrote
        (whether or not its slot was dropped: see :meth:`sinks.base.Sink.discard_snapshot`)."""
        _, failures = self._collect(block=True)  # no commit may run under the delete
        self._result({}, failures, 0.0)
        for schema_name, table in tables:
            name = f"{schema_name}.{table}"
            if name in self._tables:
                _forget_table(self._tables[name])  # rows deleted under it
            uri = layout.changes_uri(self.root, name)
            with delta_errors(f"deleting the interrupted snapshot from {uri}"):
                if DeltaTable.is_deltatable(uri, storage_options=self.storage_options):
                    dt = DeltaTable(uri, storage_options=self.storage_options)
                    dt.delete(f"{layout.OP} = 'r' AND {layout.LSN} = {lsn}")

    # -- adding -----------------------------------------------------------------------------

    def _check_capacity(self) -> None:
        if self._pending_rows >= self.batch.max_rows or self._pending_bytes >= self.batch.max_bytes:
            raise SinkBackpressureError(
                f"{self._pending_rows} rows / {self._pending_bytes} bytes buffered: flush first"
            )

    def add(
        self,
        event: ChangeEvent,
        *,
        stream: str | None = None,
        offset: int | None = None,
        dedupe: bool = True,
    ) -> None:
        """Buffer ``event`` unless it is at or below the table's watermark (a replay).

        Kafka mode passes the message's ``stream`` (``"<topic>:<partition>"``) and
        ``offset``: the event is then compared with that stream's watermark, and a message
        at or below the stream's newest offset is dropped too. ``dedupe=False`` skips the
        position check, for events whose positions are not capture's exact ones (topics
        written by Debezium itself); the offsets still make writes exactly-once.
        """
        buf = self._buffer(event.table)
        position = (event.commit_lsn, event.seq)
        mark = None
        if stream is None:
            if position <= buf.accepted:
                return
        else:
            mark = self._stream(buf, stream)
            done = mark.offset_accepted
            if offset is not None and done is not None and offset <= done:
                return  # a message this sink has already handled (a re-read after a seek)
            if dedupe and position <= mark.accepted:
                # Re-sent by a restarted capture: handled, so its offset counts as done.
                mark.offset_accepted = offset if offset is not None else mark.offset_accepted
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
        rows.fallback.append(event.fallback)
        _accept(buf, mark, position, offset, dedupe=dedupe)
        self._account(buf, 1, event.size_bytes, event.commit_lsn)

    def add_changes(
        self,
        table: TableSchema,
        changes: pa.Table,
        *,
        size_bytes: int = 0,
        stream: str | None = None,
        offsets: pa.Array | None = None,
        dedupe: bool = True,
    ) -> None:
        """Buffer changes of ``table`` that arrive in Arrow form, the columnar twin of :meth:`add`.

        ``changes`` is shaped like :func:`changelog_table` builds it, rows in ascending
        ``(commit_lsn, seq)`` order. Rows at or below the table's watermark (a replay) are
        dropped, as :meth:`add` drops such events. Kafka mode passes the ``stream`` and each
        row's Kafka ``offsets``: rows at or below the stream's newest handled offset are
        dropped, then rows at or below the stream's watermark (unless ``dedupe`` is false,
        see :meth:`add`); every offset of the batch counts as handled. ``size_bytes`` is
        what the rows took on the wire (for the ``max_bytes`` batch limit).

        Raises:
            SinkBackpressureError: the buffers are full; flush, then add the same batch again.
        """
        if changes.num_rows == 0:
            return
        buf = self._buffer(table)
        mark = None
        last_offset = None
        if stream is None:
            watermark = buf.accepted
        else:
            mark = self._stream(buf, stream)
            watermark = mark.accepted if dedupe else _NOTHING_WRITTEN
            if offsets is not None:
                last_offset = offsets[-1].as_py()
                done = mark.offset_accepted
                if done is not None:
                    fresh = pc.greater(offsets, done)
                    if not pc.all(fresh).as_py():
                        changes = changes.filter(fresh)
        if changes.num_rows and watermark != _NOTHING_WRITTEN:
            # Positions ascend, so a replay is a prefix: count it and cut it off.
            lsn, seq = watermark
            lsns, seqs = changes.column(layout.LSN), changes.column(layout.SEQ)
            replayed = pc.or_(
                pc.less(lsns, lsn), pc.and_(pc.equal(lsns, lsn), pc.less_equal(seqs, seq))
            )
            skip = pc.sum(replayed).as_py() or 0
            if skip:
                changes = changes.slice(skip)
        if changes.num_rows == 0:
            if mark is not None and last_offset is not None:
                mark.offset_accepted = last_offset  # handled: replays count as done
            return
        self._check_capacity()
        last = (changes.column(layout.LSN)[-1].as_py(), changes.column(layout.SEQ)[-1].as_py())
        buf.parts.append(_Changes(changes))
        _accept(buf, mark, last, last_offset, dedupe=dedupe)
        self._account(
            buf,
            changes.num_rows,
            size_bytes or changes.nbytes,
            pc.min(changes.column(layout.LSN)).as_py(),
        )

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

        ``batch`` may carry a ``_cdc_fallback`` map column (see :mod:`cdc.postgres.snapshot`).

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
        buf.parts.append(_snapshot_rows(table, batch, lsn, first_seq, read_at))
        buf.accepted = (lsn, first_seq + n - 1)
        self._account(buf, n, batch.nbytes, lsn)

    def add_initial_snapshot(
        self,
        table: TableSchema,
        batches: Iterable[pa.Table],
        *,
        lsn: int,
        read_at: datetime,
        flush: Callable[[], object],
    ) -> dict[str, Any]:
        """Write ``table``'s initial snapshot as it is read: one streamed Delta write (files
        of up to ``batch.max_bytes`` of Parquet), then a commit of no rows that records the
        watermark ``(lsn, last seq)``.

        delta-rs encodes the Parquet without the GIL while the caller's reader copies the
        next rows, and no row waits in this sink's buffers: memory holds the batches in
        flight and the file being encoded. When rows at or after ``(lsn, 0)`` are already
        accepted (a replay to deduplicate), the rows go through :meth:`add_snapshot`
        instead (:meth:`Sink.add_initial_snapshot`).

        Hazard: between the two commits the rows are in the table with no watermark. A run
        that stops there has not finished its snapshot, so the next run discards them
        (:meth:`discard_snapshot`) and copies again, as after any interrupted initial
        snapshot. A failed write is not retried (its batches are consumed): the error, or
        the one ``batches`` raised, ends the snapshot.
        """
        buf = self._buffer(table)
        if buf.accepted >= (lsn, 0):
            return super().add_initial_snapshot(
                table, batches, lsn=lsn, read_at=read_at, flush=flush
            )
        if buf.rows:
            flush()  # what is buffered first (a re-snapshot's gap marker), in its own commit
        started = time.monotonic()
        shape = self._evolve(buf, changelog_arrow_schema(table).empty_table()).schema
        casts = buf.incoming_casts
        rows = 0
        failure: list[BaseException] = []
        abandoned = threading.Event()

        def changelog() -> Iterator[pa.RecordBatch]:  # pulled by delta-rs, GIL taken per batch
            nonlocal rows
            try:
                for batch in batches:
                    if abandoned.is_set():
                        raise TerminalSinkError(
                            f"the snapshot of {buf.qualified_name} was abandoned"
                        )
                    if batch.num_rows:
                        data = _snapshot_rows(table, batch, lsn, rows, read_at)
                        rows += batch.num_rows
                        yield from (cast_columns(data, casts) if casts else data).to_batches()
            except BaseException as e:  # delta-rs only sees a failed stream: keep the cause
                failure.append(e)
                raise

        what = f"writing the snapshot of {buf.qualified_name} to {buf.uri}"
        errors: list[BaseException] = []

        def write() -> None:
            try:
                with delta_errors(what):
                    write_deltalake(
                        buf.uri,
                        pa.RecordBatchReader.from_batches(shape, changelog()),
                        mode="append",
                        partition_by=list(layout.PARTITION_COLUMNS),
                        schema_mode="merge",
                        storage_options=self.storage_options,
                        target_file_size=self.batch.max_bytes,
                        writer_properties=_snapshot_writer_properties(),
                    )
            except BaseException as e:  # handed to the calling thread below
                errors.append(e)

        # In a thread of its own, so that the calling thread stays in Python while the
        # table is copied and runs signal handlers (a SIGTERM sets the caller's stop, which
        # ``batches`` obeys): delta-rs holds the thread it is called from until it is done.
        writer = threading.Thread(target=write, name="cdc-snapshot-write", daemon=True)
        writer.start()
        try:
            while writer.is_alive():
                writer.join(_JOIN_POLL_SECONDS)
        except BaseException:  # KeyboardInterrupt: end the stream, then the writer
            abandoned.set()
            writer.join()
            raise
        if failure:
            raise failure[0]
        if errors:
            raise errors[0]
        if not rows:
            return {"rows": 0, "commits": 0, "tables": {}, "duration_s": 0.0}
        buf.accepted = (lsn, rows - 1)
        props = CommitProperties(app_transactions=self._transactions(buf))
        with delta_errors(f"recording the snapshot watermark of {buf.qualified_name}"):
            write_deltalake(
                buf.uri,
                shape.empty_table(),
                mode="append",
                partition_by=list(layout.PARTITION_COLUMNS),
                storage_options=self.storage_options,
                commit_properties=props,
            )
        buf.written = buf.accepted
        _forget_table(buf)  # written through its URI: the open table is behind
        log.debug("snapshot of %d rows written to %s up to %s", rows, buf.uri, buf.accepted)
        return {
            "rows": rows,
            "commits": 2,
            "tables": {buf.qualified_name: rows},
            "duration_s": round(time.monotonic() - started, 4),
        }

    def _account(self, buf: _TableBuffer, rows: int, size: int, lsn: int) -> None:
        if buf.oldest is None:
            buf.oldest = time.monotonic()
            buf.first_lsn = lsn
            self._active[buf.qualified_name] = buf
        elif lsn < buf.first_lsn:  # Kafka mode: streams interleave their positions
            buf.first_lsn = lsn
        buf.rows += rows
        buf.bytes += size
        self._pending_rows += rows
        self._pending_bytes += size

    def latest_schema(self, qualified_name: str) -> TableSchema | None:
        return self.registry.latest(qualified_name)

    # -- flushing ---------------------------------------------------------------------------

    @property
    def pending_rows(self) -> int:
        return self._pending_rows

    def pending_since(self) -> int | None:
        """The smallest commit LSN of a row not yet durable, buffered or being committed
        (``None``: there is none).

        Each table's positions ascend, and a table's rows are committed in that order, so
        every change of a transaction that committed below this LSN is durable: capture
        may confirm such a transaction while other tables still hold rows.
        """
        lsns = [buf.first_lsn for buf in self._active.values()]
        lsns += [buf.inflight.first_lsn for buf in self._inflight.values() if buf.inflight]
        return min(lsns, default=None)

    def _shares(self) -> tuple[float, float]:
        """Each active table's share of the row and byte limits. When the buffers are
        full (the sum reaches a limit) some table holds at least its share, so flushing
        the due tables always frees room."""
        active = len(self._active) or 1
        return self.batch.max_rows / active, self.batch.max_bytes / active

    def _due(self) -> list[_TableBuffer]:
        """The tables due for a commit, the one waiting longest first."""
        now = time.monotonic()
        rows, size = self._shares()
        age = self.batch.max_seconds
        due = [
            buf
            for buf in self._active.values()
            if buf.inflight is None
            and (buf.rows >= rows or buf.bytes >= size or now - (buf.oldest or now) >= age)
        ]
        due.sort(key=lambda buf: buf.oldest or now)
        return due

    def _commit_room(self) -> int | None:
        """How many more commits :meth:`flush_due_tables` may start now (``None``: no
        limit, before any commit has been timed).

        A commit takes its table's rows when it is submitted, and rows that arrive while
        it waits in the queue wait for the table's next commit. With hundreds of due
        tables and a queue of all of them, that doubles the staleness. So only as many
        commits are queued as the threads will start before the caller's next call (from
        the recent commit time and call interval, with half again as margin), the oldest
        tables first; the others keep gathering rows and go in a later call."""
        if self._commit_seconds is None or self._call_interval is None:
            return None
        threads = self._threads()
        per_call = threads * self._call_interval / max(self._commit_seconds, 1e-4)
        return max(threads, math.ceil(1.5 * per_call)) - len(self._inflight)

    def flush_due(self) -> bool:
        """Whether some table is due (its oldest row has waited ``max_seconds``, or it
        holds its share of ``max_rows`` / ``max_bytes``: the limit divided among the
        tables with rows buffered), or a commit started by :meth:`flush_due_tables` has
        ended and waits to be accounted for."""
        return self.seconds_until_flush() == 0.0

    def seconds_until_flush(self) -> float:
        """How long until :meth:`flush_due` holds with nothing more added (``inf``: nothing
        is buffered). Callers that block waiting for input cap the wait with it, so a
        batch is committed on time instead of a wait later."""
        for buf in self._inflight.values():
            if buf.inflight is not None and buf.inflight.future and buf.inflight.future.done():
                return 0.0
        room = self._commit_room()
        if room is not None and room <= 0:
            return _BUSY_POLL_SECONDS  # due or not, nothing can start until a commit ends
        rows, size = self._shares()
        oldest = math.inf
        for buf in self._active.values():
            if buf.inflight is not None:
                continue  # its next commit waits for the running one
            if buf.rows >= rows or buf.bytes >= size:
                return 0.0
            if buf.oldest is not None and buf.oldest < oldest:
                oldest = buf.oldest
        return max(0.0, oldest + self.batch.max_seconds - time.monotonic())

    def flush(self) -> dict[str, Any]:
        """Commit every buffered row, one Delta commit per table, the tables concurrently;
        returns when all are committed (commits started by :meth:`flush_due_tables` too).

        Returns metrics: ``{"rows", "commits", "tables": {name: rows}, "duration_s"}``. On an
        error every other table is still committed; those committed stay committed (their
        watermarks protect them from being written again), the failed ones keep their rows
        for the next flush, and the error of the first failed table is raised (a terminal
        one before a transient one).
        """
        started = time.monotonic()
        written, failures = self._collect(block=True)
        failed = set(failures)
        ingested_at = datetime.now(UTC)
        for buf in list(self._active.values()):
            if buf.qualified_name not in failed:
                self._submit(buf, ingested_at, failures)
        more, errors = self._collect(block=True)
        failures.update(errors)
        for name, rows in more.items():
            written[name] = written.get(name, 0) + rows
        return self._result(written, failures, started)

    def flush_due_tables(self) -> dict[str, Any]:
        """Start the commits of the tables that are due (see :meth:`flush_due`) and return
        at once; account for the commits that have ended since the last call. A table
        that changes rarely is not committed with every busy one, a busy one does not wait
        for the others' age, and a slow commit (an object store taking its time) holds up
        no other table: each has at most one commit running, and capture goes on reading
        meanwhile. :attr:`pending_rows` and :meth:`pending_since` count the rows of a
        running commit until it has landed.

        Returns metrics of the commits that ended, as :meth:`flush` does; raises the error
        of a commit that failed (its rows are buffered again).
        """
        started = time.monotonic()
        if self._last_due_call is not None:
            # Capped: after a quiet spell the caller is back to calling at least this often.
            interval = min(started - self._last_due_call, self.batch.max_seconds)
            self._call_interval = _average(self._call_interval, interval)
        self._last_due_call = started
        written, failures = self._collect(block=False)
        ingested_at = datetime.now(UTC)
        room = self._commit_room()
        for buf in self._due():
            if room is not None and room <= 0:
                break
            if buf.qualified_name not in failures:
                self._submit(buf, ingested_at, failures)
                if room is not None:
                    room -= 1
        return self._result(written, failures, started)

    def _threads(self) -> int:
        if self.batch.commit_threads is not None:
            return self.batch.commit_threads
        # Measured (benchmarks/many_tables.py): on a local disk, commits are CPU-bound,
        # and a few threads keep two cores busy; on an object store each commit waits for
        # several round trips, so more of them overlap.
        return LOCAL_COMMIT_THREADS if self._local else REMOTE_COMMIT_THREADS

    def _submit(
        self, buf: _TableBuffer, ingested_at: datetime, failures: dict[str, BaseException]
    ) -> None:
        """Take ``buf``'s rows out and start their commit in a commit thread."""
        try:
            # Decided here, in the caller's thread: what the commit records, and for a
            # Kafka stream the fencing check, which reads the marks that add() moves.
            txns = self._transactions(buf)
            target = self._fenced_target(buf) if buf.streams else None
        except SinkError as e:
            failures[buf.qualified_name] = e
            return
        assert buf.oldest is not None
        flight = _InFlight(
            buf.parts,
            buf.rows,
            buf.bytes,
            buf.oldest,
            buf.first_lsn,
            buf.accepted,
            {s: (m.accepted, m.offset_accepted) for s, m in buf.streams.items()},
        )
        buf.parts = []
        buf.rows = buf.bytes = 0
        buf.oldest = None
        del self._active[buf.qualified_name]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self._threads(), thread_name_prefix="delta-commit"
            )
        buf.inflight = flight
        self._inflight[buf.qualified_name] = buf
        flight.future = self._pool.submit(self._write, buf, flight.parts, ingested_at, txns, target)

    def _collect(self, *, block: bool) -> tuple[dict[str, int], dict[str, BaseException]]:
        """Account for the commits that have ended (all of them, waiting, with ``block``):
        rows written per table, and the errors of those that failed, whose rows go back
        in front of their buffers."""
        written: dict[str, int] = {}
        failures: dict[str, BaseException] = {}
        if block:
            wait(
                [
                    b.inflight.future
                    for b in self._inflight.values()
                    if b.inflight and b.inflight.future
                ]
            )
        for name, buf in list(self._inflight.items()):
            flight = buf.inflight
            assert flight is not None and flight.future is not None
            if not flight.future.done():
                continue
            error = flight.future.exception()
            del self._inflight[name]
            buf.inflight = None
            if error is None:
                written[name] = flight.rows
                self._pending_rows -= flight.rows
                self._pending_bytes -= flight.bytes
                buf.written = flight.accepted
                for stream, (accepted, offset) in flight.marks.items():
                    mark = buf.streams[stream]
                    mark.written = accepted
                    mark.offset_written = offset
                continue
            failures[name] = error
            buf.in_doubt = True
            buf.parts[:0] = flight.parts
            if buf.oldest is None:
                buf.first_lsn = flight.first_lsn
                self._active[name] = buf
            else:
                buf.first_lsn = min(buf.first_lsn, flight.first_lsn)
            buf.oldest = flight.oldest
            buf.rows += flight.rows
            buf.bytes += flight.bytes
        return written, failures

    def _result(
        self, written: dict[str, int], failures: dict[str, BaseException], started: float
    ) -> dict[str, Any]:
        if failures:
            errors = list(failures.values())
            if len(errors) > 1:
                names = sorted(failures)
                log.warning(
                    "%d table commits failed (%s%s); the first: %s",
                    len(errors),
                    ", ".join(names[:5]),
                    ", ..." if len(names) > 5 else "",
                    errors[0],
                )
            raise next((e for e in errors if isinstance(e, TerminalSinkError)), errors[0])
        return {
            "rows": sum(written.values()),
            "commits": len(written),
            "tables": written,
            "duration_s": round(time.monotonic() - started, 4),
        }

    def _write(
        self,
        buf: _TableBuffer,
        parts: list[Part],
        ingested_at: datetime,
        txns: list[Transaction],
        target: DeltaTable | str | None,
    ) -> None:
        """Commit ``parts`` (in a commit thread: touches nothing of ``buf`` but what only
        its commits use: the checked schema and the open table)."""
        started = time.monotonic()
        try:
            data = pa.concat_tables(
                [p if isinstance(p, pa.Table) else p.to_arrow(ingested_at) for p in parts],
                promote_options="permissive",
            )
            if buf.in_doubt and not buf.streams:
                # A failed commit may still have landed: an object store can take the PUT of
                # the log entry and lose its answer (a timeout). The watermark the table
                # records decides which of the rows are still to write. (Kafka mode needs no
                # check: a failed flush makes the worker re-read from the offsets in Delta.)
                data = _after(data, self._read_watermark(buf.uri))
                if data.num_rows == 0:
                    buf.in_doubt = False
                    return
            self._commit(buf, data, txns, target)
            buf.in_doubt = False
        finally:
            self._commit_seconds = _average(self._commit_seconds, time.monotonic() - started)

    def close(self) -> None:
        """Wait for the commits running, and stop the commit threads (does not flush)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _transactions(self, buf: _TableBuffer) -> list[Transaction]:
        """The app transactions of ``buf``'s next commit: what it covers."""
        txns = []
        counts: set[int] = set()
        if buf.accepted != buf.written:
            lsn, seq = buf.accepted
            txns += [Transaction(self._lsn_app, lsn), Transaction(self._seq_app, seq)]
        for stream, mark in buf.streams.items():
            if mark.accepted != mark.written:
                lsn, seq = mark.accepted
                txns.append(Transaction(stream_app_id(self.app_id, stream, "lsn"), lsn))
                txns.append(Transaction(stream_app_id(self.app_id, stream, "seq"), seq))
                topic, _, partition = stream.rpartition(":")
                if topic in self._partition_counts and partition.isdigit():
                    txns.append(Transaction(partition_app_id(int(partition), "lsn"), lsn))
                    txns.append(Transaction(partition_app_id(int(partition), "seq"), seq))
                    counts.add(self._partition_counts[topic])
            if mark.offset_accepted is not None and mark.offset_accepted != mark.offset_written:
                offset_app = stream_app_id(self.app_id, stream, "offset")
                txns.append(Transaction(offset_app, mark.offset_accepted))
        if counts:
            txns.append(Transaction(PARTITIONS_APP_ID, max(counts)))
        return txns

    def _target(self, buf: _TableBuffer) -> str | DeltaTable:
        """Where to commit ``buf`` when it holds no streams: the table kept from its last
        commit (delta-rs brings it up to date at the commit, checking for conflicts with
        commits made since)."""
        if buf.table is None:
            with delta_errors(f"reading {buf.uri}"):
                if DeltaTable.is_deltatable(buf.uri, storage_options=self.storage_options):
                    buf.table = DeltaTable(buf.uri, storage_options=self.storage_options)
        return buf.table if buf.table is not None else buf.uri

    def _fenced_target(self, buf: _TableBuffer) -> str | DeltaTable:
        """Where to commit ``buf``: its URI, or, when it holds streams, the table as read
        now, after checking that no other writer has committed those streams since this
        sink looked. Committing through that snapshot makes Delta reject the commit if one
        does so in between (two commits setting one app id conflict)."""
        if not buf.streams:
            return buf.uri
        with delta_errors(f"reading {buf.uri}"):
            if not DeltaTable.is_deltatable(buf.uri, storage_options=self.storage_options):
                return buf.uri
            dt = DeltaTable(buf.uri, storage_options=self.storage_options)
        for stream, mark in buf.streams.items():
            if mark.offset_accepted == mark.offset_written:
                continue  # not in this commit
            with delta_errors(f"reading {buf.uri}"):
                recorded = dt.transaction_version(stream_app_id(self.app_id, stream, "offset"))
            if recorded != mark.offset_written:
                raise StreamFencedError(
                    f"{buf.qualified_name}: another writer committed {stream} up to offset "
                    f"{recorded} (this sink expected {mark.offset_written}); the partition "
                    "belongs to someone else now"
                )
        return dt

    def _evolve(self, buf: _TableBuffer, data: pa.Table) -> pa.Table:
        """Apply the schema-evolution policy before writing rows of a changed shape."""
        if data.schema != buf.checked_schema:
            buf.incoming_casts = {}
            with delta_errors(f"reading the schema of {buf.uri}"):
                exists = DeltaTable.is_deltatable(buf.uri, storage_options=self.storage_options)
                dt = DeltaTable(buf.uri, storage_options=self.storage_options) if exists else None
            if dt is not None:
                lake = pa.schema(dt.schema().to_arrow())
                plan = plan_evolution(lake, data.schema, table=buf.qualified_name)
                if plan.widen:
                    _forget_table(buf)  # rewritten: opened again for the next commit
                    with delta_errors(f"widening columns of {buf.uri}"):
                        rows = widen_in_place(
                            buf.uri, plan.widen, storage_options=self.storage_options
                        )
                    log.warning(
                        "%s: widened %s in place (%d rows rewritten)",
                        buf.qualified_name,
                        ", ".join(f"{c} to {t}" for c, t in plan.widen.items()),
                        rows,
                    )
                buf.incoming_casts = plan.cast_incoming
            buf.checked_schema = data.schema
        return cast_columns(data, buf.incoming_casts) if buf.incoming_casts else data

    def _commit(
        self,
        buf: _TableBuffer,
        data: pa.Table,
        txns: list[Transaction],
        target: DeltaTable | str | None,
    ) -> None:
        data = self._evolve(buf, data)
        if target is None and self._append(buf, data, txns):
            return
        props = CommitProperties(app_transactions=txns)
        if target is None:
            target = self._target(buf)
        committed = False
        try:
            with delta_errors(f"writing {data.num_rows} rows of {buf.qualified_name} to {buf.uri}"):
                write_deltalake(
                    target,
                    data,
                    mode="append",
                    partition_by=list(layout.PARTITION_COLUMNS),
                    schema_mode="merge",
                    storage_options=self.storage_options,
                    commit_properties=props,
                )
            committed = True
        finally:
            if not committed:
                buf.table = None  # its state is in doubt: read the table again next time
            buf.appender = None  # behind this commit: opened again for the next one
        log.debug("committed %d rows to %s", data.num_rows, buf.uri)

    def _append(self, buf: _TableBuffer, data: pa.Table, txns: list[Transaction]) -> bool:
        """Commit ``data`` with the blind append of :mod:`sinks.delta_append` when the
        lake is on a local disk and the rows fit the table as they are; ``False`` when
        delta-rs must commit them (an object store, a schema to evolve, a table changed
        by another writer)."""
        if not self._local:
            return False
        what = f"appending {data.num_rows} rows to {buf.uri}"
        with delta_errors(what):
            if buf.appender is None:
                buf.appender = open_appender(buf.uri)
            if buf.appender is None or not buf.appender.accepts(data):
                return False
            version = buf.appender.append(data, transactions=[(t.app_id, t.version) for t in txns])
        if version is None:
            buf.appender = None
            return False
        buf.table = None  # behind the append: opened again if delta-rs commits next
        log.debug("appended %d rows to %s at version %d", data.num_rows, buf.uri, version)
        return True
