"""DeltaChangelogSink.add_initial_snapshot: a table's initial snapshot written as it is read
(one streamed Delta write), then its watermark recorded; and the buffered default of the
Sink contract, which it falls back to."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from catalog import lake_layout as layout
from cdc.core.pgtypes import Oid
from cdc.core.settings import BatchSettings
from cdc.core.table_schema import ColumnSchema, TableSchema
from sinks.base import Sink
from sinks.delta_changelog import DeltaChangelogSink, changelog_arrow_schema

READ_AT = datetime(2026, 3, 5, 1, 30, tzinfo=UTC)

# A composite key of mixed types, with a quoted, mixed-case schema, table and column.
ORDERS = TableSchema(
    "Sales",
    "Order Lines",
    (
        ColumnSchema("Region", Oid.TEXT, -1, True),
        ColumnSchema("id", Oid.INT8, -1, True),
        ColumnSchema("Amount", Oid.NUMERIC, (12 << 16 | 2) + 4),
        ColumnSchema("note", Oid.TEXT),
    ),
)
# No key at all.
EVENTS = TableSchema("public", "events", (ColumnSchema("payload", Oid.TEXT),))


def _orders(first: int, n: int) -> pa.Table:
    """Rows ``first..first+n``; every third note and every fifth amount NULL."""
    arrow = changelog_arrow_schema(ORDERS)
    ids = range(first, first + n)
    return pa.table(
        {
            "Region": pa.array(["eu" if i % 2 else "us" for i in ids]),
            "id": pa.array(ids, pa.int64()),
            "Amount": pa.array(
                [None if i % 5 == 0 else Decimal(i) / 100 for i in ids],
                arrow.field("Amount").type,
            ),
            "note": pa.array([None if i % 3 == 0 else f"n{i}" * 20 for i in ids]),
        }
    )


def _batches(sizes: list[int]) -> Iterator[pa.Table]:
    first = 0
    for n in sizes:
        yield _orders(first, n)
        first += n


def _lake_rows(root: Path, table: TableSchema) -> list[dict]:
    dt = DeltaTable(layout.changes_uri(str(root), table.qualified_name))
    return dt.to_pyarrow_table().sort_by(layout.SEQ).to_pylist()


def _never_flush() -> None:
    raise AssertionError("the streamed snapshot never needs a flush")


def test_rows_keep_their_order_and_consecutive_seqs_across_files(tmp_path: Path) -> None:
    # Files of at most 64 KiB: the snapshot spans several Parquet files, in one commit.
    sink = DeltaChangelogSink(str(tmp_path), app_id="t", batch=BatchSettings(max_bytes=64 * 1024))
    sink.ensure_table(ORDERS)
    sizes = [700, 0, 1, 2500, 999]
    result = sink.add_initial_snapshot(
        ORDERS, _batches(sizes), lsn=500, read_at=READ_AT, flush=_never_flush
    )
    total = sum(sizes)
    assert result["rows"] == total and result["tables"] == {ORDERS.qualified_name: total}
    rows = _lake_rows(tmp_path, ORDERS)
    assert [r[layout.SEQ] for r in rows] == list(range(total))
    assert [r["id"] for r in rows] == list(range(total))  # seq follows the order read
    assert {r[layout.LSN] for r in rows} == {500} and {r[layout.OP] for r in rows} == {"r"}
    source_columns = ORDERS.column_names
    assert [{c: r[c] for c in source_columns} for r in rows] == _orders(0, total).to_pylist()
    assert sum(r["note"] is None for r in rows) == len(range(0, total, 3))
    dt = DeltaTable(layout.changes_uri(str(tmp_path), ORDERS.qualified_name))
    assert len(dt.file_uris()) > 1
    # The watermark: recorded in Delta, and what a new sink reads back.
    assert dt.transaction_version("t:lsn") == 500
    assert dt.transaction_version("t:seq") == total - 1
    assert sink.watermark(ORDERS) == (500, total - 1)
    again = DeltaChangelogSink(str(tmp_path), app_id="t")
    assert again.watermark(ORDERS) == (500, total - 1)
    assert sink.pending_rows == 0


def test_a_keyless_table_and_an_empty_one(tmp_path: Path) -> None:
    sink = DeltaChangelogSink(str(tmp_path), app_id="t")
    sink.ensure_table(EVENTS)
    empty = sink.add_initial_snapshot(EVENTS, iter([]), lsn=9, read_at=READ_AT, flush=_never_flush)
    assert empty["commits"] == 0 and sink.watermark(EVENTS) == (-1, -1)
    batch = pa.table({"payload": pa.array(["a", None, "a", ""])})  # duplicates, NULL, empty
    sink.add_initial_snapshot(EVENTS, iter([batch]), lsn=9, read_at=READ_AT, flush=_never_flush)
    rows = _lake_rows(tmp_path, EVENTS)
    assert [(r["payload"], r[layout.SEQ]) for r in rows] == [("a", 0), (None, 1), ("a", 2), ("", 3)]
    assert sink.watermark(EVENTS) == (9, 3)


def test_an_error_of_the_reader_reaches_the_caller_and_nothing_is_committed(
    tmp_path: Path,
) -> None:
    class CopyFailedError(Exception):
        pass

    def failing() -> Iterator[pa.Table]:
        yield _orders(0, 1000)
        raise CopyFailedError("the server went away")

    sink = DeltaChangelogSink(str(tmp_path), app_id="t")
    sink.ensure_table(ORDERS)
    with pytest.raises(CopyFailedError, match="went away"):
        sink.add_initial_snapshot(ORDERS, failing(), lsn=5, read_at=READ_AT, flush=_never_flush)
    assert _lake_rows(tmp_path, ORDERS) == []
    assert DeltaChangelogSink(str(tmp_path), app_id="t").watermark(ORDERS) == (-1, -1)


def test_rows_at_or_below_the_watermark_go_through_the_buffered_path(tmp_path: Path) -> None:
    sink = DeltaChangelogSink(str(tmp_path), app_id="t", batch=BatchSettings(max_rows=250))
    sink.ensure_table(ORDERS)
    sink.add_snapshot(ORDERS, _orders(0, 400), lsn=77, first_seq=0, read_at=READ_AT)
    sink.flush()
    flushes: list[dict] = []
    result = sink.add_initial_snapshot(
        ORDERS,
        _batches([400, 300, 300]),  # the first 400 again: a replay, dropped
        lsn=77,
        read_at=READ_AT,
        flush=lambda: flushes.append(sink.flush()),
    )
    assert result["commits"] == 0  # buffered: the caller's next flush commits the rest
    sink.flush()
    assert flushes and all(f["rows"] for f in flushes)  # full buffers were flushed on the way
    rows = _lake_rows(tmp_path, ORDERS)
    assert [r[layout.SEQ] for r in rows] == list(range(1000))
    assert sink.watermark(ORDERS) == (77, 999)


def test_the_default_of_the_sink_contract_adds_batch_by_batch(tmp_path: Path) -> None:
    sink = DeltaChangelogSink(str(tmp_path), app_id="t", batch=BatchSettings(max_rows=1000))
    sink.ensure_table(ORDERS)
    flushes: list[dict] = []
    result = Sink.add_initial_snapshot(
        sink,
        ORDERS,
        _batches([600, 600, 600]),
        lsn=3,
        read_at=READ_AT,
        flush=lambda: flushes.append(sink.flush()),
    )
    assert result["commits"] == 0 and [f["rows"] for f in flushes] == [1200]
    sink.flush()
    assert [r[layout.SEQ] for r in _lake_rows(tmp_path, ORDERS)] == list(range(1800))
