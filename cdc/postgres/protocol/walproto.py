"""Frames of the streaming replication protocol's COPY BOTH phase (no IO).

After ``START_REPLICATION SLOT ... LOGICAL ...`` the server and client exchange CopyData
messages. Each carries one frame whose first byte says what it is. All integers are
big-endian; LSNs are unsigned 64-bit; times are signed 64-bit microseconds since
2000-01-01 00:00 UTC (the PostgreSQL epoch).

Server to client:

* ``w`` XLogData: ``Int64 data_start, Int64 wal_end, Int64 send_time, Byte* payload``.
  With ``pgoutput`` the payload is exactly one logical replication message
  (see :mod:`cdc.postgres.protocol.pgoutput`).
* ``k`` Primary keepalive: ``Int64 wal_end, Int64 send_time, Byte1 reply_requested``.
  When ``reply_requested`` is set the server disconnects us after ``wal_sender_timeout``
  unless a standby status update arrives soon.

Client to server:

* ``r`` Standby status update: ``Int64 write, Int64 flush, Int64 apply, Int64 now,
  Byte1 reply_requested``. For logical slots the server only uses ``flush`` to advance
  ``confirmed_flush_lsn``: WAL before it may be recycled, so only report what is durably
  stored downstream.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cdc.core.errors import DecodeError

__all__ = [
    "PG_EPOCH",
    "PrimaryKeepalive",
    "XLogData",
    "datetime_to_pg_timestamp",
    "parse_copy_frame",
    "pg_timestamp_to_datetime",
    "standby_status_update",
    "xlogdata_split",
]

#: 2000-01-01 00:00:00 UTC, the origin of PostgreSQL's ``TimestampTz``.
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

_XLOGDATA = struct.Struct(">QQq")  # after the b"w" tag
_KEEPALIVE = struct.Struct(">QqB")  # after the b"k" tag
_DATA_START = struct.Struct(">Q")
_STATUS_UPDATE = struct.Struct(">cQQQqB")

_XLOGDATA_HEADER = 1 + _XLOGDATA.size
_KEEPALIVE_SIZE = 1 + _KEEPALIVE.size

_MAX_LSN = 0xFFFF_FFFF_FFFF_FFFF
_ONE_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class XLogData:
    """A ``w`` frame: a chunk of WAL, decoded by the output plugin into ``payload``.

    ``payload`` is a memoryview slice of the frame when the frame was a memoryview (no
    copy); keep the underlying buffer alive while using it.
    """

    data_start: int
    wal_end: int
    send_time: datetime
    payload: bytes | memoryview


@dataclass(frozen=True, slots=True)
class PrimaryKeepalive:
    """A ``k`` frame: the server's heartbeat, possibly asking for an immediate reply."""

    wal_end: int
    send_time: datetime
    reply_requested: bool


def pg_timestamp_to_datetime(microseconds: int) -> datetime:
    """Convert PostgreSQL microseconds-since-2000 to an aware UTC datetime.

    Raises:
        DecodeError: the value is outside what :class:`datetime.datetime` can hold
            (years 1 to 9999), e.g. PostgreSQL's ``infinity`` or corrupt bytes.
    """
    try:
        return PG_EPOCH + timedelta(microseconds=microseconds)
    except OverflowError:
        raise DecodeError(
            f"timestamp {microseconds} (microseconds since 2000-01-01) is outside the "
            "range of years 1 to 9999"
        ) from None


def datetime_to_pg_timestamp(value: datetime) -> int:
    """Convert an aware datetime to PostgreSQL microseconds-since-2000.

    Raises:
        ValueError: ``value`` is naive; its instant would be a guess.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("datetime must be timezone-aware (e.g. datetime.now(UTC))")
    # Integer division of timedeltas is exact; total_seconds() would round through a float.
    return (value - PG_EPOCH) // _ONE_MICROSECOND


def parse_copy_frame(frame: bytes | memoryview) -> XLogData | PrimaryKeepalive:
    """Parse one CopyData frame sent by the server during START_REPLICATION.

    Raises:
        DecodeError: empty frame, unknown tag, or a frame too short for its header.
    """
    if isinstance(frame, memoryview) and (frame.format != "B" or frame.ndim != 1):
        # Indexing must yield ints. Recasting a contiguous view keeps the payload zero-copy.
        frame = frame.cast("B") if frame.c_contiguous else memoryview(frame.tobytes())
    size = len(frame)
    if size == 0:
        raise DecodeError("empty replication frame: expected tag b'w' or b'k'")
    tag = frame[0]
    if tag == 0x77:  # b"w"
        if size < _XLOGDATA_HEADER:
            raise DecodeError(
                f"XLogData frame is {size} bytes, shorter than its {_XLOGDATA_HEADER}-byte "
                f"header (truncated at byte offset {size})"
            )
        data_start, wal_end, send_time = _XLOGDATA.unpack_from(frame, 1)
        return XLogData(
            data_start, wal_end, _frame_time(send_time, "XLogData", 17), frame[_XLOGDATA_HEADER:]
        )
    if tag == 0x6B:  # b"k"
        if size != _KEEPALIVE_SIZE:
            raise DecodeError(
                f"primary keepalive frame is {size} bytes, expected exactly {_KEEPALIVE_SIZE}"
            )
        wal_end, send_time, reply = _KEEPALIVE.unpack_from(frame, 1)
        if reply > 1:
            raise DecodeError(
                f"primary keepalive reply_requested byte at offset 17 is {reply}, expected 0 or 1"
            )
        return PrimaryKeepalive(wal_end, _frame_time(send_time, "primary keepalive", 9), reply == 1)
    raise DecodeError(
        f"unknown replication frame tag {bytes([tag])!r} at byte offset 0: "
        "expected b'w' (XLogData) or b'k' (primary keepalive)"
    )


def xlogdata_split(frame: bytes | memoryview) -> tuple[int, bytes | memoryview] | None:
    """``(data_start, payload)`` of an XLogData frame, or ``None`` for any other frame.

    The streaming loop's fast path: it skips building an :class:`XLogData` and its
    ``send_time``, which it does not use. Hand ``None`` results to :func:`parse_copy_frame`.

    Raises:
        DecodeError: an XLogData frame too short for its header.

    >>> xlogdata_split(b"w" + bytes(8) + bytes(16) + b"B...")
    (0, b'B...')
    """
    if not frame or frame[0] != 0x77:  # b"w"
        return None
    if len(frame) < _XLOGDATA_HEADER:
        parse_copy_frame(frame)  # raises the precise error
    return _DATA_START.unpack_from(frame, 1)[0], frame[_XLOGDATA_HEADER:]


def standby_status_update(
    *,
    write_lsn: int,
    flush_lsn: int,
    apply_lsn: int,
    reply_requested: bool = False,
    now: datetime | None = None,
) -> bytes:
    """Build the ``r`` frame that reports our progress to the server.

    ``now`` defaults to the current time; pass it to make the frame reproducible.

    Raises:
        ValueError: an LSN is outside ``0..2**64-1`` or ``now`` is naive.
    """
    for name, lsn in (("write_lsn", write_lsn), ("flush_lsn", flush_lsn), ("apply_lsn", apply_lsn)):
        if not 0 <= lsn <= _MAX_LSN:
            raise ValueError(f"{name}={lsn} is outside the 64-bit LSN range 0..{_MAX_LSN}")
    clock = datetime_to_pg_timestamp(datetime.now(UTC) if now is None else now)
    return _STATUS_UPDATE.pack(
        b"r", write_lsn, flush_lsn, apply_lsn, clock, 1 if reply_requested else 0
    )


def _frame_time(microseconds: int, frame_name: str, offset: int) -> datetime:
    try:
        return pg_timestamp_to_datetime(microseconds)
    except DecodeError as e:
        raise DecodeError(f"{frame_name} frame send_time at byte offset {offset}: {e}") from None
