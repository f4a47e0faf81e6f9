"""COPY BOTH frames of START_REPLICATION."""

from __future__ import annotations

import contextlib
import struct
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.core.errors import DecodeError
from cdc.postgres.protocol.walproto import (
    PG_EPOCH,
    PrimaryKeepalive,
    XLogData,
    datetime_to_pg_timestamp,
    parse_copy_frame,
    pg_timestamp_to_datetime,
    standby_status_update,
    xlogdata_split,
)

MAX_LSN = 2**64 - 1
# Microseconds from the PostgreSQL epoch to datetime.min and datetime.max.
MIN_TS = datetime_to_pg_timestamp(datetime.min.replace(tzinfo=UTC))
MAX_TS = datetime_to_pg_timestamp(datetime.max.replace(tzinfo=UTC))

lsns = st.integers(min_value=0, max_value=MAX_LSN)
timestamps = st.integers(min_value=MIN_TS, max_value=MAX_TS)


def xlogdata_frame(data_start: int, wal_end: int, send_time: int, payload: bytes) -> bytes:
    return b"w" + struct.pack(">QQq", data_start, wal_end, send_time) + payload


def keepalive_frame(wal_end: int, send_time: int, reply: int) -> bytes:
    return b"k" + struct.pack(">QqB", wal_end, send_time, reply)


def test_timestamps_count_microseconds_from_2000_utc() -> None:
    assert pg_timestamp_to_datetime(0) == datetime(2000, 1, 1, tzinfo=UTC)
    assert pg_timestamp_to_datetime(1) == datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
    assert pg_timestamp_to_datetime(-1_000_000) == datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert pg_timestamp_to_datetime(0).tzinfo is UTC
    assert PG_EPOCH.timestamp() == 946684800
    plus_two = timezone(timedelta(hours=2))
    assert datetime_to_pg_timestamp(datetime(2000, 1, 1, 2, tzinfo=plus_two)) == 0


def test_timestamp_out_of_datetime_range() -> None:
    with pytest.raises(DecodeError, match="outside the range"):
        pg_timestamp_to_datetime(2**63 - 1)  # PostgreSQL's 'infinity'
    with pytest.raises(DecodeError):
        pg_timestamp_to_datetime(MIN_TS - 1)


def test_naive_datetime_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        datetime_to_pg_timestamp(datetime(2024, 1, 1))


def test_parse_xlogdata() -> None:
    frame = xlogdata_frame(0x16_B374D848, 0x16_B374D900, 1_000_000, b"B payload")
    msg = parse_copy_frame(frame)
    assert msg == XLogData(
        0x16_B374D848, 0x16_B374D900, datetime(2000, 1, 1, 0, 0, 1, tzinfo=UTC), b"B payload"
    )


def test_xlogdata_payload_is_a_zero_copy_view_of_a_memoryview_frame() -> None:
    buf = bytearray(xlogdata_frame(1, 2, 3, b"hello"))
    msg = parse_copy_frame(memoryview(buf))
    assert isinstance(msg, XLogData)
    assert isinstance(msg.payload, memoryview)
    assert msg.payload.obj is buf
    buf[-5:] = b"HELLO"
    assert bytes(msg.payload) == b"HELLO"


def test_memoryview_of_another_format_is_read_as_bytes() -> None:
    frame = keepalive_frame(42, 0, 1)
    view = memoryview(frame).cast("c")
    assert parse_copy_frame(view) == PrimaryKeepalive(42, PG_EPOCH, True)  # type: ignore[arg-type]


def test_empty_xlogdata_payload() -> None:
    msg = parse_copy_frame(xlogdata_frame(1, 2, 3, b""))
    assert isinstance(msg, XLogData)
    assert msg.payload == b""


@pytest.mark.parametrize(("reply", "expected"), [(0, False), (1, True)])
def test_parse_keepalive(reply: int, expected: bool) -> None:
    msg = parse_copy_frame(keepalive_frame(42, 0, reply))
    assert msg == PrimaryKeepalive(42, PG_EPOCH, expected)
    assert parse_copy_frame(memoryview(keepalive_frame(42, 0, reply))) == msg


@pytest.mark.parametrize(
    ("frame", "pattern"),
    [
        (b"", "empty replication frame"),
        (b"x" + bytes(30), r"unknown replication frame tag b'x' at byte offset 0"),
        (b"w" + bytes(23), r"XLogData frame is 24 bytes, shorter than its 25-byte header"),
        (b"k" + bytes(16), r"keepalive frame is 17 bytes, expected exactly 18"),
        (b"k" + bytes(18), r"keepalive frame is 19 bytes, expected exactly 18"),
        (keepalive_frame(1, 0, 2), r"reply_requested byte at offset 17 is 2"),
        (keepalive_frame(1, 2**63 - 1, 0), r"keepalive frame send_time at byte offset 9"),
        (xlogdata_frame(1, 1, -(2**63), b""), r"XLogData frame send_time at byte offset 17"),
    ],
)
def test_malformed_frames(frame: bytes, pattern: str) -> None:
    with pytest.raises(DecodeError, match=pattern):
        parse_copy_frame(frame)


def test_standby_status_update_layout() -> None:
    now = datetime(2000, 1, 1, 0, 0, 2, tzinfo=UTC)
    frame = standby_status_update(
        write_lsn=0x16_B374D848, flush_lsn=0x16_B374D000, apply_lsn=0, reply_requested=True, now=now
    )
    assert frame == (
        b"r"
        + bytes.fromhex("00000016b374d848")
        + bytes.fromhex("00000016b374d000")
        + bytes(8)
        + (2_000_000).to_bytes(8, "big")
        + b"\x01"
    )
    assert len(frame) == 34


def test_standby_status_update_defaults_to_the_current_time() -> None:
    before = datetime.now(UTC)
    frame = standby_status_update(write_lsn=1, flush_lsn=1, apply_lsn=1)
    after = datetime.now(UTC)
    clock = pg_timestamp_to_datetime(struct.unpack_from(">q", frame, 25)[0])
    assert before <= clock <= after
    assert frame[-1] == 0


@pytest.mark.parametrize("bad", [-1, MAX_LSN + 1])
def test_standby_status_update_rejects_out_of_range_lsns(bad: int) -> None:
    with pytest.raises(ValueError, match="flush_lsn"):
        standby_status_update(write_lsn=0, flush_lsn=bad, apply_lsn=0)


def test_standby_status_update_rejects_naive_now() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        standby_status_update(write_lsn=0, flush_lsn=0, apply_lsn=0, now=datetime(2024, 1, 1))


# --- properties --------------------------------------------------------------------------


@given(timestamps)
def test_timestamp_round_trip(micros: int) -> None:
    assert datetime_to_pg_timestamp(pg_timestamp_to_datetime(micros)) == micros


@given(lsns, lsns, timestamps, st.binary(max_size=64), st.booleans())
def test_xlogdata_round_trip(
    data_start: int, wal_end: int, send_time: int, payload: bytes, as_view: bool
) -> None:
    frame = xlogdata_frame(data_start, wal_end, send_time, payload)
    msg = parse_copy_frame(memoryview(frame) if as_view else frame)
    assert isinstance(msg, XLogData)
    assert (msg.data_start, msg.wal_end) == (data_start, wal_end)
    assert datetime_to_pg_timestamp(msg.send_time) == send_time
    assert bytes(msg.payload) == payload


@given(lsns, timestamps, st.booleans())
def test_keepalive_round_trip(wal_end: int, send_time: int, reply: bool) -> None:
    msg = parse_copy_frame(keepalive_frame(wal_end, send_time, int(reply)))
    assert msg == PrimaryKeepalive(wal_end, pg_timestamp_to_datetime(send_time), reply)


@given(lsns, lsns, lsns, st.booleans(), st.datetimes(timezones=st.just(UTC)))
def test_standby_status_update_round_trip(
    write: int, flush: int, apply: int, reply: bool, now: datetime
) -> None:
    frame = standby_status_update(
        write_lsn=write, flush_lsn=flush, apply_lsn=apply, reply_requested=reply, now=now
    )
    tag, w, f, a, clock, r = struct.unpack(">cQQQqB", frame)
    assert (tag, w, f, a, r) == (b"r", write, flush, apply, int(reply))
    assert pg_timestamp_to_datetime(clock) == now


@given(st.binary(max_size=40))
def test_arbitrary_bytes_raise_only_decode_error(frame: bytes) -> None:
    with contextlib.suppress(DecodeError):
        parse_copy_frame(frame)


@given(lsns, lsns, timestamps, st.binary(max_size=64), st.booleans())
def test_xlogdata_split_agrees_with_parse_copy_frame(
    data_start: int, wal_end: int, send_time: int, payload: bytes, as_view: bool
) -> None:
    frame = xlogdata_frame(data_start, wal_end, send_time, payload)
    split = xlogdata_split(memoryview(frame) if as_view else frame)
    assert split is not None
    assert split[0] == data_start
    assert bytes(split[1]) == payload


def test_xlogdata_split_leaves_other_frames_to_parse_copy_frame() -> None:
    assert xlogdata_split(keepalive_frame(1, 0, 1)) is None
    assert xlogdata_split(b"") is None
    with pytest.raises(DecodeError, match="shorter than its 25-byte header"):
        xlogdata_split(b"w" + bytes(23))
