"""Transforms in Kafka mode: `cdc capture` masks before producing (topics, schema registry
and capture state never hold a raw value), `cdc sink` lands what capture transformed as it
is and applies the rules to topics Debezium wrote. Real PostgreSQL, Tansu, Delta."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from catalog.kafka_schema_registry import create_topics
from catalog.lake import Lake
from tests.integration.test_kafka_sink import produce
from tests.integration.test_transforms_embedded import (
    CONFIG,
    HASH_KEY,
    MARK,
    SCHEMA,
    customer,
    digest,
    every_value_in,
    insert,
)
from tests.plugins import debezium_samples as dbz
from tests.plugins.kafka_pipeline import (
    background,
    capture_thread,
    settings,
    sink_thread,
    unique,
    wait_captured,
    wait_streaming,
    wait_sunk,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def every_message(bootstrap: str, prefix: str) -> list[str]:
    """Key, value and headers of every message of every topic of ``prefix`` (the table
    topics, the schema registry, capture's state and the dead-letter topic)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = admin.list_topics(timeout=10).topics
    names = sorted(t for t in topics if t.startswith(f"{prefix}."))
    assert any(n.endswith("__schemas") for n in names), names
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": unique("all"), "enable.auto.commit": False}
    )
    out: list[str] = []
    try:
        consumer.assign([TopicPartition(t, p, 0) for t in names for p in topics[t].partitions])
        idle_until = time.monotonic() + 3
        while time.monotonic() < idle_until:
            m = consumer.poll(0.3)
            if m is None or m.error():
                continue
            idle_until = time.monotonic() + 3
            out.append(f"{m.topic()} {m.key()!r} {m.value()!r} {m.headers()!r}")
    finally:
        consumer.close()
    return out


def test_capture_masks_before_kafka_and_the_sink_lands_it_as_is(
    pg_dsn: str,
    pg_conn: psycopg.Connection,
    kafka_broker: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    config = tmp_path / "cdc.toml"
    config.write_text(CONFIG)
    monkeypatch.setenv("CDC_CONFIG", str(config))
    pg_conn.execute(SCHEMA)
    insert(pg_conn, [customer(n) for n in range(1, 6)] + [customer(6, "XX")])
    prefix, name, lake = unique("tfk"), unique("tfk"), str(tmp_path / "lake")
    group = f"{prefix}-g"
    capture = capture_thread(settings(kafka_broker, prefix, name, **{"source.dsn": pg_dsn}))
    sink = sink_thread(
        settings(kafka_broker, prefix, name, **{"lake.path": lake, "kafka.group": group})
    )
    with background(capture):
        wait_streaming(pg_dsn, name, capture)
        with background(sink):
            insert(pg_conn, [customer(n) for n in range(7, 10)])
            pg_conn.execute('UPDATE crm."Customers" SET country = \'XX\' WHERE "Id" IN (2, 8)')
            pg_conn.execute('DELETE FROM crm."Customers" WHERE "Id" = 3')
            pg_conn.execute(f"INSERT INTO crm.events VALUES ('k', '{MARK}@k')")
            wait_captured(pg_dsn, name, capture, sink)
            wait_sunk(kafka_broker, prefix, group, capture, sink)

    messages = every_message(kafka_broker, prefix)
    assert any(f"{prefix}.crm_public.customers" in m for m in messages)  # routed topic
    assert not any(".crm.Customers" in m.split(" ")[0] for m in messages)
    assert not any(MARK in m for m in messages)
    assert not any(HASH_KEY in m for m in messages)
    assert MARK not in every_value_in(lake)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert MARK not in logged and HASH_KEY not in logged

    with Lake(lake) as lk:
        current = dict(lk.sql('SELECT "Id", email FROM crm_public.customers').fetchall())
        events = lk.sql("SELECT note, email FROM crm.events").fetchall()
    # Masked once (by capture), not again by the sink; rows that left the filter are gone.
    assert current == {
        n: (digest(f"{MARK}.mail{n}@example.com") if n % 5 else None) for n in (1, 4, 5, 7, 9)
    }
    assert events == [("k", digest(f"{MARK}@k"))]


def test_sink_applies_rules_to_debezium_topics(
    kafka_broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "cdc.toml"
    config.write_text(
        f'[transforms]\nhash_key = "{HASH_KEY}"\n\n'
        "[[transforms.rules]]\n"
        'tables = ["public.customers"]\n'
        'mask = { email = "hash", last_name = "redact" }\n'
        "filter = \"first_name <> 'Anne Marie'\"\n"
        'route = "dbz.people"\n'
    )
    monkeypatch.setenv("CDC_CONFIG", str(config))
    prefix, lake = unique("tfd"), str(tmp_path / "lake")
    customers = f"{prefix}.public.customers"
    create_topics(AdminClient({"bootstrap.servers": kafka_broker}), {customers: 1})
    produce(kafka_broker, customers, dbz.customer_messages(schemas=True))
    group = f"{prefix}-g"
    sink = sink_thread(
        settings(kafka_broker, prefix, unique("n"), **{"lake.path": lake, "kafka.group": group})
    )
    with background(sink):
        wait_sunk(kafka_broker, prefix, group, sink)
    with Lake(lake) as lk:
        current = lk.sql("SELECT id, first_name, last_name, email FROM dbz.people").fetchall()
        history = lk.sql(
            "SELECT _cdc_op, id, email FROM dbz.people_changes ORDER BY _cdc_lsn, _cdc_seq"
        ).fetchall()
    assert current == [(2, "Bob", "***", digest("bob@x.org"))]
    # Anne's update left the filter: a delete of her key (then Debezium's own delete).
    assert [op for op, _, _ in history] == ["c", "d", "d", "c"]
    assert history[0][2] == digest(dbz.ANNE["email"])
    text = every_value_in(lake)
    assert dbz.ANNE["email"] not in text and "Kretchmar" not in text and "bob@x.org" not in text
