"""Scaled-out mode end to end: PostgreSQL -> `cdc capture` -> Kafka (Tansu) -> two `cdc sink`
workers -> Delta, compared with PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition

from catalog.kafka_schema_registry import KafkaSchemaRegistry
from catalog.lake import Lake
from catalog.schema_registry import SchemaRegistry
from cdc.core.kafka_format import HEADER_SCHEMA_ID
from tests.plugins.kafka_pipeline import (
    background,
    capture_thread,
    settings,
    sink_thread,
    table_topics,
    unique,
    wait_captured,
    wait_streaming,
    wait_sunk,
)
from tests.plugins.lake import assert_lake_matches_postgres, duplicate_positions

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]

SCHEMA = """
CREATE TABLE orders (
    id bigint PRIMARY KEY, customer text NOT NULL, amount numeric(12, 2), placed timestamptz,
    born date, blob bytea, tags text[], doc jsonb, ratio float8
);
CREATE TABLE order_lines (order_id bigint, line int, sku text, qty int, PRIMARY KEY (order_id, line));
CREATE TABLE audit (msg text, at timestamptz DEFAULT now());  -- no key: insert-only
CREATE TABLE untouched (id int PRIMARY KEY, v text);
"""
ORDER_COLUMNS = ["id", "customer", "amount", "placed", "born", "blob", "tags", "doc", "ratio"]


def insert_orders(conn: psycopg.Connection, start: int, n: int) -> None:
    conn.execute(
        "INSERT INTO orders SELECT g, 'customer ' || (g %% 97), (g %% 1000) / 7.0, "
        "timestamptz '2026-01-01 00:00:00.123456+00' + g * interval '1 minute', "
        "date '2020-01-01' + (g %% 3000)::int, decode(md5(g::text), 'hex'), "
        "ARRAY['a' || g, NULL, 'x,y'], jsonb_build_object('g', g), g / 3.0 "
        "FROM generate_series(%s::bigint, %s::bigint) g",
        [start, start + n - 1],
    )


def test_postgres_to_two_sinks_through_kafka_equals_postgres(
    pg_dsn: str, pg_conn: psycopg.Connection, kafka_broker: str, tmp_path: Path
) -> None:
    pg_conn.execute(SCHEMA)
    insert_orders(pg_conn, 1, 3000)
    pg_conn.execute(
        "INSERT INTO order_lines SELECT g / 3, g % 3, 'sku' || g, g FROM generate_series(3, 2999) g"
    )
    pg_conn.execute("INSERT INTO audit (msg) SELECT 'boot ' || g FROM generate_series(1, 50) g")
    prefix, name, lake = unique("e2e"), unique("e2e"), str(tmp_path / "lake")
    group = f"{prefix}-sinks"
    capture = capture_thread(settings(kafka_broker, prefix, name, **{"source.dsn": pg_dsn}))
    sink_settings = settings(
        kafka_broker, prefix, name, **{"lake.path": lake, "kafka.group": group}
    )
    with background(capture):
        wait_streaming(pg_dsn, name, capture)  # topics exist: the sinks join once
        sinks = (sink_thread(sink_settings, "sink-a"), sink_thread(sink_settings, "sink-b"))
        with background(*sinks):
            # Streaming changes of every kind while the sinks catch up with the snapshot.
            insert_orders(pg_conn, 10_001, 2000)
            pg_conn.execute("UPDATE orders SET amount = amount + 1, tags = NULL WHERE id % 5 = 0")
            pg_conn.execute("UPDATE orders SET id = id + 100000 WHERE id BETWEEN 20 AND 29")
            pg_conn.execute("DELETE FROM orders WHERE id % 7 = 0")
            with pg_conn.transaction():
                pg_conn.execute("DELETE FROM order_lines WHERE line = 2")
                pg_conn.execute("UPDATE order_lines SET qty = -qty WHERE order_id % 2 = 0")
            pg_conn.execute(
                "INSERT INTO audit (msg) SELECT 'run ' || g FROM generate_series(1, 30) g"
            )
            # The table's shape changes mid-stream: a new schema version, a new Delta column.
            pg_conn.execute("ALTER TABLE orders ADD COLUMN status text")
            pg_conn.execute("UPDATE orders SET status = 'shipped' WHERE id % 3 = 0 AND id < 2000")
            # Existing rows gain the default without row events: capture copies the table
            # again (an incremental snapshot) and the copy travels through Kafka too.
            pg_conn.execute("ALTER TABLE order_lines ADD COLUMN note text DEFAULT 'n/a'")
            pg_conn.execute("UPDATE order_lines SET note = 'changed' WHERE order_id = 5")
            wait_captured(pg_dsn, name, capture, *sinks)
            wait_sunk(kafka_broker, prefix, group, capture, *sinks)

            # Measured phase: one bulk insert, timed through capture and through the sinks.
            bulk = 40_000
            started = time.monotonic()
            insert_orders(pg_conn, 1_000_001, bulk)
            committed = time.monotonic()
            wait_captured(pg_dsn, name, capture, *sinks)
            produced = time.monotonic()
            wait_sunk(kafka_broker, prefix, group, capture, *sinks)
            consumed = time.monotonic()
        metrics = [s.result for s in sinks]
    print(
        f"\nbulk insert of {bulk} rows: committed in {committed - started:.2f}s; "
        f"capture produced and acknowledged {bulk / (produced - committed):,.0f} events/s; "
        f"two sinks consumed and committed {bulk / (consumed - committed):,.0f} events/s "
        f"(end to end {consumed - committed:.2f}s, including the second in which the check "
        "makes sure nothing more arrives)"
    )

    assert all(m is not None and m["messages"] > 0 for m in metrics), "both sinks took partitions"
    assert sum(m["dead_letters"] for m in metrics if m) == 0
    columns = [*ORDER_COLUMNS, "status"]
    total = assert_lake_matches_postgres(pg_dsn, lake, "public.orders", columns, ["id"])
    assert total > bulk
    assert_lake_matches_postgres(
        pg_dsn,
        lake,
        "public.order_lines",
        ["order_id", "line", "sku", "qty", "note"],
        ["order_id", "line"],
    )
    assert_lake_matches_postgres(pg_dsn, lake, "public.audit", ["msg", "at"], ["msg", "at"])
    for table in ("public.orders", "public.order_lines", "public.audit"):
        assert duplicate_positions(lake, table) == []
    with Lake(lake) as lk:
        assert lk.sql("SELECT count(*) FROM public.untouched").fetchone() == (0,)
        moved = lk.sql(
            "SELECT _cdc_op, id FROM public.orders_changes WHERE id IN (21, 100021) "
            "ORDER BY _cdc_lsn, _cdc_seq"
        ).fetchall()
        assert moved == [("r", 21), ("d", 21), ("c", 100021)]

    # The registries, from Python: Kafka's has both versions of orders; so has the lake's.
    with KafkaSchemaRegistry(kafka_broker, prefix=prefix) as registry:
        versions = registry.versions("public.orders")
        assert [v.version for v in versions] == [1, 2]
        assert versions[1].schema.column_names == (*ORDER_COLUMNS, "status")
        assert registry.get(versions[0].schema_id) == versions[0].schema
        assert set(registry.tables()) == {
            "public.orders",
            "public.order_lines",
            "public.audit",
            "public.untouched",
        }
    lake_versions = SchemaRegistry(lake).versions("public.orders")
    assert [v.schema_id for v in lake_versions] == [v.schema_id for v in versions]


def test_json_with_schema_format_carries_connect_schemas_and_lands_the_same(
    pg_dsn: str, pg_conn: psycopg.Connection, kafka_broker: str, tmp_path: Path
) -> None:
    pg_conn.execute(SCHEMA)
    insert_orders(pg_conn, 1, 200)
    prefix, name, lake = unique("jws"), unique("jws"), str(tmp_path / "lake")
    capture = capture_thread(
        settings(
            kafka_broker, prefix, name, **{"source.dsn": pg_dsn, "kafka.format": "json-with-schema"}
        )
    )
    sink = sink_thread(
        settings(kafka_broker, prefix, name, **{"lake.path": lake, "kafka.group": f"{prefix}-g"})
    )
    with background(capture):
        wait_streaming(pg_dsn, name, capture)
        with background(sink):
            pg_conn.execute("DELETE FROM orders WHERE id <= 10")
            wait_captured(pg_dsn, name, capture, sink)
            wait_sunk(kafka_broker, prefix, f"{prefix}-g", capture, sink)
    assert_lake_matches_postgres(pg_dsn, lake, "public.orders", ORDER_COLUMNS, ["id"])

    consumer = Consumer({"bootstrap.servers": kafka_broker, "group.id": unique("peek")})
    topic = f"{prefix}.public.orders"
    assert topic in table_topics(kafka_broker, prefix)
    consumer.assign([TopicPartition(topic, p, 0) for p in range(3)])
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 20
    try:
        while len(seen) < 3 and time.monotonic() < deadline:
            m = consumer.poll(0.5)
            if m is None or m.error():
                continue
            if m.value() is None:
                seen["tombstone"] = seen.get("tombstone", 0) + 1
                continue
            value, key = orjson.loads(m.value()), orjson.loads(m.key())
            assert set(value) == {"schema", "payload"} and set(key) == {"schema", "payload"}
            assert value["schema"]["name"] == f"{prefix}.public.orders.Envelope"
            assert dict(m.headers())[HEADER_SCHEMA_ID]
            seen[value["payload"]["op"]] = 1
    finally:
        consumer.close()
    assert {"r", "d", "tombstone"} <= set(seen)
