"""``cdc sink``: consumer-group workers that write Kafka change events to the lake, exactly once.

Any number of workers share the table topics through one consumer group. Each batches
events per table and writes them with :class:`~sinks.delta_changelog.DeltaChangelogSink`
in the layout embedded mode writes, so the DuckDB views work unchanged (runs of capture's
messages are decoded column-wise, the rest message by message: see
:meth:`KafkaSinkWorker._handle_columnar`); messages it cannot decode or that do not fit
their schema go to :class:`~sinks.dead_letters.DeadLetterSink`.

Exactly-once, as kafka-delta-ingest does it:

* Every Delta commit records, for each topic-partition it covers, the offset of the last
  message handled (a deltalake app transaction), in the same commit as the rows.
* On partition assignment a worker reads those offsets from Delta and seeks to the next
  one. The consumer group's committed offsets are written for monitoring (lag) only.
* Events capture sent again after its own restart have positions ``(lsn, seq)`` at or below
  the partition's watermark, also recorded in Delta per partition, and are dropped.
* On revoke a worker flushes what it holds; if that fails it discards it, and the next
  owner re-reads it from the recorded offsets. A worker that lost its partitions without
  noticing (a long pause) cannot commit them any more: the commit checks the recorded
  offsets first, and Delta's conflict check rejects two commits of one partition.

Hazards:
    * A partition feeds one table. An event of another table in it (a topic routing several
      tables together) is dead-lettered, with that reason.
    * A partition whose messages all become dead letters or tombstones never records an
      offset in its table; a new owner re-reads it from its start (the letters are not
      written twice).
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import pyarrow.fs as pafs
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from catalog import lake_layout as layout
from catalog.commit_safety import require_safe_commits
from catalog.errors import CatalogError, TransientCatalogError
from catalog.kafka_schema_registry import KafkaSchemaRegistry, create_topics
from cdc.core.errors import ConfigError
from cdc.core.kafka_format import (
    client_config,
    close_client,
    dlq_topic,
    is_retriable,
    table_topics_pattern,
    topic_name,
)
from cdc.core.settings import Settings
from cdc.core.table_schema import TableSchema
from sinks.dead_letters import DeadLetter, DeadLetterSink
from sinks.delta_changelog import DeltaChangelogSink, changelog_table, stream_app_id
from sinks.errors import (
    KafkaConsumerError,
    KafkaConsumerUnavailableError,
    SinkBackpressureError,
    TerminalSinkError,
    TransientSinkError,
    UndecodableMessageError,
)
from sinks.event_decoding import ColumnarChanges, ColumnRun, Decoded, EventDecoder
from transforms import Transforms

__all__ = [
    "KafkaConsumerError",
    "KafkaConsumerUnavailableError",
    "KafkaSinkWorker",
    "consumer_config",
    "run_sink",
]

log = logging.getLogger(__name__)

DEFAULT_CONSUMER: Final[dict[str, Any]] = {
    "auto.offset.reset": "earliest",
    "session.timeout.ms": 10_000,
    # New table topics are found at the next metadata refresh (librdkafka's default is
    # five minutes).
    "topic.metadata.refresh.interval.ms": 5_000,
    "max.poll.interval.ms": 300_000,
    # An idle partition's fetch waits this long for data (librdkafka: 500 ms); it bounds
    # how late the first change after a quiet spell reaches the lake.
    "fetch.wait.max.ms": 100,
}
#: Offsets live in Delta: the group's are committed by hand, for monitoring only.
REQUIRED_CONSUMER: Final[dict[str, Any]] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
}
_REQUIRED_PRODUCER: Final[dict[str, Any]] = {"enable.idempotence": True, "acks": "all"}
_TABLE_REFRESH_SECONDS = 5.0
#: ... and while messages keep coming (reading the registry blocks the loop for a round trip).
_TABLE_REFRESH_BUSY_SECONDS = 30.0
_PROGRESS_SECONDS = 1.0
#: A run that does not type column-wise is halved down to this size before its messages
#: are decoded one by one.
_MIN_SPLIT = 64
#: Stretches of a partition that skip pyarrow.json after it refused one (see _add_piece).
_JSON_SKIP = 8
#: The garbage collector's generation-0 threshold while run_sink runs (see there).
_GC_THRESHOLD = 50_000


def _wrap(error: KafkaError | KafkaException, doing: str) -> TransientSinkError | TerminalSinkError:
    err = error.args[0] if isinstance(error, KafkaException) else error
    if not isinstance(err, KafkaError):
        return KafkaConsumerUnavailableError(f"{doing}: {error}")
    cls = KafkaConsumerUnavailableError if is_retriable(err) else KafkaConsumerError
    return cls(f"{doing}: {err.str()} ({err.name()})")


def consumer_config(settings: Settings, *, client_id: str) -> dict[str, Any]:
    """librdkafka consumer properties: defaults, then ``kafka.client`` and
    ``kafka.consumer``, then the group and manual offset handling."""
    try:
        return client_config(
            settings.kafka_bootstrap(),
            common=settings.kafka.client,
            specific=settings.kafka.consumer,
            defaults={**DEFAULT_CONSUMER, "client.id": client_id},
            required={**REQUIRED_CONSUMER, "group.id": settings.kafka_group},
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e


@dataclass(slots=True)
class _Partition:
    stream: str
    table: str | None  # the table this partition feeds, once known
    next_offset: int  # messages below it are handled (or are being re-read after a seek)
    reported: int = -1  # the offset last committed to the group (monitoring)
    json_skip: int = 0  # stretches left that skip pyarrow.json (it refused one lately)


class KafkaSinkWorker:
    """One consumer-group member writing change events to the lake.

    Use :func:`run_sink` unless you need the parts (tests call :meth:`run` in threads).

    Args:
        settings: ``kafka`` (bootstrap, group, topics, prefix, properties), ``lake`` and
            ``batch`` are used; ``name`` is the app id of the offsets in Delta, so a new
            group with the same name continues where the old one stopped.
        stop: Set it to flush, leave the group and return.
        columnar: Decode consecutive messages of one partition and schema version
            column-wise (the default); False decodes every message on its own (the same
            rows and dead letters, slower).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        stop: threading.Event | None = None,
        on_flush: Callable[[dict[str, Any]], None] | None = None,
        columnar: bool = True,
    ) -> None:
        self.settings = settings
        #: Decode runs of messages column-wise (False: every message on its own, the
        #: reference the column-wise path is tested against).
        self.columnar = columnar
        self.stop = stop or threading.Event()
        #: Called after each successful flush with the sink's result plus "dead_letters"
        #: (letters committed) and "duration_s": the hook of the Prometheus metrics.
        self.on_flush = on_flush
        self.bootstrap = settings.kafka_bootstrap()
        self.root = layout.normalize_root(settings.lake.path)
        self.storage_options = settings.lake.storage_options or None
        require_safe_commits(self.root, self.storage_options, writer="cdc sink")
        self.prefix = settings.topic_prefix
        self.app_id = f"cdc-lakehouse:{settings.name}"
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{id(self) & 0xFFFF:04x}"
        kafka = settings.kafka
        self._cooperative = "cooperative" in str(
            {**kafka.client, **kafka.consumer}.get("partition.assignment.strategy", "")
        )
        self.dlq_topic = kafka.dlq_topic or dlq_topic(self.prefix)
        try:
            self.consumer = Consumer(consumer_config(settings, client_id=self.worker_id))
            self.producer = Producer(
                client_config(
                    self.bootstrap,
                    common=kafka.client,
                    specific=kafka.producer,
                    defaults={"linger.ms": 5},
                    required=_REQUIRED_PRODUCER,
                )
            )
        except (KafkaException, ValueError) as e:
            raise ConfigError(f"invalid Kafka settings: {e}") from e
        self.registry = KafkaSchemaRegistry(
            self.bootstrap,
            prefix=self.prefix,
            client=kafka.client,
            producer=kafka.producer,
            consumer=kafka.consumer,
        )
        self.decoder = EventDecoder(self.registry.get, known=self._known_schema)
        # Rules for topics capture did not write (Debezium's); ours arrive transformed.
        self.transforms = (
            Transforms(settings.transforms, source=settings.config_file)
            if settings.transforms.rules
            else None
        )
        self._partition_counts: dict[str, int] = {}  # topic -> partitions
        self.sink = self._new_sink()
        self.dlq = DeadLetterSink(
            self.root,
            app_id=self.app_id,
            producer=self.producer,
            topic=self.dlq_topic,
            worker=self.worker_id,
            storage_options=self.storage_options,
        )
        self._owned: dict[tuple[str, int], _Partition] = {}
        self._stream_tables: dict[str, str] = {}  # stream -> table, learned along the way
        self._dlq_since: float | None = None
        # Bumped whenever what was buffered is discarded: messages of the current batch
        # after that point are read again from the recorded offsets, not handled now.
        self._epoch = 0
        self._backoff = 0.2
        self._last_progress = 0.0
        self._last_table_refresh = 0.0
        self._ensured_tables: set[str] = set()
        self.metrics: dict[str, Any] = {
            "messages": 0,
            "rows_written": 0,
            "commits": 0,
            "dead_letters": 0,
            "tombstones": 0,
            # Messages decoded column-wise (the rest, message by message), and of those
            # the ones typed by pyarrow.json straight from their bytes.
            "columnar_messages": 0,
            "json_typed_messages": 0,
            "rebalances": 0,
            "resets": 0,
        }

    # -- set-up -------------------------------------------------------------------------

    def _new_sink(self) -> DeltaChangelogSink:
        sink = DeltaChangelogSink(
            self.root,
            app_id=self.app_id,
            batch=self.settings.batch,
            storage_options=self.storage_options,
        )
        for topic, count in self._partition_counts.items():
            sink.set_partition_count(topic, count)
        return sink

    def _learn_partition_count(self, topic: str, partition: int) -> None:
        """Tell the sink how many partitions ``topic`` has (so its commits record every
        partition's mark for ``cdc jobs merge``), before the first event of a partition is
        added: asked from the broker once per topic, and again when a partition number
        shows the topic has grown."""
        known = self._partition_counts.get(topic)
        if known is not None and partition < known:
            return
        try:
            metadata = self.consumer.list_topics(topic, timeout=10)
        except KafkaException as e:
            raise _wrap(e, f"cannot read the partitions of {topic}") from e
        described = metadata.topics.get(topic)
        count = max(len(described.partitions) if described is not None else 0, partition + 1)
        self._partition_counts[topic] = count
        self.sink.set_partition_count(topic, count)

    def _known_schema(self, qualified_name: str) -> TableSchema | None:
        if self.transforms is not None and "." in qualified_name:
            # A routed table is in the lake under its target name (its shape there is
            # the transformed one, which the rules leave as it is).
            target = self.transforms.output_name(*qualified_name.split(".", 1))
            qualified_name = ".".join(target)
        try:
            return self.sink.registry.latest(qualified_name)
        except CatalogError:
            return None

    def _subscription(self) -> list[str]:
        return self.settings.kafka.topics or [table_topics_pattern(self.prefix)]

    def _ensure_dlq_topic(self) -> None:
        admin = AdminClient(client_config(self.bootstrap, common=self.settings.kafka.client))
        try:
            create_topics(
                admin,
                {self.dlq_topic: 1},
                replication_factor=self.settings.kafka.replication_factor,
            )
        except TransientCatalogError as e:
            raise KafkaConsumerUnavailableError(f"cannot create {self.dlq_topic}: {e}") from e
        except CatalogError as e:
            raise KafkaConsumerError(f"cannot create {self.dlq_topic}: {e}") from e

    # -- offsets in Delta ---------------------------------------------------------------

    def _lake_tables(self) -> list[str]:
        """Qualified names of the changelog tables in the lake."""
        fs, path = layout.filesystem(self.root, self.storage_options)
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError as e:
            raise TransientSinkError(f"cannot list the lake {self.root}: {e}") from e
        names = []
        for info in infos:
            name = info.base_name
            if info.type != pafs.FileType.Directory or name in (
                layout.INTERNAL_DIR,
                layout.DLQ_DIR,
            ):
                continue
            names.append(name)
        return sorted(names)

    def _resolve(self, streams: list[str]) -> dict[str, tuple[str | None, int | None]]:
        """For each stream: the table it feeds and the offset recorded there (or Nones).

        Tables this worker has seen the stream feed are asked first; otherwise every table
        of the lake is searched, one log read per table.
        """
        found: dict[str, tuple[str | None, int | None]] = {}
        unknown = []
        for stream in streams:
            table = self._stream_tables.get(stream)
            offset = self.sink.committed_offset(table, stream) if table else None
            if offset is not None:
                found[stream] = (table, offset)
            else:
                unknown.append(stream)
        if unknown:
            for name in self._lake_tables():
                uri = layout.changes_uri(self.root, name)
                try:
                    if not DeltaTable.is_deltatable(uri, storage_options=self.storage_options):
                        continue
                    dt = DeltaTable(uri, storage_options=self.storage_options)
                except (DeltaError, OSError) as e:
                    raise TransientSinkError(f"cannot read {uri}: {e}") from e
                for stream in unknown:
                    if stream in found:
                        continue
                    app = stream_app_id(self.app_id, stream, "offset")
                    if dt.transaction_version(app) is not None:
                        found[stream] = (name, self.sink.committed_offset(name, stream))
        for stream in streams:
            found.setdefault(stream, (None, None))
            self.dlq.committed_offset(stream)  # what the next _dlq commit must find
            table = found[stream][0]
            if table is not None:
                self._stream_tables[stream] = table
        return found

    def _assign_offsets(self, partitions: list[TopicPartition]) -> None:
        streams = [f"{p.topic}:{p.partition}" for p in partitions]
        resolved = self._resolve(streams)
        for p, stream in zip(partitions, streams, strict=True):
            table, offset = resolved[stream]
            start = offset + 1 if offset is not None else OFFSET_BEGINNING
            p.offset = start
            self._owned[(p.topic, p.partition)] = _Partition(
                stream, table, offset + 1 if offset is not None else 0
            )
            log.info(
                "%s: %s starts at %s",
                self.worker_id,
                stream,
                f"offset {start} (after {table}'s last commit)" if table else "its beginning",
            )

    # -- rebalances ---------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.metrics["rebalances"] += 1
        if not self._cooperative:
            # Eager: everything was revoked (and flushed) first. A new sink forgets what
            # the previous assignment read from Delta.
            self.sink.close()
            self.sink = self._new_sink()
            self.dlq.discard()
        self._assign_offsets(partitions)
        if self._cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Flush, so the next owner starts after what this worker held; if the flush fails,
        # discard it all: the next owner re-reads it from the offsets recorded in Delta.
        if not self._flush(reseek=False):
            self._discard()
            self._reseek(exclude=partitions)
        for p in partitions:
            self._owned.pop((p.topic, p.partition), None)
        if self._cooperative:
            consumer.incremental_unassign(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The partitions may belong to someone else already: commit nothing of them.
        log.warning(
            "%s lost %d partitions; discarding what it held", self.worker_id, len(partitions)
        )
        self._discard()
        for p in partitions:
            self._owned.pop((p.topic, p.partition), None)
        self._reseek()
        if self._cooperative:
            consumer.incremental_unassign(partitions)

    def _discard(self) -> None:
        # Commits still running in the old sink's threads end first (landed or not), so
        # that the offsets read from Delta afterwards include every commit that landed.
        self.sink.close()
        self.sink = self._new_sink()
        self.dlq.discard()
        self._dlq_since = None
        self._epoch += 1

    def _reseek(self, exclude: list[TopicPartition] | None = None) -> None:
        """Seek every owned partition back to the offset recorded in Delta."""
        skip = {(p.topic, p.partition) for p in exclude or []}
        owned = [(tp, part) for tp, part in self._owned.items() if tp not in skip]
        if not owned:
            return
        resolved = self._resolve([part.stream for _tp, part in owned])
        for (topic, partition), part in owned:
            table, offset = resolved[part.stream]
            part.table = table
            part.next_offset = offset + 1 if offset is not None else 0
            target = offset + 1 if offset is not None else OFFSET_BEGINNING
            try:
                self.consumer.seek(TopicPartition(topic, partition, target))
            except KafkaException as e:
                # Reading on from the current position would skip what was discarded.
                raise _wrap(e, f"cannot seek {part.stream} back to {target}") from e

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Consume, write and commit until ``stop`` is set; returns the metrics."""
        self._ensure_dlq_topic()
        self.consumer.subscribe(
            self._subscription(),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        try:
            while not self.stop.is_set():
                try:
                    # Waiting past the flush deadline would delay the commit by up to the
                    # whole timeout while messages keep arriving.
                    wait = min(0.2, self.sink.seconds_until_flush())
                    messages = self.consumer.consume(num_messages=2000, timeout=wait)
                except KafkaException as e:
                    raise _wrap(e, "consuming failed") from e
                epoch = self._epoch
                if self.transforms is not None:
                    self._handle_transformed(messages, epoch)
                elif self.columnar:
                    self._handle_columnar(messages, epoch)
                else:
                    for message in messages:
                        self._handle(message)
                        if self._epoch != epoch:
                            break  # sought back to Delta's offsets: the rest comes again
                if self._flush_due():
                    # Commits run in the sink's commit threads while this loop reads on.
                    self._flush(wait=False)
                elif not self.sink.pending_rows and not self.dlq.pending:
                    self._report_progress()
                self._refresh_tables(busy=bool(messages))
            self._flush(reseek=False)
        except BaseException:
            # Leaving the group revokes the partitions, and revoking flushes: after a
            # failure, nothing half-handled may be committed on the way out.
            self._discard()
            raise
        finally:
            try:
                self.consumer.close()  # leaves the group: the others take over at once
            finally:
                self.sink.close()
                self.producer.flush(5)  # dead letters are produced before their commit
                close_client(self.producer)
                self.registry.close()
        return dict(self.metrics)

    def _handle(self, message: Message) -> None:
        item = self._decode(message)
        if item is not None:
            self._add(*item)

    def _handle_transformed(self, messages: list[Message], epoch: int) -> None:
        """Decode a whole consumed batch, transform the events of foreign topics (those
        that are not ``cdc capture``'s, which are transformed already) in one go, then add
        them in order."""
        assert self.transforms is not None
        items = [item for item in map(self._decode, messages) if item is not None]
        foreign = [decoded.event for _, decoded, _ in items if not decoded.exact_position]
        kept = {id(e) for e in self.transforms.apply(foreign)} if foreign else set()
        for part, decoded, offset in items:
            if decoded.exact_position or id(decoded.event) in kept:
                self._add(part, decoded, offset)
            if self._epoch != epoch:
                return  # sought back to Delta's offsets: the rest comes again

    def _decode(self, message: Message) -> tuple[_Partition, Decoded, int] | None:
        error = message.error()
        if error is not None:
            if error.fatal():
                raise _wrap(error, "the consumer failed")
            if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                # A pattern with no topic yet, or a topic not created yet: they are
                # picked up at the next metadata refresh.
                log.debug("consumer: %s", error.str())
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer: %s", error.str())
            return None
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        if topic is None or partition is None or offset is None:
            return None
        part = self._owned.get((topic, partition))
        if part is None or offset < part.next_offset:
            return None  # revoked meanwhile, or fetched before a seek back
        part.next_offset = offset + 1
        self.metrics["messages"] += 1
        return self._decode_owned(message, part, topic, partition, offset)

    def _decode_owned(
        self, message: Message, part: _Partition, topic: str, partition: int, offset: int
    ) -> tuple[_Partition, Decoded, int] | None:
        """:meth:`_decode` of a message already counted as handled."""
        try:
            headers = message.headers()
            decoded = self.decoder.decode(
                key=message.key(),
                value=message.value(),
                # A list of (name, value) pairs, or None (a dict from some test doubles).
                headers=list(headers.items()) if isinstance(headers, dict) else headers,
                offset=offset,
            )
        except UndecodableMessageError as e:
            self._dead_letter(message, str(e), None)
            return None
        if decoded is None:
            self.metrics["tombstones"] += 1
            return None
        event = decoded.event
        name = event.table.qualified_name
        if part.table is None:
            self._learn_partition_count(topic, partition)
            part.table = name
            self._stream_tables[part.stream] = name
        elif part.table != name:
            self._dead_letter(
                message,
                f"partition {part.stream} feeds table {part.table}; an event of {name} cannot "
                "be written with it (one table per topic)",
                name,
            )
            return None
        return part, decoded, offset

    def _handle_columnar(self, messages: list[Message], epoch: int) -> None:
        """Handle a consumed batch column-wise where it can.

        Each stretch of consecutive messages of one partition goes to :meth:`_add_stretch`
        (pyarrow.json over the values, the fastest); what that does not take goes to
        :meth:`_handle_prepared`, then message by message, in the partition's order."""
        owned = self._owned
        start, end = 0, len(messages)
        while start < end:
            first = messages[start]
            key = (first.topic(), first.partition())
            stop = start + 1
            while stop < end and (messages[stop].topic(), messages[stop].partition()) == key:
                stop += 1
            part = owned.get(key)  # type: ignore[arg-type]
            stretch = messages[start:stop]
            start = stop
            if part is not None and part.table is None:
                # The partition's first message learns its table, on its own.
                if not self._handle_prepared(stretch[:1], epoch):
                    return
                stretch = stretch[1:]
            if part is not None and part.json_skip:
                part.json_skip -= 1
                done = self._handle_prepared(stretch, epoch)
            elif part is None or part.table is None or any(m.error() for m in stretch):
                done = self._handle_prepared(stretch, epoch)
            else:
                done = self._add_stretch(stretch, part, epoch)
            if not done or self._epoch != epoch:
                return  # sought back to Delta's offsets: the rest comes again

    def _add_stretch(self, messages: list[Message], part: _Partition, epoch: int) -> bool:
        """Add consecutive messages of ``part`` typed by pyarrow.json, in pieces of at most
        the room left in the batch (see :meth:`_add_piece`); False when what was buffered
        was discarded meanwhile (the rest is read again)."""
        offsets = [m.offset() for m in messages]
        # Fetched before a seek back: skipped, as the per-message path skips them.
        skip = 0
        while skip < len(offsets) and offsets[skip] < part.next_offset:  # type: ignore[operator]
            skip += 1
        if skip:
            messages, offsets = messages[skip:], offsets[skip:]
        if any(a >= b for a, b in itertools.pairwise(offsets)):  # type: ignore[operator]
            # (Never from one fetch; the per-message path skips what is below an offset.)
            return self._handle_prepared(messages, epoch)
        while messages:
            room = max(1, self.settings.batch.max_rows - self.sink.pending_rows)
            if not self._add_piece(messages[:room], offsets[:room], part, epoch):  # type: ignore[arg-type]
                return False
            messages, offsets = messages[room:], offsets[room:]
        return True

    def _add_piece(
        self, messages: list[Message], offsets: list[int], part: _Partition, epoch: int
    ) -> bool:
        """Add messages typed by pyarrow.json, or by :meth:`_handle_prepared` when they do
        not type so (the next few stretches of the partition then skip pyarrow.json: a
        table whose messages it never takes pays for one parse in a few). False when what
        was buffered was discarded meanwhile."""
        changes = self.decoder.columns_of_values(
            [m.value() for m in messages],
            [m.headers() for m in messages],
            offsets,
            table=part.table or "",
        )
        if changes is None:
            part.json_skip = _JSON_SKIP
            return self._handle_prepared(messages, epoch)
        part.next_offset = offsets[-1] + 1
        self.metrics["messages"] += len(messages)
        self.metrics["json_typed_messages"] += len(messages)
        return self._add_columns(changes, part, epoch)

    def _handle_prepared(self, messages: list[Message], epoch: int) -> bool:
        """Handle messages column-wise where :meth:`EventDecoder.prepare` takes them:
        consecutive messages of one partition and one schema version gather in a run,
        added to the sink as Arrow columns in one go; every other message (and every
        message of a run :meth:`EventDecoder.columns` cannot type) takes the per-message
        path, in its place in the partition's order. False when what was buffered was
        discarded meanwhile (the rest is read again)."""
        run: ColumnRun | None = None
        run_part: _Partition | None = None
        room = 0
        prepare = self.decoder.prepare
        owned = self._owned
        for message in messages:
            # The checks of _decode, inline: this loop runs once per message.
            part = None
            if message.error() is None:
                offset = message.offset()
                part = owned.get((message.topic(), message.partition()))  # type: ignore[arg-type]
                if part is not None and part.table is not None and offset is not None:
                    if offset < part.next_offset:
                        continue  # fetched before a seek back
                    headers = message.headers()
                    item = prepare(
                        message.value(),
                        list(headers.items()) if isinstance(headers, dict) else headers,
                    )
                    # (Another table's event is a dead letter: _handle says so.)
                    if item is not None and item.table_name == part.table:
                        if run is not None and (run_part is not part or not run.fits(item)):
                            if not self._add_run(run, run_part, epoch):
                                return False
                            run = None
                        if run is None:
                            run, run_part = ColumnRun(item.shape), part
                            # Up to the batch's row limit, as the per-message path fills it.
                            room = max(1, self.settings.batch.max_rows - self.sink.pending_rows)
                        run.append(item, offset, message)
                        part.next_offset = offset + 1
                        if len(run.offsets) >= room:
                            if not self._add_run(run, run_part, epoch):
                                return False
                            run = None
                        continue
            # Errors, skipped messages, a partition's first message (which learns the
            # partition's table) and whatever prepare() does not take: one by one.
            if run is not None:
                if not self._add_run(run, run_part, epoch):
                    return False
                run = None
            self._handle(message)
            if self._epoch != epoch:
                return False  # sought back to Delta's offsets: the rest comes again
        if run is not None:
            return self._add_run(run, run_part, epoch)
        return True

    def _add_run(self, run: ColumnRun, part: _Partition | None, epoch: int) -> bool:
        """Add a run column-wise, or its messages one by one when it does not type; False
        when what was buffered was discarded meanwhile (the rest is read again)."""
        assert part is not None  # set with the run
        self.metrics["messages"] += len(run.offsets)
        return self._add_typed(run, part, epoch)

    def _add_typed(self, run: ColumnRun, part: _Partition, epoch: int) -> bool:
        changes = self.decoder.columns(run)
        if changes is None and len(run.offsets) >= _MIN_SPLIT:
            # Halve it, so only a small run around the value that does not type (a
            # dead letter, most likely) is decoded message by message.
            return all(self._add_typed(half, part, epoch) for half in run.halves())
        if changes is None:
            for message, offset in zip(run.items, run.offsets, strict=True):
                item = self._decode_owned(
                    message, part, message.topic() or "", message.partition() or 0, offset
                )
                if item is not None:
                    self._add(*item)
                if self._epoch != epoch:
                    return False
            return True
        return self._add_columns(changes, part, epoch)

    def _add_columns(self, changes: ColumnarChanges, part: _Partition, epoch: int) -> bool:
        """Add a run typed column-wise to the sink; False when what was buffered was
        discarded meanwhile (the rest is read again)."""
        self.metrics["columnar_messages"] += len(changes.offsets)
        data = changelog_table(
            changes.schema,
            changes.values,
            ops=changes.ops,
            lsns=changes.lsns,
            seqs=changes.seqs,
            txids=changes.txids,
            commit_ts=changes.commit_ts,
        )

        def add() -> None:
            self.sink.add_changes(
                changes.schema,
                data,
                size_bytes=changes.size_bytes,
                stream=part.stream,
                offsets=changes.offsets,
            )

        try:
            add()
        except SinkBackpressureError:
            if self._flush():
                add()
            # else: reset and sought back; the run is read again
        return self._epoch == epoch

    def _add(self, part: _Partition, decoded: Decoded, offset: int) -> None:
        event = decoded.event
        try:
            self.sink.add(event, stream=part.stream, offset=offset, dedupe=decoded.exact_position)
        except SinkBackpressureError:
            if self._flush():
                self.sink.add(
                    event, stream=part.stream, offset=offset, dedupe=decoded.exact_position
                )
            # else: reset and sought back; this message is read again

    def _dead_letter(self, message: Message, reason: str, table: str | None) -> None:
        _kind, ts = message.timestamp()
        letter = DeadLetter(
            reason=reason,
            topic=message.topic() or "",
            partition=message.partition() or 0,
            offset=message.offset() or 0,
            key=message.key(),
            value=message.value(),
            headers=[(k, v.encode() if isinstance(v, str) else v) for k, v in _headers(message)],
            timestamp_ms=ts if ts and ts > 0 else None,
            table=table,
        )
        if self.dlq.add(letter):
            self.metrics["dead_letters"] += 1
            if self._dlq_since is None:
                self._dlq_since = time.monotonic()

    def _flush_due(self) -> bool:
        if self.sink.flush_due() or self.dlq.pending >= self.settings.batch.max_rows:
            return True
        since = self._dlq_since
        return since is not None and time.monotonic() - since >= self.settings.batch.max_seconds

    def _flush(self, *, reseek: bool = True, wait: bool = True) -> bool:
        """Commit dead letters, then the tables. On a failure, discard everything held and
        (with ``reseek``) seek back to the offsets recorded in Delta; returns False then.

        With ``wait=False`` only the tables that are due are committed, in the sink's
        commit threads (:meth:`DeltaChangelogSink.flush_due_tables`), and this returns at
        once: consuming goes on while delta-rs writes. The offsets a commit records are
        taken when it starts, and a table has one commit running at a time, so the order of
        commits and offsets is that of the blocking flush. A commit that failed is reported
        at the next call, which then discards and re-reads as a failed blocking flush does.
        """
        try:
            started = time.monotonic()
            # Dead letters first, always to the end: the tables' offsets may cover the
            # letters' messages.
            dead = self.dlq.flush() if wait or self.dlq.pending else {"commits": 0}
            written = self.sink.flush() if wait else self.sink.flush_due_tables()
        except (TransientSinkError, TransientCatalogError) as e:
            self.metrics["resets"] += 1
            log.warning("%s: flush failed, re-reading from Delta's offsets: %s", self.worker_id, e)
            self._discard()
            if reseek:
                self._reseek()
            self.stop.wait(self._backoff)
            self._backoff = min(self._backoff * 2, 10.0)
            return False
        self._backoff = 0.2
        if not self.dlq.pending:
            self._dlq_since = None
        self.metrics["rows_written"] += written["rows"]
        self.metrics["commits"] += written["commits"] + dead["commits"]
        if not (wait or written["commits"] or dead["commits"]):
            return True  # commits started; none has ended yet
        if self.on_flush is not None:
            self.on_flush(
                dict(
                    written,
                    dead_letters=dead.get("dead_letters", 0),
                    duration_s=time.monotonic() - started,
                )
            )
        # (After commits that ran in the background, the group's offsets may run ahead of
        # Delta by the commits still running: they are for monitoring only.)
        self._report_progress(force=wait)
        return True

    def _report_progress(self, *, force: bool = False) -> None:
        """Commit the group's offsets (monitoring only: lag tools read them)."""
        now = time.monotonic()
        if not force and now - self._last_progress < _PROGRESS_SECONDS:
            return
        self._last_progress = now
        offsets = [
            TopicPartition(topic, partition, part.next_offset)
            for (topic, partition), part in self._owned.items()
            if part.next_offset > part.reported
        ]
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as e:
            log.debug("committing group offsets failed (monitoring only): %s", e)
            return
        for tp in offsets:
            self._owned[(tp.topic, tp.partition)].reported = tp.offset

    def _refresh_tables(self, *, busy: bool = False) -> None:
        """Create the Delta tables of registered tables that have no events yet, so empty
        source tables are queryable, as in embedded mode.

        Every few seconds when idle; less often while ``busy`` (the last poll returned
        messages), since reading the registry stops the loop for a broker round trip.
        """
        now = time.monotonic()
        every = _TABLE_REFRESH_BUSY_SECONDS if busy else _TABLE_REFRESH_SECONDS
        if now - self._last_table_refresh < every:
            return
        self._last_table_refresh = now
        explicit = set(self.settings.kafka.topics or [])
        try:
            names = self.registry.tables()
            for name in names:
                if name in self._ensured_tables:
                    continue
                if explicit and topic_name(self.prefix, name) not in explicit:
                    continue
                uri = layout.changes_uri(self.root, name)
                if not DeltaTable.is_deltatable(uri, storage_options=self.storage_options):
                    schema = self.registry.latest(name)
                    if schema is not None:
                        self.sink.ensure_table(schema)
                self._ensured_tables.add(name)
        except (CatalogError, DeltaError, OSError) as e:
            # Another worker creating the same table, or Kafka busy: try again later.
            log.debug("creating tables of registered schemas failed: %s", e)


def _headers(message: Message) -> list[tuple[str, str | bytes | None]]:
    headers = message.headers()
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers or [])


def run_sink(
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    on_flush: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Consume the table topics as one member of ``settings.kafka_group`` and write them to
    the lake until ``stop`` is set; returns metrics (messages, rows_written, commits,
    dead_letters, tombstones, columnar_messages, json_typed_messages, rebalances, resets).

    Start as many as you like with the same group: they share the partitions, and when one
    stops or dies the others take its partitions over without losing or repeating a row.

    Example:
        >>> settings = load_settings(**{"kafka.bootstrap": "k:9092", "lake.path": "./lake",
        ...                             "kafka.group": "lake"})  # doctest: +SKIP
        >>> run_sink(settings, stop=stop)  # doctest: +SKIP
        {'messages': 1052, 'rows_written': 1047, 'commits': 12, 'dead_letters': 0, ...}
    """
    # A worker holds up to a batch of decoded events, so the young generations fill with
    # objects that survive: with the default threshold (700) the collector runs every few
    # hundred messages and costs about a fifth of decoding. Rarer young collections get
    # nearly all of that back; the thresholds are restored on return.
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], _GC_THRESHOLD), *thresholds[1:])
    try:
        return KafkaSinkWorker(settings, stop=stop, on_flush=on_flush).run()
    finally:
        gc.set_threshold(*thresholds)
