"""Fuzzing the pgoutput decoder: bad input raises DecodeError only, good input round-trips."""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc.core.errors import DecodeError
from cdc.postgres.protocol.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    Relation,
    RelationColumn,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    Type,
    Update,
    decode_message,
)
from cdc.postgres.protocol.walproto import datetime_to_pg_timestamp
from tests.plugins.pgoutput_samples import ALL_SAMPLES

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SAMPLE_NAMES = sorted(ALL_SAMPLES)
TAGS = b"BCORYIUDTMSEcA"


def decode_or_decode_error(data: bytes | memoryview, in_stream: bool) -> Message | None:
    """Decode, treating DecodeError as the one allowed failure."""
    try:
        return decode_message(data, in_stream=in_stream)
    except DecodeError as e:
        # The contract: every message names where it went wrong.
        assert "byte offset" in str(e), str(e)
        return None


# --- (a) every truncation of every real sample --------------------------------------------


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_every_prefix_of_a_sample_decodes_or_raises_decode_error(name: str) -> None:
    data = ALL_SAMPLES[name]
    for end in range(len(data)):
        for in_stream in (False, True):
            decode_or_decode_error(data[:end], in_stream)


# --- (b) mutations of real samples ---------------------------------------------------------

_edits = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete"]),
        st.integers(min_value=0, max_value=10_000),
        st.binary(min_size=1, max_size=6),
    ),
    min_size=1,
    max_size=4,
)


def _apply(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for op, position, chunk in edits:
        at = position % (len(buf) + 1)
        if op == "flip" and at < len(buf):
            buf[at] ^= chunk[0] or 1
        elif op == "set" and at < len(buf):
            buf[at] = chunk[0]
        elif op == "insert":
            buf[at:at] = chunk
        else:
            del buf[at : at + len(chunk)]
    return bytes(buf)


@FUZZ
@given(st.sampled_from(SAMPLE_NAMES), _edits, st.booleans(), st.booleans())
def test_mutated_samples_raise_only_decode_error(
    name: str, edits: list[tuple[str, int, bytes]], in_stream: bool, as_view: bool
) -> None:
    data = _apply(ALL_SAMPLES[name], edits)
    decode_or_decode_error(memoryview(data) if as_view else data, in_stream)


# --- (c) random bytes -----------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=200), st.booleans())
def test_random_bytes_raise_only_decode_error(data: bytes, in_stream: bool) -> None:
    decode_or_decode_error(data, in_stream)


@FUZZ
@given(st.sampled_from(list(TAGS)), st.binary(max_size=200), st.booleans())
def test_random_bodies_behind_valid_tags_raise_only_decode_error(
    tag: int, body: bytes, in_stream: bool
) -> None:
    decode_or_decode_error(bytes([tag]) + body, in_stream)


# --- (d) generated valid messages round-trip -------------------------------------------------
#
# An independent encoder, written from the protocol documentation rather than from the
# decoder, so that a misreading in one is unlikely to be mirrored in the other.


def _ts(value: datetime) -> bytes:
    return struct.pack(">q", datetime_to_pg_timestamp(value))


def _cstr(value: str) -> bytes:
    return value.encode() + b"\x00"


def _xid(xid: int | None) -> bytes:
    return b"" if xid is None else struct.pack(">I", xid)


def _tuple(values: TupleData) -> bytes:
    out = [struct.pack(">H", len(values))]
    for value in values:
        if value is None:
            out.append(b"n")
        elif value is UNCHANGED_TOAST:
            out.append(b"u")
        elif isinstance(value, str):
            raw = value.encode()
            out.append(b"t" + struct.pack(">I", len(raw)) + raw)
        else:
            assert isinstance(value, bytes)
            out.append(b"b" + struct.pack(">I", len(value)) + value)
    return b"".join(out)


def encode(msg: Message) -> bytes:
    match msg:
        case Begin(final_lsn, commit_ts, xid):
            return b"B" + struct.pack(">Q", final_lsn) + _ts(commit_ts) + struct.pack(">I", xid)
        case Commit(flags, commit_lsn, end_lsn, commit_ts):
            return b"C" + struct.pack(">BQQ", flags, commit_lsn, end_lsn) + _ts(commit_ts)
        case Origin(commit_lsn, name):
            return b"O" + struct.pack(">Q", commit_lsn) + _cstr(name)
        case Relation(relation_id, namespace, name, identity, columns, xid):
            out = b"R" + _xid(xid) + struct.pack(">I", relation_id) + _cstr(namespace)
            out += _cstr(name) + identity.encode() + struct.pack(">H", len(columns))
            for col in columns:
                out += bytes([int(col.is_key)]) + _cstr(col.name)
                out += struct.pack(">Ii", col.type_oid, col.type_modifier)
            return out
        case Type(type_oid, namespace, name, xid):
            return b"Y" + _xid(xid) + struct.pack(">I", type_oid) + _cstr(namespace) + _cstr(name)
        case Insert(relation_id, new, xid):
            return b"I" + _xid(xid) + struct.pack(">I", relation_id) + b"N" + _tuple(new)
        case Update(relation_id, new, old, old_kind, xid):
            out = b"U" + _xid(xid) + struct.pack(">I", relation_id)
            if old is not None:
                assert old_kind is not None
                out += old_kind.encode() + _tuple(old)
            return out + b"N" + _tuple(new)
        case Delete(relation_id, old, old_kind, xid):
            return (
                b"D" + _xid(xid) + struct.pack(">I", relation_id) + old_kind.encode() + _tuple(old)
            )
        case Truncate(relation_ids, cascade, restart_identity, xid):
            options = int(cascade) | (int(restart_identity) << 1)
            return (
                b"T"
                + _xid(xid)
                + struct.pack(f">IB{len(relation_ids)}I", len(relation_ids), options, *relation_ids)
            )
        case LogicalMessage(transactional, lsn, prefix, content, xid):
            head = b"M" + _xid(xid) + struct.pack(">BQ", int(transactional), lsn)
            return head + _cstr(prefix) + struct.pack(">I", len(content)) + content
        case StreamStart(xid, first_segment):
            return b"S" + struct.pack(">IB", xid, int(first_segment))
        case StreamStop():
            return b"E"
        case StreamCommit(xid, flags, commit_lsn, end_lsn, commit_ts):
            return b"c" + struct.pack(">IBQQ", xid, flags, commit_lsn, end_lsn) + _ts(commit_ts)
        case StreamAbort(xid, subxid):
            return b"A" + struct.pack(">II", xid, subxid)
    raise AssertionError(f"no encoder for {msg!r}")


# Only messages that carry an xid field in a stream: the others are encoded the same way
# in or out of a stream, and their xid argument does not exist.
_STREAMABLE = (Relation, Type, Insert, Update, Delete, Truncate, LogicalMessage)

u8 = st.integers(min_value=0, max_value=0xFF)
u32 = st.integers(min_value=0, max_value=0xFFFF_FFFF)
i32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
lsn = st.integers(min_value=0, max_value=2**64 - 1)
stream_xid = st.none() | u32
timestamp = st.datetimes(timezones=st.just(UTC))
# Surrogates cannot be encoded as UTF-8; names cannot contain NUL (C strings).
text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12)
name = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=12)
value = st.none() | st.just(UNCHANGED_TOAST) | text | st.binary(max_size=12)
tuple_data = st.lists(value, max_size=8).map(tuple)
old_kind: st.SearchStrategy[Literal["K", "O"]] = st.sampled_from(("K", "O"))

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Begin, lsn, timestamp, u32),
    st.builds(Commit, u8, lsn, lsn, timestamp),
    st.builds(Origin, lsn, name),
    st.builds(
        Relation,
        u32,
        name,
        name,
        st.sampled_from("dnfi"),
        st.lists(st.builds(RelationColumn, name, u32, i32, st.booleans()), max_size=6).map(tuple),
        stream_xid,
    ),
    st.builds(Type, u32, name, name, stream_xid),
    st.builds(Insert, u32, tuple_data, stream_xid),
    st.builds(Update, u32, tuple_data, xid=stream_xid),
    st.tuples(u32, tuple_data, tuple_data, old_kind, stream_xid).map(
        lambda t: Update(t[0], t[1], t[2], t[3], t[4])
    ),
    st.builds(Delete, u32, tuple_data, old_kind, stream_xid),
    st.builds(
        Truncate, st.lists(u32, max_size=5).map(tuple), st.booleans(), st.booleans(), stream_xid
    ),
    st.builds(LogicalMessage, st.booleans(), lsn, name, st.binary(max_size=20), stream_xid),
    st.builds(StreamStart, u32, st.booleans()),
    st.just(StreamStop()),
    st.builds(StreamCommit, u32, u8, lsn, lsn, timestamp),
    st.builds(StreamAbort, u32, u32),
)


@settings(max_examples=1000, deadline=None)
@given(messages, st.booleans())
def test_generated_messages_round_trip(msg: Message, as_view: bool) -> None:
    data = encode(msg)
    in_stream = isinstance(msg, _STREAMABLE) and msg.xid is not None
    decoded = decode_message(memoryview(data) if as_view else data, in_stream=in_stream)
    assert decoded == msg
    assert type(decoded) is type(msg)


@FUZZ
@given(messages, st.data())
def test_truncated_generated_messages_raise_decode_error(msg: Message, data: st.DataObject) -> None:
    encoded = encode(msg)
    end = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    in_stream = isinstance(msg, _STREAMABLE) and msg.xid is not None
    with pytest.raises(DecodeError):
        decode_message(encoded[:end], in_stream=in_stream)
