"""``cdc capture``'s columnar path against its per-event path: the same pgoutput bytes give
the same Kafka messages (topic, key, value, headers, partition, order), whichever way they
were decoded and encoded.

The per-event path: the pure decoder, ChangeAssembler, one ChangeEvent per change, each
encoded by EventEncoder. The columnar path: ColumnarDecoder's Arrow batches encoded whole
by :class:`cdc.kafka.batch_encoder.BatchEncoder` (what ``KafkaProducerSink.add_changes``
produces), and the events the assembler still makes (key changes, FULL updates,
truncates). The batches are also turned back into events by
:func:`cdc.kafka.batch_encoder.changelog_events` (the batch encoder's path for the rows it
leaves to the per-event encoder), compared field by field. ``ts_ms`` (wall-clock time at
event creation) is set to 0 on both sides. Each table's (topic's) messages are compared in
order; the interleaving of different tables may differ (the columnar path cuts a table's
rows into a batch only when it must).
"""

from __future__ import annotations

import dataclasses
import struct
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc.core.events import ChangeEvent
from cdc.core.pgtypes import Oid
from cdc.kafka.batch_encoder import BatchEncoder, changelog_events
from cdc.kafka.event_encoder import EventEncoder
from cdc.postgres.columnar import ChangeBatch, ColumnarDecoder
from cdc.postgres.protocol.assembler import ChangeAssembler, TransactionCommitted
from cdc.postgres.protocol.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    Commit,
    Delete,
    Insert,
    Relation,
    RelationColumn,
    Truncate,
    Update,
    decode_message,
)
from tests.plugins.pgoutput_encode import encode
from tests.plugins.samples import INT4_ARRAY, NUMERIC_10_2

TEXT_ARRAY = 1009
TIMESTAMP_3 = 3
POINT = 600  # a type without a mapping of its own: its text

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=10)
# PostgreSQL's output of timestamps (ISO, years 1-9999; the fraction without trailing zeros,
# as PostgreSQL prints it) and of timestamptz (at some offset).
_datetimes = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31))
_timestamps = _datetimes.map(lambda d: d.isoformat(sep=" ").rstrip("0").rstrip("."))
_zoned = st.tuples(_timestamps, st.sampled_from(["+00", "-03", "+05:30"])).map("".join)

# name, type oid, typmod, key, values. Quoted, mixed-case names; a composite key of mixed
# types (int4, text, uuid); values without a typed form (NaN, infinity...) beside typed ones.
WIDE: tuple[tuple[str, int, int, bool, st.SearchStrategy[str]], ...] = (
    ("Id", Oid.INT4, -1, True, st.integers(-(2**31), 2**31 - 1).map(str)),
    ("Region Code", Oid.TEXT, -1, True, _text),
    (
        "Ref",
        Oid.UUID,
        -1,
        True,
        st.uuids().map(str) | st.just("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"),
    ),
    ("amount", Oid.NUMERIC, NUMERIC_10_2, False, st.sampled_from(["1.50", "-9.99", "NaN", "1e3"])),
    ("ratio", Oid.NUMERIC, -1, False, st.sampled_from(["NaN", "Infinity", "1e-7", "3.1415926"])),
    ("born", Oid.DATE, -1, False, st.sampled_from(["2024-02-29", "infinity", "0044-03-15 BC"])),
    (
        "seen",
        Oid.TIMESTAMPTZ,
        -1,
        False,
        st.sampled_from(["2024-01-02 03:04:05.123456+00", "infinity", "1999-12-31 23:59:59+05:30"])
        | _zoned,
    ),
    # timestamptz(0) and (3): PostgreSQL rounds to the precision; more digits (which it
    # never sends) are kept all the same.
    ("Seen0", Oid.TIMESTAMPTZ, 0, False, _zoned),
    ("seen3", Oid.TIMESTAMPTZ, 3, False, _zoned),
    (
        "local",
        Oid.TIMESTAMP,
        TIMESTAMP_3,
        False,
        # Sub-millisecond digits in a timestamp(3): refused by the encoder, kept as text.
        st.sampled_from(["2024-01-02 03:04:05.123", "-infinity", "2000-01-01 00:00:00"])
        | _timestamps,
    ),
    ("local_us", Oid.TIMESTAMP, -1, False, _timestamps),
    ("at", Oid.TIME, -1, False, st.sampled_from(["03:04:05.5", "24:00:00", "00:00:00"])),
    ("at_ms", Oid.TIME, 3, False, st.sampled_from(["03:04:05.5", "12:00:00.123", "00:00:01"])),
    ("zone_at", Oid.TIMETZ, -1, False, st.sampled_from(["03:04:05+02", "23:59:59.5-03:30"])),
    # ISO 8601 (our sessions' IntervalStyle), and another style: kept as text.
    ("span", Oid.INTERVAL, -1, False, st.sampled_from(["P1DT2H", "P-3M", "PT1.5S", "-3 mons"])),
    ("ok", Oid.BOOL, -1, False, st.sampled_from(["t", "f"])),
    ("born2", Oid.DATE, -1, False, st.dates().map(lambda d: d.isoformat())),
    ("small", Oid.INT2, -1, False, st.integers(-(2**15), 2**15 - 1).map(str)),
    ("o", Oid.OID, -1, False, st.integers(0, 2**32 - 1).map(str)),
    ("cash", Oid.MONEY, -1, False, st.sampled_from(["$1,234.56", "-$0.01", "$0.00"])),
    ("big", Oid.INT8, -1, False, st.integers(-(2**63), 2**63 - 1).map(str)),
    ("f4", Oid.FLOAT4, -1, False, st.sampled_from(["1.5", "NaN", "-Infinity", "3.4e38"])),
    ("score", Oid.FLOAT8, -1, False, st.sampled_from(["1.5", "NaN", "1e308", "-0"])),
    ("raw", Oid.BYTEA, -1, False, st.binary(max_size=6).map(lambda b: "\\x" + b.hex())),
    ("tags", INT4_ARRAY, -1, False, st.sampled_from(["{1,2,NULL}", "{}", "{{1,2},{3,4}}"])),
    ("names", TEXT_ARRAY, -1, False, st.sampled_from(['{a,"b c",NULL}', "{}"])),
    ("doc", Oid.JSONB, -1, False, st.sampled_from(['{"a": 1}', '{"ünï": "cødé ✓"}', "[]"])),
    ("js", Oid.JSON, -1, False, st.sampled_from(['{ "b" : [1, 2.50] }', "null"])),
    ("Code", Oid.VARCHAR, 14, False, _text),
    ("fixed", Oid.BPCHAR, 9, False, _text),
    ("kind", Oid.CHAR, -1, False, st.sampled_from(["a", '"', "\\"])),
    ("pt", POINT, -1, False, st.sampled_from(["(1,2)", "(-1.5,2e-9)"])),
    ("Note", Oid.TEXT, -1, False, _text),
)
KEYS = [i for i, c in enumerate(WIDE) if c[3]]
#: Values without a typed form (or a Debezium one): half the rows go without them, so that
#: the batch encoder lays out many whole rows itself (it leaves such rows to the events).
SPECIAL = {"NaN", "Infinity", "-Infinity", "infinity", "-infinity", "0044-03-15 BC"}
SPECIAL |= {"{{1,2},{3,4}}", "24:00:00", "1e3", "-3 mons"}
WIDE_REL = 16384
KEYLESS_REL = 16390  # no key: partition from the change's position


@st.composite
def _row(draw: st.DrawFn, *, toast: bool = False) -> tuple[Any, ...]:
    out: list[Any] = []
    plain = draw(st.booleans())
    for _name, oid, _mod, key, values in WIDE:
        if plain:
            values = values.filter(lambda v: v not in SPECIAL)
        choice = draw(st.integers(0, 7))
        if not key and choice == 0:
            out.append(None)
        elif toast and not key and choice == 1 and oid in (Oid.TEXT, Oid.JSONB, Oid.BYTEA):
            out.append(UNCHANGED_TOAST)
        else:
            out.append(draw(values))
    return tuple(out)


def _key_only(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(v if i in KEYS else None for i, v in enumerate(row))


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    """Encoded pgoutput messages: every kind of row change, in a few transactions."""
    identity = draw(st.sampled_from(["d", "f"]))
    wide = Relation(
        WIDE_REL,
        "Sales",
        "Order Lines",
        identity,
        tuple(RelationColumn(n, oid, mod, key) for n, oid, mod, key, _ in WIDE),
    )
    keyless = Relation(
        KEYLESS_REL,
        "public",
        "Event Log",
        "n",
        (RelationColumn("line", Oid.TEXT, -1, False), RelationColumn("n", Oid.INT8, -1, False)),
    )
    out = [encode(wide), encode(keyless)]
    lsn = 0x1000
    ts = datetime(2024, 5, 1, tzinfo=UTC)
    for xid in range(700, 700 + draw(st.integers(1, 3))):
        ts += timedelta(seconds=1, microseconds=draw(st.integers(0, 999_999)))
        lsn += 0x100
        out.append(encode(Begin(lsn + 0x80, ts, xid)))
        # Some transactions make only one kind of change: batches of one op and one
        # commit, which the batch encoder lays out with constants.
        only = draw(st.sampled_from([None, None, "insert", "update", "delete"]))
        for _ in range(draw(st.integers(0, 12))):
            kind = only or draw(
                st.sampled_from(
                    ["insert", "insert", "update", "key", "full", "delete", "keyless", "trunc"]
                )
            )
            if kind == "insert":
                out.append(encode(Insert(WIDE_REL, draw(_row()))))
            elif kind == "update":
                out.append(encode(Update(WIDE_REL, draw(_row(toast=True)))))
            elif kind == "key":
                old = _key_only(draw(_row()))
                out.append(encode(Update(WIDE_REL, draw(_row(toast=True)), old, "K")))
            elif kind == "full":
                out.append(encode(Update(WIDE_REL, draw(_row(toast=True)), draw(_row()), "O")))
            elif kind == "delete":
                old = draw(_row())
                if identity == "f":
                    out.append(encode(Delete(WIDE_REL, old, "O")))
                else:
                    out.append(encode(Delete(WIDE_REL, _key_only(old), "K")))
            elif kind == "keyless":
                line = draw(st.none() | _text)
                out.append(encode(Insert(KEYLESS_REL, (line, str(draw(st.integers(0, 9)))))))
            else:
                out.append(encode(Truncate((WIDE_REL, KEYLESS_REL), False, False)))
        out.append(encode(Commit(0, lsn + 0x80, lsn + 0xA0, ts)))
    return out


def _message_lsn(index: int) -> int:
    # Distinct, increasing WAL positions per message, as XLogData data_start would be.
    return 0x5000 + index * 0x28


def _per_event(messages: list[bytes]) -> list[ChangeEvent]:
    assembler = ChangeAssembler()
    out: list[ChangeEvent] = []
    for i, payload in enumerate(messages):
        for item in assembler.feed(decode_message(payload), lsn=_message_lsn(i), size=len(payload)):
            if not isinstance(item, TransactionCommitted):
                out.append(item)
    return out


def _columnar_items(messages: list[bytes], cut_every: int, *, in_stream: bool = False) -> list[Any]:
    """What ColumnarDecoder makes of ``messages``: batches, events and commits."""
    decoder = ColumnarDecoder(ChangeAssembler())
    items: list[Any] = []
    for i, payload in enumerate(messages):
        stream = in_stream and payload[:1] in (b"I", b"U", b"D")
        if stream:
            payload = payload[:1] + struct.pack(">I", 999) + payload[1:]
        items += decoder.feed(payload, lsn=_message_lsn(i), in_stream=stream)
        if cut_every and i % cut_every == 0:
            items += decoder.cut_all()
    items += decoder.cut_all()
    return items


def _columnar(
    messages: list[bytes], cut_every: int, *, in_stream: bool = False
) -> tuple[list[ChangeEvent], int]:
    """The columnar path's changes as events (its batches through changelog_events)."""
    out: list[ChangeEvent] = []
    batches = 0
    for item in _columnar_items(messages, cut_every, in_stream=in_stream):
        if isinstance(item, ChangeBatch):
            batches += 1
            out += changelog_events(item.table, item.changes, lsns=item.lsns, texts=item.texts)
        elif not isinstance(item, TransactionCommitted):
            out.append(item)
    return out, batches


def _by_table(events: list[ChangeEvent]) -> list[ChangeEvent]:
    return sorted(events, key=lambda e: e.table.qualified_name)  # stable: order kept


def _comparable(event: ChangeEvent) -> ChangeEvent:
    """``event`` without its wall-clock time and size, NaN made equal to itself."""

    def row(values: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
        if values is None:
            return None
        return tuple("NaN" if isinstance(v, float) and v != v else v for v in values)

    return dataclasses.replace(
        event, ts_ms=0, size_bytes=0, before=row(event.before), after=row(event.after)
    )


def _difference(got: ChangeEvent, expected: ChangeEvent) -> list[tuple[str, Any, Any]]:
    """What differs, value by value (for the failure message)."""
    out = []
    g, e = _comparable(got), _comparable(expected)
    for image in ("before", "after"):
        a, b = getattr(g, image), getattr(e, image)
        if a is None or b is None:
            if a != b:
                out.append((image, a, b))
            continue
        for column, x, y in zip(e.table.columns, a, b, strict=True):
            if x != y or type(x) is not type(y):
                out.append((f"{image}.{column.name}", x, y))
    for name in ("op", "commit_lsn", "seq", "txid", "commit_ts", "lsn", "unchanged_toast"):
        if getattr(g, name) != getattr(e, name):
            out.append((name, getattr(g, name), getattr(e, name)))
    if g.fallback != e.fallback:
        out.append(("fallback", g.fallback, e.fallback))
    return out


def _messages(events: list[ChangeEvent], fmt: Any) -> list[tuple[Any, ...]]:
    encoder = EventEncoder(prefix="shop", database="shop", format=fmt)
    out = []
    for event in events:
        fixed = dataclasses.replace(event, ts_ms=0, size_bytes=0)
        for m in encoder.encode(fixed, tombstones=True, partitions=3):
            out.append((m.topic, m.key, m.value, m.headers, m.partition))
    return out


def _batch_messages(items: list[Any], fmt: Any) -> list[tuple[Any, ...]]:
    """What ``KafkaProducerSink`` sends for the columnar path's items: each batch encoded
    whole by BatchEncoder, each event by EventEncoder, in order, grouped by topic."""
    encoder = EventEncoder(prefix="shop", database="shop", format=fmt)
    batch_encoder = BatchEncoder(encoder)
    out = []
    for item in items:
        if isinstance(item, ChangeBatch):
            encoded = batch_encoder.encode(
                item.table, item.changes, lsns=item.lsns, texts=item.texts, partitions=3, ts_ms=0
            )
            sent = list(encoded.messages(tombstones=True))
        elif isinstance(item, ChangeEvent):
            sent = encoder.encode(dataclasses.replace(item, ts_ms=0), tombstones=True, partitions=3)
        else:
            continue
        out += [(m.topic, m.key, m.value, m.headers, m.partition) for m in sent]
    return sorted(out, key=lambda m: m[0])  # stable: each topic's order kept


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=streams(),
    cut_every=st.integers(0, 5),
    fmt=st.sampled_from(["json", "json-with-schema"]),
)
def test_columnar_capture_sends_the_per_event_messages(
    messages: list[bytes], cut_every: int, fmt: str
) -> None:
    # Each table's changes keep their order (a topic's order); the columnar path may
    # interleave tables differently, which Kafka cannot see (one topic per table).
    expected = _by_table(_per_event(messages))
    got = _by_table(_columnar(messages, cut_every)[0])
    # The events themselves, field by field (ts_ms and size_bytes aside)...
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert _comparable(g) == _comparable(e), _difference(g, e)
    # ...and the bytes sent: keys, values, headers, partitions, in order, both from the
    # events and from the batches encoded whole.
    sent = _messages(expected, fmt)
    assert _messages(got, fmt) == sent
    batch_sent = _batch_messages(_columnar_items(messages, cut_every), fmt)
    assert len(batch_sent) == len(sent)
    for b, e in zip(batch_sent, sent, strict=True):
        assert b == e, (b, e)


def _transaction(*changes: Any) -> list[bytes]:
    """The wide table's Relation, then ``changes`` in one transaction (commit LSN 0x9000)."""
    wide = Relation(
        WIDE_REL,
        "Sales",
        "Order Lines",
        "d",
        tuple(RelationColumn(n, oid, mod, key) for n, oid, mod, key, _ in WIDE),
    )
    ts = datetime(2024, 5, 1, tzinfo=UTC)
    return [
        encode(wide),
        encode(Begin(0x9000, ts, 42)),
        *(encode(c) for c in changes),
        encode(Commit(0, 0x9000, 0x9010, ts)),
    ]


def test_batches_keep_each_rows_own_lsn() -> None:
    row = tuple("1" if oid in (Oid.INT4, Oid.INT2, Oid.INT8) else None for _, oid, _, _, _ in WIDE)
    row = ("1", "eu", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", *row[3:])
    messages = _transaction(
        Insert(WIDE_REL, row), Update(WIDE_REL, row), Delete(WIDE_REL, _key_only(row), "K")
    )
    for in_stream in (False, True):
        got, batches = _columnar(messages, 0, in_stream=in_stream)
        assert batches == 1
        assert [(e.op, e.lsn, e.commit_lsn, e.seq) for e in got] == [
            ("c", _message_lsn(2), 0x9000, 0),
            ("u", _message_lsn(3), 0x9000, 1),
            ("d", _message_lsn(4), 0x9000, 2),
        ]
        assert [_comparable(e) for e in got] == [_comparable(e) for e in _per_event(messages)]


@pytest.mark.parametrize("fmt", ["json", "json-with-schema"])
def test_unchanged_toast_and_fallbacks_survive_the_batch(fmt: str) -> None:
    base = [draw for draw in ("7", "Zürich", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")]
    rest: list[Any] = [None] * (len(WIDE) - 3)
    rest[WIDE.index(next(c for c in WIDE if c[0] == "born")) - 3] = "infinity"
    rest[-1] = UNCHANGED_TOAST
    row = (*base, *rest)
    messages = _transaction(Update(WIDE_REL, row))
    got, batches = _columnar(messages, 0)
    assert batches == 1
    (event,) = got
    assert event.unchanged_toast == ("Note",)
    assert event.fallback == {"born": "infinity"}
    assert _messages(got, fmt) == _messages(_per_event(messages), fmt)
    assert _batch_messages(_columnar_items(messages, 0), fmt) == _messages(got, fmt)


def test_replayed_spill_records_keep_their_own_lsn() -> None:
    """A streamed transaction's changes are replayed from spill records (Int64 data_start,
    Int32 xid, Int32 length, the in-stream message): each row's LSN is its record's."""
    row = ("5", "eu", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", *([None] * (len(WIDE) - 3)))
    head = _transaction()[:2]
    changes = [encode(Insert(WIDE_REL, row)), encode(Delete(WIDE_REL, _key_only(row), "K"))]
    records = b"".join(
        struct.pack(">qII", 0x7000 + 0x40 * i, 901, len(c) + 4)
        + c[:1]
        + struct.pack(">I", 901)
        + c[1:]
        for i, c in enumerate(changes)
    )
    decoder = ColumnarDecoder(ChangeAssembler())
    for payload in head:
        decoder.feed(payload, lsn=1)
    decoder.feed(changes[0], lsn=2)  # registers the relation
    decoder.cut_all()
    pos, taken, status = decoder.builder.replay_records(records, 0, set(), 100)
    assert (pos, taken, status) == (len(records), 2, 0)
    (batch,) = decoder.cut_all()
    assert batch.lsns.to_pylist() == [0x7000, 0x7040]
    events = list(changelog_events(batch.table, batch.changes, lsns=batch.lsns, texts=batch.texts))
    assert [(e.op, e.lsn, e.seq) for e in events] == [("c", 0x7000, 1), ("d", 0x7040, 2)]
