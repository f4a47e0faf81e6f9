"""Decoding of pgoutput messages, mostly from bytes captured from PostgreSQL 15."""

from __future__ import annotations

import copy
import hashlib
import pickle
import struct
from datetime import UTC, datetime

import pytest

from cdc.core.errors import DecodeError
from cdc.core.lsn import parse_lsn
from cdc.postgres.protocol.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    Relation,
    RelationCache,
    RelationColumn,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    UnchangedToast,
    Update,
    decode_message,
)
from tests.plugins import pgoutput_samples as s

INT8, BOOL, BYTEA, INT4, TEXT, NUMERIC = 20, 16, 17, 23, 25, 1700


def decode(name: str) -> object:
    return decode_message(s.ALL_SAMPLES[name], in_stream=name in s.IN_STREAM)


def assert_recent_utc(ts: datetime) -> None:
    assert ts.tzinfo is UTC
    assert datetime(2020, 1, 1, tzinfo=UTC) < ts < datetime(2100, 1, 1, tzinfo=UTC)


# --- protocol version 1, captured -----------------------------------------------------


def test_begin_and_commit_frame_one_transaction() -> None:
    begin = decode_message(s.BEGIN_INSERT)
    commit = decode_message(s.COMMIT_INSERT)
    assert isinstance(begin, Begin)
    assert isinstance(commit, Commit)
    assert begin.xid == 731
    # Begin announces the LSN of the commit record that Commit then reports.
    assert begin.final_lsn == commit.commit_lsn
    assert commit.end_lsn > commit.commit_lsn
    assert commit.flags == 0
    assert begin.commit_ts == commit.commit_ts
    assert_recent_utc(commit.commit_ts)


def test_type_message_names_the_enum() -> None:
    assert decode_message(s.TYPE_MOOD) == Type(type_oid=16385, namespace="public", name="mood")


def test_relation_items() -> None:
    rel = decode_message(s.RELATION_ITEMS)
    assert isinstance(rel, Relation)
    assert (rel.namespace, rel.name, rel.replica_identity, rel.xid) == (
        "public",
        "items",
        "d",
        None,
    )
    assert rel.columns == (
        RelationColumn("id", INT4, -1, True),
        # numeric(10,2): typmod is ((precision << 16) | scale) + VARHDRSZ.
        RelationColumn("name", TEXT, -1, False),
        RelationColumn("price", NUMERIC, ((10 << 16) | 2) + 4, False),
        RelationColumn("mood", 16385, -1, False),
        RelationColumn("note", TEXT, -1, False),
        RelationColumn("data", BYTEA, -1, False),
    )
    assert decode_message(s.INSERT_ITEMS).relation_id == rel.relation_id  # type: ignore[union-attr]


def test_insert_values_are_text_with_utf8_and_nulls() -> None:
    msg = decode_message(s.INSERT_ITEMS)
    assert msg == Insert(16391, ("1", "wídget ☃", "9.99", "happy", None, "\\x00ff"))


def test_update_without_key_change_has_no_old_tuple() -> None:
    msg = decode_message(s.UPDATE_ITEMS)
    assert msg == Update(16391, new=("1", "gadget", "9.99", "happy", None, "\\x00ff"))
    assert isinstance(msg, Update)
    assert msg.old is None and msg.old_kind is None


def test_update_of_primary_key_sends_old_key_tuple() -> None:
    msg = decode_message(s.UPDATE_ITEMS_KEY_CHANGE)
    assert msg == Update(
        16391,
        new=("2", "gadget", "9.99", "happy", None, "\\x00ff"),
        # Non-key columns come as 'n' in a key tuple although they were not NULL.
        old=("1", None, None, None, None, None),
        old_kind="K",
    )


def test_replica_identity_full_update_and_delete_carry_the_whole_old_row() -> None:
    rel = decode_message(s.RELATION_FULL_T)
    assert isinstance(rel, Relation)
    assert (rel.name, rel.replica_identity) == ("full_t", "f")
    assert decode_message(s.INSERT_FULL_T) == Insert(rel.relation_id, ("1", "a"))
    assert decode_message(s.UPDATE_FULL_T) == Update(
        rel.relation_id, new=("1", "b"), old=("1", "a"), old_kind="O"
    )
    assert decode_message(s.DELETE_FULL_T) == Delete(rel.relation_id, ("1", "b"), "O")


def test_delete_with_default_identity_sends_key_only() -> None:
    assert decode_message(s.DELETE_ITEMS) == Delete(16391, ("2", None, None, None, None, None), "K")


def test_truncate_options_and_relation_ids() -> None:
    assert decode_message(s.TRUNCATE_ITEMS) == Truncate(
        (16391,), cascade=True, restart_identity=True
    )
    full_t = decode_message(s.RELATION_FULL_T)
    toasty = decode_message(s.RELATION_TOASTY)
    assert isinstance(full_t, Relation) and isinstance(toasty, Relation)
    assert decode_message(s.TRUNCATE_TWO) == Truncate(
        (full_t.relation_id, toasty.relation_id), cascade=False, restart_identity=False
    )


def test_logical_messages() -> None:
    tx = decode_message(s.MESSAGE_TRANSACTIONAL)
    non_tx = decode_message(s.MESSAGE_NON_TRANSACTIONAL)
    assert isinstance(tx, LogicalMessage) and isinstance(non_tx, LogicalMessage)
    assert (tx.transactional, tx.prefix, tx.content, tx.xid) == (
        True,
        "cdc-test",
        b"transactional hello",
        None,
    )
    assert (non_tx.transactional, non_tx.prefix, non_tx.content) == (
        False,
        "cdc-test",
        b"\x00\x01\x02\x03",
    )
    assert type(non_tx.content) is bytes
    # Emitted one after the other, after the first test transaction committed.
    commit = decode_message(s.COMMIT_INSERT)
    assert isinstance(commit, Commit)
    assert commit.end_lsn < tx.lsn < non_tx.lsn


def test_unchanged_toast_value_is_not_sent() -> None:
    rel = decode_message(s.RELATION_TOASTY)
    assert isinstance(rel, Relation)
    assert [c.name for c in rel.columns] == ["id", "big", "counter"]
    msg = decode_message(s.UPDATE_TOASTY_UNCHANGED)
    assert msg == Update(rel.relation_id, new=("1", UNCHANGED_TOAST, "1"))
    assert isinstance(msg, Update)
    assert msg.new[1] is UNCHANGED_TOAST


def test_origin() -> None:
    begin = decode_message(s.BEGIN_ORIGIN)
    commit = decode_message(s.COMMIT_ORIGIN)
    assert isinstance(begin, Begin) and isinstance(commit, Commit)
    assert begin.final_lsn == commit.commit_lsn
    assert decode_message(s.ORIGIN) == Origin(parse_lsn("0/ABCDEF0"), "upstream-a")
    assert decode_message(s.INSERT_ITEMS_ORIGIN) == Insert(
        16391, ("7", "from origin", None, "ok", "n", None)
    )


def test_binary_mode_values_are_bytes() -> None:
    rel = decode_message(s.RELATION_BIN_T)
    assert isinstance(rel, Relation)
    assert [(c.name, c.type_oid, c.is_key) for c in rel.columns] == [
        ("id", INT8, True),
        ("flag", BOOL, False),
        ("raw", BYTEA, False),
        ("label", TEXT, False),
    ]
    msg = decode_message(s.INSERT_BIN_T)
    assert msg == Insert(
        rel.relation_id,
        ((42).to_bytes(8, "big"), b"\x01", b"\xde\xad\xbe\xef", "héllo".encode()),
    )


def test_replica_identity_full_toast_is_in_old_tuple_only() -> None:
    rel = decode_message(s.RELATION_TOASTY_FULL)
    assert isinstance(rel, Relation)
    assert rel.replica_identity == "f"
    # With REPLICA IDENTITY FULL every column is flagged as part of the key.
    assert all(c.is_key for c in rel.columns)
    msg = decode_message(s.UPDATE_TOASTY_FULL)
    assert isinstance(msg, Update)
    big = "".join(hashlib.md5(str(g).encode()).hexdigest() for g in range(1, 81))
    one = (1).to_bytes(4, "big")
    assert msg.old_kind == "O"
    assert msg.old == (one, big.encode(), (0).to_bytes(4, "big"))
    assert msg.new == (one, UNCHANGED_TOAST, one)


# --- protocol version 2 streaming, captured -------------------------------------------


def test_stream_start_and_stop() -> None:
    assert decode_message(s.STREAM_START_FIRST) == StreamStart(745, first_segment=True)
    assert decode_message(s.STREAM_START_NEXT) == StreamStart(745, first_segment=False)
    assert decode_message(s.STREAM_STOP) == StreamStop()


def test_streamed_changes_carry_the_xid() -> None:
    rel = decode("STREAM_RELATION_BULK")
    assert isinstance(rel, Relation)
    assert (rel.name, rel.xid) == ("bulk", 745)
    assert [c.name for c in rel.columns] == ["id", "payload"]
    assert decode("STREAM_INSERT_BULK") == Insert(rel.relation_id, ("1", "x" * 200), xid=745)
    assert decode("STREAM_UPDATE") == Update(rel.relation_id, new=("1", "updated"), xid=745)
    assert decode("STREAM_DELETE") == Delete(rel.relation_id, ("2", None), "K", xid=745)
    msg = decode("STREAM_MESSAGE")
    assert isinstance(msg, LogicalMessage)
    assert (msg.transactional, msg.prefix, msg.content, msg.xid) == (
        True,
        "cdc-test",
        b"inside stream",
        745,
    )


def test_streamed_subtransaction_changes_carry_the_subxid() -> None:
    assert decode("STREAM_INSERT_SUBXACT") == Insert(16412, ("1001", "y" * 200), xid=746)
    assert decode_message(s.STREAM_ABORT) == StreamAbort(xid=745, subxid=746)
    rel = decode("STREAM_RELATION_SUBXACT")
    assert isinstance(rel, Relation)
    assert rel.xid == 747
    assert decode("STREAM_INSERT_AFTER_ROLLBACK") == Insert(16412, ("5000", "after rollback"), 747)


def test_stream_commit() -> None:
    msg = decode_message(s.STREAM_COMMIT)
    assert isinstance(msg, StreamCommit)
    assert (msg.xid, msg.flags) == (745, 0)
    assert msg.end_lsn > msg.commit_lsn
    assert_recent_utc(msg.commit_ts)


def test_stream_abort_with_parallel_apply_fields_is_accepted() -> None:
    # PostgreSQL 16 appends abort_lsn and abort_ts with streaming=parallel.
    extended = s.STREAM_ABORT + struct.pack(">Qq", 0x1604880, 12345)
    assert decode_message(extended) == StreamAbort(xid=745, subxid=746)
    with pytest.raises(DecodeError, match="Stream Abort"):
        decode_message(s.STREAM_ABORT + b"\x00")


def test_in_stream_flag_must_match() -> None:
    with pytest.raises(DecodeError, match="Insert"):
        decode_message(s.STREAM_INSERT_BULK, in_stream=False)
    with pytest.raises(DecodeError, match="Insert"):
        decode_message(s.INSERT_ITEMS, in_stream=True)


def test_every_sample_decodes_from_bytes_memoryview_and_bytearray() -> None:
    for name, data in s.ALL_SAMPLES.items():
        expected = decode(name)
        in_stream = name in s.IN_STREAM
        assert decode_message(memoryview(data), in_stream=in_stream) == expected, name
        # A slice of a bigger buffer, as a receive loop would hand over.
        framed = memoryview(b"\xff" * 25 + data + b"\xee")[25:-1]
        assert decode_message(framed, in_stream=in_stream) == expected, name
        assert decode_message(bytearray(data), in_stream=in_stream) == expected, name


def test_large_memoryview_is_decoded_in_place() -> None:
    big = "é" * 50_000  # 100 kB of UTF-8, above the copy threshold
    encoded = big.encode()
    data = (
        b"I"
        + struct.pack(">IcH", 7, b"N", 3)
        + b"t"
        + struct.pack(">I", len(encoded))
        + encoded
        + b"b\x00\x00\x00\x02\x01\x02n"
    )
    expected = Insert(7, (big, b"\x01\x02", None))
    assert decode_message(data) == expected
    assert decode_message(memoryview(data)) == expected
    assert decode_message(memoryview(data).cast("c")) == expected  # type: ignore[arg-type]
    bad = bytearray(data)
    bad[20] = 0xFF
    with pytest.raises(DecodeError, match="UTF-8"):
        decode_message(memoryview(bytes(bad)))


def test_realistic_sequence_with_relation_cache() -> None:
    """Walk the streamed capture the way a consumer would, tracking in_stream."""
    cache = RelationCache()
    order = [
        "STREAM_START_FIRST",
        "STREAM_RELATION_BULK",
        "STREAM_INSERT_BULK",
        "STREAM_STOP",
        "STREAM_START_NEXT",
        "STREAM_MESSAGE",
        "STREAM_UPDATE",
        "STREAM_DELETE",
        "STREAM_INSERT_SUBXACT",
        "STREAM_STOP",
        "STREAM_ABORT",
        "STREAM_START_NEXT",
        "STREAM_RELATION_SUBXACT",
        "STREAM_INSERT_AFTER_ROLLBACK",
        "STREAM_STOP",
        "STREAM_COMMIT",
    ]
    in_stream = False
    rows = 0
    for name in order:
        msg = decode_message(s.ALL_SAMPLES[name], in_stream=in_stream)
        if isinstance(msg, StreamStart):
            in_stream = True
        elif isinstance(msg, StreamStop):
            in_stream = False
        elif isinstance(msg, Relation):
            cache.add(msg)
        elif isinstance(msg, Insert | Update | Delete):
            rel = cache.get(msg.relation_id)
            tup = msg.old if isinstance(msg, Delete) else msg.new
            assert len(tup) == len(rel.columns)
            rows += 1
    assert rows == 5
    assert not in_stream


# --- RelationCache and UnchangedToast ---------------------------------------------------


def test_relation_cache() -> None:
    cache = RelationCache()
    rel = decode_message(s.RELATION_ITEMS)
    assert isinstance(rel, Relation)
    assert rel.relation_id not in cache
    with pytest.raises(DecodeError, match="unknown relation id 16391: a Relation message must"):
        cache.get(rel.relation_id)
    cache.add(rel)
    assert rel.relation_id in cache
    assert cache.get(rel.relation_id) is rel
    assert len(cache) == 1
    newer = Relation(rel.relation_id, "public", "items", "f", rel.columns[:1])
    cache.add(newer)
    assert cache.get(rel.relation_id) is newer


def test_unchanged_toast_is_a_singleton() -> None:
    assert UnchangedToast() is UNCHANGED_TOAST
    assert pickle.loads(pickle.dumps(UNCHANGED_TOAST)) is UNCHANGED_TOAST
    assert copy.copy(UNCHANGED_TOAST) is UNCHANGED_TOAST
    assert copy.deepcopy((UNCHANGED_TOAST,))[0] is UNCHANGED_TOAST
    assert "UNCHANGED_TOAST" in repr(UNCHANGED_TOAST)


def test_messages_are_frozen() -> None:
    msg = decode_message(s.INSERT_ITEMS)
    assert isinstance(msg, Insert)
    with pytest.raises(AttributeError):
        msg.relation_id = 1  # type: ignore[misc]


# --- malformed input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "in_stream", "pattern"),
    [
        (b"", False, r"empty pgoutput message at byte offset 0"),
        (b"Z", False, r"unknown pgoutput message tag b'Z' at byte offset 0"),
        (b"P" + bytes(40), False, r"Prepare .*protocol version 3"),
        (s.BEGIN_INSERT[:-1], False, r"Begin message at byte offset 20: truncated"),
        (
            s.BEGIN_INSERT + b"\x00",
            False,
            r"Begin message at byte offset 21: 1 unexpected trailing",
        ),
        (s.INSERT_ITEMS[:3], False, r"Insert message at byte offset 3: truncated"),
        (s.INSERT_ITEMS + b"\x00", False, r"Insert message at byte offset 61: 1 unexpected"),
        (s.INSERT_ITEMS[:-1], False, r"Insert message at byte offset 51: column 5 claims 6 bytes"),
        (s.INSERT_ITEMS[:-7], False, r"Insert message at byte offset 54: truncated in column 5"),
        (b"I\x00\x00\x00\x01X\x00\x00", False, r"Insert .*offset 5: expected b'N'"),
        # 65535 columns announced, 3 bytes left: rejected before allocating anything.
        (b"I\x00\x00\x00\x01N\xff\xffnnn", False, r"Insert .*offset 6: tuple claims 65535 col"),
        (b"I\x00\x00\x00\x01N\x00\x01x", False, r"offset 8: column 0 has unknown kind b'x'"),
        (
            b"I\x00\x00\x00\x01N\x00\x01t\x00\x00\x00\x02\xc3\x28",
            False,
            r"Insert .*offset 13: column 0 text value is not valid UTF-8",
        ),
        (
            b"I\x00\x00\x00\x01N\x00\x01t\xff\xff\xff\xff",
            False,
            r"column 0 claims 4294967295 bytes but only 0 remain",
        ),
        (b"U\x00\x00\x00\x01K\x00\x01n", False, r"Update .*offset 9: truncated before the new"),
        (b"U\x00\x00\x00\x01K\x00\x01nK", False, r"Update .*offset 9: expected b'N' after"),
        (b"D\x00\x00\x00\x01N\x00\x01n", False, r"Delete .*offset 5: expected b'K' or b'O'"),
        (b"T\xff\xff\xff\xff\x00", False, r"Truncate .*offset 1: claims 4294967295 relation"),
        (b"T\x00\x00\x00\x01\x04\x00\x00\x00\x01", False, r"Truncate .*unknown option bits"),
        (b"R\x00\x00\x00\x01public", False, r"Relation .*offset 5: namespace string has no NUL"),
        (
            b"R\x00\x00\x00\x01p\x00t\x00d\xff\xff\x00",
            False,
            r"Relation .*offset 10: claims 65535 columns but only 1 bytes remain",
        ),
        (b"R\x00\x00\x00\x01p\x00t\x00x\x00\x00", False, r"unknown replica identity 'x'"),
        (
            b"Y\x00\x00\x00\x01\xff\x00t\x00",
            False,
            r"Type .*offset 5: namespace is not valid UTF-8",
        ),
        (
            s.MESSAGE_TRANSACTIONAL[:-1],
            False,
            r"LogicalMessage message at byte offset 19: content length is 19 but 18 bytes follow",
        ),
        (
            b"M\x02" + bytes(8) + b"p\x00" + bytes(4),
            False,
            r"LogicalMessage .*offset 1: unknown flags",
        ),
        (b"S\x00\x00\x00\x01\x02", False, r"Stream Start .*first-segment flag is 2"),
        (b"E\x00", False, r"Stream Stop message at byte offset 1: 1 unexpected trailing"),
        (b"I\x00\x00", True, r"Insert message at byte offset 3: truncated in the xid"),
        (b"R\x00\x00", True, r"Relation message at byte offset 3: truncated in the xid"),
        (
            s.BEGIN_INSERT[:9] + b"\x7f" + bytes(7) + s.BEGIN_INSERT[17:],
            False,
            r"Begin message at byte offset 9: timestamp .* outside",
        ),
    ],
)
def test_malformed_input_names_message_offset_and_problem(
    data: bytes, in_stream: bool, pattern: str
) -> None:
    with pytest.raises(DecodeError, match=pattern):
        decode_message(data, in_stream=in_stream)


def test_wrong_argument_type_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        decode_message(5)  # type: ignore[arg-type]
