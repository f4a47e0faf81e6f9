"""Where capture stands: one object shared by the snapshot and the streaming pieces.

The snapshot sets ``consistent_point`` and ``snapshot_done``; streaming advances
``received_lsn``, ``committed_lsn`` and ``flushed_lsn``. The slot-and-snapshot part is saved
by a position store (:class:`sinks.base.PositionStore`: in the lake, or in Kafka for ``cdc
capture``) so a restart knows whether an interrupted snapshot must be redone;
the LSNs are re-read from PostgreSQL (the slot) and Delta (the per-table watermarks)
instead, which are the sources of truth for them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class CapturePosition:
    """Progress of one pipeline.

    Attributes:
        slot: The replication slot this position belongs to.
        consistent_point: LSN where the slot's exported snapshot ends and streaming starts;
            ``None`` until the slot exists.
        snapshot_done: The initial snapshot is fully written (or was not wanted).
        received_lsn: Newest WAL position received from the server.
        committed_lsn: End LSN of the newest transaction whose changes are all in the sink.
        flushed_lsn: Newest LSN durable downstream and confirmed to PostgreSQL; the server
            may recycle WAL before it.
        server_wal_end: WAL end the server reported in its latest keepalive.
        snapshotted: Tables whose existing rows have been copied (``None`` for state written
            before this was recorded: then no table is re-copied on that account).
        pending_snapshots: Tables whose copy started but did not finish, with the LSN its
            rows are written at (``None`` until the temporary slot exists).
    """

    slot: str
    consistent_point: int | None = None
    snapshot_done: bool = False
    received_lsn: int = 0
    committed_lsn: int = 0
    flushed_lsn: int = 0
    server_wal_end: int = 0
    snapshotted: set[str] | None = None
    pending_snapshots: dict[str, int | None] = field(default_factory=dict)

    @property
    def snapshot_lsn(self) -> int:
        """The ``_cdc_lsn`` of snapshot rows: just below the consistent point.

        A transaction streamed by the slot may commit exactly at the consistent point, so
        snapshot rows take the LSN before it: they sort before every streamed change and
        never share an (lsn, seq) with one.
        """
        if self.consistent_point is None:
            raise ValueError("the slot has no consistent point yet")
        return self.consistent_point - 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "consistent_point": self.consistent_point,
            "snapshot_done": self.snapshot_done,
            "snapshotted": None if self.snapshotted is None else sorted(self.snapshotted),
            "pending_snapshots": self.pending_snapshots,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CapturePosition:
        return cls(
            slot=data["slot"],
            consistent_point=data.get("consistent_point"),
            snapshot_done=bool(data.get("snapshot_done")),
            snapshotted=None if data.get("snapshotted") is None else set(data["snapshotted"]),
            pending_snapshots=dict(data.get("pending_snapshots") or {}),
        )


class CommittedTransactions:
    """The transactions handed to a sink whose end is not confirmed yet, in commit order.

    A sink that commits each table on its own schedule holds some tables' rows while
    others are durable. It tells the smallest commit LSN it still holds
    (:meth:`sinks.base.Sink.pending_since`); every transaction that committed below it is
    durable in every table, so the end of the newest such one may be confirmed.

    Example:
        >>> done = CommittedTransactions()
        >>> done.add(100, 150); done.add(200, 250); done.add(300, 350)
        >>> done.durable_end(300)  # the transaction at 300 still has rows pending
        250
        >>> done.durable_end(300) is None  # nothing newer became durable
        True
    """

    __slots__ = ("_pairs",)

    def __init__(self) -> None:
        self._pairs: deque[tuple[int, int]] = deque()

    def add(self, commit_lsn: int, end_lsn: int) -> None:
        """Every change of the transaction committed at ``commit_lsn`` is in the sink."""
        self._pairs.append((commit_lsn, end_lsn))

    def durable_end(self, pending_since: int) -> int | None:
        """The end LSN of the newest transaction that committed below ``pending_since``
        (``None``: none since the last call); those transactions are forgotten."""
        pairs = self._pairs
        end = None
        while pairs and pairs[0][0] < pending_since:
            end = pairs.popleft()[1]
        return end

    def clear(self) -> None:
        """Nothing is pending: every transaction handed on is durable."""
        self._pairs.clear()

    def __len__(self) -> int:
        return len(self._pairs)
