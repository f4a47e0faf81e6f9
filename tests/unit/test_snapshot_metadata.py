"""The metadata columns :meth:`DeltaChangelogSink.add_snapshot` gives snapshot rows."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable

from catalog import lake_layout as layout
from cdc.core.pgtypes import Oid
from cdc.core.table_schema import ColumnSchema, TableSchema
from sinks.delta_changelog import DeltaChangelogSink

ITEMS = TableSchema(
    "shop", "items", (ColumnSchema("id", Oid.INT8, -1, True), ColumnSchema("name", Oid.TEXT))
)
# 01:30 in UTC+2 is the previous day in UTC: the partition date is the UTC one.
READ_AT = datetime(2026, 3, 5, 1, 30, tzinfo=timezone(timedelta(hours=2)))


def _rows(root: Path) -> list[dict]:
    uri = layout.changes_uri(str(root), ITEMS.qualified_name)
    return sorted(DeltaTable(uri).to_pyarrow_table().to_pylist(), key=lambda r: r[layout.SEQ])


def test_snapshot_metadata_columns(tmp_path: Path) -> None:
    sink = DeltaChangelogSink(str(tmp_path), app_id="t")
    n = 1000
    first = 10_000_000_000
    batch = pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "name": pa.array([f"n{i}" for i in range(n)]),
            layout.FALLBACK: pa.array(
                [{"name": "kept"} if i == 7 else None for i in range(n)],
                pa.map_(pa.string(), pa.string()),
            ),
        }
    )
    sink.add_snapshot(ITEMS, batch, lsn=123, first_seq=first, read_at=READ_AT)
    sink.flush()
    rows = _rows(tmp_path)
    assert [r[layout.SEQ] for r in rows] == list(range(first, first + n))
    assert {r[layout.OP] for r in rows} == {"r"}
    assert {r[layout.LSN] for r in rows} == {123}
    assert {r[layout.COMMIT_TS] for r in rows} == {READ_AT.astimezone(UTC)}
    assert {r[layout.DATE] for r in rows} == {date(2026, 3, 4)}
    assert {r[layout.TXID] for r in rows} == {None}
    assert {r[layout.INGESTED_AT] for r in rows} == {None}
    assert {r[layout.UNCHANGED_TOAST] is None for r in rows} == {True}
    assert dict(rows[7][layout.FALLBACK]) == {"name": "kept"}
    assert all(r[layout.FALLBACK] is None for i, r in enumerate(rows) if i != 7)
    assert sink.watermark(ITEMS) == (123, first + n - 1)
