"""``cdc capture``'s columnar path into Kafka: the messages of a whole columnar batch (a
:class:`~cdc.postgres.columnar.ChangeBatch`), built column by column with Arrow compute.

Each column's values become their JSON text for the whole batch at once (integers, dates and
timestamps by casts, timestamptz by ``strftime``, strings quoted in place; other types by
the column's Debezium encoder, value by value, without an event or a row dict), and one
element-wise join per batch lays them out as the rows' keys and envelopes. The bytes are
those :class:`~cdc.kafka.event_encoder.EventEncoder` gives the
:class:`~cdc.core.events.ChangeEvent` of the same change (``tests/unit/
test_kafka_capture_columnar.py`` checks it byte for byte): the layout below follows
:func:`cdc.core.events.envelope_payload` and must change with it.

Rows the fast path does not lay out (values kept as text in ``_cdc_fallback``, unchanged
TOAST columns, a value its encoder refuses or JSON cannot hold) are turned into events
(:func:`changelog_events`) and take the per-event encoder, in their place in the batch.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from catalog import lake_layout as layout
from cdc.core import pgtypes
from cdc.core.errors import ValueConversionError
from cdc.core.events import CONNECTOR_VERSION, ChangeEvent, commit_millis
from cdc.core.kafka_format import HEADER_COMMIT_TS_US, HEADER_LSN, HEADER_SCHEMA_ID, HEADER_SEQ
from cdc.core.lsn import format_lsn
from cdc.core.table_schema import ColumnSchema, TableSchema
from cdc.kafka.event_encoder import EncodedMessage, EventEncoder

__all__ = ["BatchEncoder", "EncodedBatch", "changelog_events"]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE: Final = datetime(1970, 1, 1)
_MICROS_PER_UNIT: Final = {"s": 1_000_000, "ms": 1000, "us": 1}

# Large offsets: a batch of wide rows may hold more than 2 GiB of JSON.
_BIN: Final = pa.large_binary()
_NULL: Final = pa.scalar(b"null", _BIN)
_NOTHING: Final = pa.scalar(b"", _BIN)
#: Characters JSON strings escape (orjson escapes exactly these): such values are dumped
#: one by one, the others are quoted as they are.
_ESCAPED: Final = r'[\x00-\x1f"\\]'
_UNESCAPED: Final = bytes(b for b in range(256) if b >= 0x20 and b not in b'"\\')
_CHANGE_OPS: Final = pa.array(["c", "u", "d"])

Headers = list[tuple[str, str | bytes | None]]


def _lit(data: bytes) -> pa.Scalar:
    return pa.scalar(data, _BIN)


def _join(*parts: pa.Array | pa.Scalar) -> pa.Array:
    """Element-wise concatenation (a null part makes the element null)."""
    return pc.binary_join_element_wise(*parts, _NOTHING)


def _strings(values: pa.Array) -> pa.Array:
    """Integers (or strings) as the bytes of their decimal text."""
    return pc.cast(pc.cast(values, pa.string()), _BIN)


#: (typed column, its texts as sent, the column) -> (each value's JSON, rows whose value
#: the fast path cannot give: None when there are none).
_Fragments = Callable[[pa.Array, pa.Array | None, ColumnSchema], tuple[pa.Array, pa.Array | None]]


def _integers(typed: pa.Array, _text: pa.Array | None, _c: ColumnSchema) -> tuple[Any, Any]:
    return _strings(typed).fill_null(_NULL), None


def _booleans(typed: pa.Array, _text: pa.Array | None, _c: ColumnSchema) -> tuple[Any, Any]:
    return pc.if_else(typed, _lit(b"true"), _lit(b"false")).fill_null(_NULL), None


def _texts(typed: pa.Array, _text: pa.Array | None, _c: ColumnSchema) -> tuple[Any, Any]:
    quoted = _join(_lit(b'"'), pc.cast(typed, _BIN), _lit(b'"'))
    if _may_need_escapes(typed):
        escaped = pc.match_substring_regex(typed, _ESCAPED).fill_null(False)
        if pc.any(escaped).as_py():
            dumped = [orjson.dumps(v) for v in typed.filter(escaped).to_pylist()]
            quoted = pc.replace_with_mask(quoted, escaped, pa.array(dumped, _BIN))
    return quoted.fill_null(_NULL), None


def _may_need_escapes(typed: pa.Array) -> bool:
    """Whether any byte of the column's values is one JSON escapes (one pass over the
    whole data buffer: several times faster than the regular expression row by row)."""
    _validity, offsets, data = typed.buffers()
    if data is None or len(typed) == 0:
        return False
    ends = memoryview(offsets).cast("q" if pa.types.is_large_string(typed.type) else "i")
    used = memoryview(data)[ends[typed.offset] : ends[typed.offset + len(typed)]]
    return bool(used.tobytes().translate(None, _UNESCAPED))


def _dates(typed: pa.Array, _text: pa.Array | None, _c: ColumnSchema) -> tuple[Any, Any]:
    # Days since the epoch, as pgtypes' date encoder gives them.
    return _strings(pc.cast(typed, pa.int32())).fill_null(_NULL), None


def _timestamps(typed: pa.Array, _text: pa.Array | None, c: ColumnSchema) -> tuple[Any, Any]:
    micros = pc.cast(typed, pa.int64())
    if pgtypes.temporal_precision(c.type_modifier) > 3:  # MicroTimestamp
        return _strings(micros).fill_null(_NULL), None
    # Timestamp (milliseconds): a value with sub-millisecond digits is refused.
    millis = pc.divide(micros, 1000)  # truncates; exact where it is not refused
    refused = pc.not_equal(pc.multiply(millis, 1000), micros).fill_null(False)
    return _strings(millis).fill_null(_NULL), refused


def _zoned_timestamps(typed: pa.Array, _text: pa.Array | None, c: ColumnSchema) -> tuple[Any, Any]:
    # ZonedTimestamp: 'YYYY-MM-DDTHH:MM:SS.ffffff' (UTC; the year has four digits, as
    # Python's are), then as pgtypes' encoder shortens it: to the column's precision when
    # the digits beyond it are zeros (no fraction at all for precision 0), else all six.
    # Cast without the zone: the same UTC values, printed 50 times faster than with it.
    text = pc.cast(pc.cast(typed, pa.timestamp("us")), pa.string())  # 'YYYY-MM-DD HH:...'
    text = pc.cast(pc.utf8_replace_slice(text, 10, 11, "T"), _BIN)
    precision = pgtypes.temporal_precision(c.type_modifier)
    if precision < 6:
        short = pc.binary_slice(text, 0, 20 + precision if precision else 19)
        text = pc.if_else(pc.ends_with(text, pattern=b"0" * (6 - precision)), short, text)
    return _join(_lit(b'"'), text, _lit(b'Z"')).fill_null(_NULL), None


def _per_value(column: ColumnSchema) -> _Fragments:
    """Any other type: each value through the column's Debezium encoder, as the per-event
    path does (the same Python values, see :func:`_column_values`)."""
    encode = pgtypes.debezium_encoder(column.type_oid, column.type_modifier)
    dumps = orjson.dumps

    def fragments(typed: pa.Array, text: pa.Array | None, c: ColumnSchema) -> tuple[Any, Any]:
        out: list[bytes] = []
        refused: list[int] = []
        for i, value in enumerate(_column_values(typed, c, text)):
            if value is None:
                out.append(b"null")
                continue
            try:
                out.append(dumps(encode(value)))
            except (ValueConversionError, orjson.JSONEncodeError):
                out.append(b"null")
                refused.append(i)
        mask = None
        if refused:
            flags = [False] * len(out)
            for i in refused:
                flags[i] = True
            mask = pa.array(flags, pa.bool_())
        return pa.array(out, _BIN), mask

    return fragments


def _fragments_of(column: ColumnSchema) -> _Fragments:
    """How a column's values become JSON for a whole batch."""
    oid, modifier = column.type_oid, column.type_modifier
    arrow = pgtypes.arrow_type(oid, modifier)
    encoder = pgtypes.debezium_encoder(oid, modifier)
    if encoder is pgtypes.IDENTITY_ENCODER and pa.types.is_integer(arrow):
        return _integers
    if encoder is pgtypes.IDENTITY_ENCODER and pa.types.is_boolean(arrow):
        return _booleans
    if encoder is pgtypes.TEXT_ENCODER and pa.types.is_string(arrow):
        return _texts
    if oid == pgtypes.Oid.DATE:
        return _dates
    if oid == pgtypes.Oid.TIMESTAMP and arrow == pa.timestamp("us"):
        return _timestamps
    if oid == pgtypes.Oid.TIMESTAMPTZ and arrow == pa.timestamp("us", tz="UTC"):
        return _zoned_timestamps
    return _per_value(column)


@dataclass(slots=True)
class _Layout:
    """The constant parts of one table shape's messages."""

    schema: TableSchema
    fragments: tuple[_Fragments, ...]
    names: tuple[bytes, ...]  # '"a":' before each column's value
    key_positions: tuple[int, ...]
    key_names: tuple[bytes, ...]
    key_wrap: tuple[bytes, bytes]  # around the key object (json-with-schema: the schema)
    value_wrap: tuple[bytes, bytes]  # around the envelope
    source: tuple[bytes, bytes, bytes]  # the envelope's constant runs around source fields


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """The change messages of a batch's rows, in row order, ready for ``produce``.

    ``deletes`` flags the rows that are deletes (a keyed delete is followed by a tombstone);
    ``partitions`` holds -1 where the producer's partitioner picks by key. Each row's
    headers come from :meth:`headers` (built as they are sent: the commit's headers are
    shared, only the seq differs from row to row).
    """

    topic: str
    keys: list[bytes | None]
    values: list[bytes]
    partitions: list[int]
    deletes: list[bool]
    schema_id: bytes
    seqs: list[bytes]  # each row's seq header
    lsn_headers: tuple[list[tuple[str, bytes]], list[int]]  # per commit LSN, row -> which
    time_headers: tuple[list[tuple[str, bytes]], list[int]]  # per commit time, row -> which

    def headers(self) -> Iterator[Headers]:
        """Each row's headers, in row order (those of the per-event encoder)."""
        schema = (HEADER_SCHEMA_ID, self.schema_id)
        lsn_header, lsn_of = self.lsn_headers
        time_header, time_of = self.time_headers
        for seq, lsn, at in zip(self.seqs, lsn_of, time_of, strict=True):
            yield [schema, lsn_header[lsn], (HEADER_SEQ, seq), time_header[at]]

    def messages(self, *, tombstones: bool = True) -> Iterator[EncodedMessage]:
        """The messages as :meth:`EventEncoder.encode <cdc.kafka.event_encoder.EventEncoder.
        encode>` gives them, tombstones included."""
        for key, value, headers, partition, deleted in zip(
            self.keys, self.values, self.headers(), self.partitions, self.deletes, strict=True
        ):
            yield EncodedMessage(
                self.topic, key, value, headers, None if partition < 0 else partition
            )
            if tombstones and deleted and key is not None:
                yield EncodedMessage(self.topic, key, None, [])


class BatchEncoder:
    """Encodes columnar batches with ``encoder``'s settings (prefix, database, format) and
    its table codecs (topics, schema ids, Connect schemas).

    Example:
        >>> batch_encoder = BatchEncoder(EventEncoder(prefix="shop", database="shop"))  # doctest: +SKIP
        >>> encoded = batch_encoder.encode(batch.table, batch.changes, lsns=batch.lsns,
        ...                                texts=batch.texts, partitions=3)  # doctest: +SKIP
    """

    def __init__(self, encoder: EventEncoder) -> None:
        self.encoder = encoder
        self._layouts: dict[str, _Layout] = {}

    def _layout(self, table: TableSchema) -> _Layout:
        layout_ = self._layouts.get(table.qualified_name)
        if layout_ is not None and (layout_.schema is table or layout_.schema == table):
            layout_.schema = table
            return layout_
        codec = self.encoder.codec(table)
        dumps = orjson.dumps
        names = tuple(dumps(c.name) + b":" for c in table.columns)
        key_names = tuple(dumps(table.columns[j].name) + b":" for j in codec.key_positions)
        key_wrap = value_wrap = (b"", b"")
        if codec.key_schema is not None:
            key_wrap = (b'{"schema":' + dumps(codec.key_schema) + b',"payload":', b"}")
        if codec.value_schema is not None:
            value_wrap = (b'{"schema":' + dumps(codec.value_schema) + b',"payload":', b"}")
        enc = self.encoder
        source = (
            # before "ts_ms" (the commit's milliseconds)
            b',"source":{"version":'
            + dumps(CONNECTOR_VERSION)
            + b',"connector":"postgresql","name":'
            + dumps(enc.prefix)
            + b',"ts_ms":',
            # between "ts_ms" and the message LSN of "sequence"
            b',"snapshot":"false","db":' + dumps(enc.database) + b',"sequence":"[null,\\"',
            # between the LSN of "sequence" and "txId"
            b'\\"]","schema":'
            + dumps(table.schema)
            + b',"table":'
            + dumps(table.table)
            + b',"txId":',
        )
        layout_ = _Layout(
            schema=table,
            fragments=tuple(_fragments_of(c) for c in table.columns),
            names=names,
            key_positions=codec.key_positions,
            key_names=key_names,
            key_wrap=key_wrap,
            value_wrap=value_wrap,
            source=source,
        )
        self._layouts[table.qualified_name] = layout_
        return layout_

    def encode(
        self,
        table: TableSchema,
        changes: pa.Table,
        *,
        lsns: pa.Array,
        texts: tuple[pa.Array, ...] = (),
        partitions: int,
        ts_ms: int | None = None,
    ) -> EncodedBatch:
        """The messages of a columnar batch's rows (``changes``, ``lsns`` and ``texts`` as
        in :func:`changelog_events`); ``partitions`` is the topic's partition count (a keyless
        table's rows are spread by :func:`~cdc.kafka.event_encoder.keyless_partition`), and
        ``ts_ms`` the envelope's ``ts_ms`` (now, by default).

        Raises what :meth:`EventEncoder.encode_raw
        <cdc.kafka.event_encoder.EventEncoder.encode_raw>` raises for a row (a key value
        without a Debezium form).
        """
        n = changes.num_rows
        codec = self.encoder.codec(table)
        if ts_ms is None:
            ts_ms = time.time_ns() // 1_000_000
        if n == 0:
            return EncodedBatch(
                codec.topic, [], [], [], [], codec.schema_id, [], ([], []), ([], [])
            )
        shape = self._layout(table)
        changes = changes.combine_chunks()

        def column(name: str) -> pa.Array:
            return changes.column(name).chunk(0)

        ops = column(layout.OP)
        txids = column(layout.TXID)
        seqs = column(layout.SEQ)
        # Rows the fast path leaves to the events: values kept as text, unchanged TOAST
        # columns, no transaction (a layout of its own), an op batches do not carry, and
        # (below) a value its encoder refuses.
        slow = pc.or_(
            pc.or_(column(layout.FALLBACK).is_valid(), column(layout.UNCHANGED_TOAST).is_valid()),
            pc.or_(txids.is_null(), pc.invert(pc.is_in(ops, _CHANGE_OPS))),
        )
        values: list[pa.Array] = []
        for j, c in enumerate(table.columns):
            fragments, refused = shape.fragments[j](column(c.name), texts[j] if texts else None, c)
            values.append(fragments)
            if refused is not None:
                slow = pc.or_(slow, refused)

        # What depends on the commit (on the op): one text for the whole batch when it is
        # the same for every row (one transaction of inserts, say), else one per row.
        stamps = pc.cast(column(layout.COMMIT_TS), pa.int64()).dictionary_encode()
        commits = column(layout.LSN).dictionary_encode()
        micros = [str(s).encode() for s in stamps.dictionary.to_pylist()]
        commit_lsns = commits.dictionary.to_pylist()
        times = [_EPOCH + timedelta(microseconds=s) for s in stamps.dictionary.to_pylist()]
        millis = _per_row([str(commit_millis(t)).encode() for t in times], stamps)
        nanos = _per_row([str(s * 1000).encode() for s in stamps.dictionary.to_pylist()], stamps)
        formatted = _per_row([format_lsn(v).encode() for v in commit_lsns], commits)
        txid = _uniform(txids)
        if txid is None:
            txid = _strings(txids).fill_null(_NULL)
        deleted = pc.equal(ops, "d")
        op = _uniform(ops)
        before: bytes | pa.Array
        after: bytes | pa.Array
        if op is None:
            op = pc.cast(ops, _BIN)
            before = pc.if_else(deleted, _lit(b'{"before":'), _lit(b'{"before":null,"after":'))
            after = pc.if_else(deleted, _lit(b',"after":null'), _NOTHING)
        elif op == b"d":
            before, after = b'{"before":', b',"after":null'
        else:
            before, after = b'{"before":null,"after":', b""
        own_lsn = _strings(lsns)
        source = shape.source
        envelope = _join_parts(
            shape.value_wrap[0],
            before,
            *_object_parts(shape.names, values),
            after,
            source[0],
            millis,
            source[1],
            own_lsn,
            source[2],
            txid,
            b',"lsn":',
            own_lsn,
            b',"xmin":null,"ts_us":',
            _per_row(micros, stamps),
            b',"ts_ns":',
            nanos,
            b'},"op":"',
            op,
            b'","ts_ms":' + str(ts_ms).encode() + b',"transaction":{"id":"',
            txid,
            b":",
            formatted,
            b'","total_order":',
            _strings(pc.add(seqs, 1)),
            b',"data_collection_order":null}}',
            shape.value_wrap[1],
        )
        out_values: list[bytes] = envelope.to_pylist()

        if shape.key_positions:
            keys: list[bytes | None] = _join_parts(
                shape.key_wrap[0],
                *_object_parts(shape.key_names, [values[j] for j in shape.key_positions]),
                shape.key_wrap[1],
            ).to_pylist()
            partition_of: list[int] = [-1] * n
        else:
            keys = [None] * n
            spread = _join(_strings(column(layout.LSN)), _lit(b"/"), _strings(seqs)).to_pylist()
            partition_of = [zlib.crc32(p) % partitions for p in spread]

        slow_rows = pc.indices_nonzero(slow)
        if len(slow_rows):
            events = changelog_events(
                table,
                changes.take(slow_rows),
                lsns=lsns.take(slow_rows),
                texts=tuple(t.take(slow_rows) for t in texts),
                ts_ms=ts_ms,
            )
            encode_raw = self.encoder.encode_raw
            for i, event in zip(slow_rows.to_pylist(), events, strict=True):
                # The headers are the same either way.
                _topic, key, value, _headers, partition = encode_raw(event, partitions=partitions)
                keys[i], out_values[i] = key, value
                partition_of[i] = -1 if partition is None else partition
        return EncodedBatch(
            codec.topic,
            keys,
            out_values,
            partition_of,
            deleted.to_pylist(),
            codec.schema_id,
            _strings(seqs).to_pylist(),
            ([(HEADER_LSN, str(v).encode()) for v in commit_lsns], commits.indices.to_pylist()),
            ([(HEADER_COMMIT_TS_US, t) for t in micros], stamps.indices.to_pylist()),
        )


def _object_parts(names: tuple[bytes, ...], values: list[pa.Array]) -> list[bytes | pa.Array]:
    """The parts of a JSON object of ``values`` (``names``: each member's ``"name":``)."""
    if not names:
        return [b"{}"]
    parts: list[bytes | pa.Array] = []
    for i, (name, fragments) in enumerate(zip(names, values, strict=True)):
        parts += ((b"{" if i == 0 else b",") + name, fragments)
    parts.append(b"}")
    return parts


def _join_parts(*parts: bytes | pa.Array) -> pa.Array:
    """Element-wise concatenation of arrays and constant texts, the constants next to each
    other merged first (each argument of the join costs about as much as an array's)."""
    merged: list[pa.Array | pa.Scalar] = []
    pending = b""
    for part in parts:
        if isinstance(part, bytes):
            pending += part
            continue
        if pending:
            merged.append(_lit(pending))
            pending = b""
        merged.append(part)
    if pending:
        merged.append(_lit(pending))
    return _join(*merged)


def _uniform(values: pa.Array) -> bytes | None:
    """The text of the one value of ``values`` (no nulls), or None when they differ."""
    if values.null_count:
        return None
    low, high = pc.min_max(values).values()
    if low != high:
        return None
    value = low.as_py()
    return value.encode() if isinstance(value, str) else str(value).encode()


def _per_row(texts: list[bytes], encoded: pa.DictionaryArray) -> bytes | pa.Array:
    """Each row's text of its commit (``texts`` per distinct value of ``encoded``): the
    one text when there is one."""
    if len(texts) == 1:
        return texts[0]
    return pa.array(texts, _BIN).take(encoded.indices)


def changelog_events(
    table: TableSchema,
    changes: pa.Table,
    *,
    lsns: pa.Array,
    texts: tuple[pa.Array, ...] = (),
    ts_ms: int | None = None,
) -> Iterator[ChangeEvent]:
    """The :class:`~cdc.core.events.ChangeEvent` of each row of a columnar batch (changelog
    rows, see :func:`sinks.delta_changelog.changelog_table`, each row's own message LSN,
    and the values' texts as sent), equal to what
    :class:`~cdc.postgres.protocol.assembler.ChangeAssembler` makes of the same messages
    (``ts_ms`` aside: the batch's wall-clock time unless given, and ``size_bytes``: the
    batch keeps only its total size).

    The builder takes only inserts (``c``: ``after``), updates without an old tuple (``u``:
    ``after``, unchanged TOAST columns null and named) and deletes (``d``: ``before``).
    Commit times that repeat are one object, as the assembler's are (the encoder caches by
    identity).
    """
    n = changes.num_rows
    if n == 0:
        return
    columns = [
        _column_values(changes.column(c.name), c, texts[j] if texts else None)
        for j, c in enumerate(table.columns)
    ]
    rows = zip(*columns, strict=True) if columns else iter([()] * n)
    ops = changes.column(layout.OP).to_pylist()
    commit_lsns = changes.column(layout.LSN).to_pylist()
    seqs = changes.column(layout.SEQ).to_pylist()
    txids = changes.column(layout.TXID).to_pylist()
    stamps = pc.cast(changes.column(layout.COMMIT_TS), pa.int64()).to_pylist()
    own_lsns = lsns.to_pylist()
    unchanged = changes.column(layout.UNCHANGED_TOAST)
    unchanged_rows = unchanged.to_pylist() if unchanged.null_count < n else None
    fallback = changes.column(layout.FALLBACK)
    fallback_rows = fallback.to_pylist() if fallback.null_count < n else None
    times: dict[int, datetime] = {}
    # The batch's wall-clock time: its rows were made into events together.
    if ts_ms is None:
        ts_ms = time.time_ns() // 1_000_000
    none = [None] * n
    for op, row, commit_lsn, seq, txid, stamp, lsn, names, fallback_texts in zip(
        ops,
        rows,
        commit_lsns,
        seqs,
        txids,
        stamps,
        own_lsns,
        unchanged_rows if unchanged_rows is not None else none,
        fallback_rows if fallback_rows is not None else none,
        strict=True,
    ):
        commit_ts = times.get(stamp)
        if commit_ts is None:
            commit_ts = times[stamp] = _EPOCH + timedelta(microseconds=stamp)
        deleted = op == "d"
        yield ChangeEvent(
            op,
            table,
            row if deleted else None,
            None if deleted else row,
            commit_lsn,
            seq,
            txid,
            commit_ts,
            lsn,
            tuple(names) if names else (),
            # pyarrow gives map values as lists of (key, value) pairs.
            dict(fallback_texts) if fallback_texts else None,
            0,
            ts_ms,
        )


def _column_values(
    typed: pa.Array | pa.ChunkedArray, column: ColumnSchema, text: pa.Array | None
) -> list[Any]:
    """The Python values of one column of a batch, as the per-value parser gives them.

    Arrow's float32 narrows a ``float4`` value, which the parser keeps as a double (and the
    Debezium JSON shows in full): such columns are parsed from their text where typed."""
    dtype = typed.type
    if pa.types.is_timestamp(dtype) and dtype.unit in _MICROS_PER_UNIT:
        # pyarrow makes a datetime several times slower than adding to the epoch does.
        epoch = _EPOCH if dtype.tz is not None else _EPOCH_NAIVE
        factor = _MICROS_PER_UNIT[dtype.unit]
        return [
            None if v is None else epoch + timedelta(microseconds=v * factor)
            for v in pc.cast(typed, pa.int64()).to_pylist()
        ]
    if text is None or not _has_float32(dtype):
        return typed.to_pylist()
    parse = pgtypes.text_parser(column.type_oid, column.type_modifier)
    return [
        None if value is None else parse(raw)
        for value, raw in zip(typed.to_pylist(), text.to_pylist(), strict=True)
    ]


def _has_float32(dtype: pa.DataType) -> bool:
    if pa.types.is_float32(dtype):
        return True
    return bool(pa.types.is_list(dtype)) and _has_float32(dtype.value_type)
