"""Streaming: reads the slot through a replication connection and yields change events.

The loop here is the IO half; frames are parsed by :mod:`cdc.walproto`, messages decoded by
:mod:`cdc.pgoutput` and turned into events by :class:`cdc.assembler.ChangeAssembler`.

The server must hear from us: it asks for a reply in keepalives and drops connections that
stay silent longer than ``wal_sender_timeout`` (60 s by default), so status updates go out
on request and every ``status_interval`` seconds even while the sink is busy elsewhere.
"""

from __future__ import annotations

import time

from cdc import pgoutput
from cdc.assembler import ChangeAssembler, Describe, TransactionCommitted
from cdc.events import ChangeEvent
from cdc.position import CapturePosition
from cdc.replication import ReplicationConnection
from cdc.walproto import PrimaryKeepalive, parse_copy_frame

StreamItem = ChangeEvent | TransactionCommitted


class StreamingSource:
    """Change events from one slot, resuming at the slot's confirmed position.

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
    ) -> None:
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        self.position = position
        self.assembler = ChangeAssembler(describe)
        self.status_interval = status_interval
        self.max_items = max_items
        self._conn: ReplicationConnection | None = None
        self._last_status = 0.0

    @property
    def in_transaction(self) -> bool:
        return self.assembler.in_transaction

    def start(self, conn: ReplicationConnection | None = None) -> None:
        """Start streaming, on ``conn`` if given (the one that created the slot)."""
        self.close()
        self._conn = conn or ReplicationConnection(self.dsn)
        # A transaction cut off by a lost connection is sent again from its beginning.
        self.assembler.reset_transaction()
        self._conn.start_replication(self.slot, self.publication)
        self._last_status = time.monotonic()

    def read(self, timeout: float) -> list[StreamItem]:
        """Items from the frames that arrive within ``timeout`` seconds (at most ``max_items``).

        Returns as soon as something arrived and the socket has nothing more buffered. The
        position advances only when the items are returned: if the connection drops
        mid-read, the decoded items are lost with it, and so must be their LSNs, or they
        would be confirmed without ever reaching the sink.
        """
        if self._conn is None:
            raise RuntimeError("start() first")
        items: list[StreamItem] = []
        received = committed = wal_end = 0
        deadline = time.monotonic() + timeout
        while len(items) < self.max_items:
            wait = 0.0 if items else max(0.0, deadline - time.monotonic())
            frame = self._conn.read_frame(wait)
            if frame is None:
                break
            parsed = parse_copy_frame(frame)
            if isinstance(parsed, PrimaryKeepalive):
                wal_end = max(wal_end, parsed.wal_end)
                if parsed.reply_requested:
                    self.send_status()
                continue
            received = max(received, parsed.data_start)
            message = pgoutput.decode_message(parsed.payload)
            produced = self.assembler.feed(message, lsn=parsed.data_start, size=len(parsed.payload))
            for item in produced:
                if isinstance(item, TransactionCommitted):
                    committed = item.end_lsn
            items.extend(produced)
        position = self.position
        position.received_lsn = max(position.received_lsn, received)
        position.committed_lsn = max(position.committed_lsn, committed)
        position.server_wal_end = max(position.server_wal_end, wal_end)
        if time.monotonic() - self._last_status >= self.status_interval:
            self.send_status()
        return items

    def confirm(self, flushed_lsn: int) -> None:
        """Everything up to ``flushed_lsn`` is durable downstream: tell the server."""
        if flushed_lsn > self.position.flushed_lsn:
            self.position.flushed_lsn = flushed_lsn
            self.send_status()

    def send_status(self) -> None:
        if self._conn is None:
            return
        position = self.position
        self._conn.send_status(
            write_lsn=max(position.received_lsn, position.flushed_lsn),
            flush_lsn=position.flushed_lsn,
        )
        self._last_status = time.monotonic()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
