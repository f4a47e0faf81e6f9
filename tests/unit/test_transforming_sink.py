"""TransformingSink in front of a real Delta changelog writer: order, backpressure, pending
rows and flush timing are those of the sink behind it."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from deltalake import DeltaTable

from catalog import lake_layout as layout
from cdc.core.events import ChangeEvent
from cdc.core.settings import BatchSettings, TransformRuleSettings, TransformSettings
from cdc.core.table_schema import ColumnSchema, TableSchema
from sinks.delta_changelog import DeltaChangelogSink
from sinks.errors import SinkBackpressureError
from sinks.transformed import TransformingSink
from transforms import Transforms

ITEMS = TableSchema(
    "shop",
    "items",
    (ColumnSchema("id", 23, is_key=True, attnum=1), ColumnSchema("qty", 23, attnum=2)),
)


def event(op: str, key: int, qty: int, seq: int) -> ChangeEvent:
    return ChangeEvent(
        op, ITEMS, None, (key, qty), 10, seq, 1, datetime(2026, 1, 1, tzinfo=UTC), 10
    )  # type: ignore[arg-type]


def sink(tmp_path: Path, *, max_rows: int = 1000, max_seconds: float = 60) -> TransformingSink:
    batch = BatchSettings(max_rows=max_rows, max_seconds=max_seconds)
    rules = TransformSettings(
        rules=[
            TransformRuleSettings(
                tables=["shop.*"],
                filter="qty > 0",
                route="lake.items",
                add_columns={"twice": "qty * 2"},
            )
        ]
    )
    return TransformingSink(
        DeltaChangelogSink(str(tmp_path), app_id="t", batch=batch),
        Transforms(rules),
        max_seconds=max_seconds,
        max_buffer=3,
    )


def written(tmp_path: Path) -> list[tuple]:
    table = DeltaTable(layout.changes_uri(str(tmp_path), "lake.items")).to_pyarrow_table()
    rows = table.select(["_cdc_seq", "_cdc_op", "id", "qty", "twice"]).to_pylist()
    return sorted(tuple(r.values()) for r in rows)


def test_backpressure_behind_the_buffer_loses_and_repeats_nothing(tmp_path: Path) -> None:
    s = sink(tmp_path, max_rows=2)
    events = [event("c", k, k % 3, seq=k) for k in range(10)]  # qty 0 fails the filter
    flushed_rows = 0
    for e in events:
        try:
            s.add(e)
        except SinkBackpressureError:  # what capture does: flush, add the same event again
            flushed_rows += s.flush()["rows"]
            s.add(e)
    assert s.pending_rows > 0  # held events count until durable
    flushed_rows += s.flush()["rows"]
    assert s.pending_rows == 0
    expected = [(k, "c", k, k % 3, 2 * (k % 3)) for k in range(10) if k % 3]
    assert written(tmp_path) == expected
    assert flushed_rows == len(expected)


def test_flush_is_due_when_the_oldest_held_event_has_waited(tmp_path: Path) -> None:
    s = sink(tmp_path, max_seconds=0.05)
    assert not s.flush_due()
    s.add(event("c", 1, 1, 0))
    assert not s.flush_due() and s.pending_rows == 1
    time.sleep(0.06)
    assert s.flush_due()
    assert s.flush()["rows"] == 1 and not s.flush_due()


def test_snapshot_rows_wait_for_the_events_held_before_them(tmp_path: Path) -> None:
    import pyarrow as pa

    s = sink(tmp_path)
    s.ensure_table(ITEMS)
    s.add(event("c", 1, 5, 0))
    batch = pa.table({"id": pa.array([2, 3], pa.int32()), "qty": pa.array([0, 7], pa.int32())})
    s.add_snapshot(ITEMS, batch, lsn=20, first_seq=0, read_at=datetime(2026, 1, 1, tzinfo=UTC))
    assert s.pending_rows == 2  # the event, drained before the batch; one snapshot row filtered
    s.flush()
    assert [r[1:] for r in written(tmp_path)] == [("c", 1, 5, 10), ("r", 3, 7, 14)]
    assert s.latest_schema("shop.items") == ITEMS  # the source shape, for capture's checks


def test_pending_since_covers_the_events_held_and_those_behind(tmp_path: Path) -> None:
    s = sink(tmp_path, max_seconds=0.2)
    assert s.pending_since() is None
    s.add(event("c", 1, 5, 0))  # held here, untransformed: its commit LSN (10) is pending
    assert s.pending_since() == 10 and not s.flush_due()
    time.sleep(0.2)
    assert s.flush_due()
    # The events held here are the ones due: everything is committed, not just started.
    s.flush_due_tables()
    assert s.pending_rows == 0 and s.pending_since() is None
    assert written(tmp_path) == [(0, "c", 1, 5, 10)]
