"""The compiled per-table paths of the Kafka encoder and decoder give exactly what the
general paths give: the same JSON bytes, the same values, the same reasons for refusing."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import pytest

from cdc.core.events import ChangeEvent, debezium_envelope
from cdc.core.kafka_format import HEADER_COMMIT_TS_US, HEADER_LSN, HEADER_SCHEMA_ID, HEADER_SEQ
from cdc.core.pgtypes import Oid
from cdc.core.table_schema import ColumnSchema, TableSchema
from cdc.kafka.event_encoder import EventEncoder, keyless_partition
from sinks.errors import UndecodableMessageError
from sinks.event_decoding import EventDecoder
from tests.plugins.samples import ROW, TYPES, event

KEYLESS = TableSchema(
    "public", "log", (ColumnSchema("line", Oid.TEXT), ColumnSchema("at", Oid.TIMESTAMPTZ, 3))
)
NO_COLUMNS = TableSchema("public", "empty", ())


def events() -> list[ChangeEvent]:
    key_only = (7,) + (None,) * (len(TYPES.columns) - 1)
    nulls = (8,) + (None,) * (len(ROW) - 1)
    too_precise = list(ROW)
    too_precise[3] = Decimal("1.234")  # numeric(10,2): no Connect Decimal, text beside
    nan = list(ROW)
    nan[4] = Decimal("NaN")
    out = [
        event("c", after=ROW, seq=1),
        event("r", after=ROW, seq=2),
        event("u", before=ROW, after=ROW, seq=3),
        event("d", before=key_only, seq=4),
        event("t", seq=5),
        event("u", after=nulls, seq=6, unchanged_toast=("note", "doc")),
        event("c", after=(*ROW[:3], None, *ROW[4:]), seq=7, fallback={"price": "NaN"}),
        event("c", after=tuple(too_precise), seq=8),
        event("c", after=tuple(nan), seq=9),
        event("c", after=nulls, seq=10),
        event("c", after=(), table=NO_COLUMNS, seq=11),
    ]
    for seq, ts in enumerate(
        [
            datetime(2026, 1, 1, tzinfo=UTC),
            datetime(2026, 1, 1, 0, 0, 0, 500000, tzinfo=UTC),
            datetime(2026, 1, 1, 0, 0, 0, 123, tzinfo=UTC),
            # Equal instants in other zones: the remembered text must still be right.
            datetime(2026, 1, 1, 3, 0, 0, 123, tzinfo=timezone(timedelta(hours=3))),
            datetime(2025, 12, 31, 21, 0, 0, 123, tzinfo=timezone(timedelta(hours=-3))),
            None,
        ]
    ):
        out.append(event("c", after=(f"line {seq}", ts), table=KEYLESS, seq=20 + seq))
    untxed = event("c", after=ROW, seq=30)
    untxed.txid = None
    naive = event("c", after=ROW, seq=31)
    naive.commit_ts = datetime(2026, 1, 1, 10, 0, 0, 123456)
    before_1970 = event("c", after=ROW, seq=32)
    before_1970.commit_ts = datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    later_commit = event("c", after=ROW, seq=0)
    later_commit.commit_lsn += 0x100
    # Back to the first commit: the encoder's cached commit values must follow.
    return [*out, untxed, naive, before_1970, later_commit, event("d", before=key_only, seq=33)]


def reference_value(event: ChangeEvent, micros: int) -> bytes:
    envelope = debezium_envelope(event, server_name="shop", database="shopdb")
    envelope["source"]["ts_us"] = micros
    envelope["source"]["ts_ns"] = micros * 1000
    return orjson.dumps(envelope)


@pytest.mark.parametrize("format", ["json", "json-with-schema"])
def test_compiled_encoding_gives_the_general_paths_bytes(format: str) -> None:
    encoder = EventEncoder(prefix="shop", database="shopdb", format=format)  # type: ignore[arg-type]
    for e in events():
        [change, *_] = encoder.encode(e, partitions=3)
        headers = dict(change.headers)
        micros = int(headers[HEADER_COMMIT_TS_US])
        expected = reference_value(e, micros)
        # The commit's cached values belong to this event's commit, whatever came before.
        assert headers[HEADER_LSN] == str(e.commit_lsn).encode()
        assert headers[HEADER_SEQ] == str(e.seq).encode()
        assert headers[HEADER_SCHEMA_ID] == str(e.table.schema_id()).encode()
        assert change.partition == (keyless_partition(e, 3) if change.key is None else None)
        value = orjson.loads(change.value)
        if format == "json-with-schema":
            assert orjson.dumps(value["payload"]) == expected
        else:
            assert change.value == expected, e
        key_columns = [i for i, c in enumerate(e.table.columns) if c.is_key]
        if change.key is not None and format == "json":
            row = e.before if e.op == "d" else e.after
            assert row is not None
            names = [e.table.columns[i].name for i in key_columns]
            assert orjson.loads(change.key) == {
                n: orjson.loads(reference_value(e, micros))["before" if e.op == "d" else "after"][n]
                for n in names
            }


def test_values_their_encoder_refuses_keep_their_text_and_bad_rows_raise() -> None:
    encoder = EventEncoder(prefix="shop", database="shopdb")
    encoder.encode(event("c", after=("x", datetime(2026, 1, 1, tzinfo=UTC)), table=KEYLESS))
    # A naive value equals no aware one: the remembered text does not hide the refusal.
    naive = event("c", after=("x", datetime(2026, 1, 1)), table=KEYLESS)
    [change] = encoder.encode(naive)
    value = orjson.loads(change.value)
    assert value["after"]["at"] is None
    assert value["cdc_fallback"] == {"at": "2026-01-01 00:00:00"}
    assert change.value == reference_value(naive, int(dict(change.headers)[HEADER_COMMIT_TS_US]))
    with pytest.raises(ValueError):
        encoder.encode(event("c", after=ROW[:-1]))  # one value short


def messages(encoder: EventEncoder) -> list[Any]:
    return [m for e in events() for m in encoder.encode(e, partitions=3)]


def general_decoder(lookup: Any) -> EventDecoder:
    """A decoder whose shapes have no compiled path."""
    decoder = EventDecoder(lookup)
    original = decoder._registered

    def registered(*args: Any) -> Any:
        shape = original(*args)
        shape.fast = None
        return shape

    decoder._registered = registered  # type: ignore[method-assign]
    return decoder


def comparable(decoded: Any) -> Any:
    if decoded is None:
        return None
    e = decoded.event

    def norm(values: Any) -> Any:
        if values is None:
            return None
        return tuple(
            ("NaN",) if isinstance(v, float) and math.isnan(v) else (type(v).__name__, v)
            for v in values
        )

    return (
        decoded.exact_position,
        e.op,
        e.table,
        norm(e.before),
        norm(e.after),
        e.commit_lsn,
        e.seq,
        e.txid,
        e.commit_ts,
        e.lsn,
        e.unchanged_toast,
        e.fallback,
    )


def test_compiled_decoding_gives_the_general_paths_events() -> None:
    schemas = {t.schema_id(): t for t in (TYPES, KEYLESS, NO_COLUMNS)}
    fast, general = EventDecoder(schemas.__getitem__), general_decoder(schemas.__getitem__)
    for m in messages(EventEncoder(prefix="shop", database="shopdb")):
        args = {"key": m.key, "value": m.value, "headers": m.headers, "offset": 3}
        assert comparable(fast.decode(**args)) == comparable(general.decode(**args))


def with_after(message: Any, **after: Any) -> bytes:
    doc = orjson.loads(message.value)
    doc["after"].update(after)
    return orjson.dumps(doc)


@pytest.mark.parametrize(
    ("after", "reason"),
    [
        ({"small": 40000}, "shop.types.small: 40000 is outside the int16 range"),
        ({"num": True}, "shop.types.num: expected an integer, got True"),
        ({"seen": "2026-01-01T00:00:00"}, "has no UTC offset"),
        ({"seen": "soon"}, "is not an ISO 8601 timestamp"),
        ({"flag": 1}, "shop.types.flag: expected true or false, got 1"),
        ({"f8": "many"}, "shop.types.f8: expected a number"),
        ({"bogus": 1}, "columns ['bogus']"),
    ],
)
def test_values_the_compiled_path_refuses_say_why(after: dict[str, Any], reason: str) -> None:
    encoder = EventEncoder(prefix="shop", database="shopdb")
    [good] = encoder.encode(event("c", after=ROW))
    decoder = EventDecoder({TYPES.schema_id(): TYPES}.__getitem__)
    decoder.decode(key=good.key, value=good.value, headers=good.headers)  # warms the caches
    with pytest.raises(
        UndecodableMessageError, match=reason.replace("[", r"\[").replace("]", r"\]")
    ):
        decoder.decode(key=good.key, value=with_after(good, **after), headers=good.headers)


def test_placeholders_and_left_out_columns_take_the_general_path() -> None:
    encoder = EventEncoder(prefix="shop", database="shopdb")
    [good] = encoder.encode(event("u", after=ROW))
    decoder = EventDecoder({TYPES.schema_id(): TYPES}.__getitem__)
    value = with_after(good, note="__debezium_unavailable_value", label=None)
    decoded = decoder.decode(key=good.key, value=value, headers=good.headers)
    assert decoded is not None
    assert decoded.event.unchanged_toast == ("note",)
    names = TYPES.column_names
    assert decoded.event.after[names.index("note")] is None  # type: ignore[index]
    assert decoded.event.after[names.index("label")] is None  # type: ignore[index]


def test_remembered_headers_follow_each_message() -> None:
    encoder = EventEncoder(prefix="shop", database="shopdb")
    decoder = EventDecoder({t.schema_id(): t for t in (TYPES, KEYLESS)}.__getitem__)
    first = event("c", after=ROW, seq=1)
    second = event("c", after=("x", None), table=KEYLESS, seq=2)
    second.commit_lsn += 100
    second.commit_ts = first.commit_ts + timedelta(seconds=1)
    for e in (first, second, first):
        [m] = encoder.encode(e)
        decoded = decoder.decode(key=m.key, value=m.value, headers=m.headers)
        assert decoded is not None
        assert decoded.event.table is e.table
        assert (decoded.event.commit_lsn, decoded.event.seq) == (e.commit_lsn, e.seq)
        assert decoded.event.commit_ts == e.commit_ts
    [m] = encoder.encode(first)
    headers = dict(m.headers)
    for name in (HEADER_SCHEMA_ID, HEADER_LSN, HEADER_COMMIT_TS_US):
        bad = [(k, b"12x" if k == name else v) for k, v in headers.items()]
        with pytest.raises(UndecodableMessageError, match=f"header {name} is not an integer"):
            decoder.decode(key=m.key, value=m.value, headers=bad)
