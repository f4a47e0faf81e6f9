"""Messages in the format Debezium's PostgreSQL connector writes through Kafka Connect's
JsonConverter, with and without ``schemas.enable``.

The customers events are the create/update/delete examples of Debezium's PostgreSQL
connector documentation ("Data change events"), keys included; the products events use
the connector's documented default encodings (``decimal.handling.mode=precise``,
``time.precision.mode=adaptive``, ``binary.handling.mode=bytes``) for a wider set of types.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

SOURCE_SCHEMA: dict[str, Any] = {
    "type": "struct",
    "fields": [
        {"type": "string", "optional": False, "field": "version"},
        {"type": "string", "optional": False, "field": "connector"},
        {"type": "string", "optional": False, "field": "name"},
        {"type": "int64", "optional": False, "field": "ts_ms"},
        {"type": "boolean", "optional": True, "default": False, "field": "snapshot"},
        {"type": "string", "optional": False, "field": "db"},
        {"type": "string", "optional": False, "field": "schema"},
        {"type": "string", "optional": False, "field": "table"},
        {"type": "int64", "optional": True, "field": "txId"},
        {"type": "int64", "optional": True, "field": "lsn"},
        {"type": "int64", "optional": True, "field": "xmin"},
    ],
    "optional": False,
    "name": "io.debezium.connector.postgresql.Source",
    "field": "source",
}


def envelope_schema(name: str, columns: list[dict[str, Any]]) -> dict[str, Any]:
    row = {"type": "struct", "fields": columns, "optional": True, "name": f"{name}.Value"}
    return {
        "type": "struct",
        "fields": [
            {**row, "field": "before"},
            {**row, "field": "after"},
            SOURCE_SCHEMA,
            {"type": "string", "optional": False, "field": "op"},
            {"type": "int64", "optional": True, "field": "ts_ms"},
        ],
        "optional": False,
        "name": f"{name}.Envelope",
    }


def source(table: str, *, lsn: int, tx: int, ts_ms: int, snapshot: Any = False) -> dict[str, Any]:
    return {
        "version": "2.7.4.Final",
        "connector": "postgresql",
        "name": "PostgreSQL_server",
        "ts_ms": ts_ms,
        "snapshot": snapshot,
        "db": "postgres",
        "sequence": f'["{lsn - 9}","{lsn}"]',
        "schema": "public",
        "table": table,
        "txId": tx,
        "lsn": lsn,
        "xmin": None,
    }


CUSTOMER_COLUMNS = [
    {"type": "int32", "optional": False, "field": "id"},
    {"type": "string", "optional": False, "field": "first_name"},
    {"type": "string", "optional": False, "field": "last_name"},
    {"type": "string", "optional": False, "field": "email"},
]
CUSTOMERS_SCHEMA = envelope_schema("PostgreSQL_server.inventory.customers", CUSTOMER_COLUMNS)
CUSTOMER_KEY_SCHEMA = {
    "type": "struct",
    "fields": [{"type": "int32", "optional": False, "field": "id"}],
    "optional": False,
    "name": "PostgreSQL_server.inventory.customers.Key",
}
ANNE = {"id": 1, "first_name": "Anne", "last_name": "Kretchmar", "email": "annek@noanswer.org"}

#: (op, key payload, envelope payload): the documentation's create, update and delete.
CUSTOMER_EVENTS: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
    (
        {"id": 1},
        {
            "before": None,
            "after": ANNE,
            "source": source("customers", lsn=24023128, tx=555, ts_ms=1559033904863),
            "op": "c",
            "ts_ms": 1559033904863,
        },
    ),
    (
        {"id": 1},
        {
            "before": None,
            "after": {**ANNE, "first_name": "Anne Marie"},
            "source": source("customers", lsn=24023128 + 4000, tx=556, ts_ms=1559033904963),
            "op": "u",
            "ts_ms": 1465584025523,
        },
    ),
    (
        {"id": 1},
        {
            "before": {**ANNE, "first_name": "Anne Marie"},
            "after": None,
            "source": source("customers", lsn=46523128, tx=556 + 1, ts_ms=1559033905001),
            "op": "d",
            "ts_ms": 1465581902461,
        },
    ),
    ({"id": 1}, None),  # the tombstone after the delete
    (
        {"id": 2},
        {
            "before": None,
            "after": {"id": 2, "first_name": "Bob", "last_name": "B", "email": "bob@x.org"},
            "source": source("customers", lsn=46524000, tx=558, ts_ms=1559033906000),
            "op": "c",
            "ts_ms": 1559033906100,
        },
    ),
]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unscaled(value: int) -> str:
    """Debezium's precise decimal: base64 of the big-endian two's-complement integer."""
    length = (value + (value < 0)).bit_length() // 8 + 1
    return b64(value.to_bytes(length, "big", signed=True))


PRODUCT_COLUMNS = [
    {"type": "int32", "optional": False, "field": "id"},
    {"type": "string", "optional": True, "field": "name"},
    {
        "type": "bytes",
        "optional": True,
        "name": "org.apache.kafka.connect.data.Decimal",
        "version": 1,
        "parameters": {"scale": "2", "connect.decimal.precision": "10"},
        "field": "price",
    },
    {
        "type": "struct",
        "fields": [
            {"type": "int32", "optional": False, "field": "scale"},
            {"type": "bytes", "optional": False, "field": "value"},
        ],
        "optional": True,
        "name": "io.debezium.data.VariableScaleDecimal",
        "version": 1,
        "doc": "Variable scaled decimal",
        "field": "ratio",
    },
    {"type": "double", "optional": True, "field": "weight"},
    {"type": "boolean", "optional": True, "field": "active"},
    {"type": "int32", "optional": True, "name": "io.debezium.time.Date", "version": 1,
     "field": "released"},
    {"type": "int64", "optional": True, "name": "io.debezium.time.MicroTime", "version": 1,
     "field": "opens"},
    {"type": "int64", "optional": True, "name": "io.debezium.time.MicroTimestamp", "version": 1,
     "field": "updated"},
    {"type": "string", "optional": True, "name": "io.debezium.time.ZonedTimestamp", "version": 1,
     "field": "seen"},
    {"type": "bytes", "optional": True, "field": "thumb"},
    {"type": "string", "optional": True, "name": "io.debezium.data.Json", "version": 1,
     "field": "attrs"},
    {"type": "string", "optional": True, "name": "io.debezium.data.Uuid", "version": 1,
     "field": "uid"},
    {"type": "array", "items": {"type": "string", "optional": True}, "optional": True,
     "field": "tags"},
]  # fmt: skip
PRODUCTS_SCHEMA = envelope_schema("PostgreSQL_server.inventory.products", PRODUCT_COLUMNS)
PRODUCT_KEY_SCHEMA = {
    "type": "struct",
    "fields": [{"type": "int32", "optional": False, "field": "id"}],
    "optional": False,
    "name": "PostgreSQL_server.inventory.products.Key",
}
LAMP = {
    "id": 10,
    "name": "lamp",
    "price": unscaled(-1999),  # -19.99
    "ratio": {"scale": 3, "value": unscaled(1500)},  # 1.500
    "weight": "NaN",
    "active": True,
    "released": 20454,  # 2026-01-01
    "opens": 34_200_000_000,  # 09:30:00
    "updated": 1_767_225_600_123_456,  # 2026-01-01 00:00:00.123456
    "seen": "2026-01-01T10:00:00.5Z",
    "thumb": b64(b"\x00\xffPNG"),
    "attrs": '{"watts": 40}',
    "uid": "0b9c0f6e-4d1a-4f7e-9c1b-2f0e8d6a1b3c",
    "tags": ["a", None, "b,c"],
}
PRODUCT_EVENTS: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
    (
        {"id": 10},
        {
            "before": None,
            "after": LAMP,
            "source": source(
                "products", lsn=50000000, tx=600, ts_ms=1767261600000, snapshot="true"
            ),
            "op": "r",
            "ts_ms": 1767261600001,
        },
    ),
    (
        {"id": 10},
        {
            "before": None,
            # A TOASTed column Debezium did not receive: the documented placeholder.
            "after": {**LAMP, "name": "lamp 2", "attrs": "__debezium_unavailable_value"},
            "source": source("products", lsn=50001000, tx=601, ts_ms=1767261700000),
            "op": "u",
            "ts_ms": 1767261700001,
        },
    ),
]


def message(
    key: dict[str, Any] | None,
    value: dict[str, Any] | None,
    *,
    key_schema: dict[str, Any] | None = None,
    value_schema: dict[str, Any] | None = None,
) -> tuple[bytes | None, bytes | None]:
    """Key and value bytes as JsonConverter writes them (wrapped when given schemas)."""
    k = None
    if key is not None:
        k = orjson.dumps({"schema": key_schema, "payload": key} if key_schema else key)
    v = None
    if value is not None:
        v = orjson.dumps({"schema": value_schema, "payload": value} if value_schema else value)
    return k, v


def customer_messages(*, schemas: bool) -> list[tuple[bytes | None, bytes | None]]:
    return [
        message(
            k,
            v,
            key_schema=CUSTOMER_KEY_SCHEMA if schemas else None,
            value_schema=CUSTOMERS_SCHEMA if schemas else None,
        )
        for k, v in CUSTOMER_EVENTS
    ]


def product_messages(*, schemas: bool) -> list[tuple[bytes | None, bytes | None]]:
    return [
        message(
            k,
            v,
            key_schema=PRODUCT_KEY_SCHEMA if schemas else None,
            value_schema=PRODUCTS_SCHEMA if schemas else None,
        )
        for k, v in PRODUCT_EVENTS
    ]
