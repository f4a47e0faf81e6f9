"""The one sink contract: what capture (or a Kafka consumer worker) hands change events to,
and where capture keeps its position.

Modelled on small sink APIs such as quixstreams': :meth:`Sink.add` per event (kept in
batches per destination), :meth:`Sink.flush` to make everything added so far durable. A
sink whose buffers are full raises :class:`~sinks.errors.SinkBackpressureError` from ``add``
or ``add_snapshot``; the caller flushes and adds the same data again.

Two sinks implement it: :class:`~sinks.delta_changelog.DeltaChangelogSink` (``cdc run``,
and the Kafka consumer workers) and :class:`~cdc.kafka.producer.KafkaProducerSink` (``cdc
capture``). A sink counts a row as pending until it is durable downstream. Capture confirms
to PostgreSQL the end of the newest transaction that committed below
:meth:`Sink.pending_since` (every change of it is durable), or, when nothing is pending,
everything received.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Protocol

import pyarrow as pa

from cdc.core.events import ChangeEvent
from cdc.core.position import CapturePosition
from cdc.core.table_schema import TableSchema
from sinks.errors import SinkBackpressureError


class Sink(ABC):
    """Receives change events and snapshot batches and makes them durable on :meth:`flush`."""

    @property
    def takes_changes(self) -> bool:
        """Whether the sink has ``add_changes(table, changes, *, size_bytes)``, taking
        changes already in changelog form (see
        :func:`sinks.delta_changelog.changelog_table`): capture then hands it columnar
        batches instead of one event per change."""
        return False

    @abstractmethod
    def ensure_table(self, table: TableSchema) -> None:
        """Make ``table``'s destination exist (an empty table is still a table)."""

    @abstractmethod
    def add(self, event: ChangeEvent) -> None:
        """Buffer one event. Raises SinkBackpressureError when the buffers are full."""

    @abstractmethod
    def add_snapshot(
        self,
        table: TableSchema,
        batch: pa.RecordBatch | pa.Table,
        *,
        lsn: int,
        first_seq: int,
        read_at: datetime,
    ) -> None:
        """Buffer snapshot rows (op ``r``) in Arrow form, positioned at ``(lsn, first_seq..)``.

        Raises SinkBackpressureError when the buffers are full."""

    def add_initial_snapshot(
        self,
        table: TableSchema,
        batches: Iterable[pa.Table],
        *,
        lsn: int,
        read_at: datetime,
        flush: Callable[[], object],
    ) -> dict[str, Any]:
        """Add all of ``table``'s rows in an initial snapshot at ``lsn``, seq 0, 1, 2...

        ``batches`` is consumed to its end. ``flush`` makes room when the buffers are full
        (the caller's flush, with its retries). Returns the metrics of the commits this call
        made itself, in the form of :meth:`flush`'s (``commits`` 0: none, everything is
        buffered for the next flush). This default adds each batch with
        :meth:`add_snapshot`; a sink may write the rows as they come instead.

        Hazard: only for a snapshot that is redone from the start when it is interrupted
        (``discard_snapshot`` first, as the initial snapshot is): an interrupted call may
        leave rows durable that no watermark covers yet.
        """
        first_seq = 0
        for batch in batches:
            try:
                self.add_snapshot(table, batch, lsn=lsn, first_seq=first_seq, read_at=read_at)
            except SinkBackpressureError:
                flush()
                self.add_snapshot(table, batch, lsn=lsn, first_seq=first_seq, read_at=read_at)
            first_seq += batch.num_rows
        return {"rows": 0, "commits": 0, "tables": {}, "duration_s": 0.0}

    @abstractmethod
    def discard_snapshot(
        self, tables: list[tuple[str, str]], lsn: int, *, slot_dropped: bool = False
    ) -> None:
        """Undo the rows an interrupted snapshot at ``lsn`` wrote, before it is redone.

        ``slot_dropped``: the snapshot's slot is gone, so no change after ``lsn`` will ever
        correct what the partial copy holds (the initial snapshot's case).
        """

    @abstractmethod
    def flush(self) -> dict[str, Any]:
        """Make every buffered row durable; returns metrics (``rows``, ``commits``, ...)."""

    @abstractmethod
    def flush_due(self) -> bool:
        """Whether a batch limit (rows, bytes or age) has been reached."""

    def flush_due_tables(self) -> dict[str, Any]:
        """Make durable what is due (see :meth:`flush_due`), at least; returns metrics as
        :meth:`flush` does. A sink that batches per table may leave the others buffered;
        this one flushes everything."""
        return self.flush()

    @property
    @abstractmethod
    def pending_rows(self) -> int:
        """Rows added but not yet durable."""

    def pending_since(self) -> int | None:
        """The smallest commit LSN among the rows added and not yet durable (``None``:
        nothing is pending). Every change of a transaction that committed below it is
        durable. This one knows no positions: while anything is pending it answers 0, so
        capture confirms nothing past its last complete flush."""
        return 0 if self.pending_rows else None

    @abstractmethod
    def latest_schema(self, qualified_name: str) -> TableSchema | None:
        """The table's last registered shape (``None``: never seen), so that capture can
        compare the first change after a restart with it."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources. Does not flush."""


class SnapshotProgress(Protocol):
    """Receives snapshot progress (the CLI draws a progress bar from it)."""

    def table_started(self, name: str, estimated_rows: int | None) -> None: ...
    def rows_copied(self, name: str, rows: int) -> None: ...
    def table_done(self, name: str, rows: int) -> None: ...
    def snapshot_finished(self) -> None:
        """Every table is copied: streaming starts (a display may stop redrawing)."""


class PositionStore(Protocol):
    """Keeps the slot-and-snapshot part of a :class:`~cdc.core.position.CapturePosition`.

    :class:`~sinks.position_store.LakePositionStore` keeps it in the lake (``cdc run``),
    :class:`~cdc.kafka.position_store.KafkaPositionStore` in a compacted topic (``cdc
    capture``). ``path`` names where, for messages.
    """

    path: str

    def load(self) -> CapturePosition | None: ...
    def save(self, position: CapturePosition) -> None: ...
