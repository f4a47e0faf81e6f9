"""A sink that applies the pipeline's transforms before handing events on to another sink.

Capture wraps its sink (the Delta changelog writer, or the Kafka producer) in a
:class:`TransformingSink` when ``[[transforms.rules]]`` are configured, so that nothing
downstream of it (Delta files, topics, the dead-letter table, their error messages) ever
holds a value before its rules ran.

Batching: :meth:`add` only appends the event to a list, and :meth:`add_changes` (capture's
columnar batches, already Arrow) the batch; the list is transformed in one go (one DuckDB
query per table, see :class:`transforms.Transforms`; a table's consecutive batches are
concatenated and transformed together) when it holds ``max_buffer`` rows
(``max_batch_rows`` when it takes a batch: batches are large already), or capture
flushes (which it does when :meth:`flush_due` says the oldest event held has waited
``max_seconds``, the same limit the sink behind applies), or adds snapshot rows. A query
costs about a millisecond however few rows it has, and the replication stream often
delivers a few hundred changes per read, so transforming per read would cost more than the
rules themselves. Every table's changes keep their arrival order, and the held rows count
in :attr:`pending_rows` and :meth:`pending_since`, so capture confirms no LSN before they
are durable downstream. Rows a rule drops are never pending: capture confirms past them,
and a replay drops them again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa

from catalog import lake_layout as layout
from cdc.core.events import ChangeEvent
from cdc.core.table_schema import TableSchema
from sinks.base import Sink
from sinks.delta_changelog import DeltaChangelogSink
from sinks.errors import SinkBackpressureError
from transforms import Transforms

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Changes:
    """A columnar batch held (see :meth:`TransformingSink.add_changes`), or, once
    transformed, what it became (``table`` the output shape)."""

    table: TableSchema
    changes: pa.Table
    size_bytes: int

    @property
    def first_lsn(self) -> int:
        """Its smallest commit LSN (positions ascend within a batch)."""
        return int(self.changes.column(layout.LSN)[0].as_py())


_Held = ChangeEvent | _Changes


def _first_lsn(item: _Held) -> int:
    return item.first_lsn if isinstance(item, _Changes) else item.commit_lsn


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
        max_batch_rows: int = 20_000,
    ) -> None:
        self.inner = inner
        self.transforms = transforms
        self.max_seconds = max_seconds
        self.max_buffer = max_buffer
        self.max_batch_rows = max_batch_rows
        # When the oldest event added since the last flush arrived: it bounds how long any
        # event waits, here and in ``inner``, as ``inner`` alone would.
        self._oldest: float | None = None
        self._raw: list[_Held] = []
        self._raw_rows = 0
        # The smallest commit LSN held in _raw: columnar batches are cut at the end of a
        # read, after the events of later transactions that came in the same read.
        self._raw_lsn: int | None = None
        self._ready: deque[_Held] = deque()
        self._sources: dict[str, TableSchema] = {}  # source name -> its shape last seen
        self._last_table: TableSchema | None = None

    @property
    def takes_changes(self) -> bool:
        """Columnar batches in, when the sink behind takes them (the Delta one)."""
        return isinstance(self.inner, DeltaChangelogSink)

    def _drain(self) -> None:
        """Transform what is held and add it to ``inner``. Raises SinkBackpressureError with
        the items ``inner`` did not take still held (transformed, never twice)."""
        if self._raw:
            raw, self._raw = self._raw, []
            self._raw_rows = 0
            self._raw_lsn = None
            self._ready.extend(self._transform(raw))
        ready = self._ready
        add = self.inner.add
        while ready:
            item = ready[0]
            if isinstance(item, _Changes):
                self._add_changes(item)
            else:
                add(item)
            ready.popleft()

    def _add_changes(self, item: _Changes) -> None:
        inner = self.inner
        assert isinstance(inner, DeltaChangelogSink)  # see takes_changes
        inner.add_changes(item.table, item.changes, size_bytes=item.size_bytes)

    def _transform(self, raw: list[_Held]) -> list[_Held]:
        """``raw`` transformed, in order within each table: the events in one go, each
        run of a table's batches (of one shape, with no event of that table between them)
        concatenated and transformed together, in the place of its first batch."""
        events = [item for item in raw if not isinstance(item, _Changes)]
        if len(events) == len(raw):
            return list(self.transforms.apply(events))
        # apply() changes events in place (their table becomes the output shape).
        sources = {id(e): e.table.qualified_name for e in events}
        kept = {id(e) for e in self.transforms.apply(events)} if events else set()
        slots: list[_Held | list[_Changes]] = []
        runs: dict[str, list[_Changes]] = {}  # table -> its open run (a list in slots)
        for item in raw:
            if isinstance(item, _Changes):
                name = item.table.qualified_name
                run = runs.get(name)
                if run is not None and run[0].table is item.table:
                    run.append(item)
                    continue
                runs[name] = run = [item]
                slots.append(run)
            else:
                runs.pop(sources[id(item)], None)  # later batches follow the event
                if id(item) in kept:
                    slots.append(item)
        out: list[_Held] = []
        for slot in slots:
            if not isinstance(slot, list):
                out.append(slot)
                continue
            source = slot[0].table
            data = (
                slot[0].changes
                if len(slot) == 1
                else pa.concat_tables([c.changes for c in slot])  # chunks, not copies
            )
            output, changes = self.transforms.apply_changes(
                source,
                data,
                op_column=layout.OP,
                unchanged_column=layout.UNCHANGED_TOAST,
                fallback_column=layout.FALLBACK,
            )
            if changes.num_rows:
                size = sum(c.size_bytes for c in slot)
                if changes.num_rows < data.num_rows:  # what the filters kept, in proportion
                    size = size * changes.num_rows // data.num_rows
                out.append(_Changes(output, changes, size))
        return out

    def ensure_table(self, table: TableSchema) -> None:
        self._drain()
        self._sources[table.qualified_name] = table
        plan = self.transforms.plan(table)
        self.inner.ensure_table(table if plan is None else plan.output)

    def add(self, event: ChangeEvent) -> None:
        if self._raw_rows >= self.max_buffer:
            self._drain()  # before taking the event: on backpressure, it is added again
        self._hold(event, 1, event.commit_lsn)
        table = event.table
        if table is not self._last_table:  # most events share their table's shape object
            self._last_table = table
            self._sources[table.qualified_name] = table

    def _hold(self, item: _Held, rows: int, lsn: int) -> None:
        if self._oldest is None:
            self._oldest = time.monotonic()
        self._raw.append(item)
        self._raw_rows += rows
        if self._raw_lsn is None or lsn < self._raw_lsn:
            self._raw_lsn = lsn

    def add_changes(self, table: TableSchema, changes: pa.Table, *, size_bytes: int = 0) -> None:
        """Hold a columnar batch of ``table`` (changelog form, see
        :func:`sinks.delta_changelog.changelog_table`) for the rules; they run over its
        Arrow columns, never per row in Python (only rows carrying unchanged-TOAST names or
        fallback texts are mapped one by one). Only when :attr:`takes_changes`.

        Raises SinkBackpressureError (before holding the batch) when the batches held
        before it could not be handed on; add the same batch again after a flush.
        """
        if changes.num_rows == 0:
            return
        if self._raw_rows >= self.max_batch_rows:
            self._drain()
            # Everything held is behind now, where its age counts again (up to twice
            # ``max_seconds`` in all, see flush_due_tables): while catching up, the sink
            # behind commits on its own schedule, as it does without rules, instead of
            # a complete flush here every ``max_seconds``.
            self._oldest = None
        item = _Changes(table, changes, size_bytes)
        self._hold(item, changes.num_rows, item.first_lsn)
        if table is not self._last_table:
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
        ready = sum(i.changes.num_rows if isinstance(i, _Changes) else 1 for i in self._ready)
        return self._raw_rows + ready + self.inner.pending_rows

    def pending_since(self) -> int | None:
        lsns = [lsn for lsn in (self._raw_lsn, self.inner.pending_since()) if lsn is not None]
        if self._ready:  # left over by backpressure: rare, and few
            lsns.append(min(_first_lsn(item) for item in self._ready))
        return min(lsns, default=None)

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
