"""The Delta changelog sink against real Delta tables (no PostgreSQL needed)."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from catalog import lake_layout as layout
from cdc.core.events import ChangeEvent
from cdc.core.pgtypes import Oid
from cdc.core.settings import BatchSettings
from cdc.core.table_schema import ColumnSchema, TableSchema
from sinks.delta_changelog import DeltaChangelogSink, changelog_arrow_schema, changelog_table
from sinks.errors import SinkBackpressureError, TransientSinkError

ITEMS = TableSchema(
    "shop", "items", (ColumnSchema("id", Oid.INT8, -1, True), ColumnSchema("name", Oid.TEXT))
)
STORES = TableSchema("shop", "stores", (ColumnSchema("id", Oid.INT4, -1, True),))
TS = datetime(2026, 3, 4, 23, 59, 59, tzinfo=UTC)


def event(table: TableSchema, op: str, values: tuple, lsn: int, seq: int) -> ChangeEvent:
    return ChangeEvent(
        op=op,  # type: ignore[arg-type]
        table=table,
        before=values if op == "d" else None,
        after=None if op in ("d", "t") else values,
        commit_lsn=lsn,
        seq=seq,
        txid=42,
        commit_ts=TS,
        lsn=lsn,
        size_bytes=20,
    )


def changes(root: Path, table: TableSchema) -> pa.Table:
    uri = layout.changes_uri(str(root), table.qualified_name)
    return (
        DeltaTable(uri)
        .to_pyarrow_table()
        .sort_by([("_cdc_lsn", "ascending"), ("_cdc_seq", "ascending")])
    )


def test_one_commit_per_table_per_flush_with_watermark_and_metadata(tmp_path: Path) -> None:
    sink = DeltaChangelogSink(str(tmp_path), app_id="t")
    for seq in range(3):
        sink.add(event(ITEMS, "c", (seq, f"n{seq}"), 100, seq))
    sink.add(event(STORES, "c", (1,), 100, 3))
    metrics = sink.flush()
    assert metrics["rows"] == 4 and metrics["commits"] == 2
    assert metrics["tables"] == {"shop.items": 3, "shop.stores": 1}

    uri = layout.changes_uri(str(tmp_path), "shop.items")
    dt = DeltaTable(uri)
    assert dt.version() == 0
    assert dt.transaction_version("t:lsn") == 100
    assert dt.transaction_version("t:seq") == 2
    assert dt.metadata().partition_columns == ["_cdc_date"]
    rows = changes(tmp_path, ITEMS).to_pylist()
    assert [r["id"] for r in rows] == [0, 1, 2]
    first = rows[0]
    assert first["_cdc_op"] == "c" and first["_cdc_txid"] == 42
    assert first["_cdc_commit_ts"] == TS
    assert first["_cdc_date"] == date(2026, 3, 4)  # UTC date of the commit
    assert first["_cdc_ingested_at"] is not None and first["_cdc_unchanged_toast"] is None

    # Nothing pending: a flush writes nothing.
    assert sink.flush()["commits"] == 0
    assert DeltaTable(uri).version() == 0


def test_replayed_changes_are_skipped_even_mid_transaction(tmp_path: Path) -> None:
    sink = DeltaChangelogSink(str(tmp_path), app_id="t")
    txn = [event(ITEMS, "c", (i, "x"), 200, i) for i in range(5)]
    for e in txn[:3]:
        sink.add(e)
    sink.flush()  # a flush in the middle of the transaction, then a crash

    restarted = DeltaChangelogSink(str(tmp_path), app_id="t")
    assert restarted.watermark(ITEMS) == (200, 2)
    for e in [event(ITEMS, "c", (9, "old"), 150, 0), *txn]:  # the slot replays it all
        restarted.add(e)
    assert restarted.pending_rows == 2
    restarted.flush()
    assert changes(tmp_path, ITEMS)["id"].to_pylist() == [0, 1, 2, 3, 4]

    # Another app id has its own watermark.
    other = DeltaChangelogSink(str(tmp_path), app_id="other")
    assert other.watermark(ITEMS) == (-1, -1)


def test_backpressure_and_flush_limits(tmp_path: Path) -> None:
    sink = DeltaChangelogSink(
        str(tmp_path), app_id="t", batch=BatchSettings(max_rows=2, max_seconds=0.05)
    )
    assert not sink.flush_due()
    sink.add(event(ITEMS, "c", (1, "a"), 1, 0))
    assert not sink.flush_due()
    time.sleep(0.06)
    assert sink.flush_due()  # age
    sink.add(event(ITEMS, "c", (2, "b"), 1, 1))
    with pytest.raises(SinkBackpressureError):
        sink.add(event(ITEMS, "c", (3, "c"), 1, 2))
    sink.flush()
    sink.add(event(ITEMS, "c", (3, "c"), 1, 2))
    assert sink.pending_rows == 1


def test_deletes_keep_the_before_image_and_truncates_are_rows(tmp_path: Path) -> None:
    sink = DeltaChangelogSink(str(tmp_path), app_id="t")
    sink.add(event(ITEMS, "c", (1, "a"), 10, 0))
    sink.add(event(ITEMS, "d", (1, "a"), 11, 0))
    sink.add(event(ITEMS, "t", (), 12, 0))
    sink.flush()
    rows = changes(tmp_path, ITEMS).to_pylist()
    assert [(r["_cdc_op"], r["id"], r["name"]) for r in rows] == [
        ("c", 1, "a"),
        ("d", 1, "a"),
        ("t", None, None),
    ]


def test_added_column_evolves_the_table_and_registers_the_schema(tmp_path: Path) -> None:
    sink = DeltaChangelogSink(str(tmp_path), app_id="t")
    sink.add(event(ITEMS, "c", (1, "a"), 10, 0))
    wider = TableSchema("shop", "items", (*ITEMS.columns, ColumnSchema("qty", Oid.INT4)))
    sink.add(event(wider, "c", (2, "b", 5), 11, 0))
    sink.flush()
    rows = changes(tmp_path, ITEMS).to_pylist()
    assert [(r["id"], r["qty"]) for r in rows] == [(1, None), (2, 5)]
    versions = sink.registry.versions("shop.items")
    assert [v.schema for v in versions] == [ITEMS, wider]


def test_snapshot_batches_get_metadata_and_consecutive_seq(tmp_path: Path) -> None:
    sink = DeltaChangelogSink(str(tmp_path), app_id="t")
    batch = pa.table({"id": pa.array([5, 6], pa.int64()), "name": ["x", None]})
    sink.add_snapshot(ITEMS, batch, lsn=99, first_seq=0, read_at=TS)
    sink.add_snapshot(ITEMS, batch.slice(0, 1), lsn=99, first_seq=2, read_at=TS)
    sink.flush()
    rows = changes(tmp_path, ITEMS).to_pylist()
    assert [(r["_cdc_op"], r["_cdc_lsn"], r["_cdc_seq"], r["id"]) for r in rows] == [
        ("r", 99, 0, 5),
        ("r", 99, 1, 6),
        ("r", 99, 2, 5),
    ]
    assert sink.watermark(ITEMS) == (99, 2)


def test_seconds_until_flush_counts_down_from_the_oldest_buffered_change(tmp_path: Path) -> None:
    sink = DeltaChangelogSink(
        str(tmp_path), app_id="t", batch=BatchSettings(max_rows=3, max_seconds=30)
    )
    assert sink.seconds_until_flush() == float("inf") and not sink.flush_due()
    sink.add(event(ITEMS, "c", (1, "a"), 100, 0))
    assert 29 < sink.seconds_until_flush() <= 30 and not sink.flush_due()
    sink.add(event(ITEMS, "c", (2, "b"), 100, 1))
    sink.add(event(ITEMS, "c", (3, "c"), 100, 2))
    assert sink.seconds_until_flush() == 0.0 and sink.flush_due()


def test_commit_times_of_many_transactions_keep_their_own_values(tmp_path: Path) -> None:
    sink = DeltaChangelogSink(str(tmp_path), app_id="t")
    times = [datetime(2026, 3, 4, 12, m, tzinfo=UTC) for m in (1, 2, 1, 3)]
    for seq, ts in enumerate(times):
        e = event(ITEMS, "c", (seq, "x"), 100 + seq, 0)
        e.commit_ts = ts
        sink.add(e)
    sink.flush()
    assert changes(tmp_path, ITEMS)["_cdc_commit_ts"].to_pylist() == times


def _as_changes(table: TableSchema, events: list[ChangeEvent]) -> pa.Table:
    """The events in changelog form, built column by column (as the columnar paths do)."""
    rows = [e.before if e.op == "d" else e.after for e in events]
    values = [
        pa.array([r[i] for r in rows], type=changelog_arrow_schema(table).field(i).type)
        for i in range(len(table.columns))
    ]
    return changelog_table(
        table,
        values,
        ops=pa.array([e.op for e in events]),
        lsns=pa.array([e.commit_lsn for e in events]),
        seqs=pa.array([e.seq for e in events]),
        txids=pa.array([e.txid for e in events]),
        commit_ts=pa.array([e.commit_ts for e in events]),
    )


def _without_ingest_time(table: pa.Table) -> list[dict]:
    return table.drop_columns([layout.INGESTED_AT]).to_pylist()


def test_add_changes_writes_what_add_writes_and_drops_the_replayed_prefix(tmp_path: Path) -> None:
    events = [event(ITEMS, "c", (i, f"n{i}"), 100 + i // 3, i % 3) for i in range(9)]
    events.append(event(ITEMS, "d", (4, "n4"), 104, 0))
    per_event = DeltaChangelogSink(str(tmp_path / "a"), app_id="t")
    for e in events:
        per_event.add(e)
    per_event.flush()

    columnar = DeltaChangelogSink(str(tmp_path / "b"), app_id="t")
    columnar.add_changes(ITEMS, _as_changes(ITEMS, events[:4]))
    assert columnar.pending_rows == 4 and columnar.watermark(ITEMS) == (101, 0)
    # A replay overlapping what was buffered: only the rows after (101, 0) are new.
    columnar.add_changes(ITEMS, _as_changes(ITEMS, events[2:]))
    columnar.add_changes(ITEMS, _as_changes(ITEMS, events[5:]))  # all replayed
    assert columnar.pending_rows == len(events)
    columnar.flush()

    written = changes(tmp_path / "b", ITEMS)
    assert _without_ingest_time(written) == _without_ingest_time(changes(tmp_path / "a", ITEMS))
    assert written.column(layout.INGESTED_AT).null_count == 0
    uri = layout.changes_uri(str(tmp_path / "b"), ITEMS.qualified_name)
    assert DeltaTable(uri).transaction_version("t:lsn") == 104


def test_add_changes_in_kafka_mode_drops_handled_offsets_and_counts_them_done(
    tmp_path: Path,
) -> None:
    events = [event(ITEMS, "c", (i, f"n{i}"), 200 + i, 0) for i in range(6)]
    sink = DeltaChangelogSink(str(tmp_path), app_id="t")
    stream = "shop.public.items:0"
    sink.add_changes(
        ITEMS, _as_changes(ITEMS, events[:3]), stream=stream, offsets=pa.array([10, 11, 12])
    )
    # Offsets 11 and 12 were handled; 13 re-sends a position already written (a restarted
    # capture), so only 14 and 15 are new.
    again = [events[1], events[2], events[2], events[3], events[4]]
    sink.add_changes(
        ITEMS, _as_changes(ITEMS, again), stream=stream, offsets=pa.array([11, 12, 13, 14, 15])
    )
    assert sink.pending_rows == 5
    sink.flush()
    assert sink.committed_offset(ITEMS.qualified_name, stream) is not None
    uri = layout.changes_uri(str(tmp_path), ITEMS.qualified_name)
    dt = DeltaTable(uri)
    assert dt.transaction_version(f"t:{stream}:offset") == 15
    assert [r["id"] for r in changes(tmp_path, ITEMS).to_pylist()] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("commit_path", ["delta-rs", "local append"])
def test_a_commit_that_landed_but_reported_a_failure_is_not_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, commit_path: str
) -> None:
    """An object store can take the PUT of the log entry and lose its answer: the commit
    failed for the sink but is in the table. The retry writes only what is not. (A local
    append cannot lose its answer, but the sink's recovery must not depend on which path
    committed.)"""
    import sinks.delta_append as delta_append
    import sinks.delta_changelog as delta_changelog

    lost_answers = [OSError("operation timed out after the store took the PUT")]
    # The commit path under test: delta-rs's write, or the local append.
    module, name = (
        (delta_changelog, "write_deltalake")
        if commit_path == "delta-rs"
        else (delta_append.LocalAppender, "append")
    )
    real_commit = getattr(module, name)

    def commit_then_lose_the_answer(*args: Any, **kwargs: Any) -> Any:
        result = real_commit(*args, **kwargs)
        if lost_answers:
            raise lost_answers.pop()
        return result

    if commit_path == "delta-rs":
        monkeypatch.setattr(delta_changelog, "open_appender", lambda uri: None)

    sink = DeltaChangelogSink(str(tmp_path), app_id="t")
    sink.ensure_table(ITEMS)
    for seq in range(3):
        sink.add(event(ITEMS, "c", (seq, f"n{seq}"), 100, seq))
    monkeypatch.setattr(module, name, commit_then_lose_the_answer)
    with pytest.raises(TransientSinkError):
        sink.flush()
    assert sink.pending_rows == 3  # as far as the sink knows, nothing landed
    sink.add(event(ITEMS, "c", (3, "n3"), 101, 0))
    assert sink.flush()["rows"] == 4
    assert [r["id"] for r in changes(tmp_path, ITEMS).to_pylist()] == [0, 1, 2, 3]
    # A retry that finds everything already written writes nothing.
    lost_answers.append(OSError("timed out again"))
    sink.add(event(ITEMS, "c", (4, "n4"), 102, 0))
    with pytest.raises(TransientSinkError):
        sink.flush()
    assert sink.flush()["rows"] == 1 and sink.pending_rows == 0
    assert [r["id"] for r in changes(tmp_path, ITEMS).to_pylist()] == [0, 1, 2, 3, 4]
