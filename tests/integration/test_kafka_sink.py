"""`cdc sink` on its own: dead letters, and topics written by Debezium (Tansu, no PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from deltalake import DeltaTable

from catalog.kafka_schema_registry import KafkaSchemaRegistry, create_topics
from catalog.lake import Lake
from cdc.core.events import ChangeEvent
from cdc.core.kafka_format import HEADER_SCHEMA_ID
from cdc.core.pgtypes import Oid
from cdc.core.table_schema import ColumnSchema, TableSchema
from cdc.kafka.event_encoder import EventEncoder
from sinks import delta_changelog
from sinks.dead_letters import dlq_uri
from sinks.delta_changelog import DeltaChangelogSink
from sinks.errors import TransientSinkError
from tests.plugins import debezium_samples as dbz
from tests.plugins.kafka_pipeline import (
    background,
    consume_all,
    settings,
    sink_thread,
    unique,
    wait_sunk,
)

pytestmark = pytest.mark.kafka

ITEMS = TableSchema(
    "shop", "items", (ColumnSchema("id", Oid.INT4, -1, True), ColumnSchema("qty", Oid.INT2))
)


def item(key: int, qty: int, lsn: int) -> ChangeEvent:
    return ChangeEvent(
        op="c",
        table=ITEMS,
        before=None,
        after=(key, qty),
        commit_lsn=lsn,
        seq=0,
        txid=1,
        commit_ts=datetime(2026, 1, 1, tzinfo=UTC),
        lsn=lsn,
    )


def produce(
    bootstrap: str, topic: str, messages: list[tuple], *, partition: int | None = None
) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value, *headers in messages:
        kwargs = {} if partition is None else {"partition": partition}
        producer.produce(
            topic, key=key, value=value, headers=headers[0] if headers else None, **kwargs
        )
    assert producer.flush(15) == 0


def test_bad_messages_become_dead_letters_and_the_worker_keeps_going(
    kafka_broker: str, tmp_path: Path
) -> None:
    prefix, lake = unique("dlq"), str(tmp_path / "lake")
    topic = f"{prefix}.shop.items"
    create_topics(AdminClient({"bootstrap.servers": kafka_broker}), {topic: 3})
    with KafkaSchemaRegistry(kafka_broker, prefix=prefix) as registry:
        registry.create_topic()
        registry.register(ITEMS)
    encoder = EventEncoder(prefix=prefix, database="shop")

    def ours(event: ChangeEvent, **header_overrides: bytes) -> tuple:
        [m] = encoder.encode(event)
        headers = [(k, header_overrides.get(k, v)) for k, v in m.headers]
        return (m.key, m.value, headers)

    garbage = (b"k", b"\x00\x9f\x92\x96 not json at all")
    wrong_shape = (b'{"id": 3}', b'{"id": 3, "qty": 1}')
    unknown_id = ours(item(4, 1, lsn=40), **{HEADER_SCHEMA_ID: b"12345"})
    misfit = ours(item(5, 1, lsn=50))
    misfit = (misfit[0], misfit[1].replace(b'"qty":1', b'"qty":"many"'), misfit[2])
    messages = [ours(item(1, 1, lsn=10)), garbage, wrong_shape, unknown_id, misfit]
    messages.append(ours(item(2, 2, lsn=60)))
    produce(kafka_broker, topic, messages, partition=0)

    group = f"{prefix}-g"
    sink = sink_thread(
        settings(kafka_broker, prefix, unique("n"), **{"lake.path": lake, "kafka.group": group})
    )
    with background(sink):
        wait_sunk(kafka_broker, prefix, group, sink)
    assert sink.result is not None and sink.result["dead_letters"] == 4

    with Lake(lake) as lk:
        assert lk.sql("SELECT id, qty FROM shop.items ORDER BY id").fetchall() == [(1, 1), (2, 2)]
    letters = DeltaTable(dlq_uri(lake)).to_pyarrow_table().sort_by("offset").to_pylist()
    assert [(x["topic"], x["partition"], x["offset"]) for x in letters] == [
        (topic, 0, offset) for offset in (1, 2, 3, 4)
    ]
    reasons = [x["reason"] for x in letters]
    assert "not JSON" in reasons[0]
    assert "not a change event" in reasons[1]
    assert "unknown schema id 12345" in reasons[2]
    assert "shop.items.qty" in reasons[3]
    assert letters[0]["value"] == garbage[1] and letters[0]["key"] == b"k"

    in_topic = consume_all(kafka_broker, f"{prefix}.__dlq", expected=4)
    assert [m.value() for m in in_topic] == [m[1] for m in messages[1:5]]
    headers = dict(in_topic[2].headers())
    assert headers["cdc.dlq.offset"] == b"3" and headers["cdc.dlq.topic"] == topic.encode()
    assert b"unknown schema id" in headers["cdc.dlq.reason"]
    assert headers[HEADER_SCHEMA_ID] == b"12345"  # the original headers are kept


@pytest.mark.parametrize("schemas", [True, False], ids=["schemas.enable", "no-schemas"])
def test_topics_written_by_debezium_are_ingested(
    kafka_broker: str, tmp_path: Path, schemas: bool
) -> None:
    prefix, lake = unique("dbz"), str(tmp_path / "lake")
    customers, products = f"{prefix}.public.customers", f"{prefix}.public.products"
    create_topics(AdminClient({"bootstrap.servers": kafka_broker}), {customers: 3, products: 3})
    produce(kafka_broker, customers, dbz.customer_messages(schemas=schemas))
    produce(kafka_broker, products, dbz.product_messages(schemas=schemas))

    group = f"{prefix}-g"
    sink = sink_thread(
        settings(kafka_broker, prefix, unique("n"), **{"lake.path": lake, "kafka.group": group})
    )
    with background(sink):
        wait_sunk(kafka_broker, prefix, group, sink)
    assert sink.result is not None
    assert sink.result["dead_letters"] == 0 and sink.result["tombstones"] == 1

    with Lake(lake) as lk:
        # Anne was created, updated and deleted; Bob remains.
        assert lk.sql("SELECT id, first_name, email FROM public.customers").fetchall() == [
            (2, "Bob", "bob@x.org")
        ]
        history = lk.sql(
            "SELECT _cdc_op, id, first_name, _cdc_txid FROM public.customers_changes "
            "ORDER BY _cdc_lsn, _cdc_seq"
        ).fetchall()
        assert history == [
            ("c", 1, "Anne", 555),
            ("u", 1, "Anne Marie", 556),
            ("d", 1, "Anne Marie", 557),
            ("c", 2, "Bob", 558),
        ]
        lamp = lk.sql("SELECT * FROM public.products").to_arrow_table().to_pylist()
    assert len(lamp) == 1
    row = lamp[0]
    assert row["name"] == "lamp 2"
    # The column Debezium marked unavailable (TOASTed, unchanged) keeps its previous value.
    assert row["attrs"] == '{"watts": 40}'
    if schemas:
        assert row["price"] == Decimal("-19.99")
        assert row["released"] == date(2026, 1, 1)
        assert row["updated"] == datetime(2026, 1, 1, 0, 0, 0, 123456)
        assert row["seen"] == datetime(2026, 1, 1, 10, 0, 0, 500000, tzinfo=UTC)
        assert row["thumb"] == b"\x00\xffPNG"
        assert row["tags"] == ["a", None, "b,c"]
        assert row["ratio"] == "1.500"
        assert row["weight"] != row["weight"]  # NaN
    else:
        # Without schemas the encodings cannot be recognised: they land as they are.
        assert row["price"] == dbz.LAMP["price"] and row["released"] == 20454
        assert orjson.loads(row["tags"]) == ["a", None, "b,c"]
        assert row["weight"] == "NaN"  # a JSON string: a text column


@pytest.mark.parametrize("failing", ["flush", "commit thread"])
def test_a_failed_flush_rereads_from_the_recorded_offsets_without_loss_or_duplicates(
    kafka_broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    prefix, lake = unique("rst"), str(tmp_path / "lake")
    topic = f"{prefix}.shop.items"
    create_topics(AdminClient({"bootstrap.servers": kafka_broker}), {topic: 3})
    with KafkaSchemaRegistry(kafka_broker, prefix=prefix) as registry:
        registry.create_topic()
        registry.register(ITEMS)
    encoder = EventEncoder(prefix=prefix, database="shop")
    messages = []
    for i in range(3000):
        [m] = encoder.encode(item(i, i % 100, lsn=1000 + i))
        messages.append((m.key, m.value, m.headers))
    produce(kafka_broker, topic, messages)

    calls = {"n": 0}
    if failing == "flush":
        # Every other flush fails once (a commit conflict, an object store hiccup...),
        # including flushes forced by backpressure in the middle of a batch of messages.
        real_flush = DeltaChangelogSink.flush

        def flaky_flush(self: DeltaChangelogSink) -> dict:
            calls["n"] += 1
            if calls["n"] in (2, 4, 6) and self.pending_rows:
                raise TransientSinkError("injected: the object store timed out")
            return real_flush(self)

        monkeypatch.setattr(DeltaChangelogSink, "flush", flaky_flush)
    else:
        # Commits that fail in the commit threads, while the worker reads on (the flushes
        # it does not wait for): the failure is seen at its next flush.
        real_write = delta_changelog.write_deltalake

        def flaky_write(*args: object, **kwargs: object) -> None:
            calls["n"] += 1
            if calls["n"] in (2, 4, 6):
                raise OSError("injected: the object store timed out")
            real_write(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(delta_changelog, "write_deltalake", flaky_write)
    group = f"{prefix}-g"
    sink = sink_thread(
        settings(
            kafka_broker,
            prefix,
            unique("n"),
            **{"lake.path": lake, "kafka.group": group, "batch.max_rows": 400},
        )
    )
    with background(sink):
        wait_sunk(kafka_broker, prefix, group, sink)
    assert sink.result is not None and sink.result["resets"] >= 3
    with Lake(lake) as lk:
        assert lk.sql("SELECT count(*), count(DISTINCT id) FROM shop.items_changes").fetchone() == (
            3000,
            3000,
        )
