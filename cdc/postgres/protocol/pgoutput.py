"""Decoder for the ``pgoutput`` logical replication protocol, versions 1 and 2 (no IO).

Wire format
-----------
Every XLogData payload (see :mod:`cdc.postgres.protocol.walproto`) holds one message. Its first byte is a
tag; integers are big-endian; ``String`` is NUL-terminated; LSNs are unsigned 64-bit;
timestamps are signed 64-bit microseconds since 2000-01-01 UTC; OIDs and xids are
unsigned 32-bit. A transaction arrives as ``Begin``, then ``Relation``/``Type`` messages
describing any table or type whose shape the client has not seen in this session, then
row changes, then ``Commit``. Row values travel as *TupleData*: an ``Int16`` column count,
then per column one kind byte: ``n`` (NULL), ``u`` (unchanged TOAST value, not sent),
``t`` (``Int32`` length + the value's text form) or ``b`` (``Int32`` length + the type's
binary send format, only with the ``binary`` option).

Protocol version 2 (PostgreSQL 14+, option ``streaming``) sends transactions that outgrow
``logical_decoding_work_mem`` before they commit, in blocks between ``StreamStart`` and
``StreamStop``. Inside a block, Relation, Type, Insert, Update, Delete, Truncate and
transactional Message carry an extra ``Int32`` xid right after the tag. The bytes alone do
not say whether it is there, so the caller tracks the blocks and passes ``in_stream``.
``StreamCommit`` and ``StreamAbort`` arrive outside blocks.

Hazards
-------
* An unchanged TOASTed (large, stored out of line) value is sent as ``u``, decoded as
  :data:`UNCHANGED_TOAST`, in an Update's new tuple. The consumer must keep the previous
  value. REPLICA IDENTITY FULL does not remove the ``u``; it makes the old tuple carry
  the full value, so the consumer can copy it across.
* An Update's old tuple is present only when the replica identity columns changed
  (``old_kind="K"``, non-key columns are ``None`` there, not real NULLs) or the table is
  REPLICA IDENTITY FULL (``old_kind="O"``). A Delete's old tuple likewise holds only the
  key columns unless the identity is FULL.
* Inside a stream the xid of a change is the *subtransaction's* xid when the change was
  made in a subtransaction; a ``StreamAbort`` with ``subxid != xid`` discards only the
  changes carrying that subxid. Map sub-xids to the ``StreamStart`` xid yourself.
* Relation messages are resent whenever the server's cache was invalidated (DDL,
  TRUNCATE, a new session); always replace the cached one.
* Text values use the connection's client_encoding; this decoder assumes UTF-8.

Every malformed input raises :class:`cdc.core.errors.DecodeError` naming the message type,
byte offset and problem; nothing else escapes, and lengths are checked before anything is
allocated.

Example:
    >>> decode_message(bytes.fromhex("4e"))
    Traceback (most recent call last):
    ...
    cdc.core.errors.DecodeError: unknown pgoutput message tag b'N' at byte offset 0
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import ClassVar, Final, Literal, NoReturn, TypeAlias, final

from cdc.core.errors import DecodeError
from cdc.postgres.protocol.walproto import PG_EPOCH

__all__ = [
    "UNCHANGED_TOAST",
    "Begin",
    "Commit",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Message",
    "Origin",
    "Relation",
    "RelationCache",
    "RelationColumn",
    "StreamAbort",
    "StreamCommit",
    "StreamStart",
    "StreamStop",
    "Truncate",
    "TupleData",
    "Type",
    "UnchangedToast",
    "Update",
    "decode_message",
]


@final
class UnchangedToast:
    """Marker for a TOASTed value that did not change and so was not sent (kind ``u``).

    There is one instance, :data:`UNCHANGED_TOAST`; compare with ``is``.
    """

    __slots__ = ()
    _instance: ClassVar[UnchangedToast | None] = None

    def __new__(cls) -> UnchangedToast:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<UNCHANGED_TOAST: value not sent, keep the previous one>"

    def __reduce__(self) -> str:
        # Unpickling must return the singleton, or `is UNCHANGED_TOAST` checks break.
        return "UNCHANGED_TOAST"

    def __copy__(self) -> UnchangedToast:
        return self

    def __deepcopy__(self, memo: object) -> UnchangedToast:
        return self


UNCHANGED_TOAST: Final = UnchangedToast()

#: One value per column: None (NULL), UNCHANGED_TOAST, str (text format) or bytes (binary).
TupleData: TypeAlias = tuple[str | bytes | UnchangedToast | None, ...]


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_ts: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    """The transaction was replayed from another node (``pg_replication_origin``)."""

    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class RelationColumn:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    """A table's shape; ``replica_identity`` is the raw code ``d``, ``n``, ``f`` or ``i``."""

    relation_id: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[RelationColumn, ...]
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Type:
    """Names a non-built-in type (enum, domain...) used by a following Relation."""

    type_oid: int
    namespace: str
    name: str
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Insert:
    relation_id: int
    new: TupleData
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Update:
    """``old`` is the key columns (``old_kind="K"``) or the whole old row (``"O"``)."""

    relation_id: int
    new: TupleData
    old: TupleData | None = None
    old_kind: Literal["K", "O"] | None = None
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    relation_id: int
    old: TupleData
    old_kind: Literal["K", "O"]
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Truncate:
    relation_ids: tuple[int, ...]
    cascade: bool
    restart_identity: bool
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """A ``pg_logical_emit_message()`` call (sent only with the ``messages`` option)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class StreamStart:
    xid: int
    first_segment: bool


@dataclass(frozen=True, slots=True)
class StreamStop:
    pass


@dataclass(frozen=True, slots=True)
class StreamCommit:
    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: datetime


@dataclass(frozen=True, slots=True)
class StreamAbort:
    """Discard the streamed changes of ``subxid`` (all of ``xid`` when they are equal)."""

    xid: int
    subxid: int


Message: TypeAlias = (
    Begin
    | Commit
    | Origin
    | Relation
    | Type
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
)


class RelationCache:
    """The latest :class:`Relation` per relation id, to interpret row messages."""

    __slots__ = ("_relations",)

    def __init__(self) -> None:
        self._relations: dict[int, Relation] = {}

    def add(self, rel: Relation) -> None:
        self._relations[rel.relation_id] = rel

    def get(self, relation_id: int) -> Relation:
        try:
            return self._relations[relation_id]
        except KeyError:
            raise DecodeError(
                f"unknown relation id {relation_id}: a Relation message must come first"
            ) from None

    def __contains__(self, relation_id: object) -> bool:
        return relation_id in self._relations

    def __len__(self) -> int:
        return len(self._relations)


# --- decoding ------------------------------------------------------------------------

_Buffer: TypeAlias = bytes | memoryview

_U32 = struct.Struct(">I")
_TYPE_OID_MOD = struct.Struct(">Ii")
_U16 = struct.Struct(">H")
_REL_KIND = struct.Struct(">IB")  # relation id, tuple kind byte
_XID_REL_KIND = struct.Struct(">IIB")
_BEGIN = struct.Struct(">BQqI")
_COMMIT = struct.Struct(">BBQQq")
_ORIGIN = struct.Struct(">BQ")
_STREAM_START = struct.Struct(">BIB")
_STREAM_COMMIT = struct.Struct(">BIBQQq")
_STREAM_ABORT = struct.Struct(">BII")
# PostgreSQL 16+ appends abort_lsn and abort_ts when streaming=parallel (protocol 4).
_STREAM_ABORT_PARALLEL_SIZE = _STREAM_ABORT.size + 16
_TRUNCATE_HEAD = struct.Struct(">IB")
_MESSAGE_HEAD = struct.Struct(">BQ")

_TUPLE_NEW = 0x4E  # N
_TUPLE_KEY = 0x4B  # K
_TUPLE_OLD = 0x4F  # O

_TRUNCATE_CASCADE = 1
_TRUNCATE_RESTART_IDENTITY = 2
_MESSAGE_TRANSACTIONAL = 1
_COLUMN_IS_KEY = 1

# Below this size a memoryview is copied once into bytes: bytes slicing and .decode() are
# faster than memoryview slices for small values. Above it the copy would cost more than
# it saves, and huge TOAST values are decoded straight out of the caller's buffer.
_COPY_BELOW = 64 * 1024

_UNSUPPORTED_TAGS = {
    0x62: "Begin Prepare",  # b
    0x50: "Prepare",  # P
    0x4B: "Commit Prepared",  # K
    0x72: "Rollback Prepared",  # r
    0x70: "Stream Prepare",  # p
}


def _fail(name: str, offset: int, problem: str) -> NoReturn:
    raise DecodeError(f"malformed pgoutput {name} message at byte offset {offset}: {problem}")


def _kind_repr(kind: int) -> str:
    return repr(bytes((kind,)))


def _check_size(buf: _Buffer, name: str, expected: int) -> None:
    size = len(buf)
    if size < expected:
        _fail(name, size, f"truncated: the message needs {expected} bytes but has {size}")
    if size > expected:
        _fail(name, expected, f"{size - expected} unexpected trailing bytes")


def _check_end(buf: _Buffer, name: str, offset: int) -> None:
    if offset != len(buf):
        _fail(name, offset, f"{len(buf) - offset} unexpected trailing bytes")


def _timestamp(microseconds: int, name: str, offset: int) -> datetime:
    try:
        return PG_EPOCH + timedelta(microseconds=microseconds)
    except OverflowError:
        _fail(name, offset, f"timestamp {microseconds} is outside the years 1 to 9999")


def _read_xid(buf: _Buffer, name: str) -> int:
    if len(buf) < 5:
        _fail(name, len(buf), "truncated in the xid that streamed messages carry")
    xid: int = _U32.unpack_from(buf, 1)[0]
    return xid


def _read_string(buf: bytes, offset: int, name: str, field: str) -> tuple[str, int]:
    nul = buf.find(b"\x00", offset)
    if nul < 0:
        _fail(name, offset, f"{field} string has no NUL terminator")
    try:
        return buf[offset:nul].decode(), nul + 1
    except UnicodeDecodeError as e:
        _fail(name, offset + e.start, f"{field} is not valid UTF-8 ({e.reason})")


def _read_tuple(buf: _Buffer, offset: int, name: str) -> tuple[TupleData, int]:
    end = len(buf)
    if offset + 2 > end:
        _fail(name, offset, "truncated in the tuple's column count")
    ncols: int = _U16.unpack_from(buf, offset)[0]
    offset += 2
    # Every column takes at least its kind byte, so a corrupt count fails here, before any
    # work, instead of after a long loop.
    if ncols > end - offset:
        _fail(
            name, offset - 2, f"tuple claims {ncols} columns but only {end - offset} bytes remain"
        )
    values: list[str | bytes | UnchangedToast | None] = []
    append = values.append
    unpack_len = _U32.unpack_from
    # bytes.decode() beats str(view, "utf-8") by ~60 ns a value; views only reach here
    # for huge messages (see _COPY_BELOW).
    is_bytes = type(buf) is bytes
    i = 0
    start = offset
    # Reads past the end surface as IndexError/struct.error instead of being tested before
    # every byte; the handlers turn them into a DecodeError for the column at `offset`.
    try:
        for i in range(ncols):
            kind = buf[offset]
            if kind == 0x74:  # t: text
                start = offset + 5
                stop = start + unpack_len(buf, offset + 1)[0]
                if stop > end:
                    _fail(name, offset + 1, _overrun(i, start, stop, end))
                chunk = buf[start:stop]
                append(chunk.decode() if is_bytes else str(chunk, "utf-8"))  # type: ignore[union-attr]
                offset = stop
            elif kind == 0x6E:  # n: NULL
                append(None)
                offset += 1
            elif kind == 0x75:  # u: unchanged TOAST
                append(UNCHANGED_TOAST)
                offset += 1
            elif kind == 0x62:  # b: binary
                start = offset + 5
                stop = start + unpack_len(buf, offset + 1)[0]
                if stop > end:
                    _fail(name, offset + 1, _overrun(i, start, stop, end))
                append(bytes(buf[start:stop]))
                offset = stop
            else:
                _fail(
                    name,
                    offset,
                    f"column {i} has unknown kind {_kind_repr(kind)} (expected n, u, t or b)",
                )
    except (IndexError, struct.error):
        _fail(name, end, f"truncated in column {i} of {ncols}, which starts at offset {offset}")
    except UnicodeDecodeError as e:
        _fail(name, start + e.start, f"column {i} text value is not valid UTF-8 ({e.reason})")
    return tuple(values), offset


def _overrun(column: int, start: int, stop: int, end: int) -> str:
    return f"column {column} claims {stop - start} bytes but only {max(end - start, 0)} remain"


def _decode_begin(buf: _Buffer, in_stream: bool) -> Begin:
    _check_size(buf, "Begin", _BEGIN.size)
    _, final_lsn, ts, xid = _BEGIN.unpack_from(buf)
    return Begin(final_lsn, _timestamp(ts, "Begin", 9), xid)


def _decode_commit(buf: _Buffer, in_stream: bool) -> Commit:
    _check_size(buf, "Commit", _COMMIT.size)
    _, flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(buf)
    return Commit(flags, commit_lsn, end_lsn, _timestamp(ts, "Commit", 18))


def _decode_origin(buf: _Buffer, in_stream: bool) -> Origin:
    buf = bytes(buf)
    if len(buf) < _ORIGIN.size:
        _fail("Origin", len(buf), "truncated in the commit LSN")
    commit_lsn = _ORIGIN.unpack_from(buf)[1]
    name, offset = _read_string(buf, _ORIGIN.size, "Origin", "origin name")
    _check_end(buf, "Origin", offset)
    return Origin(commit_lsn, name)


def _decode_relation(buf: _Buffer, in_stream: bool) -> Relation:
    buf = bytes(buf)
    name = "Relation"
    end = len(buf)
    xid = _read_xid(buf, name) if in_stream else None
    offset = 5 if in_stream else 1
    if offset + 4 > end:
        _fail(name, offset, "truncated in the relation id")
    relation_id: int = _U32.unpack_from(buf, offset)[0]
    namespace, offset = _read_string(buf, offset + 4, name, "namespace")
    rel_name, offset = _read_string(buf, offset, name, "relation name")
    if offset + 3 > end:
        _fail(name, offset, "truncated in the replica identity or column count")
    identity = chr(buf[offset])
    if identity not in "dnfi":
        _fail(name, offset, f"unknown replica identity {identity!r} (expected d, n, f or i)")
    ncols: int = _U16.unpack_from(buf, offset + 1)[0]
    offset += 3
    # flags(1) + name(>=1) + type oid(4) + type modifier(4) per column.
    if ncols * 10 > end - offset:
        _fail(name, offset - 2, f"claims {ncols} columns but only {end - offset} bytes remain")
    columns = []
    for i in range(ncols):
        if offset >= end:
            _fail(name, offset, f"truncated before column {i} of {ncols}")
        flags = buf[offset]
        if flags & ~_COLUMN_IS_KEY:
            _fail(name, offset, f"column {i} has unknown flags {flags:#x}")
        col_name, offset = _read_string(buf, offset + 1, name, f"column {i} name")
        if offset + 8 > end:
            _fail(name, offset, f"truncated in the type of column {i}")
        type_oid, type_modifier = _TYPE_OID_MOD.unpack_from(buf, offset)
        offset += 8
        columns.append(RelationColumn(col_name, type_oid, type_modifier, flags == _COLUMN_IS_KEY))
    _check_end(buf, name, offset)
    return Relation(relation_id, namespace, rel_name, identity, tuple(columns), xid)


def _decode_type(buf: _Buffer, in_stream: bool) -> Type:
    buf = bytes(buf)
    name = "Type"
    xid = _read_xid(buf, name) if in_stream else None
    offset = 5 if in_stream else 1
    if offset + 4 > len(buf):
        _fail(name, offset, "truncated in the type OID")
    type_oid: int = _U32.unpack_from(buf, offset)[0]
    namespace, offset = _read_string(buf, offset + 4, name, "namespace")
    type_name, offset = _read_string(buf, offset, name, "type name")
    _check_end(buf, name, offset)
    return Type(type_oid, namespace, type_name, xid)


def _read_row_header(buf: _Buffer, in_stream: bool, name: str) -> tuple[int | None, int, int, int]:
    """Return (xid, relation id, tuple kind byte, offset after them)."""
    if in_stream:
        if len(buf) < 10:
            _fail(name, len(buf), "truncated in the xid, relation id or tuple kind")
        xid, relation_id, kind = _XID_REL_KIND.unpack_from(buf, 1)
        return xid, relation_id, kind, 10
    if len(buf) < 6:
        _fail(name, len(buf), "truncated in the relation id or tuple kind")
    relation_id, kind = _REL_KIND.unpack_from(buf, 1)
    return None, relation_id, kind, 6


def _decode_insert(buf: _Buffer, in_stream: bool) -> Insert:
    # Inlines _read_row_header for the common non-streamed case: Insert is the hot path.
    if not in_stream and len(buf) >= 6:
        relation_id, kind = _REL_KIND.unpack_from(buf, 1)
        xid = None
        offset = 6
    else:
        xid, relation_id, kind, offset = _read_row_header(buf, in_stream, "Insert")
    if kind != _TUPLE_NEW:
        _fail("Insert", offset - 1, f"expected b'N' before the new tuple, got {_kind_repr(kind)}")
    new, offset = _read_tuple(buf, offset, "Insert")
    if offset != len(buf):
        _check_end(buf, "Insert", offset)
    return Insert(relation_id, new, xid)


def _decode_update(buf: _Buffer, in_stream: bool) -> Update:
    name = "Update"
    xid, relation_id, kind, offset = _read_row_header(buf, in_stream, name)
    old: TupleData | None = None
    old_kind: Literal["K", "O"] | None = None
    if kind in (_TUPLE_KEY, _TUPLE_OLD):
        old_kind = "K" if kind == _TUPLE_KEY else "O"
        old, offset = _read_tuple(buf, offset, name)
        if offset >= len(buf):
            _fail(name, offset, "truncated before the new tuple")
        kind = buf[offset]
        offset += 1
        if kind != _TUPLE_NEW:
            _fail(name, offset - 1, f"expected b'N' after the old tuple, got {_kind_repr(kind)}")
    elif kind != _TUPLE_NEW:
        _fail(name, offset - 1, f"expected b'K', b'O' or b'N', got {_kind_repr(kind)}")
    new, offset = _read_tuple(buf, offset, name)
    _check_end(buf, name, offset)
    return Update(relation_id, new, old, old_kind, xid)


def _decode_delete(buf: _Buffer, in_stream: bool) -> Delete:
    name = "Delete"
    xid, relation_id, kind, offset = _read_row_header(buf, in_stream, name)
    if kind == _TUPLE_KEY:
        old_kind: Literal["K", "O"] = "K"
    elif kind == _TUPLE_OLD:
        old_kind = "O"
    else:
        _fail(
            name, offset - 1, f"expected b'K' or b'O' before the old tuple, got {_kind_repr(kind)}"
        )
    old, offset = _read_tuple(buf, offset, name)
    _check_end(buf, name, offset)
    return Delete(relation_id, old, old_kind, xid)


def _decode_truncate(buf: _Buffer, in_stream: bool) -> Truncate:
    name = "Truncate"
    end = len(buf)
    xid = _read_xid(buf, name) if in_stream else None
    offset = 5 if in_stream else 1
    if offset + 5 > end:
        _fail(name, offset, "truncated in the relation count or options")
    count, options = _TRUNCATE_HEAD.unpack_from(buf, offset)
    offset += 5
    if options & ~(_TRUNCATE_CASCADE | _TRUNCATE_RESTART_IDENTITY):
        _fail(name, offset - 1, f"unknown option bits {options:#x}")
    if count * 4 != end - offset:
        _fail(name, offset - 5, f"claims {count} relation ids but {end - offset} bytes follow")
    relation_ids = struct.unpack_from(f">{count}I", buf, offset)
    return Truncate(
        relation_ids,
        bool(options & _TRUNCATE_CASCADE),
        bool(options & _TRUNCATE_RESTART_IDENTITY),
        xid,
    )


def _decode_message(buf: _Buffer, in_stream: bool) -> LogicalMessage:
    buf = bytes(buf)
    name = "LogicalMessage"
    end = len(buf)
    xid = _read_xid(buf, name) if in_stream else None
    offset = 5 if in_stream else 1
    if offset + 9 > end:
        _fail(name, offset, "truncated in the flags or LSN")
    flags, lsn = _MESSAGE_HEAD.unpack_from(buf, offset)
    if flags & ~_MESSAGE_TRANSACTIONAL:
        _fail(name, offset, f"unknown flags {flags:#x}")
    prefix, offset = _read_string(buf, offset + 9, name, "prefix")
    if offset + 4 > end:
        _fail(name, offset, "truncated in the content length")
    length: int = _U32.unpack_from(buf, offset)[0]
    offset += 4
    if length != end - offset:
        _fail(name, offset - 4, f"content length is {length} but {end - offset} bytes follow")
    return LogicalMessage(flags == _MESSAGE_TRANSACTIONAL, lsn, prefix, buf[offset:], xid)


def _decode_stream_start(buf: _Buffer, in_stream: bool) -> StreamStart:
    _check_size(buf, "Stream Start", _STREAM_START.size)
    _, xid, first = _STREAM_START.unpack_from(buf)
    if first > 1:
        _fail("Stream Start", 5, f"first-segment flag is {first}, expected 0 or 1")
    return StreamStart(xid, first == 1)


_STREAM_STOP = StreamStop()


def _decode_stream_stop(buf: _Buffer, in_stream: bool) -> StreamStop:
    _check_size(buf, "Stream Stop", 1)
    return _STREAM_STOP


def _decode_stream_commit(buf: _Buffer, in_stream: bool) -> StreamCommit:
    _check_size(buf, "Stream Commit", _STREAM_COMMIT.size)
    _, xid, flags, commit_lsn, end_lsn, ts = _STREAM_COMMIT.unpack_from(buf)
    return StreamCommit(xid, flags, commit_lsn, end_lsn, _timestamp(ts, "Stream Commit", 22))


def _decode_stream_abort(buf: _Buffer, in_stream: bool) -> StreamAbort:
    # The parallel-apply abort_lsn/abort_ts tail is dropped: nothing downstream needs it.
    if len(buf) != _STREAM_ABORT_PARALLEL_SIZE:
        _check_size(buf, "Stream Abort", _STREAM_ABORT.size)
    _, xid, subxid = _STREAM_ABORT.unpack_from(buf)
    return StreamAbort(xid, subxid)


_DECODERS: dict[int, Callable[[_Buffer, bool], Message]] = {
    ord("B"): _decode_begin,
    ord("C"): _decode_commit,
    ord("O"): _decode_origin,
    ord("R"): _decode_relation,
    ord("Y"): _decode_type,
    ord("I"): _decode_insert,
    ord("U"): _decode_update,
    ord("D"): _decode_delete,
    ord("T"): _decode_truncate,
    ord("M"): _decode_message,
    ord("S"): _decode_stream_start,
    ord("E"): _decode_stream_stop,
    ord("c"): _decode_stream_commit,
    ord("A"): _decode_stream_abort,
}


def decode_message(data: bytes | bytearray | memoryview, *, in_stream: bool = False) -> Message:
    """Decode one pgoutput message.

    ``in_stream`` must be true between a StreamStart and its StreamStop (protocol 2),
    where row and schema messages carry a transaction id.

    Raises:
        DecodeError: the bytes are not a valid message; the text names the message
            type, the byte offset and the problem.
    """
    if type(data) is not bytes:
        if isinstance(data, memoryview):
            if data.nbytes < _COPY_BELOW or not data.c_contiguous:
                data = data.tobytes()
            elif data.format != "B" or data.ndim != 1:
                data = data.cast("B")
        elif isinstance(data, bytearray):
            data = bytes(data)
        else:
            raise TypeError(
                f"pgoutput message must be bytes or memoryview, not {type(data).__name__}"
            )
    if not data:
        raise DecodeError("empty pgoutput message at byte offset 0: expected a message tag")
    tag = data[0]
    decoder = _DECODERS.get(tag)
    if decoder is None:
        unsupported = _UNSUPPORTED_TAGS.get(tag)
        if unsupported is not None:
            raise DecodeError(
                f"unsupported pgoutput message {unsupported} (tag {_kind_repr(tag)}) at byte "
                "offset 0: two-phase commit needs protocol version 3, this decoder supports 1 and 2"
            )
        raise DecodeError(f"unknown pgoutput message tag {_kind_repr(tag)} at byte offset 0")
    return decoder(data, in_stream)
