"""A sink that applies the pipeline's transforms before handing events on to another sink.

Capture wraps its sink (the Delta changelog writer, or the Kafka producer) in a
:class:`TransformingSink` when ``[[transforms.rules]]`` are configured, so that nothing
downstream of it (Delta files, topics, the dead-letter table, their error messages) ever
holds a value before its rules ran.

Batching: :meth:`add` only appends the event to a list; the list is transformed in one go
(one DuckDB query per table, see :class:`transforms.Transforms`) when it reaches
``max_buffer`` events, or capture flushes (which it does when :meth:`flush_due` says the
oldest event held has waited ``max_seconds``, the same limit the sink behind applies), or
adds snapshot rows. A query costs about a millisecond however few rows it has, and the
replication stream often delivers a few hundred changes per read, so transforming per read
would cost more than the rules themselves. Everything keeps its arrival order, and the held
events count in :attr:`pending_rows`, so capture confirms no LSN before they are durable
downstream.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pyarrow as pa

from catalog import lake_layout as layout
from cdc.core.events import ChangeEvent
from cdc.core.table_schema import TableSchema
from sinks.base import Sink
from sinks.errors import SinkBackpressureError
from transforms import Transforms

log = logging.getLogger(__name__)


def _add_metrics(total: dict[str, Any], more: dict[str, Any]) -> None:
    for key, value in more.items():
        if isinstance(value, int | float) and isinstance(total.get(key, 0), int | float):
            total[key] = total.get(key, 0) + value
        else:
            total[key] = value


class TransformingSink(Sink):
    """``inner`` behind ``transforms``: events and snapshot batches are transformed (masked,
    filtered, reshaped, routed) before ``inner`` sees them.

    Example:
        >>> inner = DeltaChangelogSink(lake, app_id=..., batch=batch)  # doctest: +SKIP
        >>> sink = TransformingSink(inner, Transforms(rules), max_seconds=batch.max_seconds)  # doctest: +SKIP
    """

    def __init__(
        self,
        inner: Sink,
        transforms: Transforms,
        *,
        max_seconds: float,
        max_buffer: int = 5000,
    ) -> None:
        self.inner = inner
        self.transforms = transforms
        self.max_seconds = max_seconds
        self.max_buffer = max_buffer
        # When the oldest event added since the last flush arrived: it bounds how long any
        # event waits, here and in ``inner``, as ``inner`` alone would.
        self._oldest: float | None = None
        self._raw: list[ChangeEvent] = []
        self._ready: deque[ChangeEvent] = deque()
        self._sources: dict[str, TableSchema] = {}  # source name -> its shape last seen
        self._last_table: TableSchema | None = None

    def _drain(self) -> None:
        """Transform what is held and add it to ``inner``. Raises SinkBackpressureError with
        the events ``inner`` did not take still held (transformed, never twice)."""
        if self._raw:
            raw, self._raw = self._raw, []
            self._ready.extend(self.transforms.apply(raw))
        ready = self._ready
        add = self.inner.add
        while ready:
            add(ready[0])
            ready.popleft()

    def ensure_table(self, table: TableSchema) -> None:
        self._drain()
        self._sources[table.qualified_name] = table
        plan = self.transforms.plan(table)
        self.inner.ensure_table(table if plan is None else plan.output)

    def add(self, event: ChangeEvent) -> None:
        if len(self._raw) >= self.max_buffer:
            self._drain()  # before taking the event: on backpressure, it is added again
        if self._oldest is None:
            self._oldest = time.monotonic()
        self._raw.append(event)
        table = event.table
        if table is not self._last_table:  # most events share their table's shape object
            self._last_table = table
            self._sources[table.qualified_name] = table

    def add_snapshot(
        self,
        table: TableSchema,
        batch: pa.RecordBatch | pa.Table,
        *,
        lsn: int,
        first_seq: int,
        read_at: datetime,
    ) -> None:
        self._drain()
        output, rows = self.transforms.apply_snapshot(table, batch, fallback_column=layout.FALLBACK)
        self.inner.add_snapshot(output, rows, lsn=lsn, first_seq=first_seq, read_at=read_at)

    def discard_snapshot(
        self, tables: list[tuple[str, str]], lsn: int, *, slot_dropped: bool = False
    ) -> None:
        targets = [self.transforms.output_name(schema, table) for schema, table in tables]
        self.inner.discard_snapshot(targets, lsn, slot_dropped=slot_dropped)

    def flush(self) -> dict[str, Any]:
        return self._flush_with(self.inner.flush)

    def flush_due_tables(self) -> dict[str, Any]:
        """Transform what is held, then flush what the sink behind has due; everything when
        the events held here are the ones due (their age in the sink behind starts again
        when they reach it, and they must not wait a second ``max_seconds``). Events drained
        early, by another table's due flush, start their age again behind: they may wait up
        to twice ``max_seconds``."""
        if self._oldest is not None and time.monotonic() - self._oldest >= self.max_seconds:
            return self.flush()
        return self._flush_with(self.inner.flush_due_tables)

    def _flush_with(self, flush_inner: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        total: dict[str, Any] = {"rows": 0, "commits": 0}
        while True:
            try:
                self._drain()
                break
            except SinkBackpressureError:
                # A complete flush: only that surely makes room (commits that are still
                # running count as pending until they have landed).
                _add_metrics(total, self.inner.flush())
        _add_metrics(total, flush_inner())
        self._oldest = None
        return total

    def flush_due(self) -> bool:
        """Whether the oldest event added since the last flush has waited ``max_seconds``,
        or ``inner`` has reached one of its limits."""
        if self._oldest is not None and time.monotonic() - self._oldest >= self.max_seconds:
            return True
        return self.inner.flush_due()

    @property
    def pending_rows(self) -> int:
        return len(self._raw) + len(self._ready) + self.inner.pending_rows

    def pending_since(self) -> int | None:
        held = self._ready[0] if self._ready else self._raw[0] if self._raw else None
        inner = self.inner.pending_since()
        if held is None:
            return inner
        return held.commit_lsn if inner is None else min(held.commit_lsn, inner)

    def latest_schema(self, qualified_name: str) -> TableSchema | None:
        """The source shape last seen of a transformed table (``inner`` records the output
        shape, which cannot be compared with the source's); ``None`` after a restart."""
        seen = self._sources.get(qualified_name)
        if seen is not None:
            return seen
        recorded = self.inner.latest_schema(qualified_name)
        if recorded is not None and self.transforms.rules_for(recorded.schema, recorded.table):
            return None
        return recorded

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.transforms.close()
