"""The Debezium change-event envelope built from a ChangeEvent."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import orjson

from cdc.core.events import ChangeEvent, debezium_envelope
from cdc.core.pgtypes import Oid
from cdc.core.table_schema import ColumnSchema, TableSchema

ORDERS = TableSchema(
    "public",
    "orders",
    (
        ColumnSchema("id", Oid.INT8, -1, True),
        ColumnSchema("amount", Oid.NUMERIC, ((10 << 16) | 2) + 4),
        ColumnSchema("placed", Oid.TIMESTAMPTZ),
        ColumnSchema("note", Oid.TEXT),
    ),
)
COMMIT_TS = datetime(2026, 1, 1, 10, 0, 0, 123000, tzinfo=UTC)


def make(op: str, before: tuple | None, after: tuple | None, **kw: object) -> ChangeEvent:
    return ChangeEvent(
        op=op,  # type: ignore[arg-type]
        table=ORDERS,
        before=before,
        after=after,
        commit_lsn=0x16B374D848,
        seq=2,
        txid=771,
        commit_ts=COMMIT_TS,
        lsn=0x16B374D000,
        **kw,  # type: ignore[arg-type]
    )


def test_insert_envelope_has_debezium_shape_and_encodings() -> None:
    row = (1, Decimal("1.50"), datetime(2026, 1, 1, 9, 0, tzinfo=UTC), "hi")
    env = debezium_envelope(make("c", None, row), server_name="shop", database="shopdb")
    assert set(env) == {"before", "after", "source", "op", "ts_ms", "transaction"}
    assert env["op"] == "c" and env["before"] is None
    assert env["after"] == {
        "id": 1,
        "amount": "AJY=",  # decimal.handling.mode=precise: base64 of unscaled 150
        "placed": "2026-01-01T09:00:00.000000Z",
        "note": "hi",
    }
    source = env["source"]
    assert source["connector"] == "postgresql" and source["name"] == "shop"
    assert (source["db"], source["schema"], source["table"]) == ("shopdb", "public", "orders")
    assert source["snapshot"] == "false"
    assert source["ts_ms"] == int(COMMIT_TS.timestamp() * 1000)
    assert source["txId"] == 771 and source["lsn"] == 0x16B374D000
    assert env["transaction"]["id"] == "771:16/B374D848"
    assert env["transaction"]["total_order"] == 3
    orjson.dumps(env)  # plain JSON types only


def test_unchanged_toast_columns_are_left_out_not_placeholders() -> None:
    row = (1, Decimal("2.00"), None, None)
    env = debezium_envelope(
        make("u", None, row, unchanged_toast=("note",)), server_name="s", database="d"
    )
    assert "note" not in env["after"]
    assert env["after"]["placed"] is None  # a real NULL stays a null


def test_delete_snapshot_and_truncate_envelopes() -> None:
    key_only = (1, None, None, None)
    delete = debezium_envelope(make("d", key_only, None), server_name="s", database="d")
    assert delete["after"] is None and delete["before"]["id"] == 1
    read = debezium_envelope(
        make(
            "r",
            None,
            (1, Decimal("0.00"), None, "x"),
        ),
        server_name="s",
        database="d",
    )
    assert read["source"]["snapshot"] == "true"
    truncate = debezium_envelope(make("t", None, None), server_name="s", database="d")
    assert truncate["before"] is None and truncate["after"] is None and truncate["op"] == "t"


def test_values_without_an_encoding_are_null_with_their_text_beside() -> None:
    free = TableSchema(
        "public", "m", (ColumnSchema("id", Oid.INT8, -1, True), ColumnSchema("x", Oid.NUMERIC))
    )
    event = ChangeEvent(
        op="c", table=free, before=None, after=(1, "NaN"), commit_lsn=1, seq=0, txid=1,
        commit_ts=COMMIT_TS, lsn=1,
    )  # fmt: skip
    # Unconstrained numeric NaN is exact text in the lake, but a Connect decimal cannot hold it.
    env = debezium_envelope(event, server_name="s", database="d")
    assert env["after"] == {"id": 1, "x": None} and env["cdc_fallback"] == {"x": "NaN"}

    row = (1, None, None, "hi")
    env = debezium_envelope(
        make("c", None, row, fallback={"placed": "infinity"}), server_name="s", database="d"
    )
    assert env["after"]["placed"] is None and env["cdc_fallback"] == {"placed": "infinity"}
    assert "cdc_fallback" not in debezium_envelope(
        make("c", None, row), server_name="s", database="d"
    )
