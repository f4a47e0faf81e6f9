"""The sink's decoder on Debezium's own format, and on messages that must be dead letters."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, time
from decimal import Decimal

import orjson
import pyarrow as pa
import pytest

from catalog.errors import UnknownSchemaError
from cdc.core import pgtypes
from cdc.core.events import ChangeEvent
from cdc.core.pgtypes import Oid
from cdc.core.table_schema import ColumnSchema, TableSchema
from cdc.kafka.event_encoder import EventEncoder
from sinks.errors import UndecodableMessageError
from sinks.event_decoding import EventDecoder, connect_column_type
from tests.plugins import debezium_samples as dbz

ITEMS = TableSchema(
    "shop", "items", (ColumnSchema("id", Oid.INT4, -1, True), ColumnSchema("qty", Oid.INT2))
)


def lookup(schema_id: int) -> TableSchema:
    if schema_id == ITEMS.schema_id():
        return ITEMS
    raise UnknownSchemaError(f"schema id {schema_id} is not registered")


def decode_all(decoder: EventDecoder, messages):
    return [
        decoder.decode(key=k, value=v, headers=None, offset=i) for i, (k, v) in enumerate(messages)
    ]


def test_documented_customer_events_with_schemas() -> None:
    decoded = decode_all(EventDecoder(lookup), dbz.customer_messages(schemas=True))
    create, update, delete, tombstone, bob = decoded
    assert tombstone is None
    assert create is not None and update is not None and delete is not None and bob is not None
    table = create.event.table
    assert table.qualified_name == "public.customers"
    assert [(c.name, c.type_oid, c.is_key) for c in table.columns] == [
        ("id", Oid.INT4, True),
        ("first_name", Oid.TEXT, False),
        ("last_name", Oid.TEXT, False),
        ("email", Oid.TEXT, False),
    ]
    assert update.event.table is table  # one schema object: the sink batches by identity
    assert create.event.op == "c" and create.event.after == (
        1,
        "Anne",
        "Kretchmar",
        "annek@noanswer.org",
    )
    assert update.event.op == "u" and update.event.before is None
    assert update.event.after[1] == "Anne Marie"
    assert delete.event.op == "d" and delete.event.before[0] == 1 and delete.event.after is None
    # Debezium positions are not capture's: ordered by source.lsn, then the Kafka offset.
    assert not create.exact_position
    assert (create.event.commit_lsn, create.event.seq) == (24023128, 0)
    assert (delete.event.commit_lsn, delete.event.seq) == (46523128, 2)
    assert create.event.txid == 555
    assert create.event.commit_ts == datetime(2019, 5, 28, 8, 58, 24, 863000, tzinfo=UTC)


def test_documented_customer_events_without_schemas_infer_types() -> None:
    decoded = decode_all(EventDecoder(lookup), dbz.customer_messages(schemas=False))
    create = decoded[0]
    assert create is not None
    table = create.event.table
    assert [(c.name, c.type_oid, c.is_key) for c in table.columns] == [
        ("id", Oid.INT8, True),
        ("first_name", Oid.TEXT, False),
        ("last_name", Oid.TEXT, False),
        ("email", Oid.TEXT, False),
    ]
    assert create.event.after == (1, "Anne", "Kretchmar", "annek@noanswer.org")
    assert decoded[3] is None  # tombstone


def test_schemaless_messages_reuse_the_types_the_lake_already_has() -> None:
    known = TableSchema(
        "public",
        "customers",
        (ColumnSchema("id", Oid.INT4, -1, True), ColumnSchema("first_name", Oid.VARCHAR)),
    )
    decoder = EventDecoder(
        lookup, known=lambda name: known if name == known.qualified_name else None
    )
    create = decode_all(decoder, dbz.customer_messages(schemas=False))[0]
    assert create is not None
    assert [(c.name, c.type_oid) for c in create.event.table.columns] == [
        ("id", Oid.INT4),
        ("first_name", Oid.VARCHAR),
        ("last_name", Oid.TEXT),  # new columns are inferred
        ("email", Oid.TEXT),
    ]


def test_debezium_default_type_encodings_are_decoded() -> None:
    snapshot, update = decode_all(EventDecoder(), dbz.product_messages(schemas=True))
    assert snapshot is not None and update is not None
    table = snapshot.event.table
    types = {c.name: (c.type_oid, c.type_modifier) for c in table.columns}
    assert types["price"] == (Oid.NUMERIC, ((10 << 16) | 2) + 4)
    assert types["released"] == (Oid.DATE, -1)
    assert types["seen"] == (Oid.TIMESTAMPTZ, -1)
    assert types["tags"][0] == 1009  # text[]
    row = dict(zip(table.column_names, snapshot.event.after, strict=True))
    assert row["price"] == Decimal("-19.99")
    assert row["ratio"] == "1.500"  # unconstrained numeric keeps its exact text
    assert math.isnan(row["weight"])
    assert row["active"] is True
    assert row["released"] == date(2026, 1, 1)
    assert row["updated"] == datetime(2026, 1, 1, 0, 0, 0, 123456)
    assert row["seen"] == datetime(2026, 1, 1, 10, 0, 0, 500000, tzinfo=UTC)
    assert row["thumb"] == b"\x00\xffPNG"
    assert row["attrs"] == '{"watts": 40}'
    assert row["uid"] == "0b9c0f6e-4d1a-4f7e-9c1b-2f0e8d6a1b3c"
    assert row["tags"] == ["a", None, "b,c"]
    opens = row["opens"]  # time is a time64 or PostgreSQL's text, as the mapping says
    assert opens in (time(9, 30), "09:30:00")
    assert snapshot.event.op == "r"
    # Every value fits the Arrow type the lake stores the column as.
    for column, value in zip(table.columns, snapshot.event.after, strict=True):
        pa.array([value], type=pgtypes.arrow_type(column.type_oid, column.type_modifier))
    # The unavailable-value placeholder marks an unchanged TOASTed column, not a value.
    assert update.event.unchanged_toast == ("attrs",)
    assert dict(zip(table.column_names, update.event.after, strict=True))["attrs"] is None


def test_connect_types_map_to_the_postgresql_types_debezium_made_them_from() -> None:
    assert connect_column_type({"type": "int16"}) == (Oid.INT2, -1)
    assert connect_column_type({"type": "int64", "name": "io.debezium.time.Timestamp"}) == (
        Oid.TIMESTAMP,
        3,
    )
    assert connect_column_type({"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal",
                                "parameters": {"scale": "3"}}) == (Oid.NUMERIC, -1)  # fmt: skip
    assert connect_column_type({"type": "struct", "fields": []}) == (Oid.JSONB, -1)
    assert connect_column_type({"type": "string", "name": "io.debezium.data.Enum"}) == (
        Oid.TEXT,
        -1,
    )


def ours(value: object, *, schema_id: int | str = ITEMS.schema_id()) -> dict:
    return {
        "key": b'{"id": 1}',
        "value": orjson.dumps(value),
        "headers": [
            ("cdc.schema_id", str(schema_id).encode()),
            ("cdc.lsn", b"5"),
            ("cdc.seq", b"0"),
        ],
    }


def items_envelope(after: dict) -> dict:
    return {
        "before": None,
        "after": after,
        "source": {"schema": "shop", "table": "items", "ts_ms": 1, "lsn": 5, "txId": 1},
        "op": "c",
        "ts_ms": 1,
    }


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"key": None, "value": b"\x00\x9f\x92garbage", "headers": None}, "not JSON"),
        ({"key": None, "value": b"[1, 2, 3]", "headers": None}, "a JSON list"),
        ({"key": None, "value": b'{"hello": "world"}', "headers": None}, "'op' is None"),
        ({"key": None, "value": b'{"op": "c", "source": {}}', "headers": None}, "source.schema"),
        (ours(items_envelope({"id": 1, "qty": 2}), schema_id=42), "unknown schema id 42"),
        (ours(items_envelope({"id": 1, "qty": 2}), schema_id="x1"), "not an integer"),
        (ours(items_envelope({"id": 1, "qty": 70000})), "shop.items.qty: 70000 is outside"),
        (ours(items_envelope({"id": "one", "qty": 1})), "shop.items.id: expected an integer"),
        (ours(items_envelope({"id": 1, "colour": "red"})), "columns ['colour']"),
        (ours({**items_envelope({"id": 1}), "after": None}), "op 'c' without 'after'"),
        (
            ours(
                {**items_envelope({"id": 1}), "source": {"schema": "x", "table": "y", "ts_ms": 1}}
            ),
            "but the event is for x.y",
        ),
    ],
)
def test_messages_that_cannot_be_written_say_why(message: dict, reason: str) -> None:
    with pytest.raises(
        UndecodableMessageError, match=reason.replace("[", r"\[").replace("]", r"\]")
    ):
        EventDecoder(lookup).decode(offset=0, **message)


def test_our_own_events_round_trip_with_exact_positions() -> None:
    event = ChangeEvent(
        op="c",
        table=ITEMS,
        before=None,
        after=(1, 2),
        commit_lsn=77,
        seq=3,
        txid=9,
        commit_ts=datetime(2026, 1, 1, tzinfo=UTC),
        lsn=70,
    )
    [message] = EventEncoder(prefix="p", database="d").encode(event)
    decoded = EventDecoder(lookup).decode(
        key=message.key, value=message.value, headers=message.headers, offset=1000
    )
    assert decoded is not None and decoded.exact_position
    assert (decoded.event.commit_lsn, decoded.event.seq, decoded.event.after) == (77, 3, (1, 2))
