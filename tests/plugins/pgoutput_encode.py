"""An independent pgoutput encoder, for the decoder tests (fuzzing, the columnar path)."""

from __future__ import annotations

import struct
from datetime import datetime

from hypothesis import strategies as st

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
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    Type,
    Update,
)
from cdc.postgres.protocol.walproto import datetime_to_pg_timestamp

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


#: Edits of a message: flip, set, insert or delete bytes at a position (fuzzing).
byte_edits = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete"]),
        st.integers(min_value=0, max_value=10_000),
        st.binary(min_size=1, max_size=6),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    """``data`` with ``edits`` (from :data:`byte_edits`) applied."""
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
