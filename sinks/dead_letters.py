"""Dead letters: messages a sink worker cannot write, kept with the reason instead of dropped.

Each dead letter goes to two places:

* the dead-letter **topic** (default ``<prefix>.__dlq``): the original key, value and
  headers, plus headers ``cdc.dlq.reason``, ``cdc.dlq.topic``, ``cdc.dlq.partition`` and
  ``cdc.dlq.offset``, like Kafka Connect's ``errors.deadletterqueue.context.headers``.
  At-least-once: a worker that crashes between producing and its next Delta commit
  produces the letter again after the restart.
* the **``<lake>/_dlq`` Delta table**: one row per letter (reason, topic, partition, offset,
  table, key, value, headers, times). Exactly-once: every commit records, per
  topic-partition, the offset of the last letter it holds (``<app_id>:<topic>:<p>:offset``,
  an app transaction), and letters at or below it are not written again.

Query the table with DuckDB, e.g.
``SELECT reason, topic, "partition", "offset" FROM delta_scan('<lake>/_dlq')``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import pyarrow as pa
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from catalog import lake_layout as layout
from cdc.core.kafka_format import is_retriable
from sinks.delta_changelog import delta_errors, stream_app_id
from sinks.errors import StreamFencedError, TerminalSinkError, TransientSinkError

__all__ = ["DLQ_SCHEMA", "DeadLetter", "DeadLetterSink", "dlq_uri"]

log = logging.getLogger(__name__)

_HEADER_TYPE: Final = pa.list_(
    pa.struct([pa.field("key", pa.string()), pa.field("value", pa.binary())])
)

#: Columns of the ``_dlq`` Delta table.
DLQ_SCHEMA: Final = pa.schema(
    [
        pa.field("reason", pa.string(), nullable=False),
        pa.field("topic", pa.string(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("table", pa.string()),
        pa.field("key", pa.binary()),
        pa.field("value", pa.binary()),
        pa.field("headers", _HEADER_TYPE),
        pa.field("message_ts", pa.timestamp("us", tz="UTC")),
        pa.field("dead_lettered_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("worker", pa.string()),
    ]
)


def dlq_uri(root: str) -> str:
    """The dead-letter Delta table of a lake: ``<root>/_dlq``."""
    return layout.join(layout.normalize_root(root), layout.DLQ_DIR)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be written, and why."""

    reason: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] | None = None
    timestamp_ms: int | None = None
    table: str | None = None

    @property
    def stream(self) -> str:
        return f"{self.topic}:{self.partition}"


class DeadLetterSink:
    """Buffers dead letters; :meth:`flush` makes them durable in the topic and in ``_dlq``.

    Args:
        root: Lake root.
        app_id: Identifies the writer in the app transactions (the sink's pipeline name).
        producer: Produces to ``topic``; None writes the Delta table only.
        topic: The dead-letter topic.
        worker: Written in the ``worker`` column (which process dead-lettered the message).
        storage_options: Passed to deltalake.
        delivery_timeout: How long ``flush`` waits for the topic's acknowledgements.

    Example:
        >>> dlq = DeadLetterSink("./lake", app_id="cdc", producer=p, topic="cdc.__dlq")  # doctest: +SKIP
        >>> dlq.add(DeadLetter("value is not JSON", "cdc.public.t", 0, 42, b"k", b"x"))  # doctest: +SKIP
        True
        >>> dlq.flush()  # doctest: +SKIP
        {'dead_letters': 1, 'commits': 1}
    """

    def __init__(
        self,
        root: str,
        *,
        app_id: str,
        producer: Producer | None = None,
        topic: str | None = None,
        worker: str = "",
        storage_options: dict[str, str] | None = None,
        delivery_timeout: float = 30.0,
    ) -> None:
        self.uri = dlq_uri(root)
        self.app_id = app_id
        self.producer = producer
        self.topic = topic
        self.worker = worker
        self.storage_options = storage_options or None
        self.delivery_timeout = delivery_timeout
        self._letters: list[DeadLetter] = []
        self._dead_lettered_at: list[datetime] = []
        self._recorded: dict[str, int | None] = {}  # stream -> offset in Delta (expected)
        self._accepted: dict[str, int] = {}  # stream -> newest offset buffered
        self._lock = threading.Lock()
        self._outstanding = 0
        self._failures: list[tuple[str, bool]] = []

    @property
    def pending(self) -> int:
        return len(self._letters)

    def committed_offset(self, stream: str) -> int | None:
        """The offset of the last letter of ``stream`` in ``_dlq`` when this sink first
        looked; the next commit expects to find it unchanged."""
        if stream not in self._recorded:
            offset = None
            with delta_errors(f"reading {self.uri}"):
                if DeltaTable.is_deltatable(self.uri, storage_options=self.storage_options):
                    dt = DeltaTable(self.uri, storage_options=self.storage_options)
                    offset = dt.transaction_version(stream_app_id(self.app_id, stream, "offset"))
            self._recorded[stream] = offset
        return self._recorded[stream]

    def add(self, letter: DeadLetter) -> bool:
        """Buffer ``letter`` and produce it to the topic; False if ``_dlq`` already has it."""
        stream = letter.stream
        done = self._accepted.get(stream, self.committed_offset(stream))
        if done is not None and letter.offset <= done:
            return False
        log.warning(
            "dead letter %s[%d]@%d: %s",
            letter.topic,
            letter.partition,
            letter.offset,
            letter.reason,
        )
        if self.producer is not None and self.topic is not None:
            self._produce(letter)
        self._letters.append(letter)
        self._dead_lettered_at.append(datetime.now(UTC))
        self._accepted[stream] = letter.offset
        return True

    def _produce(self, letter: DeadLetter) -> None:
        assert self.producer is not None and self.topic is not None
        headers: list[tuple[str, str | bytes | None]] = list(letter.headers or [])
        headers += [
            ("cdc.dlq.reason", letter.reason.encode()),
            ("cdc.dlq.topic", letter.topic.encode()),
            ("cdc.dlq.partition", str(letter.partition).encode()),
            ("cdc.dlq.offset", str(letter.offset).encode()),
        ]

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            with self._lock:
                self._outstanding -= 1
                if err is not None:
                    self._failures.append((f"{err.str()} ({err.name()})", is_retriable(err)))

        with self._lock:
            self._outstanding += 1
        deadline = time.monotonic() + self.delivery_timeout
        while True:
            try:
                self.producer.produce(
                    self.topic,
                    key=letter.key,
                    value=letter.value,
                    headers=headers,
                    on_delivery=delivered,
                )
                break
            except BufferError:
                if time.monotonic() > deadline:
                    with self._lock:
                        self._outstanding -= 1
                    raise TransientSinkError(
                        f"the dead-letter producer's queue stayed full for {self.delivery_timeout}s"
                    ) from None
                self.producer.poll(0.1)
            except KafkaException as e:
                with self._lock:
                    self._outstanding -= 1
                err = e.args[0]
                cls = TransientSinkError if is_retriable(err) else TerminalSinkError
                raise cls(f"cannot produce to {self.topic}: {err.str()}") from e

    def discard(self) -> None:
        """Forget the buffered letters and what was read from Delta (after a rebalance
        or a failed flush). Letters already produced to the topic stay there."""
        self._letters.clear()
        self._dead_lettered_at.clear()
        self._recorded.clear()
        self._accepted.clear()

    def flush(self) -> dict[str, Any]:
        """Wait for the topic's acknowledgements, then commit the letters to ``_dlq``.

        Raises:
            TransientSinkError: the topic did not acknowledge, the commit failed, or
                :class:`~sinks.delta_changelog.StreamFencedError` (another worker wrote a
                partition this one was handling).
        """
        if self.producer is not None:
            deadline = time.monotonic() + self.delivery_timeout
            while self._outstanding and time.monotonic() < deadline:
                self.producer.flush(1.0)
            with self._lock:
                failures, self._failures = self._failures, []
                outstanding = self._outstanding
            if failures:
                # One that can never be delivered (too large, not authorized) is terminal.
                cls = TransientSinkError if all(ok for _, ok in failures) else TerminalSinkError
                first = next((text for text, ok in failures if not ok), failures[0][0])
                raise cls(f"dead letters were not delivered: {first}")
            if outstanding:
                raise TransientSinkError(
                    f"{outstanding} dead letters not acknowledged by {self.topic}"
                )
        if not self._letters:
            return {"dead_letters": 0, "commits": 0}
        target = self._fenced_target()
        data = self._table()
        txns = [
            Transaction(stream_app_id(self.app_id, stream, "offset"), offset)
            for stream, offset in self._accepted.items()
            if offset != self._recorded.get(stream)
        ]
        with delta_errors(f"writing {len(self._letters)} dead letters to {self.uri}"):
            write_deltalake(
                target,
                data,
                mode="append",
                schema_mode="merge",
                storage_options=self.storage_options,
                commit_properties=CommitProperties(app_transactions=txns),
            )
        written = len(self._letters)
        self._recorded.update(self._accepted)
        self._letters.clear()
        self._dead_lettered_at.clear()
        return {"dead_letters": written, "commits": 1}

    def _fenced_target(self) -> str | DeltaTable:
        with delta_errors(f"reading {self.uri}"):
            if not DeltaTable.is_deltatable(self.uri, storage_options=self.storage_options):
                return self.uri
            dt = DeltaTable(self.uri, storage_options=self.storage_options)
        for stream, offset in self._accepted.items():
            if offset == self._recorded.get(stream):
                continue
            with delta_errors(f"reading {self.uri}"):
                recorded = dt.transaction_version(stream_app_id(self.app_id, stream, "offset"))
            if recorded != self._recorded.get(stream):
                raise StreamFencedError(
                    f"_dlq: another writer committed dead letters of {stream} up to offset "
                    f"{recorded}; the partition belongs to someone else now"
                )
        return dt

    def _table(self) -> pa.Table:
        letters = self._letters

        def ts(ms: int | None) -> datetime | None:
            return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)

        return pa.Table.from_pydict(
            {
                "reason": [x.reason for x in letters],
                "topic": [x.topic for x in letters],
                "partition": [x.partition for x in letters],
                "offset": [x.offset for x in letters],
                "table": [x.table for x in letters],
                "key": [x.key for x in letters],
                "value": [x.value for x in letters],
                "headers": [
                    None
                    if x.headers is None
                    else [
                        {"key": k, "value": v.encode() if isinstance(v, str) else v}
                        for k, v in x.headers
                    ]
                    for x in letters
                ],
                "message_ts": [ts(x.timestamp_ms) for x in letters],
                "dead_lettered_at": list(self._dead_lettered_at),
                "worker": [self.worker] * len(letters),
            },
            schema=DLQ_SCHEMA,
        )
