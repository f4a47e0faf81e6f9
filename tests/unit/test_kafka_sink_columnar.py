"""The column-wise decoding of ``cdc sink`` (EventDecoder.prepare/columns, and
EventDecoder.columns_of_values with pyarrow.json) gives exactly what decoding message by
message gives, and leaves to that path what it cannot type."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.core import pgtypes
from cdc.core.events import ChangeEvent
from cdc.core.kafka_format import HEADER_LSN, HEADER_SCHEMA_ID, HEADER_SEQ
from cdc.core.table_schema import TableSchema
from cdc.kafka.event_encoder import EventEncoder
from sinks.event_decoding import DEBEZIUM_UNAVAILABLE, ColumnRun, EventDecoder
from tests.plugins.samples import (
    KEYLESS,
    MIXED,
    PLAIN,
    ROW,
    TYPES,
    change,
    event,
    mixed,
    plain,
)

Message = tuple[bytes | None, list[tuple[str, bytes]]]


def encode(events: list[ChangeEvent], format: str = "json") -> list[Message]:
    encoder = EventEncoder(prefix="shop", database="shopdb", format=format)  # type: ignore[arg-type]
    # (Without the tombstones that follow deletes: the per-message path skips them.)
    return [
        (m.value, list(m.headers))  # type: ignore[misc]
        for e in events
        for m in encoder.encode(e, partitions=1)
        if m.value is not None
    ]


def new_decoder(*tables: TableSchema) -> EventDecoder:
    by_id = {t.schema_id(): t for t in tables}
    return EventDecoder(by_id.__getitem__)


def warm(decoder: EventDecoder, messages: list[Message]) -> None:
    """Decode one message per schema id by the per-message path (which looks the id up,
    as the worker does with the first message of a schema version)."""
    seen = set()
    for value, headers in messages:
        sid = dict(headers).get(HEADER_SCHEMA_ID)
        if sid not in seen and value is not None:
            seen.add(sid)
            decoder.decode(key=None, value=value, headers=headers)


def by_message(decoder: EventDecoder, messages: list[Message]) -> list[str]:
    """The changelog columns message by message, as DeltaChangelogSink builds them."""
    events = [
        d.event
        for value, headers in messages
        if (d := decoder.decode(key=None, value=value, headers=headers)) is not None
    ]
    table = events[0].table
    rows = [e.before if e.op == "d" else e.after for e in events]
    columns = [
        pa.array(
            [r[i] for r in rows],  # type: ignore[index]
            type=pgtypes.arrow_type(c.type_oid, c.type_modifier),
        )
        for i, c in enumerate(table.columns)
    ]
    meta = [
        pa.array([e.op for e in events]),
        pa.array([e.commit_lsn for e in events], pa.int64()),
        pa.array([e.seq for e in events], pa.int64()),
        pa.array([e.txid for e in events], pa.int64()),
        pa.array([e.commit_ts for e in events], pa.timestamp("us", tz="UTC")),
    ]
    return [repr(a.to_pylist()) for a in columns + meta]


def by_columns(decoder: EventDecoder, messages: list[Message]) -> list[str] | None:
    run = None
    for offset, (value, headers) in enumerate(messages):
        prepared = decoder.prepare(value, headers)
        assert prepared is not None, value
        if run is None:
            run = ColumnRun(prepared.shape)
        assert run.fits(prepared)
        run.append(prepared, offset, None)
    assert run is not None
    changes = decoder.columns(run)
    if changes is None:
        return None
    assert changes.offsets.to_pylist() == list(range(len(messages)))
    assert changes.size_bytes == sum(len(v or b"") for v, _ in messages)
    meta = [changes.ops, changes.lsns, changes.seqs, changes.txids, changes.commit_ts]
    return [repr(a.to_pylist()) for a in changes.values + meta]


def assert_same(table: TableSchema, events: list[ChangeEvent], format: str = "json") -> None:
    """The events' messages decode column-wise (every one of them) as message by message."""
    messages = encode(events, format)
    decoder = new_decoder(table)
    warm(decoder, messages)
    assert by_columns(decoder, messages) == by_message(new_decoder(table), messages)


def test_every_type_decodes_column_wise_as_message_by_message() -> None:
    nulls = (8,) + (None,) * (len(ROW) - 1)
    events = [
        event("c", after=ROW, seq=1),
        event("r", after=ROW, seq=2),
        event("u", after=ROW, seq=3),
        event("c", after=nulls, seq=4),
        event("d", before=nulls, seq=5),
    ]
    for format in ("json", "json-with-schema"):
        assert_same(TYPES, events, format)


def test_composite_mixed_keys_quoted_names_and_keyless_tables() -> None:
    events = [mixed("c", n, seq=n) for n in range(1, 40)]
    events += [mixed("u", 5, seq=50, qty=None, gift=None), mixed("d", 6, seq=51)]
    assert_same(MIXED, events)

    at = datetime(2026, 6, 1, 6, 30, tzinfo=UTC)
    keyless = [event("c", after=(f"line {n}", at), table=KEYLESS, seq=n) for n in range(5)]
    keyless.append(event("c", after=(None, None), table=KEYLESS, seq=9))
    assert_same(KEYLESS, keyless)


def test_what_the_column_wise_path_leaves_to_the_per_message_path() -> None:
    decoder = new_decoder(MIXED)
    [(good, headers)] = encode([mixed("c", 1, seq=1)])
    warm(decoder, [(good, headers)])
    assert decoder.prepare(good, headers) is not None
    doc = orjson.loads(good)

    def variant(**changes: Any) -> bytes:
        return orjson.dumps({**doc, **changes})

    partial = dict(doc["after"])
    del partial["qty"]  # an unchanged TOASTed value capture left out
    refused = [
        (None, headers),  # a tombstone
        (b"not json", headers),
        (variant(op="t", after=None), headers),  # a truncate
        (variant(op="x"), headers),
        (variant(op=["c"]), headers),
        (variant(after=partial), headers),
        (variant(after={**doc["after"], "extra": 1}), headers),
        (variant(cdc_fallback={"price": "NaN"}), headers),
        (variant(before=doc["after"]), headers),  # a row image in both
        (variant(op="d"), headers),  # a delete without 'before'
        (variant(source={**doc["source"], "table": "other"}), headers),
        (variant(source={**doc["source"], "lsn": "16"}), headers),
        (good, [h for h in headers if h[0] != HEADER_SEQ]),  # not capture's exact position
        (good, [(k, b"x" if k == HEADER_SEQ else v) for k, v in headers]),
        (good, [(k, b"99" if k == HEADER_SCHEMA_ID else v) for k, v in headers]),  # unknown id
    ]
    for value, hs in refused:
        assert decoder.prepare(value, hs) is None, value


def test_a_run_with_a_value_it_cannot_type_is_left_to_the_per_message_path() -> None:
    decoder = new_decoder(MIXED)
    messages = encode([mixed("c", n, seq=n) for n in range(1, 5)])
    warm(decoder, messages)
    for column, bad in [("qty", "many"), ("qty", 70000), ("sku", DEBEZIUM_UNAVAILABLE)]:
        doc = orjson.loads(messages[2][0])  # type: ignore[arg-type]
        doc["after"][column] = bad
        changed = [*messages[:2], (orjson.dumps(doc), messages[2][1]), *messages[3:]]
        assert by_columns(decoder, changed) is None, (column, bad)


def test_a_replayed_position_starts_a_new_run() -> None:
    decoder = new_decoder(MIXED)
    messages = encode([mixed("c", 1, seq=1), mixed("c", 2, seq=2)])
    warm(decoder, messages)
    first, second = (decoder.prepare(v, h) for v, h in messages)
    assert first is not None and second is not None
    run = ColumnRun(first.shape)
    run.append(first, 0, None)
    assert run.fits(second)
    run.append(second, 1, None)
    assert not run.fits(first)  # capture re-sent it after a restart


def test_zoned_timestamps_the_arrow_cast_does_not_take_use_the_decoder() -> None:
    decoder = new_decoder(KEYLESS)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    messages = encode([event("c", after=("a", at), table=KEYLESS, seq=n) for n in range(4)])
    warm(decoder, messages)
    texts = [
        "2026-01-01T03:00:00.5+03:00",
        "2026-01-01 00:00:00Z",  # Python takes the space, the pattern does not: decoder
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999Z",
    ]
    changed = []
    for (value, headers), text in zip(messages, texts, strict=True):
        doc = orjson.loads(value)  # type: ignore[arg-type]
        doc["after"]["at"] = text
        changed.append((orjson.dumps(doc), headers))
    assert by_columns(decoder, changed) == by_message(new_decoder(KEYLESS), changed)
    for text in ["2026-01-01T00:00:00", "0001-01-01T00:00:00+01:00", "0000-12-31T23:00:00-01:00"]:
        doc = orjson.loads(messages[0][0])  # type: ignore[arg-type]
        doc["after"]["at"] = text
        # Python refuses these (no offset, or out of range in UTC): so must the run.
        assert by_columns(decoder, [(orjson.dumps(doc), messages[0][1])]) is None, text


_ints = st.none() | st.integers(-(2**31), 2**31 - 1)
_rows = st.tuples(
    st.integers(-(2**31), 2**31 - 1),  # Order (a key)
    st.text(max_size=20),  # sku (a key)
    st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    ),
    st.none() | st.integers(-(2**15), 2**15 - 1),
    st.none() | st.decimals(min_value=-(10**7), max_value=10**7, places=2, allow_nan=False),
    st.none() | st.floats(),
    st.none() | st.booleans(),
    st.none() | st.dates(),
    st.none() | st.binary(max_size=8),
    st.none()
    | st.dictionaries(st.text(max_size=3), _ints, max_size=2).map(
        lambda d: orjson.dumps(d).decode()
    ),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("cud"), _rows), min_size=1, max_size=12))
def test_encoded_values_decode_column_wise_as_message_by_message(
    changes: list[tuple[str, tuple[Any, ...]]],
) -> None:
    assert_same(
        MIXED, [change(op, row, table=MIXED, seq=seq) for seq, (op, row) in enumerate(changes)]
    )


def test_halves_of_a_run_are_runs_of_its_halves() -> None:
    decoder = new_decoder(MIXED)
    messages = encode([mixed("c", n, seq=n) for n in range(1, 8)])
    warm(decoder, messages)
    run = ColumnRun(decoder.prepare(*messages[0]).shape)  # type: ignore[union-attr]
    for offset, (value, headers) in enumerate(messages):
        run.append(decoder.prepare(value, headers), offset, offset)  # type: ignore[arg-type]
    first, second = run.halves()
    assert first.offsets + second.offsets == run.offsets == first.items + second.items
    assert first.seqs + second.seqs == run.seqs and first.rows + second.rows == run.rows
    assert first.size + second.size == run.size
    whole, one, two = (decoder.columns(r) for r in (run, first, second))
    assert whole is not None and one is not None and two is not None
    assert [pa.concat_arrays([a, b]) for a, b in zip(one.values, two.values, strict=True)] == (
        whole.values
    )


# -- pyarrow.json over a run's values (EventDecoder.columns_of_values) ---------------------


def by_values(decoder: EventDecoder, messages: list[Message], table: TableSchema) -> Any:
    """The changelog columns of a run typed by pyarrow.json, or None when it is not taken."""
    changes = decoder.columns_of_values(
        [v for v, _ in messages],
        [h for _, h in messages],
        list(range(len(messages))),
        table=table.qualified_name,
    )
    if changes is None:
        return None
    assert changes.offsets.to_pylist() == list(range(len(messages)))
    assert changes.size_bytes == sum(len(v or b"") for v, _ in messages)
    meta = [changes.ops, changes.lsns, changes.seqs, changes.txids, changes.commit_ts]
    for array, column in zip(changes.values, table.columns, strict=True):
        assert array.type == pgtypes.arrow_type(column.type_oid, column.type_modifier)
    return [repr(a.to_pylist()) for a in changes.values + meta]


def assert_same_by_values(table: TableSchema, events: list[ChangeEvent]) -> None:
    messages = encode(events)
    decoder = new_decoder(table)
    warm(decoder, messages)
    assert by_values(decoder, messages, table) == by_message(new_decoder(table), messages)


def plain_events() -> list[ChangeEvent]:
    events = [plain("c", n, seq=n) for n in range(1, 40)]  # NULLs among them
    events += [plain("u", 5, seq=50, qty=None, gift=None, Note=None), plain("d", 6, seq=51)]
    events += [plain("r", 7, seq=52), plain("c", 8, seq=53, Big=-(2**63), qty=-(2**15))]
    return events


def test_pyarrow_json_types_runs_as_message_by_message() -> None:
    assert_same_by_values(PLAIN, plain_events())
    assert_same_by_values(PLAIN, [plain("d", n, seq=n) for n in range(1, 6)])  # deletes only
    at = datetime(2026, 6, 1, 6, 30, tzinfo=UTC)
    keyless = [event("c", after=(f"line {n}", at), table=KEYLESS, seq=n) for n in range(5)]
    keyless.append(event("c", after=(None, None), table=KEYLESS, seq=9))
    assert_same_by_values(KEYLESS, keyless)


def test_pyarrow_json_leaves_whole_runs_to_the_other_paths() -> None:
    table = PLAIN.qualified_name
    messages = encode([plain("c", n, seq=n) for n in range(1, 5)])
    decoder = new_decoder(PLAIN)
    warm(decoder, messages)
    assert by_values(decoder, messages, PLAIN) is not None
    good, headers = messages[1]
    assert good is not None
    doc = orjson.loads(good)

    def variant(**changes: Any) -> bytes:
        return orjson.dumps({**doc, **changes})

    def after(**changes: Any) -> bytes:
        return variant(after={**doc["after"], **changes})

    partial = dict(doc["after"])
    del partial["Note"]  # an unchanged TOASTed value capture left out: not a NULL
    text = good.decode()
    refused = [
        (None, headers),  # a tombstone
        (b"not json", headers),
        (b"", headers),
        (b"null", headers),
        (good + b"\n", headers),  # whitespace the per-message path takes, but a new line
        (text.replace(',"source"', ',\n"source"').encode(), headers),
        (good[:-1] + b',"op":"c"}', headers),  # a key twice
        (good + good, headers),  # two values in one message (with the empty one below)
        (variant(op="t", after=None), headers),  # a truncate
        (variant(op="x"), headers),
        (variant(op=None), headers),
        (variant(op=["c"]), headers),
        (variant(after=partial), headers),
        (variant(after=None), headers),
        (after(extra=1), headers),
        (after(qty=70000), headers),  # out of the column's range
        (after(qty=1.0), headers),  # the per-message path takes it
        (good.replace(b'"Big":2000000000000', b'"Big":18446744073709551616'), headers),
        (after(sku=5), headers),
        (after(gift="yes"), headers),
        (after(Note=DEBEZIUM_UNAVAILABLE), headers),
        (after(at="2026-01-01 00:00:00"), headers),  # no offset: Python refuses it
        (variant(cdc_fallback={"Note": "x"}), headers),
        (variant(before=doc["after"]), headers),  # a row image in both
        (variant(op="d"), headers),  # a delete without 'before'
        (variant(source={**doc["source"], "table": "other"}), headers),
        (variant(source={**doc["source"], "lsn": "16"}), headers),
        (variant(source={**doc["source"], "extra": 1}), headers),  # not capture's envelope
        (variant(ts_us=1), headers),
        (good.replace(b'"sku"', b'"SKU"'), headers),  # names are case-sensitive
        (b"\xff" + good, headers),
        (good, [h for h in headers if h[0] != HEADER_SEQ]),  # not capture's exact position
        (good, [*headers, ("x", b"1")]),
        (good, headers[::-1]),
        (good, [(k, b"x" if k == HEADER_SEQ else v) for k, v in headers]),
        (good, [(k, b" 2" if k == HEADER_SEQ else v) for k, v in headers]),
        (good, [(k, None if k == HEADER_LSN else v) for k, v in headers]),
        (good, [(k, b"99" if k == HEADER_SCHEMA_ID else v) for k, v in headers]),  # unknown id
        (good, [(k, b"1" if k == HEADER_SEQ else v) for k, v in headers]),  # not ascending
        (good, None),
    ]
    for value, hs in refused:
        run = [messages[0], (value, hs), messages[2]]
        if value == good + good:
            run.append((b"", headers))
        assert by_values(decoder, run, PLAIN) is None, (value, hs)
    # Another table's run, and a table of kinds pyarrow.json does not type.
    assert decoder.columns_of_values([good], [headers], [0], table="Shop.other") is None
    mixed_messages = encode([mixed("c", n, seq=n) for n in range(1, 4)])
    warm(decoder_mixed := new_decoder(MIXED), mixed_messages)
    assert by_values(decoder_mixed, mixed_messages, MIXED) is None
    assert decoder.columns_of_values([], [], [], table=table) is None


def test_pyarrow_json_tells_a_null_from_an_absent_column() -> None:
    decoder = new_decoder(PLAIN)
    messages = encode([plain("c", 1, seq=1), plain("u", 2, seq=2, Note=None)])
    warm(decoder, messages)
    assert by_values(decoder, messages, PLAIN) == by_message(new_decoder(PLAIN), messages)
    toast = plain("u", 3, seq=3, Note=None)
    toast.unchanged_toast = ("Note",)
    with_toast = encode([plain("c", 1, seq=1), toast])
    assert b'"Note"' not in (with_toast[1][0] or b"")
    assert by_values(decoder, with_toast, PLAIN) is None


_plain_rows = st.tuples(
    st.integers(-(2**31), 2**31 - 1),
    st.text(max_size=20),
    st.none() | st.integers(-(2**63), 2**63 - 1),
    st.none() | st.integers(-(2**15), 2**15 - 1),
    st.none() | st.booleans(),
    st.none()
    | st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    ),
    st.none() | st.text(max_size=30),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("crud"), _plain_rows), min_size=1, max_size=12))
def test_encoded_values_decode_by_pyarrow_json_as_message_by_message(
    changes: list[tuple[str, tuple[Any, ...]]],
) -> None:
    events = [change(op, row, table=PLAIN, seq=seq) for seq, (op, row) in enumerate(changes)]
    assert_same_by_values(PLAIN, events)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
def test_any_bytes_among_good_values_are_taken_only_as_the_per_message_path_takes_them(
    junk: bytes,
) -> None:
    messages = encode([plain("c", n, seq=n) for n in range(1, 4)])
    decoder = new_decoder(PLAIN)
    warm(decoder, messages)
    run = [messages[0], (junk, messages[1][1]), messages[2]]
    typed = by_values(decoder, run, PLAIN)
    assert typed is None  # never a change event of capture's envelope
