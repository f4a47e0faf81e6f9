"""``KafkaProducerSink.add_changes``, capture's columnar path, against a broker: what it
sends equals the per-event messages, and it counts messages as pending until librdkafka
has their delivery reports (only failures reach Python), so a message that fails keeps
capture from confirming anything after it.

The failure is made by librdkafka's own mock cluster (``test.mock.num.brokers``) with a
round trip longer than ``message.timeout.ms``: every message times out, deterministically.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from catalog.kafka_schema_registry import KafkaSchemaRegistry
from cdc.core.pgtypes import Oid
from cdc.kafka.batch_encoder import changelog_events
from cdc.kafka.event_encoder import EventEncoder
from cdc.kafka.producer import KafkaProducerSink
from cdc.postgres.columnar import ChangeBatch, ColumnarDecoder
from cdc.postgres.protocol import compiled
from cdc.postgres.protocol import pgoutput as pg
from cdc.postgres.protocol.assembler import ChangeAssembler
from sinks.errors import SinkError
from tests.plugins.kafka_pipeline import consume_all, unique
from tests.plugins.pgoutput_encode import encode

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(compiled.ColumnBuilder is None, reason="the columnar path is compiled"),
]

# A composite key of mixed types with quoted, mixed-case names, and a keyless table.
KEYED = pg.Relation(
    16384,
    "Shop",
    "Order Lines",
    "d",
    (
        pg.RelationColumn("Order", Oid.INT4, -1, True),
        pg.RelationColumn("sku", Oid.TEXT, -1, True),
        pg.RelationColumn("at", Oid.TIMESTAMPTZ, -1, False),
        pg.RelationColumn("qty", Oid.INT2, -1, False),
        pg.RelationColumn("price", Oid.NUMERIC, ((10 << 16) | 2) + 4, False),
        pg.RelationColumn("Note", Oid.TEXT, -1, False),
    ),
)
KEYLESS = pg.Relation(
    16390, "public", "Event Log", "n", (pg.RelationColumn("line", Oid.TEXT, -1, False),)
)


def batches() -> list[ChangeBatch]:
    """Inserts, updates and deletes of both tables in two transactions, with NULLs, a
    value without a typed form (NaN) and text JSON must escape."""
    ts = datetime(2026, 5, 1, 12, 0, 0, 250000, tzinfo=UTC)
    messages = [encode(KEYED), encode(KEYLESS), encode(pg.Begin(0x9000, ts, 42))]
    for i in range(40):
        note = None if i % 5 == 0 else f'note "{i}"\n' if i % 7 == 0 else f"ünï {i}"
        price = "NaN" if i == 13 else f"{i}.50"
        row = (str(i), f"sku-{i}", "2026-05-01 12:00:00.5+00", str(i % 3), price, note)
        messages.append(encode(pg.Insert(KEYED.relation_id, row)))
        messages.append(encode(pg.Insert(KEYLESS.relation_id, (None if i % 4 else f"line {i}",))))
    messages.append(encode(pg.Commit(0, 0x9000, 0x9010, ts)))
    messages.append(encode(pg.Begin(0x9100, ts, 43)))
    for i in range(0, 40, 3):
        row = (str(i), f"sku-{i}", None, "7", "1.00", "changed")
        messages.append(encode(pg.Update(KEYED.relation_id, row)))
    for i in range(1, 40, 9):
        key = (str(i), f"sku-{i}", None, None, None, None)
        messages.append(encode(pg.Delete(KEYED.relation_id, key, "K")))
    messages.append(encode(pg.Commit(0, 0x9100, 0x9110, ts)))
    decoder = ColumnarDecoder(ChangeAssembler())
    items: list[Any] = []
    for i, payload in enumerate(messages):
        items += decoder.feed(payload, lsn=0x5000 + i * 0x28)
    items += decoder.cut_all()
    return [item for item in items if isinstance(item, ChangeBatch)]


def expected_messages(prefix: str, found: list[ChangeBatch]) -> dict[str, list[tuple]]:
    """The per-event path's messages of the same changes, by topic (``ts_ms`` apart)."""
    encoder = EventEncoder(prefix=prefix, database="shop")
    out: dict[str, list[tuple]] = {}
    for batch in found:
        for event in changelog_events(
            batch.table, batch.changes, lsns=batch.lsns, texts=batch.texts, ts_ms=0
        ):
            for m in encoder.encode(event, partitions=3):
                out.setdefault(m.topic, []).append(
                    (m.partition, m.key, without_ts_ms(m.value), m.headers)
                )
    return out


def without_ts_ms(value: bytes | None) -> Any:
    if value is None:
        return None
    envelope = orjson.loads(value)
    envelope["ts_ms"] = 0  # the wall-clock time the message was made
    return envelope


def test_columnar_batches_are_sent_as_the_per_event_messages_and_pending_until_acked(
    kafka_broker: str,
) -> None:
    prefix = unique("cap")
    found = batches()
    expected = expected_messages(prefix, found)
    with KafkaSchemaRegistry(kafka_broker, prefix=prefix) as registry:
        registry.create_topic()
        sink = KafkaProducerSink(
            {"bootstrap.servers": kafka_broker, "linger.ms": 20},
            prefix=prefix,
            database="shop",
            registry=registry,
            partitions=3,
        )
        try:
            for batch in found:
                sink.add_changes(batch.table, batch.changes, lsns=batch.lsns, texts=batch.texts)
            sent = sum(len(v) for v in expected.values())
            # Not one delivery report served yet (linger.ms holds them): all pending, so
            # the pipeline confirms nothing.
            assert 0 < sink.pending_rows <= sent
            assert sink.pending_since() == 0
            result = sink.flush()
            assert sink.pending_rows == 0 and sink.pending_since() is None
            changes = sum(1 for v in expected.values() for m in v if m[2] is not None)
            assert (result["rows"], result["messages"]) == (changes, sent)
        finally:
            sink.close()
    for topic, messages in expected.items():
        got = consume_all(kafka_broker, topic, len(messages), partitions=3, timeout=30)
        assert len(got) == len(messages)
        # Kafka keeps the order within a partition: compare partition by partition. A keyed
        # message's partition is the partitioner's (by key), a keyless one's ours.
        by_key = {m.key(): m.partition() for m in got if m.key() is not None}
        wanted: dict[int, list[tuple]] = {}
        for partition, key, value, headers in messages:
            p = partition if partition is not None else by_key[key]
            wanted.setdefault(p, []).append((key, value, headers))
        sent_to: dict[int, list[tuple]] = {}
        for m in got:
            sent_to.setdefault(m.partition(), []).append(
                (m.key(), without_ts_ms(m.value()), m.headers() or [])
            )
        assert sent_to == wanted


def test_a_failed_delivery_keeps_every_later_change_unconfirmed(kafka_broker: str) -> None:
    prefix = unique("fail")
    mock = {
        # librdkafka's in-process mock cluster, slower to answer than messages may wait.
        "test.mock.num.brokers": 1,
        "test.mock.broker.rtt": 1500,
        "message.timeout.ms": 500,
        "linger.ms": 5,
    }
    with KafkaSchemaRegistry(kafka_broker, prefix=prefix) as registry:
        registry.create_topic()
        sink = KafkaProducerSink(
            mock,
            prefix=prefix,
            database="shop",
            registry=registry,
            delivery_timeout=20,
            # The mock cluster makes a topic when asked for its metadata; the real
            # broker takes the topic creation the sink asks for first.
            admin={"bootstrap.servers": kafka_broker},
        )
        try:
            found = batches()
            for batch in found:
                sink.add_changes(batch.table, batch.changes, lsns=batch.lsns, texts=batch.texts)
            assert sink.pending_rows > 0
            with pytest.raises(SinkError, match="not delivered"):
                sink.flush()
            # Every message has timed out by now; flush_due serves their reports. The
            # failed messages stay pending for good: nothing after them is confirmed.
            time.sleep(1)
            assert sink.flush_due()
            assert sink.pending_rows > 0 and sink.pending_since() == 0
            with pytest.raises(SinkError, match="not delivered"):
                sink.flush()
        finally:
            sink.close()
