"""Fuzzing the pgoutput decoder: bad input raises DecodeError only, good input round-trips."""

from __future__ import annotations

from datetime import UTC
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
    Type,
    Update,
    decode_message,
)
from tests.plugins.pgoutput_encode import byte_edits, encode, mutate
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


@FUZZ
@given(st.sampled_from(SAMPLE_NAMES), byte_edits, st.booleans(), st.booleans())
def test_mutated_samples_raise_only_decode_error(
    name: str, edits: list[tuple[str, int, bytes]], in_stream: bool, as_view: bool
) -> None:
    data = mutate(ALL_SAMPLES[name], edits)
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
