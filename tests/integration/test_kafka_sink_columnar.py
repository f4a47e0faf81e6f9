"""`cdc sink` decoding runs column-wise writes the same Delta tables and dead letters as
decoding message by message (Tansu, real Delta tables, no PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from deltalake import DeltaTable

from catalog import lake_layout as layout
from catalog.kafka_schema_registry import KafkaSchemaRegistry, create_topics
from cdc.core.events import ChangeEvent
from cdc.core.kafka_format import topic_name
from cdc.kafka.event_encoder import EventEncoder
from sinks.dead_letters import dlq_uri
from sinks.kafka_worker import KafkaSinkWorker
from tests.plugins.kafka_pipeline import Background, background, settings, unique, wait_sunk
from tests.plugins.samples import KEYLESS, MIXED, PLAIN, ROW, TYPES, event, mixed, plain

pytestmark = pytest.mark.kafka


def changes() -> dict[Any, list[ChangeEvent]]:
    """Events per table: runs of every op, NULLs, TOAST, fallback texts, a truncate, and a
    capture restart that sends some of them again."""
    orders = [mixed("c", n, seq=n) for n in range(1, 120)]
    orders += [mixed("u", n, seq=200 + n, qty=None, gift=None) for n in range(1, 30)]
    toast = mixed("u", 40, seq=300, Doc=None)
    toast.unchanged_toast = ("Doc",)
    nan = mixed("c", 500, seq=301, price=Decimal("NaN"))  # null plus its text in cdc_fallback
    orders += [toast, nan, *[mixed("d", n, seq=400 + n) for n in range(30, 60)]]
    orders += [event("t", table=MIXED, seq=600), *[mixed("c", n, seq=700 + n) for n in range(5)]]
    orders += orders[100:140]  # sent again by a restarted capture: dropped by the watermark
    orders += [mixed("c", n, seq=800 + n) for n in range(600, 640)]

    at = datetime(2026, 6, 1, 6, 30, tzinfo=UTC)
    log = [
        event("c", after=(f"line {n}", at + timedelta(seconds=n)), table=KEYLESS, seq=n)
        for n in range(60)
    ]
    # A position ahead of the rest: those after it are below the watermark, and dropped.
    log.insert(30, event("c", after=(None, None), table=KEYLESS, seq=1000))

    nulls = (8,) + (None,) * (len(ROW) - 1)
    key_only = (7,) + (None,) * (len(ROW) - 1)
    types = [event("c", after=(n, *ROW[1:]), seq=n) for n in range(10, 60)]
    types += [event("c", after=nulls, seq=100), event("d", before=key_only, seq=101)]
    types += [event("u", before=ROW, after=ROW, seq=102), event("r", after=ROW, seq=103)]

    # Typed by pyarrow.json: NULLs, an unchanged TOAST value, deletes, a truncate, a replay.
    lines = [plain("c", n, seq=n) for n in range(1, 150)]
    toast = plain("u", 3, seq=200, Note=None)
    toast.unchanged_toast = ("Note",)
    lines += [toast, *[plain("u", n, seq=300 + n, Note=None) for n in range(1, 20)]]
    lines += [plain("d", n, seq=400 + n) for n in range(20, 40)]
    lines += [event("t", table=PLAIN, seq=500), *[plain("c", n, seq=600 + n) for n in range(9)]]
    lines += lines[120:160]
    lines += [plain("c", n, seq=700 + n) for n in range(800, 900)]
    return {MIXED: orders, KEYLESS: log, TYPES: types, PLAIN: lines}


def produce(bootstrap: str, prefix: str) -> None:
    encoder = EventEncoder(prefix=prefix, database="shop")
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for table, events in changes().items():
        topic = topic_name(prefix, table)
        messages = [(m.key, m.value, m.headers) for e in events for m in encoder.encode(e)]
        good = messages[40]
        bad_value = orjson.loads(good[1])  # type: ignore[arg-type]
        first = next(iter(bad_value["after"]))
        bad_value["after"][first] = "many"  # a value that does not fit (a string key id)
        # Among good ones: garbage, a misfit value, an event of another table.
        messages[41:41] = [
            (b"k", b"\x00 not json", good[2]),
            (good[0], orjson.dumps(bad_value), good[2]),
        ]
        for key, value, headers in messages:
            producer.produce(topic, key=key, value=value, headers=headers, partition=0)
        # Partition 1: a part of them again, with an event of another table in the middle
        # (but for PLAIN: a clean stretch, all typed by pyarrow.json but the first).
        other = next(t for t in changes() if t is not table)
        [stray] = encoder.encode(changes()[other][0])
        again = messages[60:90]
        if table is not PLAIN:
            again.insert(10, (stray.key, stray.value, stray.headers))
        for key, value, headers in again:
            producer.produce(topic, key=key, value=value, headers=headers, partition=1)
    assert producer.flush(15) == 0


def lake_contents(lake: str) -> tuple[dict[str, list[Any]], list[Any]]:
    tables = {}
    for table in changes():
        data = DeltaTable(layout.changes_uri(lake, table.qualified_name)).to_pyarrow_table()
        data = data.drop_columns([layout.INGESTED_AT])
        order = [(layout.LSN, "ascending"), (layout.SEQ, "ascending"), (layout.OP, "ascending")]
        tables[table.qualified_name] = [repr(r) for r in data.sort_by(order).to_pylist()]
    letters = DeltaTable(dlq_uri(lake)).to_pyarrow_table()
    letters = letters.drop_columns(["dead_lettered_at", "worker"])
    keys = [("topic", "ascending"), ("partition", "ascending"), ("offset", "ascending")]
    return tables, letters.sort_by(keys).to_pylist()


def test_column_wise_and_per_message_decoding_write_the_same_lake(
    kafka_broker: str, tmp_path: Path
) -> None:
    prefix = unique("col")
    create_topics(
        AdminClient({"bootstrap.servers": kafka_broker}),
        {topic_name(prefix, t): 2 for t in changes()},
    )
    with KafkaSchemaRegistry(kafka_broker, prefix=prefix) as registry:
        registry.create_topic()
        for table in changes():
            registry.register(table)
    produce(kafka_broker, prefix)

    runs = {}
    for columnar in (True, False):
        lake, group = str(tmp_path / f"lake-{columnar}"), unique("g")
        s = settings(kafka_broker, prefix, unique("n"), **{"lake.path": lake, "kafka.group": group})

        def work(stop: Any, s: Any = s, columnar: bool = columnar) -> dict[str, Any]:
            return KafkaSinkWorker(s, stop=stop, columnar=columnar).run()

        sink = Background(f"sink-{columnar}", work)
        with background(sink):
            wait_sunk(kafka_broker, prefix, group, sink)
        assert sink.result is not None
        runs[columnar] = (sink.result, lake_contents(lake))

    (fast, (fast_tables, fast_letters)), (slow, (slow_tables, slow_letters)) = (
        runs[True],
        runs[False],
    )
    for metric in ("messages", "rows_written", "dead_letters", "tombstones"):
        assert fast[metric] == slow[metric], metric
    assert fast_tables == slow_tables
    assert fast_letters == slow_letters
    # Most went column-wise; every table got rows; the dead letters: garbage per topic, a
    # stray event per topic but PLAIN's, and a misfit where the first column is not text.
    assert slow["columnar_messages"] == slow["json_typed_messages"] == 0
    assert fast["columnar_messages"] > 0.5 * fast["messages"], fast
    assert fast["json_typed_messages"] > 0, fast
    sizes = {name: len(rows) for name, rows in fast_tables.items()}
    assert all(size > 30 for size in sizes.values()), sizes
    assert len(fast_letters) == 9
    assert {x["reason"].split(":")[0] for x in fast_letters} >= {"value is not JSON"}
    assert pa.array([x["offset"] for x in fast_letters]).null_count == 0
