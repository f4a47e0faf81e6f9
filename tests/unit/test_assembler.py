"""The assembler turns decoded pgoutput messages into change events (no server needed)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cdc.core.errors import DecodeError
from cdc.core.pgtypes import Oid
from cdc.core.table_schema import ColumnSchema, TableSchema
from cdc.postgres.protocol import pgoutput
from cdc.postgres.protocol.assembler import ChangeAssembler, TransactionCommitted

TS = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

ORDERS = pgoutput.Relation(
    relation_id=16400,
    namespace="public",
    name="orders",
    replica_identity="d",
    columns=(
        pgoutput.RelationColumn("id", Oid.INT8, -1, True),
        pgoutput.RelationColumn("note", Oid.TEXT, -1, False),
        pgoutput.RelationColumn("amount", Oid.NUMERIC, ((10 << 16) | 2) + 4, False),
    ),
)


def feed_all(assembler: ChangeAssembler, *messages: pgoutput.Message) -> list:
    out: list = []
    for i, m in enumerate(messages):
        out.extend(assembler.feed(m, lsn=1000 + i, size=10))
    return out


def begin(xid: int = 7, final_lsn: int = 5000) -> pgoutput.Begin:
    return pgoutput.Begin(final_lsn=final_lsn, commit_ts=TS, xid=xid)


def commit(lsn: int = 5000, end: int = 5008) -> pgoutput.Commit:
    return pgoutput.Commit(flags=0, commit_lsn=lsn, end_lsn=end, commit_ts=TS)


def test_insert_update_delete_carry_typed_values_and_transaction_order() -> None:
    asm = ChangeAssembler()
    items = feed_all(
        asm,
        ORDERS,
        begin(),
        pgoutput.Insert(16400, ("1", "hello", "12.50")),
        pgoutput.Update(16400, ("1", None, "13.00")),
        pgoutput.Delete(16400, ("1", None, None), "K"),
        commit(),
    )
    events, done = items[:-1], items[-1]
    assert [e.op for e in events] == ["c", "u", "d"]
    assert [e.seq for e in events] == [0, 1, 2]
    assert all(e.commit_lsn == 5000 and e.txid == 7 and e.commit_ts == TS for e in events)
    from decimal import Decimal

    assert events[0].after == (1, "hello", Decimal("12.50"))
    assert events[1].after == (1, None, Decimal("13.00"))
    assert events[2].before == (1, None, None) and events[2].after is None
    assert events[0].table.qualified_name == "public.orders"
    assert events[0].table.key_columns == ("id",)
    assert done == TransactionCommitted(commit_lsn=5000, end_lsn=5008)
    assert not asm.in_transaction


def test_key_change_becomes_delete_of_old_key_then_insert_of_new() -> None:
    asm = ChangeAssembler()
    items = feed_all(
        asm,
        ORDERS,
        begin(),
        pgoutput.Update(16400, ("2", "x", "1.00"), old=("1", None, None), old_kind="K"),
        commit(),
    )
    delete, insert = items[0], items[1]
    assert (delete.op, delete.before[0], delete.after) == ("d", 1, None)
    assert (insert.op, insert.after[0], insert.before) == ("c", 2, None)
    assert (delete.seq, insert.seq) == (0, 1)


def test_full_identity_update_without_key_change_stays_an_update() -> None:
    # Under REPLICA IDENTITY FULL pgoutput flags every column as identity; the catalog's
    # primary key decides what a key change is.
    rel = pgoutput.Relation(
        16401,
        "public",
        "t",
        "f",
        (
            pgoutput.RelationColumn("id", Oid.INT4, -1, True),
            pgoutput.RelationColumn("v", Oid.TEXT, -1, True),
        ),
    )
    pk_only = TableSchema(
        "public", "t", (ColumnSchema("id", Oid.INT4, -1, True), ColumnSchema("v", Oid.TEXT)), "full"
    )
    asm = ChangeAssembler(describe=lambda r: pk_only)
    items = feed_all(
        asm, rel, begin(), pgoutput.Update(16401, ("1", "new"), ("1", "old"), "O"), commit()
    )
    assert [i.op for i in items[:-1]] == ["u"]
    assert items[0].before == (1, "old")
    assert items[0].table.key_columns == ("id",)


def test_unchanged_toast_is_marked_not_nulled() -> None:
    asm = ChangeAssembler()
    items = feed_all(
        asm,
        ORDERS,
        begin(),
        pgoutput.Update(16400, ("1", pgoutput.UNCHANGED_TOAST, "2.00")),
        commit(),
    )
    assert items[0].unchanged_toast == ("note",)
    assert items[0].after[1] is None


def test_truncate_emits_one_event_per_table() -> None:
    other = pgoutput.Relation(16402, "s", "o", "d", (pgoutput.RelationColumn("id", 23, -1, True),))
    asm = ChangeAssembler()
    items = feed_all(
        asm, ORDERS, other, begin(), pgoutput.Truncate((16400, 16402), False, False), commit()
    )
    assert [(e.op, e.table.qualified_name) for e in items[:-1]] == [
        ("t", "public.orders"),
        ("t", "s.o"),
    ]


def test_reset_transaction_drops_a_half_received_transaction() -> None:
    asm = ChangeAssembler()
    feed_all(asm, ORDERS, begin(), pgoutput.Insert(16400, ("1", "a", "1.00")))
    asm.reset_transaction()
    assert not asm.in_transaction
    items = feed_all(asm, begin(), pgoutput.Insert(16400, ("1", "a", "1.00")), commit())
    assert items[0].seq == 0


def test_errors_name_the_problem() -> None:
    asm = ChangeAssembler()
    with pytest.raises(DecodeError, match="unknown relation id 99"):
        feed_all(asm, begin(), pgoutput.Insert(99, ("1",)))
    asm = ChangeAssembler()
    with pytest.raises(DecodeError, match="outside a transaction"):
        feed_all(asm, ORDERS, pgoutput.Insert(16400, ("1", "a", "1.00")))
    asm = ChangeAssembler()
    with pytest.raises(DecodeError, match="2 columns"):
        feed_all(asm, ORDERS, begin(), pgoutput.Insert(16400, ("1", "a")))
    # A binary value (a malformed stream: binary tuple data is never requested) that the
    # row converter's text parser would meet first (found by the columnar fuzz test).
    asm = ChangeAssembler()
    with pytest.raises(DecodeError, match="binary tuple data is not requested"):
        feed_all(asm, ORDERS, begin(), pgoutput.Insert(16400, ("1", "a", b"1.00")))


def test_values_without_a_typed_form_keep_their_exact_text() -> None:
    # numeric(10,2) accepts NaN; decimal128 cannot hold it.
    asm = ChangeAssembler()
    items = feed_all(
        asm,
        ORDERS,
        begin(),
        pgoutput.Insert(16400, ("1", "a", "NaN")),
        pgoutput.Delete(16400, ("1", "a", "NaN"), "O"),
        commit(),
    )
    insert, delete = items[0], items[1]
    assert insert.after == (1, "a", None) and insert.fallback == {"amount": "NaN"}
    assert delete.before == (1, "a", None) and delete.fallback == {"amount": "NaN"}


def test_full_identity_fills_unchanged_toast_from_the_old_row() -> None:
    rel = pgoutput.Relation(
        16403,
        "public",
        "docs",
        "f",
        (
            pgoutput.RelationColumn("id", Oid.INT4, -1, True),
            pgoutput.RelationColumn("body", Oid.TEXT, -1, True),
            pgoutput.RelationColumn("n", Oid.INT4, -1, True),
        ),
    )
    asm = ChangeAssembler()
    big = "x" * 100_000
    items = feed_all(
        asm,
        rel,
        begin(),
        pgoutput.Update(16403, ("1", pgoutput.UNCHANGED_TOAST, "2"), ("1", big, "1"), "O"),
        commit(),
    )
    # Every column is identity under FULL, so this is a "key change": delete + insert,
    # and the insert has the real TOASTed value rather than a marker.
    assert [e.op for e in items[:-1]] == ["d", "c"]
    assert items[1].after == (1, big, 2) and items[1].unchanged_toast == ()
