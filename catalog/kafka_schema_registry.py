"""The Kafka-mode schema registry: table schemas in the compacted topic ``<prefix>.__schemas``.

Capture registers every version of every table's shape before it sends the first event
written with it, and puts the version's id in each event's ``cdc.schema_id`` header. Sink
workers (and anyone else) read the topic to turn ids back into shapes.

One record per version::

    key   = b"<schema>.<table>/<schema_id>"
    value = {"schema_id", "version", "registered_at", "fingerprint", "schema"}

Keys differ per version, so compaction keeps every version; ``schema`` is
:meth:`cdc.core.table_schema.TableSchema.to_dict` and ids are
:meth:`~cdc.core.table_schema.TableSchema.schema_id`, the same as in the lake-directory registry
(:mod:`catalog.schema_registry`), so an id means the same shape in both.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from catalog.errors import (
    CatalogError,
    TerminalCatalogError,
    TransientCatalogError,
    UnknownSchemaError,
)
from catalog.schema_registry import SchemaVersion
from cdc.core.kafka_format import client_config, close_client, is_retriable, schemas_topic
from cdc.core.table_schema import TableSchema

__all__ = ["CompactedTopic", "KafkaSchemaRegistry", "create_topics"]

log = logging.getLogger(__name__)

#: Producer properties the registry and state records rely on.
_REQUIRED_PRODUCER = {"enable.idempotence": True, "acks": "all"}


def _wrap(error: KafkaError | KafkaException, doing: str) -> CatalogError:
    err = error.args[0] if isinstance(error, KafkaException) else error
    if isinstance(err, KafkaError):
        cls = TransientCatalogError if is_retriable(err) else TerminalCatalogError
        return cls(f"{doing}: {err.str()} ({err.name()})")
    return TransientCatalogError(f"{doing}: {error}")


def create_topics(
    admin: AdminClient,
    topics: dict[str, int],
    *,
    replication_factor: int = -1,
    config: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist yet (name -> partitions); returns those created.

    A topic that already exists is left as it is, whatever its partition count or config.
    """
    if not topics:
        return []
    futures = admin.create_topics(
        [
            NewTopic(name, partitions, replication_factor, config=dict(config or {}))
            for name, partitions in topics.items()
        ],
        request_timeout=timeout,
        operation_timeout=timeout,
    )
    created = []
    for name, future in futures.items():
        try:
            future.result(timeout)
            created.append(name)
        except KafkaException as e:
            if e.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise _wrap(e, f"cannot create topic {name}") from e
        except TimeoutError as e:  # concurrent.futures.TimeoutError is TimeoutError (3.11)
            raise TransientCatalogError(f"creating topic {name} timed out") from e
    return created


class CompactedTopic:
    """A one-partition compacted topic read as a log of ``(key, value)`` records.

    :meth:`read_new` returns the records written since the previous call, up to the end of
    the topic as it was when the call started; :meth:`put` writes one record and waits
    until the broker has acknowledged it (idempotent producer, ``acks=all``).

    Args:
        bootstrap: bootstrap servers.
        topic: the topic's name.
        client: librdkafka properties for every client (security settings).
        producer: extra producer properties.
        consumer: extra consumer properties.
        timeout: seconds an operation may take before it fails as transient.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        client: dict[str, Any] | None = None,
        producer: dict[str, Any] | None = None,
        consumer: dict[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout = timeout
        self._client = dict(client or {})
        self._producer_props = dict(producer or {})
        self._consumer_props = dict(consumer or {})
        self._producer: Producer | None = None
        self._consumer: Consumer | None = None
        self._admin: AdminClient | None = None
        self._next_offset = 0
        self._assigned = False
        self._lock = threading.Lock()

    def admin(self) -> AdminClient:
        # Kept: librdkafka logs about purged requests when an admin client is destroyed.
        if self._admin is None:
            self._admin = AdminClient(client_config(self.bootstrap, common=self._client))
        return self._admin

    def ensure(self, *, replication_factor: int = -1) -> bool:
        """Create the topic (compacted, one partition) if missing; True if it was created."""
        created = create_topics(
            self.admin(),
            {self.topic: 1},
            replication_factor=replication_factor,
            config={"cleanup.policy": "compact"},
            timeout=self.timeout,
        )
        return bool(created)

    def _reader(self) -> Consumer:
        if self._consumer is None:
            try:
                self._consumer = Consumer(
                    client_config(
                        self.bootstrap,
                        common=self._client,
                        specific=self._consumer_props,
                        # assign() only: this group id never joins a group or commits.
                        defaults={"group.id": f"cdc-reader-{uuid.uuid4().hex}"},
                        required={
                            "enable.auto.commit": False,
                            "enable.partition.eof": True,
                            "auto.offset.reset": "earliest",
                        },
                    )
                )
            except (KafkaException, ValueError) as e:
                raise TerminalCatalogError(f"cannot create a Kafka consumer: {e}") from e
        return self._consumer

    def read_new(self) -> list[tuple[bytes | None, bytes | None, int]]:
        """Records ``(key, value, offset)`` written since the last call, oldest first."""
        with self._lock:
            consumer = self._reader()
            partition = TopicPartition(self.topic, 0)
            try:
                _low, high = consumer.get_watermark_offsets(partition, timeout=self.timeout)
            except KafkaException as e:
                code = e.args[0].code()
                if code in (KafkaError._UNKNOWN_PARTITION, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    return []  # nothing was ever registered
                raise _wrap(e, f"cannot read the end of {self.topic}") from e
            if high <= self._next_offset:
                return []
            if not self._assigned:
                start = self._next_offset or OFFSET_BEGINNING
                consumer.assign([TopicPartition(self.topic, 0, start)])
                self._assigned = True
            records: list[tuple[bytes | None, bytes | None, int]] = []
            deadline = _Deadline(self.timeout)
            while self._next_offset < high:
                if deadline.expired():
                    raise TransientCatalogError(
                        f"reading {self.topic} stopped at offset {self._next_offset} of {high}"
                    )
                message = consumer.poll(min(0.5, deadline.left()))
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        # Compaction can leave the last offsets empty; EOF is the end.
                        self._next_offset = max(self._next_offset, message.offset() or 0)
                        if self._next_offset >= high:
                            break
                        continue
                    if not is_retriable(error):
                        raise _wrap(error, f"cannot read {self.topic}")
                    continue
                offset = message.offset() or 0
                records.append((message.key(), message.value(), offset))
                self._next_offset = offset + 1
            return records

    def put(self, key: bytes, value: bytes | None) -> None:
        """Write one record and wait for the broker's acknowledgement."""
        with self._lock:
            if self._producer is None:
                try:
                    self._producer = Producer(
                        client_config(
                            self.bootstrap,
                            common=self._client,
                            specific=self._producer_props,
                            required=_REQUIRED_PRODUCER,
                        )
                    )
                except (KafkaException, ValueError) as e:
                    raise TerminalCatalogError(f"cannot create a Kafka producer: {e}") from e
            failures: list[KafkaError] = []

            def delivered(err: KafkaError | None, _msg: Any) -> None:
                if err is not None:
                    failures.append(err)

            try:
                self._producer.produce(self.topic, key=key, value=value, on_delivery=delivered)
            except KafkaException as e:
                raise _wrap(e, f"cannot write to {self.topic}") from e
            except BufferError as e:  # only records of this object are in its queue
                raise TransientCatalogError(f"producer queue for {self.topic} is full") from e
            if self._producer.flush(self.timeout) > 0:
                raise TransientCatalogError(
                    f"writing to {self.topic} was not acknowledged within {self.timeout}s"
                )
            if failures:
                raise _wrap(failures[0], f"writing to {self.topic} failed")

    def close(self) -> None:
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
            if self._producer is not None:
                self._producer.flush(self.timeout)  # put() waited already: nothing pending
                close_client(self._producer)
                self._producer = None


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return self.left() <= 0.0


class KafkaSchemaRegistry:
    """Versions of each table's shape, kept in the compacted topic ``<prefix>.__schemas``.

    Readers keep every record they have read in memory; :meth:`get` re-reads the topic when
    it meets an unknown id, so versions registered by capture after this object was built
    are found. Version numbers are derived when reading: a table's versions ordered by the
    number their writer gave them, then by offset.

    Hazards:
        * Run one capture per prefix. Two processes registering different new shapes of one
          table at the same moment both succeed, and may both claim the same version
          number; readers still order them deterministically.
        * Tansu and other memory-only brokers forget the topic on restart; capture
          registers every shape again as it meets it, but events already in topics of a
          restarted broker are gone too.

    Args:
        bootstrap: bootstrap servers.
        prefix: topic prefix; the registry lives in ``<prefix>.__schemas``.
        client, producer, consumer: librdkafka properties (security settings in ``client``).
        timeout: seconds an operation may take before it fails as transient.

    Example:
        >>> reg = KafkaSchemaRegistry("localhost:9092", prefix="shop")  # doctest: +SKIP
        >>> reg.register(schema)  # doctest: +SKIP
        81985529216486895
        >>> [(v.version, v.schema_id) for v in reg.versions("public.orders")]  # doctest: +SKIP
        [(1, 81985529216486895)]
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        prefix: str,
        client: dict[str, Any] | None = None,
        producer: dict[str, Any] | None = None,
        consumer: dict[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.topic = schemas_topic(prefix)
        self._log = CompactedTopic(
            bootstrap,
            self.topic,
            client=client,
            producer=producer,
            consumer=consumer,
            timeout=timeout,
        )
        self._lock = threading.RLock()
        # Every record read: (claimed version, offset, entry) per table.
        self._records: dict[str, list[tuple[int, int, SchemaVersion]]] = {}
        self._by_id: dict[int, TableSchema] = {}

    def create_topic(self, *, replication_factor: int = -1) -> None:
        """Create ``<prefix>.__schemas`` (compacted, one partition) if it is missing."""
        self._log.ensure(replication_factor=replication_factor)

    # -- reading ------------------------------------------------------------------------

    def refresh(self) -> int:
        """Read the records registered since the last read; returns how many there were."""
        with self._lock:
            records = self._log.read_new()
            for key, value, offset in records:
                if value is None:
                    continue  # a tombstone: nobody deletes schemas, but do not choke on one
                try:
                    entry = _decode(value, key, self.topic, offset)
                except TerminalCatalogError as e:
                    # One bad record must not make every other schema unreadable; events
                    # that name its id end up as dead letters, with this reason logged.
                    log.warning("skipping a record of the schema registry: %s", e)
                    continue
                self._records.setdefault(entry.schema.qualified_name, []).append(
                    (entry.version, offset, entry)
                )
                self._by_id.setdefault(entry.schema_id, entry.schema)
            return len(records)

    def get(self, schema_id: int) -> TableSchema:
        """The shape registered under ``schema_id``, re-reading the topic if it is unknown.

        Raises:
            UnknownSchemaError: no record in the topic has that id.
        """
        with self._lock:
            found = self._by_id.get(schema_id)
            if found is None:
                self.refresh()
                found = self._by_id.get(schema_id)
        if found is None:
            raise UnknownSchemaError(f"schema id {schema_id} is not registered in {self.topic}")
        return found

    def versions(self, qualified_name: str) -> list[SchemaVersion]:
        """Every registered version of ``schema.table``, oldest first (numbered from 1).

        Example:
            >>> [v.schema.column_names for v in reg.versions("public.orders")]  # doctest: +SKIP
            [('id', 'amount'), ('id', 'amount', 'note')]
        """
        with self._lock:
            self.refresh()
            return self._numbered(qualified_name)

    def _numbered(self, qualified_name: str) -> list[SchemaVersion]:
        seen: set[int] = set()
        out: list[SchemaVersion] = []
        for _claimed, _offset, entry in sorted(
            self._records.get(qualified_name, []), key=lambda r: (r[0], r[1])
        ):
            if entry.schema_id in seen:
                continue  # the same shape registered twice by racing writers
            seen.add(entry.schema_id)
            out.append(
                SchemaVersion(
                    schema_id=entry.schema_id,
                    version=len(out) + 1,
                    registered_at=entry.registered_at,
                    schema=entry.schema,
                )
            )
        return out

    def latest(self, qualified_name: str) -> TableSchema | None:
        """The newest registered shape of ``schema.table``, or None."""
        versions = self.versions(qualified_name)
        return versions[-1].schema if versions else None

    def tables(self) -> list[str]:
        """Qualified names of every table with at least one registered version."""
        with self._lock:
            self.refresh()
            return sorted(self._records)

    # -- writing ------------------------------------------------------------------------

    def register(self, schema: TableSchema) -> int:
        """Record ``schema`` as a version of its table (idempotent); returns its id.

        Returns only once the broker has acknowledged the record, so an event sent after
        this call can always be resolved by a reader.
        """
        with self._lock:
            self.refresh()
            schema_id = schema.schema_id()
            known = self._by_id.get(schema_id)
            if known is not None and known == schema:
                return schema_id
            existing = self._numbered(schema.qualified_name)
            entry = SchemaVersion(
                schema_id=schema_id,
                version=len(existing) + 1,
                registered_at=datetime.now(UTC),
                schema=schema,
            )
            key = f"{schema.qualified_name}/{schema_id}".encode()
            self._log.put(key, entry.to_json())
            self.refresh()
            return schema_id

    def close(self) -> None:
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _decode(value: bytes, key: bytes | None, topic: str, offset: int) -> SchemaVersion:
    try:
        entry = SchemaVersion.from_json(value)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise TerminalCatalogError(
            f"record at offset {offset} of {topic} (key {key!r}) is not a schema version: {e}"
        ) from e
    # The id is derived from the shape: a record whose id does not match was not written by
    # us (or was edited) and would attach the wrong shape to events.
    if entry.schema.schema_id() != entry.schema_id:
        raise TerminalCatalogError(
            f"record at offset {offset} of {topic} claims schema id {entry.schema_id} for a "
            f"shape whose id is {entry.schema.schema_id()}"
        )
    return entry
