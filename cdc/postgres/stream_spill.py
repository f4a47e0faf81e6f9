"""Streamed (in-progress) transactions of pgoutput protocol version 2, spilled to disk.

With ``streaming 'on'`` PostgreSQL 14+ sends a transaction that outgrows
``logical_decoding_work_mem`` before it commits, in blocks between ``StreamStart`` and
``StreamStop``, and ends it later with ``StreamCommit`` or ``StreamAbort``. Every changelog
row needs the commit LSN and commit time, which only ``StreamCommit`` tells, so nothing of
a streamed transaction can be handed on before it ends. Keeping it in memory would make
memory grow with the transaction, which is exactly what streaming is meant to avoid.

:class:`StreamedTransactions` therefore appends each in-stream message, as the raw bytes
the server sent, to one file per top-level transaction, and on ``StreamCommit`` replays the
file as if protocol version 1 had sent the transaction at its commit: a synthesized
``Begin``, the messages in their original order, then ``Commit``. Whatever consumes the
replay (:class:`cdc.postgres.protocol.assembler.ChangeAssembler`) cannot tell the two protocols apart, and
produces the same events with the same ``(commit LSN, seq)`` positions, so the sink's
deduplication works across a restart that switches between streamed and whole delivery.

Record format of a spill file, all integers big-endian::

    Int64 data_start   LSN of the XLogData frame that carried the message
    Int32 xid          the message's own xid: a subtransaction's xid for changes made in it
    Int32 length       of the payload
    Byte* payload      the pgoutput message exactly as received (in-stream form, with xid)

Aborts: ``StreamAbort`` with ``subxid == xid`` deletes the transaction's file. With a
subtransaction's xid it records that xid, and the replay skips its row changes: a
subtransaction can abort after later changes of other subtransactions were appended, so the
file cannot simply be cut back. ``Relation`` and ``Type`` messages are replayed even when
their subtransaction aborted: pgoutput sends a relation's shape once per streamed
transaction, whichever subtransaction needed it first, and later changes of surviving
subtransactions rely on it. A rolled-back DDL invalidates the shape on the server, which
then sends it again before the next change, so a replayed stale shape is always replaced
before it is used.

Hazards:

* Disk: every streamed transaction occupies about its wire size (plus 16 bytes per
  message) in the spill directory until it commits or aborts; the changes of aborted
  subtransactions stay until the whole transaction ends. The directory is a fresh
  ``cdc-stream-*`` directory under ``directory`` (default: :func:`tempfile.gettempdir`,
  i.e. ``$TMPDIR`` or ``/tmp``). On a tmpfs ``/tmp`` the spill lives in RAM, which defeats
  its purpose: point it at a real disk.
* A killed process (``kill -9``) leaves its ``cdc-stream-*`` directory behind. Nothing in
  it is needed after a restart, because PostgreSQL sends an unfinished transaction again
  from its beginning; delete such directories when no pipeline uses them.
* Memory stays bounded by the largest single message, and by one integer per aborted
  subtransaction of the open transactions.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import struct
import tempfile
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import IO, TypeAlias, cast

from cdc.core.errors import DecodeError
from cdc.core.lsn import format_lsn
from cdc.postgres.errors import StreamSpillError
from cdc.postgres.protocol import pgoutput

__all__ = [
    "CHANGE_TAGS",
    "RawReplayed",
    "RecordReader",
    "Replayed",
    "SpillChunk",
    "StreamSpillError",
    "StreamedTransactions",
]

log = logging.getLogger(__name__)

#: One replayed message with the ``lsn`` and ``size`` that ChangeAssembler.feed takes.
Replayed: TypeAlias = tuple[pgoutput.Message, int, int]


@dataclass(frozen=True, slots=True)
class SpillChunk:
    """A piece of a spill file as read (see :meth:`StreamedTransactions.commit_raw`): the
    records in it, the last one possibly cut off and continued in the next chunk."""

    data: bytes
    #: Subtransactions whose row changes the replay skips.
    aborted: frozenset[int]
    #: Records in the whole file, to check at the end that all were read.
    records: int


#: Like Replayed, but between the Begin and the Commit come the spill file's raw records,
#: for a decoder that reads the bytes itself (see StreamedTransactions.commit_raw).
RawReplayed: TypeAlias = tuple[pgoutput.Message | SpillChunk, int, int]

_RECORD = struct.Struct(">QII")  # data_start, xid, payload length
_XID_FIELD = 4  # bytes that the in-stream form adds after the tag
_XID = struct.Struct(">I")
#: Tags of the in-stream messages spilled undecoded (see StreamedTransactions.append_change).
CHANGE_TAGS = frozenset(b"IUDTM")

# Messages that describe shapes rather than change rows: replayed even when their
# subtransaction aborted (see the module docstring).
_SCHEMA_TAGS = frozenset(b"RY")

_SPILLED = (
    pgoutput.Relation,
    pgoutput.Type,
    pgoutput.Insert,
    pgoutput.Update,
    pgoutput.Delete,
    pgoutput.Truncate,
    pgoutput.LogicalMessage,
)

# Large writes and reads per system call; memory cost is one buffer per open file, and only
# the file of the current stream block (or of the replay) is open.
_BUFFER_SIZE = 1 << 20


@dataclass(slots=True)
class _Spill:
    """One open streamed transaction."""

    xid: int
    path: Path
    aborted_subxids: set[int] = field(default_factory=set)
    records: int = 0
    size: int = 0


class StreamedTransactions:
    """Spills the streamed transactions of one replication session and replays them at commit.

    Feed it the stream messages in the order they arrive: :meth:`start` and :meth:`stop`
    for ``StreamStart``/``StreamStop``, :meth:`append` for every message in between (decoded
    with ``in_stream=True``, see :attr:`in_stream`), :meth:`abort` and :meth:`commit` for
    ``StreamAbort``/``StreamCommit``. :meth:`commit` returns an iterator that reads the file
    back one record at a time; consume it fully (or close it) before the next stream
    message, since the server sends nothing else in between. After a lost connection call
    :meth:`discard_all`: the server sends unfinished transactions again.

    Example:
        >>> streams = StreamedTransactions()  # doctest: +SKIP
        >>> streams.start(StreamStart(745, first_segment=True))  # doctest: +SKIP
        >>> streams.append(insert, payload, lsn=0x16000)  # doctest: +SKIP
        >>> streams.stop()  # doctest: +SKIP
        >>> for message, lsn, size in streams.commit(stream_commit):  # doctest: +SKIP
        ...     assembler.feed(message, lsn=lsn, size=size)

    See the module docstring for the hazards, disk usage first.
    """

    def __init__(self, directory: str | PathLike[str] | None = None) -> None:
        self._parent = Path(directory) if directory is not None else None
        self._dir: Path | None = None  # created on the first streamed transaction
        self._open: dict[int, _Spill] = {}
        self._current: _Spill | None = None  # inside a StreamStart/StreamStop block
        self._writer: IO[bytes] | None = None
        self._next_file = 0

    # -- state ----------------------------------------------------------------------------

    @property
    def in_stream(self) -> bool:
        """True between StreamStart and StreamStop: decode with ``in_stream=True`` then."""
        return self._current is not None

    @property
    def open_xids(self) -> frozenset[int]:
        """Top-level xids of the streamed transactions that have not ended yet."""
        return frozenset(self._open)

    @property
    def spilled_bytes(self) -> int:
        """Bytes the open transactions occupy on disk."""
        return sum(spill.size for spill in self._open.values())

    @property
    def directory(self) -> Path | None:
        """The spill directory, once a transaction was streamed."""
        return self._dir

    # -- protocol ---------------------------------------------------------------------------

    def start(self, message: pgoutput.StreamStart) -> None:
        """A stream block of ``message.xid`` begins.

        Raises:
            DecodeError: a block is already open, or the first-segment flag contradicts
                what was received before (a first segment of an open transaction, or a
                later segment of one never started).
        """
        if self._current is not None:
            raise DecodeError(
                f"Stream Start for xid {message.xid} inside the stream block of xid "
                f"{self._current.xid} (no Stream Stop)"
            )
        spill = self._open.get(message.xid)
        if message.first_segment:
            if spill is not None:
                raise DecodeError(
                    f"Stream Start marks the first segment of xid {message.xid}, which was "
                    "already streamed"
                )
            spill = _Spill(message.xid, self._new_path(message.xid))
            self._open[message.xid] = spill
            log.debug("spilling streamed transaction %d to %s", message.xid, spill.path)
        elif spill is None:
            raise DecodeError(
                f"Stream Start continues xid {message.xid}, whose first segment never arrived"
            )
        self._writer = self._open_file(spill.path, "ab")
        self._current = spill

    def append(self, message: pgoutput.Message, payload: bytes | memoryview, lsn: int) -> None:
        """Spill ``message`` (decoded from ``payload``, which arrived at ``lsn``).

        ``Origin`` is dropped: it only names the upstream node of the transaction, which
        nothing downstream uses.

        Raises:
            DecodeError: not inside a stream block, or a message that never appears in one.
            StreamSpillError: the spill file could not be written.
        """
        spill = self._current
        if spill is None or self._writer is None:
            raise DecodeError(
                f"{type(message).__name__} carries a streamed xid outside a stream block"
            )
        if isinstance(message, pgoutput.Origin):
            return
        if not isinstance(message, _SPILLED) or message.xid is None:
            raise DecodeError(
                f"{type(message).__name__} inside the stream block of xid {spill.xid}"
            )
        self._write(spill, message.xid, payload, lsn)

    def append_change(self, payload: bytes | memoryview, lsn: int) -> None:
        """Spill an in-stream Insert, Update, Delete, Truncate or logical message without
        decoding it now: it is decoded once, at its replay, where a malformed one raises
        its :class:`~cdc.core.errors.DecodeError`. Its xid is read from its first bytes.

        Raises:
            DecodeError: not inside a stream block, or the message is too short for its xid.
            StreamSpillError: the spill file could not be written.
        """
        spill = self._current
        if spill is None or self._writer is None:
            raise DecodeError("a streamed change outside a stream block")
        if len(payload) < 1 + _XID_FIELD:
            raise DecodeError(
                f"malformed in-stream message at byte offset {len(payload)}: truncated in "
                "the xid that streamed messages carry"
            )
        self._write(spill, _XID.unpack_from(payload, 1)[0], payload, lsn)

    def append_records(self, records: bytes | bytearray | memoryview, count: int) -> None:
        """Spill ``count`` in-stream changes already in record form (the compiled reader's
        :meth:`ColumnBuilder.drain_spill <cdc.postgres.protocol.compiled.ColumnBuilder>`
        builds them), as :meth:`append_change` would one by one.

        Raises:
            DecodeError: not inside a stream block.
            StreamSpillError: the spill file could not be written.
        """
        spill = self._current
        if spill is None or self._writer is None:
            raise DecodeError("a streamed change outside a stream block")
        try:
            self._writer.write(records)
        except OSError as e:
            raise StreamSpillError(f"cannot spill streamed transaction {spill.xid}: {e}") from e
        spill.records += count
        spill.size += len(records)

    def _write(self, spill: _Spill, xid: int, payload: bytes | memoryview, lsn: int) -> None:
        assert self._writer is not None
        try:
            self._writer.write(_RECORD.pack(lsn, xid, len(payload)))
            self._writer.write(payload)
        except OSError as e:
            raise StreamSpillError(f"cannot spill streamed transaction {spill.xid}: {e}") from e
        spill.records += 1
        spill.size += _RECORD.size + len(payload)

    def stop(self) -> None:
        """The current stream block ends; its messages are flushed to the spill file.

        Raises:
            DecodeError: no block is open.
            StreamSpillError: the spill file could not be written.
        """
        if self._current is None:
            raise DecodeError("Stream Stop without a Stream Start")
        self._current = None
        self._close_writer()

    def abort(self, message: pgoutput.StreamAbort) -> None:
        """Drop the streamed transaction, or only the changes of an aborted subtransaction.

        An abort of a transaction (or subtransaction) with nothing spilled is a no-op, as in
        PostgreSQL's own apply worker: the server marks subtransactions as streamed even
        when the publication filtered all their changes out.

        Raises:
            DecodeError: inside a stream block (aborts arrive between blocks).
        """
        if self._current is not None:
            raise DecodeError(
                f"Stream Abort for xid {message.xid} inside the stream block of xid "
                f"{self._current.xid}"
            )
        spill = self._open.get(message.xid)
        if spill is None:
            return
        if message.subxid == message.xid:
            del self._open[message.xid]
            self._remove(spill.path)
            log.debug("streamed transaction %d aborted; dropped its spill", message.xid)
        else:
            spill.aborted_subxids.add(message.subxid)

    def commit(self, message: pgoutput.StreamCommit) -> Generator[Replayed, None, None]:
        """The transaction's messages as protocol 1 would have sent them, read from disk.

        Yields ``(message, lsn, size)``: a ``Begin`` carrying the commit LSN, time and xid,
        every spilled message in arrival order except row changes of aborted
        subtransactions, then a ``Commit``. ``size`` is the message's size in protocol 1
        (without the in-stream xid), so buffer accounting does not depend on the protocol.
        The file is deleted when the iterator is exhausted or closed.

        Raises:
            DecodeError: now, for a commit inside a stream block or of a transaction that
                was never streamed; while iterating, for a spilled message that does not
                decode.
            StreamSpillError: while iterating, the spill file could not be read.
        """
        self._check_commit(message)
        spill = self._open.pop(message.xid)
        return cast(Generator[Replayed, None, None], self._replay(spill, message, raw=False))

    def commit_raw(self, message: pgoutput.StreamCommit) -> Generator[RawReplayed, None, None]:
        """Like :meth:`commit`, but between the Begin and the Commit the file comes as it
        is, in :class:`SpillChunk` pieces of about 1 MiB, undecoded: for the compiled
        columnar decoder, which reads the records itself (frame them with
        :class:`RecordReader`). Nothing is decoded or skipped here."""
        self._check_commit(message)
        spill = self._open.pop(message.xid)
        return self._replay(spill, message, raw=True)

    def _check_commit(self, message: pgoutput.StreamCommit) -> None:
        if self._current is not None:
            raise DecodeError(
                f"Stream Commit for xid {message.xid} inside the stream block of xid "
                f"{self._current.xid}"
            )
        if message.xid not in self._open:
            raise DecodeError(
                f"Stream Commit for xid {message.xid}, which was never streamed "
                f"(commit LSN {format_lsn(message.commit_lsn)})"
            )

    def _replay(
        self, spill: _Spill, commit: pgoutput.StreamCommit, *, raw: bool
    ) -> Generator[RawReplayed, None, None]:
        try:
            yield (
                pgoutput.Begin(commit.commit_lsn, commit.commit_ts, commit.xid),
                commit.commit_lsn,
                0,
            )
            aborted = spill.aborted_subxids
            reader = self._open_file(spill.path, "rb")
            with reader:
                if raw:
                    frozen = frozenset(aborted)
                    while chunk := self._read(reader, spill):
                        yield SpillChunk(chunk, frozen, spill.records), 0, 0
                else:
                    for lsn, xid, payload in self._records(reader, spill):
                        if xid in aborted and payload[0] not in _SCHEMA_TAGS:
                            continue
                        decoded = pgoutput.decode_message(payload, in_stream=True)
                        yield decoded, lsn, len(payload) - _XID_FIELD
            yield (
                pgoutput.Commit(commit.flags, commit.commit_lsn, commit.end_lsn, commit.commit_ts),
                commit.end_lsn,
                0,
            )
        finally:
            self._remove(spill.path)

    @staticmethod
    def _read(reader: IO[bytes], spill: _Spill) -> bytes:
        try:
            return reader.read(_BUFFER_SIZE)
        except OSError as e:
            raise StreamSpillError(f"cannot read the spill of xid {spill.xid}: {e}") from e

    def _records(self, reader: IO[bytes], spill: _Spill) -> Iterator[tuple[int, int, bytes]]:
        header_size = _RECORD.size
        for index in range(spill.records):
            try:
                header = reader.read(header_size)
                if len(header) == header_size:
                    lsn, xid, length = _RECORD.unpack(header)
                    payload = reader.read(length)
                    if len(payload) == length:
                        yield lsn, xid, payload
                        continue
            except OSError as e:
                raise StreamSpillError(f"cannot read the spill of xid {spill.xid}: {e}") from e
            raise StreamSpillError(
                f"spill file {spill.path} of xid {spill.xid} ends in record {index} of "
                f"{spill.records}: it was truncated or removed while in use"
            )

    # -- files ------------------------------------------------------------------------------

    def discard_all(self) -> None:
        """Forget every streamed transaction (the connection was lost; the server resends)."""
        self._current = None
        self._close_writer(quiet=True)
        for spill in self._open.values():
            self._remove(spill.path)
        self._open.clear()

    def close(self) -> None:
        """Discard everything and remove the spill directory. The object stays usable."""
        self.discard_all()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> StreamedTransactions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _new_path(self, xid: int) -> Path:
        if self._dir is None or not self._dir.is_dir():
            try:
                self._dir = Path(tempfile.mkdtemp(prefix="cdc-stream-", dir=self._parent))
            except OSError as e:
                raise StreamSpillError(
                    f"cannot create a spill directory under "
                    f"{self._parent or tempfile.gettempdir()}: {e}"
                ) from e
        self._next_file += 1
        # A counter as well as the xid: a file of an earlier, already-ended transaction
        # with the same xid may still be open for replay.
        return self._dir / f"{xid}-{self._next_file}.spill"

    def _open_file(self, path: Path, mode: str) -> IO[bytes]:
        try:
            # Not a context manager: the writer stays open across messages of a block.
            return open(path, mode, buffering=_BUFFER_SIZE)
        except OSError as e:
            raise StreamSpillError(f"cannot open spill file {path}: {e}") from e

    def _close_writer(self, *, quiet: bool = False) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except OSError as e:
            if not quiet:
                raise StreamSpillError(f"cannot write spill file {writer.name}: {e}") from e

    @staticmethod
    def _remove(path: Path) -> None:
        # A file that cannot be removed only costs disk until close() removes the directory.
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


class RecordReader:
    """Frames the records of a raw replay's :class:`SpillChunk` pieces.

    :attr:`data` from :attr:`pos` on holds the records not yet taken (the last perhaps
    incomplete); a reader of the bytes itself moves :attr:`pos` with :meth:`advance`.
    """

    __slots__ = ("aborted", "data", "expected", "pos", "records")

    def __init__(self) -> None:
        self.data = b""
        self.pos = 0
        self.records = 0
        self.expected = 0
        self.aborted: frozenset[int] = frozenset()

    def add(self, chunk: SpillChunk) -> None:
        self.data = self.data[self.pos :] + chunk.data if self.pos < len(self.data) else chunk.data
        self.pos = 0
        self.aborted = chunk.aborted
        self.expected = chunk.records

    def advance(self, pos: int, records: int) -> None:
        self.pos = pos
        self.records += records

    def next(self) -> tuple[int, bytes] | None:
        """``(lsn, payload)`` of the next record to replay (skipping row changes of aborted
        subtransactions), or None when the data ends before a whole record."""
        data = self.data
        while True:
            pos = self.pos
            if pos + _RECORD.size > len(data):
                return None
            lsn, xid, length = _RECORD.unpack_from(data, pos)
            end = pos + _RECORD.size + length
            if end > len(data):
                return None
            payload = data[pos + _RECORD.size : end]
            self.pos = end
            self.records += 1
            if xid in self.aborted and payload[:1] not in (b"R", b"Y"):
                continue
            return lsn, payload

    def finish(self) -> None:
        """At the Commit: every record was read, none is left cut off.

        Raises:
            StreamSpillError: the file was truncated or changed while in use.
        """
        if self.pos != len(self.data) or self.records != self.expected:
            raise StreamSpillError(
                f"spill file ended after {self.records} of {self.expected} records "
                f"({len(self.data) - self.pos} bytes left over): it was truncated or "
                "removed while in use"
            )
        self.data = b""
        self.pos = self.records = 0
