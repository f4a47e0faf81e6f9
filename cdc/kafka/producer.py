"""``cdc capture``: PostgreSQL -> Kafka, with the embedded pipeline's set-up, snapshot and
streaming, and a sink that produces to Kafka instead of writing Delta.

Delivery: PostgreSQL is told an LSN is flushed only once the broker has acknowledged
(``acks=all``, idempotent producer) every message of every change up to it.
:attr:`KafkaProducerSink.pending_rows` is librdkafka's count of the messages it still holds
(queued, in flight, or acknowledged with the report not yet served: ``len(producer)``) plus
the failed ones, and the pipeline confirms nothing while it is above zero. Only failures
reach Python (``delivery.report.only.error``): a callback per acknowledged message cost
about a tenth of capture. A capture that dies loses nothing: PostgreSQL re-sends from the
confirmed LSN, and the sink workers drop what they already have by its ``(lsn, seq)``
position.

Memory is bounded by librdkafka's queue (``queue.buffering.max.messages`` and
``queue.buffering.max.kbytes``): when it is full, :meth:`KafkaProducerSink.add` raises
:class:`~sinks.errors.SinkBackpressureError` and the pipeline waits for deliveries before
reading more from the replication stream.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any, Final

import pyarrow as pa
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient

from catalog import lake_layout as layout
from catalog.errors import CatalogError
from catalog.kafka_schema_registry import KafkaSchemaRegistry, create_topics
from cdc.core.errors import ConfigError
from cdc.core.events import ChangeEvent
from cdc.core.kafka_format import Format, client_config, close_client, is_retriable
from cdc.core.settings import BatchSettings, Settings
from cdc.core.table_schema import TableSchema
from cdc.kafka.batch_encoder import BatchEncoder
from cdc.kafka.errors import KafkaRejectedError, KafkaUnavailableError, wrap_kafka_error
from cdc.kafka.event_encoder import EncodedMessage, EventEncoder
from sinks.base import Sink
from sinks.errors import SinkBackpressureError, TerminalSinkError, TransientSinkError

__all__ = [
    "KafkaProducerSink",
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

#: KafkaProducerSink.add serves delivery reports once per this many events, add_changes
#: once per this many rows. Until served, a report keeps its message counted against
#: queue.buffering.max.messages; serving one is a C loop (only failures reach Python).
_POLL_EVERY: Final = 64
_POLL_EVERY_ROWS: Final = 2048

#: Truncates that undo a partial snapshot sort after every row it sent (see discard_snapshot).
_AFTER_ANY_SEQ: Final = 2**62


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
        self.batch_encoder = BatchEncoder(self.encoder)
        try:
            # Delivery reports of acknowledged messages are served in C without calling
            # Python (confluent-kafka skips the callback): pending_rows counts with
            # len(producer), which holds every message until its report is served.
            self._producer = Producer(
                {
                    **config,
                    "delivery.report.only.error": True,
                    "on_delivery": self._on_failure,
                }
            )
            self._admin = AdminClient(admin or _admin_config(config))
        except KafkaException as e:
            raise ConfigError(f"invalid Kafka producer settings: {e}") from e
        self._lock = threading.Lock()  # delivery callbacks vs. the failures
        # When the producer last went from empty to holding messages (flush_due's age).
        self._oldest: float | None = None
        #: Delivery failures: (what, whether retrying may help).
        self._failures: list[tuple[str, bool]] = []
        # Sent since the last flush: all delivered once a flush succeeds.
        self._sent_rows = 0
        self._sent_messages = 0
        self._schemas: dict[str, TableSchema] = {}  # qualified name -> shape prepared last
        self._topics: dict[str, str] = {}  # topic -> qualified name
        self._partition_counts: dict[str, int] = {}
        self._registered: set[int] = set()
        # The table of the last event added, prepared, and its topic's partitions.
        self._last_table: TableSchema | None = None
        self._last_partitions = 0
        self._unpolled = 0  # events added since the last poll

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

    def _on_failure(self, err: KafkaError | None, msg: Message) -> None:
        """The delivery report of a failed message (acknowledged ones do not get here)."""
        if err is None:
            return
        with self._lock:
            self._failures.append((f"{msg.topic()}: {err.str()} ({err.name()})", is_retriable(err)))

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
        """Queue one message, counted in :attr:`pending_rows` until its delivery report.

        Raises BufferError when the producer's queue is full (nothing queued then)."""
        try:
            # -1 (RD_KAFKA_PARTITION_UA): the partitioner picks by key. Positional, as in
            # add_changes.
            self._producer.produce(
                topic, value, key, -1 if partition is None else partition, None, None, 0, headers
            )
        except KafkaException as e:
            raise _produce_error(topic, e) from e
        self._sent(0 if value is None else 1, 1)

    def _sent(self, rows: int, messages: int) -> None:
        """Count messages just queued (``rows``: change messages among them)."""
        self._sent_rows += rows
        self._sent_messages += messages
        if self._oldest is None:
            self._oldest = time.monotonic()

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
        see :func:`~cdc.kafka.batch_encoder.changelog_events`): for each row the same
        messages as :meth:`add` of the :class:`~cdc.core.events.ChangeEvent` the per-event
        path makes of the same change (``ts_ms`` aside, the wall-clock time), built for the
        whole batch by :class:`~cdc.kafka.batch_encoder.BatchEncoder`.

        Waits for room in the producer's queue instead of raising SinkBackpressureError, as
        :meth:`add_snapshot` does: a batch is half sent when the queue fills up, and its
        first rows must not be sent twice.
        """
        if changes.num_rows == 0:
            return
        if table is not self._last_table:
            self._prepare(table)
            self._last_table = table
            self._last_partitions = self._partition_counts[self.encoder.topic(table)]
        encoded = self.batch_encoder.encode(
            table, changes, lsns=lsns, texts=texts, partitions=self._last_partitions
        )
        topic = encoded.topic
        produce = self._producer.produce
        tombstones = self.tombstones
        self._sent(0, 0)  # the batch's age starts now
        sent = 0
        try:
            for i, (key, value, headers, partition, deleted) in enumerate(
                zip(
                    encoded.keys,
                    encoded.values,
                    encoded.headers(),
                    encoded.partitions,
                    encoded.deletes,
                    strict=True,
                )
            ):
                try:
                    # Positional: confluent-kafka parses keyword arguments 0.4 µs slower.
                    # (topic, value, key, partition, callback, on_delivery, timestamp, headers)
                    produce(topic, value, key, partition, None, None, 0, headers)
                    sent += 1
                except BufferError:
                    message = EncodedMessage(topic, key, value, headers, partition)
                    self._produce_waiting(message)  # counts it
                if deleted and tombstones and key is not None:
                    self._produce_waiting(EncodedMessage(topic, key, None, []))
                if i % _POLL_EVERY_ROWS == _POLL_EVERY_ROWS - 1:
                    self._producer.poll(0)
        except KafkaException as e:
            raise _produce_error(topic, e) from e
        finally:
            self._sent(sent, sent)
        self._producer.poll(0)

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
        """Messages without a served delivery report, plus failed ones (which stay pending:
        what follows them must not be confirmed to PostgreSQL).

        librdkafka's own count (``len(producer)``): a message is in it from ``produce`` until
        its delivery report is served by ``poll``/``flush``, acknowledged or not. It also
        counts other events waiting to be served (client errors), which only delays a
        confirmation until the next poll."""
        with self._lock:
            failed = len(self._failures)
        return len(self._producer) + failed

    def flush_due(self) -> bool:
        self._producer.poll(0)
        with self._lock:
            if self._failures:
                return True
        held = len(self._producer)
        if not held:
            self._oldest = None
            return False
        if held >= self.batch.max_rows:
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
        while True:
            # What was held when last seen with no failure, so that a client event queued
            # just after a flush that emptied the producer is not taken for a message.
            outstanding = len(self._producer)
            with self._lock:
                failures = list(self._failures)
            left = deadline - time.monotonic()
            if not outstanding or failures or left <= 0:
                break
            self._producer.flush(min(left, 1.0))
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
        # Nothing held, nothing failed: every message sent since the last flush is delivered.
        rows, messages = self._sent_rows, self._sent_messages
        self._sent_rows = self._sent_messages = 0
        self._oldest = None
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


def _produce_error(topic: str, e: KafkaException) -> TransientSinkError | TerminalSinkError:
    err = e.args[0]
    cls = TransientSinkError if is_retriable(err) else TerminalSinkError
    return cls(f"cannot produce to {topic}: {err.str()}")


def _admin_config(producer: dict[str, Any]) -> dict[str, Any]:
    # Producer-only properties make the admin client warn; connection and security ones
    # apply to every client.
    producer_only = set(DEFAULT_PRODUCER) | set(REQUIRED_PRODUCER)
    return {k: v for k, v in producer.items() if k not in producer_only}
