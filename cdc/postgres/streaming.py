"""Streaming: reads the slot through a replication connection and yields change events.

The loop here is the IO half; frames are parsed by :mod:`cdc.postgres.protocol.walproto`, messages decoded by
:mod:`cdc.postgres.protocol.pgoutput` and turned into events by :class:`cdc.postgres.protocol.assembler.ChangeAssembler`.

The server must hear from us: it asks for a reply in keepalives and drops connections that
stay silent longer than ``wal_sender_timeout`` (60 s by default), so status updates go out
on request and every ``status_interval`` seconds even while the sink is busy elsewhere.

On PostgreSQL 14+ replication uses pgoutput protocol version 2 with ``streaming 'on'``, so
the server does not have to decode a huge transaction whole before sending it. Its
in-progress blocks are spilled to disk by :class:`cdc.postgres.stream_spill.StreamedTransactions`
and replayed at ``StreamCommit`` as if the transaction had arrived whole, a bounded number
of items per :meth:`StreamingSource.read`, so memory does not grow with the transaction.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from os import PathLike
from typing import Any

from cdc.core.errors import DecodeError
from cdc.core.events import ChangeEvent
from cdc.core.position import CapturePosition
from cdc.postgres.columnar import ChangeBatch, ColumnarDecoder
from cdc.postgres.protocol import pgoutput
from cdc.postgres.protocol.assembler import ChangeAssembler, Describe, TransactionCommitted
from cdc.postgres.protocol.walproto import PrimaryKeepalive, parse_copy_frame, xlogdata_split
from cdc.postgres.replication import ReplicationConnection
from cdc.postgres.stream_spill import (
    CHANGE_TAGS,
    RawReplayed,
    RecordReader,
    SpillChunk,
    StreamedTransactions,
)

#: ChangeBatch only in columnar mode (see StreamingSource).
StreamItem = ChangeEvent | TransactionCommitted | ChangeBatch

# Bytes the in-stream form adds after the tag (the xid).
_XID_FIELD = 4

# Where the pgoutput message starts in an XLogData frame ("w", three Int64).
_XLOGDATA_HEADER = 25

# Bytes of spill records gathered in memory before they are written out.
_SPILL_CHUNK = 1 << 20

#: Columnar mode: how long a read waits for more rows once it has some, so batches are
#: not cut into slivers while the server is sending (adds at most this to the latency).
COALESCE_SECONDS = 0.002
#: ... and gathers for at most this long in all, however steadily rows trickle in.
COALESCE_BUDGET = 0.02
#: Rows of many tables: each table's rows become a batch of their own, at ~0.1 ms of Arrow
#: calls per batch (typing, the sink's bookkeeping) whatever its size. Gathering this long
#: per table with rows (up to COALESCE_MAX_BUDGET), across pauses of up to a quarter of
#: that, keeps those calls to about a tenth of the time. 300 busy tables: batches of 0.25 s
#: instead of one per source transaction (benchmarks/many_tables.py).
COALESCE_PER_TABLE = 0.001
COALESCE_MAX_BUDGET = 0.25


def gathering_wait(gathered_for: float, *, tables: int) -> float:
    """How long a columnar read waits for the next frame when it has rows of ``tables``
    tables and has been gathering for ``gathered_for`` seconds (0: return them now).

    Example:
        >>> gathering_wait(0.0, tables=1)  # one table: short pauses, a short budget
        0.002
        >>> gathering_wait(0.0, tables=300)  # many: a quarter of the longest budget
        0.0625
        >>> gathering_wait(0.25, tables=300)
        0.0
    """
    budget = min(COALESCE_MAX_BUDGET, tables * COALESCE_PER_TABLE)
    gap = COALESCE_SECONDS
    if budget > COALESCE_BUDGET:
        gap = budget / 4  # bridges the pauses between source transactions
    else:
        budget = COALESCE_BUDGET
    left = budget - gathered_for
    return min(gap, left) if left > 0 else 0.0


#: Logical messages with this prefix are the pipeline's own (heartbeats, signals).
MESSAGE_PREFIX = "cdc-"


class StreamingSource:
    """Change events from one slot, resuming at the slot's confirmed position.

    Hazard: streamed transactions occupy disk under ``spill_dir`` (default: the system
    temporary directory) until they end; see :mod:`cdc.postgres.stream_spill`.

    ``columnar=True`` (needs the compiled decoder, :mod:`cdc.postgres.protocol.compiled`):
    plain inserts, updates and deletes come as :class:`~cdc.postgres.columnar.ChangeBatch`
    items, per table in stream order with the events the other messages still produce;
    ``max_items`` then bounds the rows of the batches too. Switch it with
    :meth:`set_columnar` between reads.

    Example:
        >>> source = StreamingSource(dsn, slot="shop", publication="shop",
        ...                          position=CapturePosition("shop"))  # doctest: +SKIP
        >>> source.start()  # doctest: +SKIP
        >>> items = source.read(timeout=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        dsn: str,
        *,
        slot: str,
        publication: str,
        position: CapturePosition,
        describe: Describe | None = None,
        status_interval: float = 10.0,
        max_items: int = 5000,
        spill_dir: str | PathLike[str] | None = None,
        stream_in_progress: bool | None = None,
        columnar: bool = False,
    ) -> None:
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        self.position = position
        self.assembler = ChangeAssembler(describe)
        self.status_interval = status_interval
        self.max_items = max_items
        self.streams = StreamedTransactions(spill_dir)
        # None: whenever the server can (see ReplicationConnection.start_replication).
        self.stream_in_progress = stream_in_progress
        self._conn: ReplicationConnection | None = None
        #: Non-transactional logical messages whose prefix starts with ``cdc-`` (heartbeats,
        #: signals), in arrival order; the consumer takes them out.
        self.messages: list[pgoutput.LogicalMessage] = []
        self._message_end = 0
        self._last_status = 0.0
        # The streamed transaction being handed on after its StreamCommit; no frame is read
        # until it is exhausted, because everything after the commit must follow it.
        self._replay: Generator[RawReplayed, None, None] | None = None
        self._records = RecordReader()  # the spill piece being replayed (columnar mode)
        self._columns: ColumnarDecoder | None = None
        self.set_columnar(columnar)

    @property
    def columnar(self) -> bool:
        return self._columns is not None

    def set_columnar(self, on: bool) -> None:
        """Hand on row changes as batches (True) or one event each (False), from the next
        read on. Nothing stays buffered between reads, so it may change at any time."""
        if on == (self._columns is not None):
            return
        if on:
            self._columns = ColumnarDecoder(self.assembler)
        else:
            assert self._columns is not None
            self._columns.release()
            self._columns = None

    @property
    def in_transaction(self) -> bool:
        """A transaction's changes are partly handed on: its commit is not yet returned.

        Streamed transactions that are still open do not count: none of their changes has
        been handed on (they wait in the spill), and the server sends them again in full
        after a restart.
        """
        return self.assembler.in_transaction or self._replay is not None

    def start(self, conn: ReplicationConnection | None = None) -> None:
        """Start streaming, on ``conn`` if given (the one that created the slot)."""
        self.close()
        self._conn = conn or ReplicationConnection(self.dsn)
        # A transaction cut off by a lost connection is sent again from its beginning, and
        # so is every streamed one that had not ended (close() dropped their spills).
        self.assembler.reset_transaction()
        if self._columns is not None:
            self._columns.reset()
        self._message_end = 0  # it may cover items the lost connection took with it
        self._conn.start_replication(
            self.slot, self.publication, stream_in_progress=self.stream_in_progress
        )
        self._last_status = time.monotonic()

    def read(self, timeout: float) -> list[StreamItem]:
        """Items from the frames that arrive within ``timeout`` seconds (at most ``max_items``).

        Returns as soon as something arrived and the socket has nothing more buffered. The
        position advances only when the items are returned: if the connection drops
        mid-read, the decoded items are lost with it, and so must be their LSNs, or they
        would be confirmed without ever reaching the sink.

        A streamed transaction is handed on after its StreamCommit, read back from its
        spill file over as many calls as it takes; no frame is read meanwhile, since
        whatever the server sent after the commit must come after it.
        """
        if self._conn is None:
            raise RuntimeError("start() first")
        items: list[StreamItem] = []
        received = committed = wal_end = 0
        deadline = time.monotonic() + timeout
        columns = self._columns
        builder: Any = columns.builder if columns is not None else None
        streams = self.streams
        max_items = self.max_items
        conn = self._conn
        pending = 0
        gathering_since: float | None = None
        while len(items) + pending < max_items:
            if self._replay is not None:
                committed = max(committed, self._drain_replay(items))
                pending = columns.pending if columns is not None else 0
                continue
            code = 0
            frame = None
            fast = builder is not None and not streams.in_stream
            if builder is not None and streams.in_stream:
                # A streamed transaction: its changes go to the spill file in bulk.
                records = bytearray()
                frame, count = conn.spill_buffered_changes(builder, records, _SPILL_CHUNK)
                if count:
                    streams.append_records(records, count)
                    received = max(received, builder.received)
                    if frame is None:
                        continue
            elif fast:
                # The fast path: row changes libpq already holds go straight from their
                # frames into the columns, without a Python step per change.
                frame = conn.read_buffered_rows(builder, max_items - len(items))
                pending = builder.pending
                if frame is not None:
                    code = builder.code
                elif len(items) + pending >= max_items:
                    break
            if frame is None:
                if not (items or pending):
                    wait = max(0.0, deadline - time.monotonic())
                elif fast and pending < max_items // 2:
                    # A batch costs ~0.1 ms of Arrow calls whatever its size: while rows
                    # keep arriving, gather more of them instead of returning a few, for
                    # at most COALESCE_BUDGET after the first (longer for many tables).
                    now = time.monotonic()
                    if gathering_since is None:
                        gathering_since = now
                    wait = gathering_wait(
                        now - gathering_since, tables=len(builder.pending_relations())
                    )
                else:
                    wait = 0.0
                frame = conn.read_frame(wait)
                if frame is None:
                    break
                if fast:
                    code = builder.feed(frame, _XLOGDATA_HEADER, False)
                    if code > 0:
                        pending = code
                        continue
            xlogdata = xlogdata_split(frame)
            if xlogdata is None:
                keepalive = parse_copy_frame(frame)
                assert isinstance(keepalive, PrimaryKeepalive)
                wal_end = max(wal_end, keepalive.wal_end)
                if keepalive.reply_requested:
                    self.send_status()
                continue
            data_start, payload = xlogdata
            if data_start > received:
                received = data_start
            produced = self._receive(payload, data_start, code)
            for item in produced:
                if isinstance(item, TransactionCommitted):
                    committed = item.end_lsn
            items.extend(produced)
            if columns is not None:
                pending = columns.pending
        if columns is not None:
            items.extend(columns.cut_all())
            received = max(received, builder.received)
        position = self.position
        position.received_lsn = max(position.received_lsn, received)
        position.committed_lsn = max(position.committed_lsn, committed)
        position.server_wal_end = max(position.server_wal_end, wal_end, self._message_end)
        if time.monotonic() - self._last_status >= self.status_interval:
            self.send_status()
        return items

    def _receive(
        self, payload: bytes | memoryview, lsn: int, code: int = 0
    ) -> Sequence[StreamItem]:
        """Items produced by one pgoutput message (none while a transaction is streamed).

        ``code``: what the compiled builder answered for it (columnar mode)."""
        streams = self.streams
        columns = self._columns
        if streams.in_stream and payload and payload[0] in CHANGE_TAGS:
            # Most of a streamed transaction: decoded once, when it is replayed.
            streams.append_change(payload, lsn)
            return []
        message = pgoutput.decode_message(payload, in_stream=streams.in_stream)
        if streams.in_stream:
            if isinstance(message, pgoutput.StreamStop):
                streams.stop()
                return []
            streams.append(message, payload, lsn)
            if isinstance(message, pgoutput.Relation | pgoutput.Type):
                # Into the cache at once as well: the server assumes the client knows a
                # shape from the moment it sent it. Its replay at commit is harmless, and
                # needed in case another transaction's Relation replaced it meanwhile.
                cut: list[StreamItem] = []
                if columns is not None and isinstance(message, pgoutput.Relation):
                    columns.relation(message.relation_id, cut)  # rows of the old shape
                self.assembler.feed(message, lsn=lsn)
                return cut
            return []
        if isinstance(message, pgoutput.StreamStart):
            if self.assembler.in_transaction:
                raise DecodeError(
                    f"Stream Start for xid {message.xid} inside a transaction (no Commit)"
                )
            streams.start(message)
            return []
        if isinstance(message, pgoutput.StreamStop):
            streams.stop()  # outside a block: raises the DecodeError
        if isinstance(message, pgoutput.StreamAbort):
            streams.abort(message)
            return []
        if isinstance(message, pgoutput.StreamCommit):
            # Columnar mode reads the spilled bytes itself; the pure path decodes them.
            self._replay = (
                streams.commit_raw(message) if columns is not None else streams.commit(message)
            )
            return []
        if isinstance(message, pgoutput.LogicalMessage):
            if not message.transactional:
                # Decoded in WAL order outside any transaction: everything committed before
                # it has been sent, like a keepalive's WAL end.
                self._message_end = max(self._message_end, lsn)
                if message.prefix.startswith(MESSAGE_PREFIX):
                    self.messages.append(message)
            return []
        if columns is not None:
            if code < 0:  # a row change the builder needs help with
                return columns.not_taken(code, payload, lsn=lsn)
            return columns.feed_message(message, lsn=lsn, size=len(payload))
        return self.assembler.feed(message, lsn=lsn, size=len(payload))

    def _drain_replay(self, items: list[StreamItem]) -> int:
        """Move replayed items into ``items`` up to ``max_items``; the end LSN of a commit
        among them, else 0. Reading from disk a piece at a time keeps memory bounded
        whatever the size of the transaction."""
        replay = self._replay
        assert replay is not None
        if not self._drain_records(items):
            return 0
        committed = 0
        for message, lsn, size in replay:
            if isinstance(message, SpillChunk):
                self._records.add(message)
                if not self._drain_records(items):
                    return 0
                continue
            if isinstance(message, pgoutput.Commit):
                self._records.finish()
            items.extend(self._feed(message, lsn, size))
            if isinstance(message, pgoutput.Commit):
                committed = message.end_lsn
                break
            if len(items) + self._pending() >= self.max_items:
                return 0
        replay.close()  # the Commit was its last item; this deletes the spill file
        self._replay = None
        return committed

    def _drain_records(self, items: list[StreamItem]) -> bool:
        """Replay the records of the current spill piece; False when ``max_items`` stopped
        it (the rest waits for the next read)."""
        records = self._records
        columns = self._columns
        code = 0
        while True:
            if columns is not None:
                # Row changes straight from the file's bytes into the columns.
                builder = columns.builder
                pos, taken, status = builder.replay_records(
                    records.data, records.pos, records.aborted, self.max_items - len(items)
                )
                records.advance(pos, taken)
                if status == 2:
                    return False
                if status == 0:
                    return True
                code = builder.code
            record = records.next()
            if record is None:
                return True
            lsn, payload = record
            if columns is not None and payload[:1] in (b"I", b"U", b"D"):
                items.extend(columns.not_taken(code, payload, lsn=lsn, in_stream=True))
            else:
                message = pgoutput.decode_message(payload, in_stream=True)
                items.extend(self._feed(message, lsn, len(payload) - _XID_FIELD))
            if len(items) + self._pending() >= self.max_items:
                return False

    def _feed(self, message: pgoutput.Message, lsn: int, size: int) -> Sequence[StreamItem]:
        if self._columns is not None:
            return self._columns.feed_message(message, lsn=lsn, size=size)
        return self.assembler.feed(message, lsn=lsn, size=size)

    def _pending(self) -> int:
        return self._columns.pending if self._columns is not None else 0

    def confirm(self, flushed_lsn: int) -> None:
        """Everything up to ``flushed_lsn`` is durable downstream: tell the server."""
        if flushed_lsn > self.position.flushed_lsn:
            self.position.flushed_lsn = flushed_lsn
            self.send_status()

    def send_status(self, *, reply_requested: bool = False) -> None:
        """Report progress; ``reply_requested`` makes the server answer with a keepalive,
        whose WAL end says how far it has sent."""
        if self._conn is None:
            return
        position = self.position
        self._conn.send_status(
            write_lsn=max(position.received_lsn, position.flushed_lsn),
            flush_lsn=position.flushed_lsn,
            reply_requested=reply_requested,
        )
        self._last_status = time.monotonic()

    def close(self) -> None:
        """Close the connection and drop every streamed transaction and its spill file."""
        if self._replay is not None:
            # Closing the generator deletes its file.
            replay, self._replay = self._replay, None
            replay.close()
        self._records = RecordReader()
        self.streams.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
