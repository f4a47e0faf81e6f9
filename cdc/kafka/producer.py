"""``cdc capture``: PostgreSQL -> Kafka, with the embedded pipeline's set-up, snapshot and
streaming, and a sink that produces to Kafka instead of writing Delta.

Delivery: PostgreSQL is told an LSN is flushed only once the broker has acknowledged
(``acks=all``, idempotent producer) every message of every change up to it.
:class:`KafkaProducerSink` counts the messages without a delivery report in
:attr:`~KafkaProducerSink.pending_rows`, and the pipeline confirms nothing while that count is
above zero. A capture that dies loses nothing: PostgreSQL re-sends from the confirmed LSN,
and the sink workers drop what they already have by its ``(lsn, seq)`` position.

Memory is bounded by librdkafka's queue (``queue.buffering.max.messages`` and
``queue.buffering.max.kbytes``): when it is full, :meth:`KafkaProducerSink.add` raises
:class:`~sinks.errors.SinkBackpressureError` and the pipeline waits for deliveries before
reading more from the replication stream.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient

from catalog import lake_layout as layout
from catalog.errors import CatalogError
from catalog.kafka_schema_registry import KafkaSchemaRegistry, create_topics
from cdc.core import pgtypes
from cdc.core.errors import ConfigError
from cdc.core.events import ChangeEvent
from cdc.core.kafka_format import Format, client_config, close_client, is_retriable
from cdc.core.settings import BatchSettings, Settings
from cdc.core.table_schema import ColumnSchema, TableSchema
from cdc.kafka.errors import KafkaRejectedError, KafkaUnavailableError, wrap_kafka_error
from cdc.kafka.event_encoder import EncodedMessage, EventEncoder
from sinks.base import Sink
from sinks.errors import SinkBackpressureError, TerminalSinkError, TransientSinkError

__all__ = [
    "KafkaProducerSink",
    "changelog_events",
    "producer_config",
]

log = logging.getLogger(__name__)

#: The delivery guarantees depend on these; a user setting that contradicts them is refused.
REQUIRED_PRODUCER: Final[dict[str, Any]] = {"enable.idempotence": True, "acks": "all"}

DEFAULT_PRODUCER: Final[dict[str, Any]] = {
    "compression.type": "zstd",
    "linger.ms": 20,
    # Java clients (Kafka Connect, Debezium) partition by murmur2: the same key lands on
    # the same partition whichever of them wrote it.
    "partitioner": "murmur2_random",
    # The queue bounds capture's memory; it is full -> backpressure on the replication stream.
    "queue.buffering.max.messages": 100_000,
    "queue.buffering.max.kbytes": 64 * 1024,
}

#: KafkaProducerSink.add serves delivery reports once per this many events.
_POLL_EVERY: Final = 64

#: Truncates that undo a partial snapshot sort after every row it sent (see discard_snapshot).
_AFTER_ANY_SEQ: Final = 2**62

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE: Final = datetime(1970, 1, 1)
_MICROS_PER_UNIT: Final = {"s": 1_000_000, "ms": 1000, "us": 1}


def producer_config(settings: Settings) -> dict[str, Any]:
    """librdkafka producer properties: our defaults, then ``kafka.client`` and
    ``kafka.producer`` from the settings, then idempotence and ``acks=all``.

    Raises:
        ConfigError: a property contradicts idempotence or ``acks=all``.
    """
    try:
        return client_config(
            settings.kafka_bootstrap(),
            common=settings.kafka.client,
            specific=settings.kafka.producer,
            defaults=DEFAULT_PRODUCER,
            required=REQUIRED_PRODUCER,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e


class KafkaProducerSink(Sink):
    """Produces change events to one topic per table (see :mod:`cdc.kafka.event_encoder`).

    ``add`` hands messages to librdkafka, ``flush`` waits for every delivery report, and
    :attr:`pending_rows` counts the messages still without one. Topics are created with
    ``partitions`` partitions when a table is first met, and each table shape is registered
    in ``registry`` before the first event written with it.

    Hazards:
        * A message that fails delivery (its ``message.timeout.ms`` expired, say) cannot be
          sent again from here: the sink then refuses to flush for good, so nothing past it
          is confirmed to PostgreSQL, and the process has to restart to resend it.
        * The per-key order holds only while a topic keeps its partition count.

    Args:
        config: librdkafka producer properties (see :func:`producer_config`).
        prefix: Topic prefix, also Debezium's ``source.name``.
        database: The source database name (``source.db``).
        registry: Where table shapes are registered.
        format: ``json`` or ``json-with-schema``.
        partitions: Partitions of the topics this sink creates.
        replication_factor: Of the topics this sink creates (-1: the broker's default).
        tombstones: Follow each delete with a tombstone.
        batch: ``max_seconds`` and ``max_rows`` tell when waiting for deliveries is due.
        delivery_timeout: How long ``flush`` waits before it fails as transient.
        admin: librdkafka properties for the admin client (defaults to ``config``).

    Example:
        >>> sink = KafkaProducerSink(producer_config(settings), prefix="shop", database="shop",
        ...                       registry=registry)  # doctest: +SKIP
        >>> sink.add(event); sink.flush()  # doctest: +SKIP
        {'rows': 1, 'messages': 1, 'commits': 0, 'duration_s': 0.004}
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        prefix: str,
        database: str,
        registry: KafkaSchemaRegistry,
        format: Format = "json",
        partitions: int = 3,
        replication_factor: int = -1,
        tombstones: bool = True,
        batch: BatchSettings | None = None,
        delivery_timeout: float = 30.0,
        admin: dict[str, Any] | None = None,
    ) -> None:
        self.prefix = prefix
        self.registry = registry
        self.partitions = partitions
        self.replication_factor = replication_factor
        self.tombstones = tombstones
        self.batch = batch or BatchSettings()
        self.delivery_timeout = delivery_timeout
        self.encoder = EventEncoder(prefix=prefix, database=database, format=format)
        try:
            self._producer = Producer(config)
            self._admin = AdminClient(admin or _admin_config(config))
        except KafkaException as e:
            raise ConfigError(f"invalid Kafka producer settings: {e}") from e
        self._lock = threading.Lock()  # delivery callbacks vs. the counters
        self._outstanding = 0
        self._oldest: float | None = None
        #: Delivery failures: (what, whether retrying may help).
        self._failures: list[tuple[str, bool]] = []
        self._delivered_rows = 0
        self._delivered_messages = 0
        self._schemas: dict[str, TableSchema] = {}  # qualified name -> shape prepared last
        self._topics: dict[str, str] = {}  # topic -> qualified name
        self._partition_counts: dict[str, int] = {}
        self._registered: set[int] = set()
        # The table of the last event added, prepared, and its topic's partitions.
        self._last_table: TableSchema | None = None
        self._last_partitions = 0
        self._unpolled = 0  # events added since the last poll
        self._deliver = self._on_delivery  # bound once, not once per message

    # -- tables -------------------------------------------------------------------------

    def _prepare(self, table: TableSchema) -> None:
        """Create the table's topic and register its shape, once per shape."""
        name = table.qualified_name
        if self._schemas.get(name) is table:
            return
        topic = self.encoder.topic(table)
        owner = self._topics.get(topic)
        if owner is None:
            try:
                create_topics(
                    self._admin,
                    {topic: self.partitions},
                    replication_factor=self.replication_factor,
                    timeout=self.delivery_timeout,
                )
            except CatalogError as e:
                raise wrap_kafka_error(e, f"cannot create the topic of {name}") from e
            self._topics[topic] = name
            self._partition_counts[topic] = self._partition_count(topic)
        elif owner != name:
            raise KafkaRejectedError(
                f"tables {owner} and {name} would both be sent to topic {topic} (characters "
                "Kafka does not allow in topic names become '_'); rename one, or capture "
                "them with different --tables and --topic-prefix"
            )
        schema_id = table.schema_id()
        if schema_id not in self._registered:
            try:
                self.registry.register(table)
            except CatalogError as e:
                raise wrap_kafka_error(e, f"cannot register the schema of {name}") from e
            self._registered.add(schema_id)
        self._schemas[name] = table

    def _partition_count(self, topic: str) -> int:
        """The topic's partitions (it may have existed before, with another count)."""
        deadline = time.monotonic() + self.delivery_timeout
        while True:
            try:
                metadata = self._producer.list_topics(topic, timeout=self.delivery_timeout)
            except KafkaException as e:
                raise wrap_kafka_error(e, f"cannot read the metadata of {topic}") from e
            found = metadata.topics.get(topic)
            if found is not None and found.error is None and found.partitions:
                return len(found.partitions)
            if time.monotonic() > deadline:
                raise KafkaUnavailableError(f"topic {topic} has no partitions in the metadata")
            time.sleep(0.2)  # just created: the metadata may lag behind

    def ensure_table(self, table: TableSchema) -> None:
        """Create the table's topic and register its shape (before its snapshot)."""
        self._prepare(table)

    # -- producing ----------------------------------------------------------------------

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        with self._lock:
            self._outstanding -= 1
            if err is not None:
                self._failures.append(
                    (f"{msg.topic()}: {err.str()} ({err.name()})", is_retriable(err))
                )
            else:
                self._delivered_messages += 1
                if msg.value() is not None:
                    self._delivered_rows += 1
            if self._outstanding == 0:
                self._oldest = None

    def _encode(self, event: ChangeEvent, *, tombstones: bool) -> list[EncodedMessage]:
        topic = self.encoder.topic(event.table)
        return self.encoder.encode(
            event, tombstones=tombstones, partitions=self._partition_counts[topic]
        )

    def _produce(self, message: EncodedMessage) -> None:
        self._produce_raw(
            message.topic, message.key, message.value, message.headers, message.partition
        )

    def _produce_raw(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, str | bytes | None]],
        partition: int | None,
    ) -> None:
        """Queue one message, counted as outstanding until its delivery report.

        Raises BufferError when the producer's queue is full (nothing queued then)."""
        with self._lock:
            if self._outstanding == 0:
                self._oldest = time.monotonic()
            self._outstanding += 1
        try:
            self._producer.produce(
                topic,
                key=key,
                value=value,
                headers=headers,
                # -1 (RD_KAFKA_PARTITION_UA): the partitioner picks by key.
                partition=-1 if partition is None else partition,
                on_delivery=self._deliver,
            )
        except BaseException as e:
            with self._lock:
                self._outstanding -= 1
            if isinstance(e, KafkaException):
                err = e.args[0]
                cls = TransientSinkError if is_retriable(err) else TerminalSinkError
                raise cls(f"cannot produce to {topic}: {err.str()}") from e
            raise

    def _produce_waiting(self, message: EncodedMessage) -> None:
        """Produce, waiting for room in the queue (up to ``delivery_timeout``)."""
        self._waiting(self._produce, message, BufferError)

    def _waiting(self, send: Any, item: Any, full: type[Exception]) -> None:
        """``send(item)``, again while it raises ``full`` (the queue is full), serving
        delivery reports in between, for up to ``delivery_timeout``."""
        deadline = time.monotonic() + self.delivery_timeout
        while True:
            try:
                send(item)
                return
            except full:
                if time.monotonic() >= deadline:
                    raise TransientSinkError(
                        f"the producer queue stayed full for {self.delivery_timeout}s: the "
                        "brokers do not acknowledge"
                    ) from None
                self._producer.poll(0.05)

    def add(self, event: ChangeEvent) -> None:
        """Hand ``event`` (and its tombstone) to the producer.

        Raises SinkBackpressureError, with nothing of the event sent, when the producer's queue
        is full: the caller waits for deliveries (``flush``) and adds the event again.
        """
        table = event.table
        if table is not self._last_table:
            self._prepare(table)
            self._last_table = table
            self._last_partitions = self._partition_counts[self.encoder.topic(table)]
        topic, key, value, headers, partition = self.encoder.encode_raw(
            event, partitions=self._last_partitions
        )
        try:
            self._produce_raw(topic, key, value, headers, partition)
        except BufferError as e:
            raise SinkBackpressureError(
                f"{len(self._producer)} messages queued in the producer: wait for deliveries"
            ) from e
        if self.tombstones and key is not None and event.op == "d":
            # The change is queued; its tombstone must follow it whatever happens.
            self._produce_waiting(EncodedMessage(topic, key, None, []))
        self._unpolled += 1
        if self._unpolled >= _POLL_EVERY:
            # Serve delivery reports without blocking; every few events, since a call costs
            # about as much as producing (flush_due and flush poll as well).
            self._unpolled = 0
            self._producer.poll(0)

    def add_changes(
        self,
        table: TableSchema,
        changes: pa.Table,
        *,
        lsns: pa.Array,
        texts: tuple[pa.Array, ...] = (),
    ) -> None:
        """Produce the rows of a columnar batch (``cdc capture``'s fast path: a
        :class:`~cdc.postgres.columnar.ChangeBatch`'s ``changes``, ``lsns`` and ``texts``,
        see :func:`changelog_events`): for each row
        the same messages as :meth:`add` of the :class:`~cdc.core.events.ChangeEvent` the
        per-event path makes of the same change (``ts_ms`` aside, the wall-clock time).

        Waits for room in the producer's queue instead of raising SinkBackpressureError, as
        :meth:`add_snapshot` does: a batch is half sent when the queue fills up, and its
        first rows must not be sent twice.
        """
        add = self.add
        for event in changelog_events(table, changes, lsns=lsns, texts=texts):
            try:
                add(event)
            except SinkBackpressureError:
                self._waiting(add, event, SinkBackpressureError)

    def add_snapshot(
        self,
        table: TableSchema,
        batch: pa.RecordBatch | pa.Table,
        *,
        lsn: int,
        first_seq: int,
        read_at: datetime,
    ) -> None:
        """Produce snapshot rows as ``r`` events at ``(lsn, first_seq + i)``.

        Waits for room in the producer's queue instead of raising SinkBackpressureError, because
        a batch is half sent when the queue fills up and must not be sent twice.
        """
        self._prepare(table)
        n = batch.num_rows
        if n == 0:
            return
        columns = [batch.column(c.name).to_pylist() for c in table.columns]
        fallbacks: list[Any] = (
            batch.column(layout.FALLBACK).to_pylist()
            if layout.FALLBACK in batch.column_names
            else [None] * n
        )
        for i in range(n):
            fallback = fallbacks[i]
            event = ChangeEvent(
                op="r",
                table=table,
                before=None,
                after=tuple(col[i] for col in columns),
                commit_lsn=lsn,
                seq=first_seq + i,
                txid=None,
                commit_ts=read_at,
                lsn=lsn,
                # pyarrow gives map values as lists of (key, value) pairs.
                fallback=dict(fallback) if fallback else None,
            )
            for message in self._encode(event, tombstones=False):
                self._produce_waiting(message)
            if i % 1000 == 999:
                self._producer.poll(0)
        self._producer.poll(0)

    def discard_snapshot(
        self, tables: list[tuple[str, str]], lsn: int, *, slot_dropped: bool = False
    ) -> None:
        """Deal with the rows an interrupted snapshot at ``lsn`` sent, before it is redone.

        Messages cannot be taken back from a topic. While the slot lives on (an incremental
        snapshot), the partial copy is the true state of its rows at ``lsn``: the changes
        streamed after it and the redone copy supersede it, and nothing is sent. When the
        slot was dropped (the initial snapshot), the changes between the two copies are
        lost, so a row the partial copy holds may since have been deleted: each table that
        got rows gets a truncate event positioned after all of them (``(lsn, 2**62)``) and
        before the redone copy (at a later LSN). Consumers that apply truncates, the lake's
        current-state views among them, then forget the partial copy.
        """
        if not slot_dropped:
            return
        now = datetime.now(UTC)
        for schema_name, table_name in tables:
            try:
                table = self.registry.latest(f"{schema_name}.{table_name}")
            except CatalogError as e:
                raise wrap_kafka_error(e, "cannot read the schema registry") from e
            if table is None:
                continue  # never announced, so none of its rows were sent
            event = ChangeEvent(
                op="t",
                table=table,
                before=None,
                after=None,
                commit_lsn=lsn,
                seq=_AFTER_ANY_SEQ,
                txid=None,
                commit_ts=now,
                lsn=lsn,
            )
            self._prepare(table)
            for message in self._encode(event, tombstones=False):
                self._produce_waiting(message)
        self.flush()

    def latest_schema(self, qualified_name: str) -> TableSchema | None:
        return self.registry.latest(qualified_name)

    # -- flushing -----------------------------------------------------------------------

    @property
    def pending_rows(self) -> int:
        """Messages without a delivery report, plus failed ones (which stay pending: what
        follows them must not be confirmed to PostgreSQL)."""
        with self._lock:
            return self._outstanding + len(self._failures)

    def flush_due(self) -> bool:
        self._producer.poll(0)
        with self._lock:
            if self._failures:
                return True
            if not self._outstanding:
                return False
            if self._outstanding >= self.batch.max_rows:
                return True
            oldest = self._oldest
        return oldest is not None and time.monotonic() - oldest >= self.batch.max_seconds

    def flush(self) -> dict[str, Any]:
        """Wait until every message has a delivery report.

        Returns ``{"rows", "messages", "commits", "duration_s"}`` (rows: change events
        delivered since the last flush; messages include tombstones).

        Raises:
            TerminalSinkError: a message failed delivery for good (larger than the broker
                accepts, a topic this producer may not write): capture must stop and the
                cause be fixed; nothing after the last delivered message was confirmed.
            TransientSinkError: some messages are not acknowledged after
                ``delivery_timeout`` seconds (they stay queued: flush again), or a message
                failed delivery after librdkafka's own retries (then every later flush
                fails too; restart capture).
        """
        started = time.monotonic()
        deadline = started + self.delivery_timeout
        while self.pending_rows and not self._failures:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._producer.flush(min(left, 1.0))
        with self._lock:
            failures = list(self._failures)
            outstanding = self._outstanding
            rows, messages = self._delivered_rows, self._delivered_messages
            self._delivered_rows = self._delivered_messages = 0
        final = [text for text, retriable in failures if not retriable]
        if final:
            raise TerminalSinkError(
                f"{len(failures)} messages were not delivered and cannot be (first: "
                f"{final[0]}); fix the cause (the broker's or topic's max.message.bytes, "
                "the producer's message.max.bytes, ACLs), then restart capture: PostgreSQL "
                "sends everything after the last confirmed position again"
            )
        if failures:
            raise TransientSinkError(
                f"{len(failures)} messages were not delivered (first: {failures[0][0]}); "
                "restart capture: PostgreSQL sends everything after the last confirmed "
                "position again"
            )
        if outstanding:
            raise TransientSinkError(
                f"{outstanding} messages not acknowledged within {self.delivery_timeout}s"
            )
        return {
            "rows": rows,
            "messages": messages,
            "commits": 0,
            "duration_s": round(time.monotonic() - started, 4),
        }

    def close(self) -> None:
        """Drop the producer. Does not wait for deliveries: nothing unacknowledged was
        confirmed to PostgreSQL, so it is sent again by the next capture."""
        self._producer.purge()
        self._producer.poll(0)
        close_client(self._producer)  # nothing left to flush: returns at once


def changelog_events(
    table: TableSchema,
    changes: pa.Table,
    *,
    lsns: pa.Array,
    texts: tuple[pa.Array, ...] = (),
) -> Iterator[ChangeEvent]:
    """The :class:`~cdc.core.events.ChangeEvent` of each row of a columnar batch (changelog
    rows, see :func:`sinks.delta_changelog.changelog_table`, each row's own message LSN,
    and the values' texts as sent), equal to what
    :class:`~cdc.postgres.protocol.assembler.ChangeAssembler` makes of the same messages
    (``ts_ms`` and ``size_bytes`` aside: the batch keeps only its total size).

    The builder takes only inserts (``c``: ``after``), updates without an old tuple (``u``:
    ``after``, unchanged TOAST columns null and named) and deletes (``d``: ``before``).
    Commit times that repeat are one object, as the assembler's are (the encoder caches by
    identity).
    """
    n = changes.num_rows
    if n == 0:
        return
    columns = [
        _column_values(changes, c, texts[j] if texts else None) for j, c in enumerate(table.columns)
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
    ts_ms = time.time_ns() // 1_000_000
    none = [None] * n
    for op, row, commit_lsn, seq, txid, stamp, lsn, names, texts in zip(
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
            dict(texts) if texts else None,
            0,
            ts_ms,
        )


def _column_values(changes: pa.Table, column: ColumnSchema, text: pa.Array | None) -> list[Any]:
    """The Python values of one column of a batch, as the per-value parser gives them.

    Arrow's float32 narrows a ``float4`` value, which the parser keeps as a double (and the
    Debezium JSON shows in full): such columns are parsed from their text where typed."""
    typed = changes.column(column.name)
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


def _admin_config(producer: dict[str, Any]) -> dict[str, Any]:
    # Producer-only properties make the admin client warn; connection and security ones
    # apply to every client.
    producer_only = set(DEFAULT_PRODUCER) | set(REQUIRED_PRODUCER)
    return {k: v for k, v in producer.items() if k not in producer_only}
