"""A stand-in for ReplicationConnection that plays scripted pgoutput messages."""

from __future__ import annotations

import struct
from collections import deque
from typing import Any


class ScriptedConnection:
    """Stands in for ReplicationConnection: sends pgoutput messages as XLogData frames, each
    at the next LSN (``0x100`` apart) unless one is given with it."""

    def __init__(self, next_lsn: int = 0x15A0000) -> None:
        self.frames: deque[bytes] = deque()
        self.next_lsn = next_lsn
        self.statuses: list[tuple[int, int]] = []

    def add(self, messages: list[bytes | tuple[bytes, int]]) -> list[int]:
        """Queue ``messages``; returns their LSNs."""
        lsns = []
        for item in messages:
            payload, lsn = item if isinstance(item, tuple) else (item, self.next_lsn)
            self.next_lsn = lsn + 0x100
            self.frames.append(b"w" + struct.pack(">QQq", lsn, lsn, 0) + payload)
            lsns.append(lsn)
        return lsns

    def start_replication(
        self, slot: str, publication: str, *, stream_in_progress: bool | None = None
    ) -> None:
        pass

    def read_frame(self, timeout: float) -> memoryview | None:
        return memoryview(self.frames.popleft()) if self.frames else None

    def get_copy_data(self, asynchronous: int) -> tuple[int, memoryview | bytes]:
        """psycopg's ``PGconn.get_copy_data``, as the compiled reader calls it."""
        if not self.frames:
            return 0, b""
        frame = self.frames.popleft()
        return len(frame), memoryview(frame)

    def read_buffered_rows(self, builder: Any, limit: int) -> memoryview | None:
        nbytes, data = builder.drain(self.get_copy_data, limit)
        return data if nbytes > 0 else None

    def spill_buffered_changes(
        self, builder: Any, out: bytearray, max_bytes: int
    ) -> tuple[memoryview | None, int]:
        nbytes, data, records = builder.drain_spill(self.get_copy_data, out, max_bytes)
        return (data if nbytes > 0 else None), records

    def send_status(self, *, write_lsn: int, flush_lsn: int, reply_requested: bool = False) -> None:
        self.statuses.append((write_lsn, flush_lsn))

    def close(self) -> None:
        pass
