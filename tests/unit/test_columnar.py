"""The compiled columnar decoder against the pure path: same pgoutput bytes, same changelog.

Fails (never skips) when the extension is not built: CI builds it (see docs/development.md).
"""

from __future__ import annotations

import contextlib
import struct
import tempfile
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog import lake_layout as layout
from cdc.core.errors import DecodeError
from cdc.core.pgtypes import Oid
from cdc.postgres.columnar import ChangeBatch, ColumnarDecoder
from cdc.postgres.protocol import compiled, pgoutput
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
from sinks.delta_changelog import DeltaChangelogSink
from tests.plugins.pgoutput_encode import byte_edits, encode, mutate
from tests.plugins.samples import INT4_ARRAY, NUMERIC_10_2

# name, type oid, typmod, key; quoted, mixed-case names and a composite key of mixed types.
COLUMNS = (
    ("Id", Oid.INT4, -1, True),
    ("Region Code", Oid.TEXT, -1, True),
    ("amount", Oid.NUMERIC, NUMERIC_10_2, False),
    ("ratio", Oid.NUMERIC, -1, False),
    ("born", Oid.DATE, -1, False),
    ("seen", Oid.TIMESTAMPTZ, -1, False),
    ("ok", Oid.BOOL, -1, False),
    ("score", Oid.FLOAT8, -1, False),
    ("tags", INT4_ARRAY, -1, False),
    ("doc", Oid.JSONB, -1, False),
    ("Note", Oid.TEXT, -1, False),
)
KEYS = [i for i, c in enumerate(COLUMNS) if c[3]]

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
VALUES: dict[int, st.SearchStrategy[str]] = {
    0: st.integers(-(2**31), 2**31 - 1).map(str) | st.sampled_from(["2147483648", "x"]),
    1: _text,
    2: st.sampled_from(["1.50", "-99999999.99", "NaN", "0.00", "12345678901.00"]),
    3: st.sampled_from(["NaN", "Infinity", "-Infinity", "1e-7", "3.14159265358979323846264338"]),
    4: st.sampled_from(["2024-02-29", "infinity", "-infinity", "0044-03-15 BC", "9999-12-31"]),
    5: st.sampled_from(
        ["2024-01-02 03:04:05.123456+00", "infinity", "1999-12-31 23:59:59+05:30", "-infinity"]
    ),
    6: st.sampled_from(["t", "f"]),
    7: st.sampled_from(["1.5", "NaN", "-Infinity", "1e308", "-0"]),
    8: st.sampled_from(["{1,2,NULL}", "{}", "{{1,2},{3,4}}", "[0:1]={5,6}"]),
    9: st.sampled_from(['{"a": 1}', '{"ünï": "cødé ✓"}', "[]", "null"]),
    10: _text,
}


@st.composite
def rows(draw: st.DrawFn, *, toast: bool = False) -> tuple[Any, ...]:
    out: list[Any] = []
    for i, (_, _, _, key) in enumerate(COLUMNS):
        choice = draw(st.integers(0, 9))
        if not key and choice == 0:
            out.append(None)
        elif toast and not key and choice == 1 and COLUMNS[i][1] == Oid.TEXT:
            out.append(UNCHANGED_TOAST)
        else:
            out.append(draw(VALUES[i]))
    return tuple(out)


def _key_only(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(v if i in KEYS else None for i, v in enumerate(row))


#: ``streams(keyless=True)``'s second table: keyless, REPLICA IDENTITY FULL.
KEYLESS_LOG = Relation(
    16400,
    "public",
    "Log",
    "f",
    tuple(
        RelationColumn(n, oid, -1, False)
        for n, oid in (("line", Oid.TEXT), ("At", Oid.TIMESTAMPTZ), ("n", Oid.INT4))
    ),
)


@st.composite
def streams(draw: st.DrawFn, *, keyless: bool = False) -> list[bytes]:
    """Encoded pgoutput messages: Relations, transactions of every kind of row change.

    The second table is ``public.notes`` (an int8 key, inserts), or with ``keyless``
    :data:`KEYLESS_LOG` (inserts and deletes of whole rows, NULLs)."""
    identity = draw(st.sampled_from(["d", "f"]))
    rel = Relation(
        16384,
        "Sales",
        "Order Lines",
        identity,
        tuple(RelationColumn(n, oid, mod, key) for n, oid, mod, key in COLUMNS),
    )
    other = Relation(16390, "public", "notes", "d", (RelationColumn("id", Oid.INT8, -1, True),))
    if keyless:
        other = KEYLESS_LOG
    out = [encode(rel), encode(other)]
    lsn = 0x1000
    ts = datetime(2024, 5, 1, tzinfo=UTC)
    for xid in range(700, 700 + draw(st.integers(1, 4))):
        ts += timedelta(seconds=1, microseconds=draw(st.integers(0, 999_999)))
        lsn += 0x100
        out.append(encode(Begin(lsn + 0x80, ts, xid)))
        for _ in range(draw(st.integers(0, 12))):
            kind = draw(
                st.sampled_from(
                    ["insert", "insert", "update", "key", "full", "delete", "other", "trunc"]
                )
            )
            if kind == "insert":
                # PostgreSQL never sends an unchanged TOAST value in an insert; if it did,
                # both paths must still agree.
                out.append(encode(Insert(16384, draw(rows(toast=draw(st.booleans()))))))
            elif kind == "update":
                out.append(encode(Update(16384, draw(rows(toast=True)))))
            elif kind == "key":
                old = draw(rows())
                out.append(encode(Update(16384, draw(rows(toast=True)), _key_only(old), "K")))
            elif kind == "full":
                old = draw(rows())
                out.append(encode(Update(16384, draw(rows(toast=True)), old, "O")))
            elif kind == "delete":
                old = draw(rows())
                if identity == "f":
                    out.append(encode(Delete(16384, old, "O")))
                else:
                    out.append(encode(Delete(16384, _key_only(old), "K")))
            elif kind == "other" and keyless:
                line = draw(
                    st.none() | st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
                )
                row = (line, "2024-01-02 03:04:05+00", str(draw(st.integers(-2, 2))))
                deleted = draw(st.booleans())
                message = (
                    Delete(other.relation_id, row, "O")
                    if deleted
                    else Insert(other.relation_id, row)
                )
                out.append(encode(message))
            elif kind == "other":
                value = str(draw(st.integers(-(2**63), 2**63 - 1)))
                out.append(encode(Insert(16390, (value,))))
            else:
                tables = (16384, other.relation_id) if keyless else (16384,)
                out.append(encode(Truncate(tables, False, False)))
            if draw(st.integers(0, 15)) == 0:
                out.append(encode(rel))  # resent shape (cache invalidation)
        out.append(encode(Commit(0, lsn + 0x80, lsn + 0xA0, ts)))
    return out


def _in_stream(payload: bytes, xid: int) -> bytes:
    """The protocol-2 in-stream form of a row change (xid after the tag)."""
    return payload[:1] + struct.pack(">I", xid) + payload[1:]


def _pure(messages: list[bytes], sink: DeltaChangelogSink) -> None:
    assembler = ChangeAssembler()
    for lsn, payload in enumerate(messages):
        for item in assembler.feed(decode_message(payload), lsn=lsn, size=len(payload)):
            if not isinstance(item, TransactionCommitted):
                sink.add(item)


def columnar_items(messages: list[bytes], cut_every: int) -> list[Any]:
    """What the compiled decoder makes of ``messages``, cutting batches every ``cut_every``
    messages (0: only at the end)."""
    decoder = ColumnarDecoder(ChangeAssembler())
    items: list[Any] = []
    for lsn, payload in enumerate(messages):
        items += decoder.feed(payload, lsn=lsn)
        if cut_every and lsn % cut_every == 0:
            items += decoder.cut_all()
    return items + decoder.cut_all()


def _columnar(messages: list[bytes], sink: DeltaChangelogSink, cut_every: int) -> int:
    batches = 0
    for item in columnar_items(messages, cut_every):
        if isinstance(item, ChangeBatch):
            batches += 1
            sink.add_changes(item.table, item.changes, size_bytes=item.size_bytes)
        elif not isinstance(item, TransactionCommitted):
            sink.add(item)
    return batches


def _lake_tables(root: str) -> dict[str, pa.Table]:
    out = {}
    for name in ("Sales.Order Lines", "public.notes"):
        uri = layout.changes_uri(root, name)
        if DeltaTable.is_deltatable(uri):
            data = DeltaTable(uri).to_pyarrow_table().drop_columns([layout.INGESTED_AT])
            out[name] = data.sort_by([(layout.LSN, "ascending"), (layout.SEQ, "ascending")])
    return out


def test_the_extension_is_built() -> None:
    # CI builds it; a silent fallback to pure Python would leave the compiled path untested.
    assert compiled.AVAILABLE, "cdc.postgres.protocol._columns is not built (see setup.py)"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=streams(), cut_every=st.integers(0, 7))
def test_columnar_changelog_equals_the_pure_paths(messages: list[bytes], cut_every: int) -> None:
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        pure = DeltaChangelogSink(a, app_id="pure")
        _pure(messages, pure)
        fast = DeltaChangelogSink(b, app_id="fast")
        _columnar(messages, fast, cut_every)
        assert fast.pending_rows == pure.pending_rows
        pure.flush()
        fast.flush()
        expected, got = _lake_tables(a), _lake_tables(b)
        assert got.keys() == expected.keys()
        for name, table in expected.items():
            assert got[name].schema == table.schema, name
            assert comparable(got[name]) == comparable(table), name


def comparable(table: pa.Table) -> list[dict[str, Any]]:
    """Rows, with NaN made equal to itself."""
    return [
        {k: "NaN" if isinstance(v, float) and v != v else v for k, v in row.items()}
        for row in table.to_pylist()
    ]


def _transaction(*changes: bytes) -> list[bytes]:
    rel = Relation(
        16384,
        "Sales",
        "Order Lines",
        "d",
        tuple(RelationColumn(n, oid, mod, key) for n, oid, mod, key in COLUMNS),
    )
    ts = datetime(2024, 5, 1, tzinfo=UTC)
    return [
        encode(rel),
        encode(Begin(0x2000, ts, 900)),
        *changes,
        encode(Commit(0, 0x2000, 0x2010, ts)),
    ]


ROW = ("7", "eu-west ✓", "1.50", "NaN", "infinity", None, "t", "1.5", "{1}", "{}", "x" * 300)


def test_plain_changes_become_one_batch_with_the_assemblers_seqs() -> None:
    messages = _transaction(
        encode(Insert(16384, ROW)),
        encode(Update(16384, (*ROW[:10], UNCHANGED_TOAST))),
        encode(Update(16384, ROW, _key_only(("8", *ROW[1:])), "K")),  # key change: events
        encode(Delete(16384, _key_only(ROW), "K")),
    )
    decoder = ColumnarDecoder(ChangeAssembler())
    items: list[Any] = []
    for lsn, payload in enumerate(messages):
        items += decoder.feed(payload, lsn=lsn)
    items += decoder.cut_all()
    kinds = [type(i).__name__ for i in items]
    # The batch before the key change is cut so the table's order holds.
    assert kinds == [
        "ChangeBatch",
        "ChangeEvent",
        "ChangeEvent",
        "TransactionCommitted",
        "ChangeBatch",
    ]
    first, last = items[0], items[-1]
    assert first.changes.column(layout.SEQ).to_pylist() == [0, 1]
    assert [e.seq for e in items[1:3]] == [2, 3]
    assert [e.op for e in items[1:3]] == ["d", "c"]
    assert last.changes.column(layout.SEQ).to_pylist() == [4]
    assert first.op_counts == {"c": 1, "u": 1}
    assert first.changes.column(layout.UNCHANGED_TOAST).to_pylist() == [None, ["Note"]]
    assert first.changes.column(layout.FALLBACK).to_pylist()[0] == [("born", "infinity")]
    assert first.changes.column("Region Code").to_pylist() == ["eu-west ✓"] * 2


def test_streamed_in_stream_forms_are_taken_too() -> None:
    decoder = ColumnarDecoder(ChangeAssembler())
    head = _transaction()
    items: list[Any] = []
    for payload in head[:2]:
        items += decoder.feed(payload, lsn=1)
    for payload in (encode(Insert(16384, ROW)), encode(Delete(16384, _key_only(ROW), "K"))):
        items += decoder.feed(_in_stream(payload, 901), lsn=2, in_stream=True)
    assert decoder.pending == 2
    (batch,) = decoder.cut_all()
    assert batch.changes.column(layout.OP).to_pylist() == ["c", "d"]
    assert batch.changes.column(layout.TXID).to_pylist() == [900, 900]  # the top-level xid
    assert batch.size_bytes == len(encode(Insert(16384, ROW))) + len(
        encode(Delete(16384, _key_only(ROW), "K"))
    )


# --- malformed bytes: DecodeError, never a crash, never a silently wrong row -----------------

FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _feed_or_error(decoder: ColumnarDecoder, payload: bytes, in_stream: bool) -> list[Any] | None:
    try:
        return decoder.feed(payload, lsn=5, in_stream=in_stream)
    except DecodeError:
        return None


SAMPLE_ROWS = [
    encode(Insert(16384, ROW)),
    encode(Update(16384, (*ROW[:10], UNCHANGED_TOAST))),
    encode(Delete(16384, _key_only(ROW), "K")),
    encode(Delete(16384, ROW, "O")),
]


@FUZZ
@given(
    sample=st.sampled_from(SAMPLE_ROWS),
    edits=byte_edits,
    in_stream=st.booleans(),
)
def test_mutated_rows_raise_decode_error_or_decode_like_the_pure_decoder(
    sample: bytes, edits: list[tuple[str, int, bytes]], in_stream: bool
) -> None:
    data = mutate(_in_stream(sample, 900) if in_stream else sample, edits)
    decoder = ColumnarDecoder(ChangeAssembler())
    for payload in _transaction()[:2]:
        decoder.feed(payload, lsn=1)
    # Register the relation first, so the mutated row reaches the compiled code.
    decoder.feed(encode(Insert(16384, ROW)), lsn=2)
    decoder.cut_all()
    got = _feed_or_error(decoder, data, in_stream)
    pure = ChangeAssembler()
    for payload in _transaction()[:2]:
        pure.feed(decode_message(payload), lsn=1)
    pure.seq = 1
    try:
        expected = pure.feed(decode_message(data, in_stream=in_stream), lsn=5)
    except DecodeError:
        expected = None
    if expected is None:
        assert got is None
        return
    assert got is not None
    got += decoder.cut_all()
    # Same ops and positions, row for row.
    rows_got: list[tuple[str, int]] = []
    for item in got:
        if isinstance(item, ChangeBatch):
            rows_got += zip(
                item.changes.column(layout.OP).to_pylist(),
                item.changes.column(layout.SEQ).to_pylist(),
                strict=True,
            )
        else:
            rows_got.append((item.op, item.seq))
    assert rows_got == [(e.op, e.seq) for e in expected]


@FUZZ
@given(data=st.binary(max_size=80), in_stream=st.booleans())
def test_random_bytes_behind_row_tags_raise_only_decode_error(data: bytes, in_stream: bool) -> None:
    decoder = ColumnarDecoder(ChangeAssembler())
    for payload in _transaction()[:2]:
        decoder.feed(payload, lsn=1)
    for tag in b"IUD":
        with contextlib.suppress(DecodeError):
            decoder.feed(bytes([tag]) + data, lsn=3, in_stream=in_stream)
    decoder.cut_all()


def test_builder_rejects_frames_that_are_not_xlogdata() -> None:
    builder = compiled.ColumnBuilder()
    for frame in (b"", b"k" + bytes(30), b"w" + bytes(10)):
        assert builder.feed(frame, 25, False) == compiled.NOT_TAKEN
    with pytest.raises(ValueError):
        builder.register(1, 1)
        builder.begin(1, 1, 0)
        builder.feed(b"I\x00\x00\x00\x01N\x00\x01n", 0, False)
        builder.register(1, 1)  # rows are buffered: take them first
    assert pgoutput.UNCHANGED_TOAST is UNCHANGED_TOAST
