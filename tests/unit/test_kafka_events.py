"""The Kafka event contract: topics, keys, values, headers, and the round trip through the
sink's decoder (no broker needed)."""

from __future__ import annotations

import base64
import math
import re

import orjson
import pytest
from confluent_kafka import KafkaError

from cdc.core.kafka_format import (
    HEADER_COMMIT_TS_US,
    HEADER_LSN,
    HEADER_SCHEMA_ID,
    HEADER_SEQ,
    client_config,
    is_retriable,
    table_topics_pattern,
    topic_name,
)
from cdc.core.pgtypes import Oid
from cdc.core.table_schema import ColumnSchema, TableSchema
from cdc.kafka.event_encoder import EventEncoder
from sinks.event_decoding import EventDecoder
from tests.plugins.samples import COMMIT_TS, ROW, TYPES, event


def headers_of(message) -> dict[str, bytes]:
    return dict(message.headers)


def normalize(values):
    return tuple("NaN" if isinstance(v, float) and math.isnan(v) else v for v in values)


def test_topic_names_follow_the_contract_and_replace_illegal_characters() -> None:
    assert topic_name("shop", TYPES) == "shop.shop.types"
    assert topic_name("cdc", 'public.Odd "Name" ü') == "cdc.public.Odd__Name___"
    pattern = re.compile(table_topics_pattern("my-app.v1"))
    assert pattern.match("my-app.v1.public.orders")
    assert pattern.match("my-app.v1._private.t")  # a schema named _private is a table topic
    for internal in ("my-app.v1.__schemas", "my-app.v1.__dlq", "my-app.v1.__capture"):
        assert not pattern.match(internal)
    assert not pattern.match("my-appXv1.public.orders")  # the dot is literal
    with pytest.raises(ValueError, match="longer than 249"):
        topic_name("p", "s." + "t" * 250)


def test_change_message_has_json_key_envelope_value_and_position_headers() -> None:
    encoder = EventEncoder(prefix="shop", database="shopdb")
    [message] = encoder.encode(event("c", after=ROW, seq=4))
    assert message.topic == "shop.shop.types"
    assert orjson.loads(message.key) == {"id": 9007199254740993}
    headers = headers_of(message)
    assert headers[HEADER_SCHEMA_ID] == str(TYPES.schema_id()).encode()
    assert headers[HEADER_LSN] == str(0x16B374D848).encode()
    assert headers[HEADER_SEQ] == b"4"
    assert headers[HEADER_COMMIT_TS_US] == b"1767261600123456"
    value = orjson.loads(message.value)
    assert set(value) >= {"before", "after", "source", "op", "ts_ms", "transaction"}
    assert value["op"] == "c" and value["before"] is None
    # Debezium's precise decimal: base64 of the big-endian two's-complement unscaled value.
    unscaled = int.from_bytes(base64.b64decode(value["after"]["price"]), "big", signed=True)
    assert unscaled == -1234567890
    assert value["after"]["born"] == -719162  # days since 1970
    assert value["after"]["f8"] == "Infinity"
    source = value["source"]
    assert (source["name"], source["db"], source["schema"], source["table"]) == (
        "shop",
        "shopdb",
        "shop",
        "types",
    )
    assert source["ts_ms"] == 1767261600123 and source["ts_us"] == 1767261600123456


def test_delete_is_followed_by_a_tombstone_with_the_same_key() -> None:
    encoder = EventEncoder(prefix="p", database="d")
    key_only = (7,) + (None,) * (len(TYPES.columns) - 1)
    change, tombstone = encoder.encode(event("d", before=key_only))
    assert orjson.loads(change.key) == {"id": 7}
    assert tombstone.key == change.key and tombstone.value is None
    assert tombstone.topic == change.topic
    assert len(encoder.encode(event("d", before=key_only), tombstones=False)) == 1


def test_keyless_tables_and_truncates_have_null_keys() -> None:
    keyless = TableSchema("public", "log", (ColumnSchema("line", Oid.TEXT),))
    encoder = EventEncoder(prefix="p", database="d")
    [insert] = encoder.encode(event("c", after=("x",), table=keyless))
    assert insert.key is None
    [truncate] = encoder.encode(event("t", table=TYPES))
    assert truncate.key is None and orjson.loads(truncate.value)["op"] == "t"


def test_json_with_schema_wraps_key_and_value_like_jsonconverter() -> None:
    encoder = EventEncoder(prefix="shop", database="d", format="json-with-schema")
    [message] = encoder.encode(event("u", before=None, after=ROW))
    key = orjson.loads(message.key)
    assert key["payload"] == {"id": 9007199254740993}
    assert key["schema"]["type"] == "struct" and key["schema"]["name"] == "shop.shop.types.Key"
    assert key["schema"]["fields"] == [{"type": "int64", "optional": False, "field": "id"}]
    value = orjson.loads(message.value)
    plain = orjson.loads(EventEncoder(prefix="shop", database="d").value(event("u", after=ROW)))
    plain.pop("ts_ms"), value["payload"].pop("ts_ms")
    assert value["payload"] == plain
    schema = value["schema"]
    assert schema["name"] == "shop.shop.types.Envelope"
    fields = {f["field"]: f for f in schema["fields"]}
    assert list(fields)[:6] == ["before", "after", "source", "op", "ts_ms", "transaction"]
    assert fields["source"]["name"] == "io.debezium.connector.postgresql.Source"
    after = {f["field"]: f for f in fields["after"]["fields"]}
    assert after["price"]["name"] == "org.apache.kafka.connect.data.Decimal"
    assert after["price"]["parameters"] == {"scale": "2", "connect.decimal.precision": "10"}
    assert after["born"]["name"] == "io.debezium.time.Date"
    assert after["id"]["optional"] is False and after["note"]["optional"] is True
    # Every payload field is described by the schema.
    assert set(value["payload"]) <= set(fields)
    assert set(value["payload"]["source"]) <= {f["field"] for f in fields["source"]["fields"]}


@pytest.mark.parametrize("format", ["json", "json-with-schema"])
def test_every_type_survives_encoding_and_decoding(format: str) -> None:
    encoder = EventEncoder(prefix="shop", database="d", format=format)
    decoder = EventDecoder({TYPES.schema_id(): TYPES}.__getitem__)
    other = tuple(None if i else 1 for i in range(len(ROW)))
    for op, before, after in [("r", None, ROW), ("u", other, ROW), ("d", ROW, None)]:
        original = event(op, before=before, after=after, seq=3)
        message = encoder.encode(original)[0]
        decoded = decoder.decode(
            key=message.key, value=message.value, headers=message.headers, offset=12
        )
        assert decoded is not None and decoded.exact_position
        got = decoded.event
        assert got.table == TYPES
        assert got.op == op
        assert (got.commit_lsn, got.seq, got.txid, got.lsn) == (
            original.commit_lsn,
            3,
            771,
            original.lsn,
        )
        assert got.commit_ts == COMMIT_TS  # microseconds kept (source.ts_ms has only ms)
        assert got.before is None or normalize(got.before) == normalize(original.before)
        assert got.after is None or normalize(got.after) == normalize(original.after)


def test_unchanged_toast_and_fallback_text_survive_the_trip() -> None:
    encoder = EventEncoder(prefix="p", database="d")
    after = (1, *(None for _ in ROW[1:]))
    original = event("u", after=after, unchanged_toast=("note",), fallback={"price": "NaN"})
    message = encoder.encode(original)[0]
    decoded = EventDecoder({TYPES.schema_id(): TYPES}.__getitem__).decode(
        key=message.key, value=message.value, headers=message.headers
    )
    assert decoded is not None
    assert decoded.event.unchanged_toast == ("note",)
    assert decoded.event.fallback == {"price": "NaN"}


def test_client_config_layers_properties_and_refuses_weakened_guarantees() -> None:
    config = client_config(
        "k:1",
        common={"security.protocol": "SASL_SSL", "linger.ms": 1},
        specific={"linger.ms": 50},
        defaults={"linger.ms": 5, "compression.type": "zstd"},
        required={"acks": "all"},
    )
    assert config == {
        "bootstrap.servers": "k:1",
        "linger.ms": 50,
        "compression.type": "zstd",
        "security.protocol": "SASL_SSL",
        "acks": "all",
    }
    assert (
        client_config(
            "k:1", specific={"enable.idempotence": "true"}, required={"enable.idempotence": True}
        )["enable.idempotence"]
        is True
    )
    with pytest.raises(ValueError, match="acks"):
        client_config("k:1", specific={"acks": 1}, required={"acks": "all"})


def test_kafka_errors_are_classified_by_retriable_fatal_and_code() -> None:
    assert is_retriable(KafkaError(KafkaError._TRANSPORT, "down"))
    assert is_retriable(KafkaError(KafkaError.NOT_ENOUGH_REPLICAS, "x", retriable=True))
    assert not is_retriable(KafkaError(KafkaError._TRANSPORT, "x", fatal=True))
    assert not is_retriable(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "no"))
    assert not is_retriable(KafkaError(KafkaError.SASL_AUTHENTICATION_FAILED, "no"))
    assert not is_retriable(KafkaError(KafkaError._INVALID_ARG, "bad config"))


def test_messages_without_a_key_get_a_partition_from_their_position() -> None:
    keyless = TableSchema("public", "log", (ColumnSchema("line", Oid.TEXT),))
    encoder = EventEncoder(prefix="p", database="d")
    partitions = set()
    for seq in range(50):
        [first] = encoder.encode(event("c", after=("x",), table=keyless, seq=seq), partitions=4)
        [again] = encoder.encode(event("c", after=("x",), table=keyless, seq=seq), partitions=4)
        assert first.partition == again.partition  # a re-sent change lands where it did
        assert first.partition is not None and 0 <= first.partition < 4
        partitions.add(first.partition)
    assert len(partitions) > 1  # a keyless table still spreads over the partitions
    [truncate] = encoder.encode(event("t"), partitions=4)
    assert truncate.key is None and truncate.partition is not None
    keyed = encoder.encode(event("c", after=ROW), partitions=4)[0]
    assert keyed.partition is None  # the key decides, through the producer's partitioner
