"""The Debezium change-event encoder of capture's topics (the contract is in
:mod:`cdc.core.kafka_format`)."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

from cdc.core import pgtypes
from cdc.core.codegen import compile_function
from cdc.core.errors import ValueConversionError
from cdc.core.events import (
    ChangeEvent,
    commit_millis,
    debezium_envelope,
    envelope_payload,
    transaction_id,
)
from cdc.core.kafka_format import (
    HEADER_COMMIT_TS_US,
    HEADER_LSN,
    HEADER_SCHEMA_ID,
    HEADER_SEQ,
    ILLEGAL_TOPIC_CHARS,
    Format,
    remember_last,
    topic_name,
)
from cdc.core.table_schema import TableSchema

__all__ = [
    "EncodedMessage",
    "EventEncoder",
    "envelope_connect_schema",
    "key_connect_schema",
    "keyless_partition",
]

_log = logging.getLogger(__name__)

# -- Kafka Connect schemas ------------------------------------------------------------------------

_SOURCE_SCHEMA: Final[dict[str, Any]] = {
    "type": "struct",
    "fields": [
        {"type": "string", "optional": False, "field": "version"},
        {"type": "string", "optional": False, "field": "connector"},
        {"type": "string", "optional": False, "field": "name"},
        {"type": "int64", "optional": False, "field": "ts_ms"},
        {
            "type": "string",
            "optional": True,
            "name": "io.debezium.data.Enum",
            "version": 1,
            "parameters": {"allowed": "true,last,false,incremental"},
            "default": "false",
            "field": "snapshot",
        },
        {"type": "string", "optional": False, "field": "db"},
        {"type": "string", "optional": True, "field": "sequence"},
        {"type": "int64", "optional": True, "field": "ts_us"},
        {"type": "int64", "optional": True, "field": "ts_ns"},
        {"type": "string", "optional": False, "field": "schema"},
        {"type": "string", "optional": False, "field": "table"},
        {"type": "int64", "optional": True, "field": "txId"},
        {"type": "int64", "optional": True, "field": "lsn"},
        {"type": "int64", "optional": True, "field": "xmin"},
    ],
    "optional": False,
    "name": "io.debezium.connector.postgresql.Source",
    "field": "source",
}

_TRANSACTION_SCHEMA: Final[dict[str, Any]] = {
    "type": "struct",
    "fields": [
        {"type": "string", "optional": False, "field": "id"},
        {"type": "int64", "optional": False, "field": "total_order"},
        {"type": "int64", "optional": False, "field": "data_collection_order"},
    ],
    "optional": True,
    "name": "event.block",
    "version": 1,
    "field": "transaction",
}

# Exact text of values without a typed form (see cdc.core.events.debezium_envelope).
_FALLBACK_SCHEMA: Final[dict[str, Any]] = {
    "type": "map",
    "keys": {"type": "string", "optional": False},
    "values": {"type": "string", "optional": True},
    "optional": True,
    "field": "cdc_fallback",
}


def _record_name(prefix: str, table: TableSchema) -> str:
    # Connect record names must be valid Avro-ish names: same replacement as topics.
    return ILLEGAL_TOPIC_CHARS.sub("_", f"{prefix}.{table.schema}.{table.table}")


def key_connect_schema(table: TableSchema, *, prefix: str) -> dict[str, Any] | None:
    """The Connect schema of ``table``'s message keys (None for a keyless table)."""
    fields = [
        pgtypes.connect_schema(c.type_oid, c.type_modifier, field=c.name, optional=False)
        for c in table.columns
        if c.is_key
    ]
    if not fields:
        return None
    return {
        "type": "struct",
        "fields": fields,
        "optional": False,
        "name": f"{_record_name(prefix, table)}.Key",
    }


def envelope_connect_schema(table: TableSchema, *, prefix: str) -> dict[str, Any]:
    """The Connect schema of ``table``'s change-event values, shaped like Debezium's.

    Key columns are required, every other column optional (capture does not know column
    nullability; optional is always correct, only less precise).
    """
    columns = [
        pgtypes.connect_schema(c.type_oid, c.type_modifier, field=c.name, optional=not c.is_key)
        for c in table.columns
    ]
    name = _record_name(prefix, table)
    row = {"type": "struct", "fields": columns, "optional": True, "name": f"{name}.Value"}
    return {
        "type": "struct",
        "fields": [
            {**row, "field": "before"},
            {**row, "field": "after"},
            _SOURCE_SCHEMA,
            {"type": "string", "optional": False, "field": "op"},
            {"type": "int64", "optional": True, "field": "ts_ms"},
            _TRANSACTION_SCHEMA,
            _FALLBACK_SCHEMA,
        ],
        "optional": False,
        "name": f"{name}.Envelope",
        "version": 1,
    }


# -- encoding -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncodedMessage:
    """One Kafka message, ready for ``Producer.produce``."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, str | bytes | None]]
    partition: int | None = None  # None: the producer's partitioner picks it from the key


def keyless_partition(event: ChangeEvent, partitions: int) -> int:
    """The partition of ``event``'s messages when they have no key.

    Derived from the change's ``(commit_lsn, seq)`` position: a change sent again lands in
    the same partition, where the sink's per-partition watermark drops it, and a keyless
    table's changes still spread over the partitions. (A random partition, the producer's
    default for null keys, would let a re-sent change slip past the watermark of another
    partition.)

    >>> 0 <= keyless_partition(event, 3) < 3  # doctest: +SKIP
    True
    """
    return zlib.crc32(f"{event.commit_lsn}/{event.seq}".encode()) % partitions


#: One row image -> its ``before``/``after`` object (see :func:`_row_encoder`).
_RowEncoder = Callable[[tuple[Any, ...]], dict[str, Any]]

_ZONED: Final = pgtypes.Oid.TIMESTAMPTZ


def _row_encoder(
    columns: tuple[Any, ...], table: str, positions: tuple[int, ...] | None = None
) -> _RowEncoder:
    """A function turning one row image into its Debezium object, compiled for ``columns``
    (only the columns at ``positions``, in that order, when given: the message key).

    It is the fast path of :func:`cdc.core.events.debezium_envelope`'s rows: the same encoders in
    the same order, without the per-value dispatch. A value its encoder refuses raises
    :class:`~cdc.core.errors.ValueConversionError`, and the caller then encodes the event
    the general way (which keeps the value's text); anything else it raises (a row of the
    wrong length) is raised to the caller. Compiled as ``<generated cdc row encoder
    {table}>`` (``row key encoder`` for the key; see :mod:`cdc.core.codegen`).
    """
    namespace: dict[str, Any] = {}
    items = []
    for i in range(len(columns)) if positions is None else positions:
        column = columns[i]
        encode = pgtypes.debezium_encoder(column.type_oid, column.type_modifier)
        namespace[f"n{i}"] = column.name
        v = f"v{i}"
        if encode is pgtypes.IDENTITY_ENCODER:
            expr = v
        elif encode is pgtypes.TEXT_ENCODER:
            namespace[f"e{i}"] = encode
            expr = f"{v} if {v} is None or {v}.__class__ is str else e{i}({v})"
        else:
            if column.type_oid == _ZONED:
                encode = remember_last(encode, datetime)
            namespace[f"e{i}"] = encode
            expr = f"None if {v} is None else e{i}({v})"
        items.append(f"n{i}: {expr}")
    # Unpacking every value checks the row's length, as zip(strict=True) does.
    unpack = "".join(f"v{i}, " for i in range(len(columns))) or "()"
    source = f"def row(values):\n    {unpack} = values\n    return {{{', '.join(items)}}}\n"
    row: _RowEncoder = compile_function(
        source,
        name="row",
        kind="row encoder" if positions is None else "row key encoder",
        label=table,
        namespace=namespace,
    )
    return row


@dataclass(slots=True)
class _TableCodec:
    schema: TableSchema
    schema_id: bytes
    topic: str
    key_positions: tuple[int, ...]
    key_schema: dict[str, Any] | None
    value_schema: dict[str, Any] | None
    row: _RowEncoder
    key_row: _RowEncoder | None  # the key columns of a full row image (None: no key)


class EventEncoder:
    """Turns :class:`~cdc.core.events.ChangeEvent` objects into Kafka messages.

    Args:
        prefix: Topic prefix; also Debezium's logical server name (``source.name``).
        database: Database name for ``source.db``.
        format: ``json`` (the envelope) or ``json-with-schema`` (schema and payload).

    Hazard:
        The key's JSON bytes decide the partition. They are the key columns in table order,
        encoded like the values, so they stay identical across restarts; changing the
        partition count of a topic breaks per-key order, as with any Kafka producer.

    Example:
        >>> enc = EventEncoder(prefix="shop", database="shop")  # doctest: +SKIP
        >>> [m.topic for m in enc.encode(event)]  # doctest: +SKIP
        ['shop.public.orders']
    """

    def __init__(self, *, prefix: str, database: str, format: Format = "json") -> None:
        self.prefix = prefix
        self.database = database
        self.format = format
        # Keyed by qualified name, checked by identity: the assembler reuses one schema
        # object per table version, so the codec is rebuilt only when the shape changes.
        self._codecs: dict[str, _TableCodec] = {}
        self._last: _TableCodec | None = None  # the codec asked for last (most events)
        # Per commit, shared by its events: commit time -> (ts_ms, micros, micros header).
        self._ts: tuple[datetime | None, int, int, bytes] = (None, 0, 0, b"")
        # (txid, commit_lsn) -> (transaction id, commit LSN header).
        self._tx: tuple[int | None, int, str, bytes] = (None, -1, "", b"")

    def codec(self, table: TableSchema) -> _TableCodec:
        last = self._last
        if last is not None and last.schema is table:
            return last
        codec = self._codecs.get(table.qualified_name)
        if codec is None or (codec.schema is not table and codec.schema != table):
            codec = self._build(table)
        else:
            codec.schema = table  # an equal shape in a new object: keep the work done
        self._codecs[table.qualified_name] = codec
        self._last = codec
        return codec

    def _build(self, table: TableSchema) -> _TableCodec:
        positions = tuple(i for i, c in enumerate(table.columns) if c.is_key)
        with_schema = self.format == "json-with-schema"
        return _TableCodec(
            schema=table,
            schema_id=str(table.schema_id()).encode(),
            topic=topic_name(self.prefix, table),
            key_positions=positions,
            key_schema=key_connect_schema(table, prefix=self.prefix) if with_schema else None,
            value_schema=envelope_connect_schema(table, prefix=self.prefix)
            if with_schema
            else None,
            row=_row_encoder(table.columns, table.qualified_name),
            key_row=_row_encoder(table.columns, table.qualified_name, positions)
            if positions
            else None,
        )

    def topic(self, table: TableSchema) -> str:
        return self.codec(table).topic

    def key(self, event: ChangeEvent) -> bytes | None:
        """The message key of ``event``: its key columns as a JSON object, or None."""
        return self._key(self.codec(event.table), event)

    def _key(self, codec: _TableCodec, event: ChangeEvent) -> bytes | None:
        op = event.op
        if codec.key_row is None or op == "t":
            return None
        row = event.before if op == "d" else event.after
        if row is None:  # an update without a new row cannot happen; be explicit anyway
            row = event.before
        if row is None:
            return None
        # A key value its encoder refuses raises here: a key has no fallback text.
        payload = codec.key_row(row)
        if codec.key_schema is not None:
            return orjson.dumps({"schema": codec.key_schema, "payload": payload})
        return orjson.dumps(payload)

    def _times(self, event: ChangeEvent) -> tuple[int, int, bytes]:
        """``source.ts_ms``, the commit time in microseconds and its header, cached per
        commit time object (a transaction's events share it)."""
        ts = event.commit_ts
        cached = self._ts
        if cached[0] is ts:
            return cached[1], cached[2], cached[3]
        millis = commit_millis(ts)
        micros = _micros(event)
        self._ts = (ts, millis, micros, str(micros).encode())
        return millis, micros, self._ts[3]

    def _transaction(self, event: ChangeEvent) -> tuple[str, bytes]:
        """The transaction id (``txid:commit LSN``) and the ``cdc.lsn`` header."""
        cached = self._tx
        if cached[0] == event.txid and cached[1] == event.commit_lsn:
            return cached[2], cached[3]
        lsn = event.commit_lsn
        self._tx = (event.txid, lsn, transaction_id(event), str(lsn).encode())
        return self._tx[2], self._tx[3]

    def value(self, event: ChangeEvent) -> bytes:
        """The message value of ``event``: its Debezium envelope (wrapped with the schema in
        the ``json-with-schema`` format)."""
        return self._value(self.codec(event.table), event)

    def _value(self, codec: _TableCodec, event: ChangeEvent) -> bytes:
        millis, micros, _header = self._times(event)
        envelope = None
        if not event.fallback:
            try:
                envelope = self._fast_envelope(codec, event, millis)
            except ValueConversionError:
                # A value without a Debezium form: debezium_envelope keeps its text in
                # cdc_fallback. Nothing else is caught: a bug must not pass as slowness.
                envelope = None
        if envelope is None:
            # Values without a typed form (their text goes to cdc_fallback), or an error
            # for debezium_envelope to report.
            envelope = debezium_envelope(event, server_name=self.prefix, database=self.database)
        try:
            return self._dump(codec, envelope, micros)
        except orjson.JSONEncodeError:
            # An encoded value JSON cannot carry (an integer beyond 64 bits...): one value
            # must not stop capture, so it takes the fallback, as it does in the lake.
            event = _with_unencodable_as_fallback(event)
            envelope = debezium_envelope(event, server_name=self.prefix, database=self.database)
            return self._dump(codec, envelope, micros)

    @staticmethod
    def _dump(codec: _TableCodec, envelope: dict[str, Any], micros: int) -> bytes:
        source = envelope["source"]
        # Debezium 2.6+ carries the commit time in microseconds too; the lake keeps them.
        source["ts_us"] = micros
        source["ts_ns"] = micros * 1000
        schema = codec.value_schema
        if schema is not None:
            return orjson.dumps({"schema": schema, "payload": envelope})
        return orjson.dumps(envelope)

    def _fast_envelope(self, codec: _TableCodec, event: ChangeEvent, millis: int) -> dict[str, Any]:
        """:func:`~cdc.core.events.debezium_envelope` for events without fallback texts, with the
        table's compiled row function and the commit's cached values (equal JSON bytes)."""
        row = codec.row
        after = None if event.after is None else row(event.after)
        if after is not None and event.unchanged_toast:
            for name in event.unchanged_toast:
                after.pop(name, None)
        return envelope_payload(
            event,
            before=None if event.before is None else row(event.before),
            after=after,
            server_name=self.prefix,
            database=self.database,
            commit_ts_ms=millis,
            transaction_id=None if event.txid is None else self._transaction(event)[0],
        )

    def encode_raw(
        self, event: ChangeEvent, *, partitions: int | None = None
    ) -> tuple[str, bytes | None, bytes, list[tuple[str, str | bytes | None]], int | None]:
        """The change message of ``event`` as ``(topic, key, value, headers, partition)``:
        :meth:`encode`'s first message, without the object (capture's hot path).

        The common case (no fallback texts, every value encodable) is done here in one go,
        with the commit's cached values; anything else goes to :meth:`_value`, which gives
        the same bytes the general way."""
        codec = self._last
        if codec is None or codec.schema is not event.table:
            codec = self.codec(event.table)
        if self._ts[0] is not event.commit_ts:
            self._times(event)
        _ts, millis, micros, micros_header = self._ts
        tx = self._tx
        if tx[0] != event.txid or tx[1] != event.commit_lsn:
            self._transaction(event)
            tx = self._tx
        key = self._key(codec, event)
        partition = keyless_partition(event, partitions) if key is None and partitions else None
        value = None
        if not event.fallback:
            row = codec.row
            try:
                after = None if event.after is None else row(event.after)
                before = None if event.before is None else row(event.before)
            except ValueConversionError:
                pass  # _value keeps the refused value's text in cdc_fallback
            else:
                if after is not None and event.unchanged_toast:
                    for name in event.unchanged_toast:
                        after.pop(name, None)
                envelope = envelope_payload(
                    event,
                    before=before,
                    after=after,
                    server_name=self.prefix,
                    database=self.database,
                    commit_ts_ms=millis,
                    transaction_id=None if event.txid is None else tx[2],
                    commit_ts_us=micros,
                )
                schema = codec.value_schema
                try:
                    value = orjson.dumps(
                        envelope if schema is None else {"schema": schema, "payload": envelope}
                    )
                except orjson.JSONEncodeError:
                    value = None  # _value moves the values JSON cannot hold to cdc_fallback
        if value is None:
            value = self._value(codec, event)
        headers: list[tuple[str, str | bytes | None]] = [
            (HEADER_SCHEMA_ID, codec.schema_id),
            (HEADER_LSN, tx[3]),
            (HEADER_SEQ, str(event.seq).encode()),
            (HEADER_COMMIT_TS_US, micros_header),
        ]
        return codec.topic, key, value, headers, partition

    def encode(
        self, event: ChangeEvent, *, tombstones: bool = True, partitions: int | None = None
    ) -> list[EncodedMessage]:
        """The messages of one event: the change, and a tombstone after a delete.

        ``partitions`` is the topic's partition count: a message without a key then gets
        its partition from :func:`keyless_partition`.
        """
        topic, key, value, headers, partition = self.encode_raw(event, partitions=partitions)
        messages = [EncodedMessage(topic, key, value, headers, partition)]
        if tombstones and event.op == "d" and key is not None:
            messages.append(EncodedMessage(topic, key, None, []))
        return messages


def _unencodable(table: TableSchema, values: tuple[Any, ...] | None) -> dict[str, str]:
    """Column -> text of the values in ``values`` whose Debezium encoding JSON cannot hold."""
    bad: dict[str, str] = {}
    for column, value in zip(table.columns, values or (), strict=False):
        if value is None:
            continue
        try:
            orjson.dumps(pgtypes.debezium_value(value, column.type_oid, column.type_modifier))
        except (orjson.JSONEncodeError, ValueConversionError):
            bad[column.name] = value if isinstance(value, str) else str(value)
    return bad


def _with_unencodable_as_fallback(event: ChangeEvent) -> ChangeEvent:
    """``event`` with every stored-image value whose Debezium encoding JSON cannot hold
    moved to its ``fallback`` texts (null in the row, exact text in ``cdc_fallback``), as
    the embedded path keeps values its Delta type cannot hold.

    Only the stored image (``after``; ``before`` for a delete) has fallback texts. Such a
    value in an update's ``before`` image (which the lake does not keep) becomes null there,
    with a warning, as a column PostgreSQL did not send.
    """
    stored_is_before = event.op == "d"
    texts = dict(event.fallback or {})
    stored = event.before if stored_is_before else event.after
    for name, text in _unencodable(event.table, stored).items():
        texts.setdefault(name, text)
    before = event.before
    if not stored_is_before and before is not None:
        dropped = _unencodable(event.table, before)
        if dropped:
            _log.warning(
                "%s: the before image's %s cannot be encoded as JSON; sent as null",
                event.table.qualified_name,
                ", ".join(sorted(dropped)),
            )
            before = tuple(
                None if c.name in dropped else v
                for c, v in zip(event.table.columns, before, strict=True)
            )
    return replace(event, before=before, fallback=texts or None)


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MICRO: Final = timedelta(microseconds=1)


def _micros(event: ChangeEvent) -> int:
    """Commit time in microseconds since the epoch, exactly (no float rounding)."""
    ts = event.commit_ts
    if ts.tzinfo is None:  # the assembler always gives UTC; be safe with naive values
        ts = ts.replace(tzinfo=UTC)
    return (ts - _EPOCH) // _ONE_MICRO
