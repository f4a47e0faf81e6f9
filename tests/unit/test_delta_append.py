"""The local blind append (:mod:`sinks.delta_append`) against real Delta tables, read back by
delta-rs and by DuckDB's delta extension (no PostgreSQL needed)."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pyarrow as pa
import pytest
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sinks.delta_changelog as delta_changelog
from catalog import lake_layout as layout
from catalog.lake import Lake
from cdc.core.events import ChangeEvent
from cdc.core.table_schema import TableSchema
from jobs.retention import droppable_partitions
from sinks.delta_append import file_stats, log_state, open_appender
from sinks.delta_changelog import DeltaChangelogSink, changelog_arrow_schema
from sinks.errors import TransientSinkError
from tests.plugins import samples
from tests.plugins.samples import KEYLESS, MIXED, TYPES

TABLES = (MIXED, KEYLESS, TYPES)
FIRST_LSN = 0x16B374D848


def change(table: TableSchema, op: str, n: int, *, nulls: bool, lsn: int, seq: int) -> ChangeEvent:
    """A change of one of the sample tables: NULLs in every nullable column with ``nulls``."""
    if table is MIXED:
        extra = (
            dict.fromkeys(("qty", "price", "ratio", "gift", "day", "blob", "Doc")) if nulls else {}
        )
        row: tuple[Any, ...] = samples.mixed_row(n, **extra)
    elif table is KEYLESS:
        row = (None, None) if nulls else (f"line {n} ✓", samples.COMMIT_TS + timedelta(days=n))
    else:
        row = (n, *([None] * (len(TYPES.columns) - 1))) if nulls else (n, *samples.ROW[1:])
    base = samples.event(
        op, before=row if op == "d" else None, after=None if op == "d" else row, table=table
    )
    day = timedelta(days=n % 2)  # some flushes span two partitions
    return dataclasses.replace(base, commit_lsn=lsn, seq=seq, commit_ts=base.commit_ts + day)


@contextmanager
def delta_rs_only() -> Iterator[None]:
    with mock.patch.object(delta_changelog, "open_appender", return_value=None):
        yield


def lake_rows(lake: Lake, table: TableSchema) -> list[dict[str, Any]]:
    """The changelog as DuckDB and as delta-rs read it (asserted equal), without the
    ingestion time (the two sinks wrote at different moments)."""
    seen = lake.changes(table.qualified_name).drop_columns([layout.INGESTED_AT])
    uri = layout.changes_uri(lake.root, table.qualified_name)
    direct = DeltaTable(uri).to_pyarrow_table().drop_columns([layout.INGESTED_AT])
    order = [(layout.LSN, "ascending"), (layout.SEQ, "ascending")]
    assert direct.select(seen.column_names).sort_by(order).to_pylist() == seen.to_pylist()
    return seen.to_pylist()


flushes = st.lists(
    st.lists(
        st.tuples(
            st.sampled_from(range(len(TABLES))),
            st.sampled_from("cud"),
            st.integers(0, 40),
            st.booleans(),
        ),
        min_size=1,
        max_size=12,
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flushes)
def test_appended_changelogs_read_back_like_delta_rs_commits(batches: list[list[Any]]) -> None:
    """The same changes flushed through the local append and through delta-rs give the
    same changelogs, on a composite key of mixed types with quoted mixed-case names, a
    keyless table, every mapped type, and NULLs."""
    with tempfile.TemporaryDirectory() as appended, tempfile.TemporaryDirectory() as committed:
        sinks = [
            DeltaChangelogSink(appended, app_id="t"),
            DeltaChangelogSink(committed, app_id="t"),
        ]
        for sink in sinks:
            for table in TABLES:
                sink.ensure_table(table)
        for number, batch in enumerate(batches):
            events = [
                change(TABLES[t], op, n, nulls=nulls, lsn=FIRST_LSN + number, seq=seq)
                for seq, (t, op, n, nulls) in enumerate(batch)
            ]
            for event in events:
                sinks[0].add(event)
            sinks[0].flush()
            with delta_rs_only():
                for event in events:
                    sinks[1].add(event)
                sinks[1].flush()
        with Lake(appended) as ours, Lake(committed) as theirs:
            for table in TABLES:
                assert lake_rows(ours, table) == lake_rows(theirs, table)
            uri = layout.changes_uri(appended, table.qualified_name)
            clients = {c.get("clientVersion") for c in DeltaTable(uri).history()[:-1]}
            assert clients <= {"cdc-lakehouse"}  # every commit after the create was an append


def new_table(root: Path, **configuration: str) -> str:
    uri = str(root / "t")
    DeltaTable.create(
        uri,
        schema=changelog_arrow_schema(MIXED),
        partition_by=list(layout.PARTITION_COLUMNS),
        configuration=configuration or None,
    )
    return uri


def rows(lsn: int, count: int = 3, *, day: date = date(2026, 1, 1)) -> pa.Table:
    """``count`` changelog rows of ``MIXED`` at ``lsn``, in the partition of ``day``."""
    sink_rows = [samples.mixed_row(lsn * 100 + i) for i in range(count)]
    columns = {c.name: [r[i] for r in sink_rows] for i, c in enumerate(MIXED.columns)}
    at = datetime.combine(day, datetime.min.time(), UTC)
    schema = changelog_arrow_schema(MIXED)
    data = {
        **columns,
        layout.OP: ["c"] * count,
        layout.LSN: [lsn] * count,
        layout.SEQ: list(range(count)),
        layout.TXID: [7] * count,
        layout.COMMIT_TS: [at] * count,
        layout.INGESTED_AT: [at] * count,
        layout.UNCHANGED_TOAST: [None] * count,
        layout.FALLBACK: [None] * count,
        layout.DATE: [day] * count,
    }
    data["price"] = [None] * count  # its decimal is built by the sink; not what is tested
    return pa.Table.from_pydict(data, schema=schema)


def test_stats_are_exact_where_written_and_serve_retention(tmp_path: Path) -> None:
    uri = new_table(tmp_path)
    appender = open_appender(uri)
    assert appender is not None
    assert appender.append(rows(5), transactions=[("t:lsn", 5)]) == 1
    write_deltalake(uri, rows(9), mode="append")  # delta-rs's own statistics, to compare
    adds = pa.table(DeltaTable(uri).get_add_actions(flatten=True)).sort_by("max._cdc_lsn")
    ours, theirs = adds.to_pylist()
    assert ours["num_records"] == 3
    for column in ("Order", "_cdc_lsn", "_cdc_seq", "sku", "day"):
        assert ours[f"min.{column}"] is not None and ours[f"max.{column}"] is not None
    assert ours["null_count.price"] == 3
    data = rows(5)
    assert ours["min.at"] <= min(data["at"].to_pylist()) <= ours["max.at"]
    assert ours["max.at"] >= max(data["at"].to_pylist())
    assert ours.keys() == theirs.keys()
    dropped, held = droppable_partitions(adds, cutoff=date(2026, 2, 1), watermark=(6, 0))
    assert (dropped, held) == ([], date(2026, 1, 1))  # the delta-rs file at lsn 9 holds it


def test_file_stats_leave_out_what_they_cannot_bound() -> None:
    long_text = "x" * 65
    stats = file_stats(
        pa.table(
            {
                "f": [1.5, float("nan")],
                "s": [long_text, "a"],
                "ts": pa.array([1, 2], pa.timestamp("us")),  # no zone: no bound written
                "l": pa.array([[1], None], pa.list_(pa.int64())),
            }
        )
    )
    assert stats == {
        "numRecords": 2,
        "nullCount": {"f": 0, "s": 0, "ts": 0},
        "minValues": {},
        "maxValues": {},
    }


def test_commits_of_other_writers_are_skipped_over(tmp_path: Path) -> None:
    """A compaction (``cdc jobs compact``) and another app's append land between two
    appends: the appender takes the next free version and everything stays."""
    uri = new_table(tmp_path)
    appender = open_appender(uri)
    assert appender is not None
    appender.append(rows(1), transactions=[("t:lsn", 1)])
    appender.append(rows(2), transactions=[("t:lsn", 2)])
    DeltaTable(uri).optimize.compact()
    props = CommitProperties(app_transactions=[Transaction("other:lsn", 3)])
    write_deltalake(uri, rows(3), mode="append", commit_properties=props)
    assert appender.append(rows(4), transactions=[("t:lsn", 4)]) == 5
    table = DeltaTable(uri)
    assert table.version() == 5 and table.transaction_version("t:lsn") == 4
    assert sorted(set(table.to_pyarrow_table()[layout.LSN].to_pylist())) == [1, 2, 3, 4]


def test_another_writer_with_the_same_app_id_fails_the_append(tmp_path: Path) -> None:
    uri = new_table(tmp_path)
    appender = open_appender(uri)
    assert appender is not None
    props = CommitProperties(app_transactions=[Transaction("t:lsn", 3)])
    write_deltalake(uri, rows(3), mode="append", commit_properties=props)
    with pytest.raises(TransientSinkError, match="two pipelines"):
        appender.append(rows(4), transactions=[("t:lsn", 4)])
    assert DeltaTable(uri).transaction_version("t:lsn") == 3


def test_a_schema_changed_by_another_writer_hands_the_commit_to_delta_rs(tmp_path: Path) -> None:
    sink = DeltaChangelogSink(str(tmp_path), app_id="t")
    sink.ensure_table(MIXED)
    sink.add(change(MIXED, "c", 1, nulls=False, lsn=FIRST_LSN, seq=0))
    sink.flush()  # the table's appender is open now, at version 1
    uri = layout.changes_uri(str(tmp_path), MIXED.qualified_name)
    extra = rows(2).append_column("added", pa.array(["x"] * 3))
    write_deltalake(uri, extra, mode="append", schema_mode="merge")
    sink.add(change(MIXED, "c", 3, nulls=True, lsn=FIRST_LSN + 1, seq=0))
    assert sink.flush()["rows"] == 1
    table = DeltaTable(uri)
    assert table.history(1)[0]["clientVersion"] != "cdc-lakehouse"  # delta-rs committed it
    assert table.transaction_version("t:lsn") == FIRST_LSN + 1
    assert table.to_pyarrow_table().num_rows == 5
    sink.add(change(MIXED, "c", 4, nulls=False, lsn=FIRST_LSN + 2, seq=0))
    sink.flush()  # and the append takes over again, on the widened table
    assert DeltaTable(uri).history(1)[0]["clientVersion"] == "cdc-lakehouse"


def test_a_checkpoint_every_interval(tmp_path: Path) -> None:
    uri = new_table(tmp_path, **{"delta.checkpointInterval": "3"})
    appender = open_appender(uri)
    assert appender is not None
    for lsn in range(1, 6):
        appender.append(rows(lsn, day=date(2026, 1, lsn)), transactions=[("t:lsn", lsn)])
    log_dir = Path(uri) / "_delta_log"
    assert (log_dir / f"{2:020d}.checkpoint.parquet").exists()
    assert (log_dir / "_last_checkpoint").exists()
    assert not [p for p in os.listdir(log_dir) if p.endswith(".tmp") or "probe" in p]
    table = DeltaTable(uri)
    assert table.to_pyarrow_table().num_rows == 15 and table.transaction_version("t:lsn") == 5


def test_rows_spanning_partitions_become_one_file_each(tmp_path: Path) -> None:
    uri = new_table(tmp_path)
    appender = open_appender(uri)
    assert appender is not None
    data = pa.concat_tables([rows(1, day=date(2026, 1, 1)), rows(2, day=date(2026, 1, 2))])
    appender.append(data, transactions=[("t:lsn", 2)])
    adds = pa.table(DeltaTable(uri).get_add_actions(flatten=True)).to_pylist()
    assert sorted((a["partition._cdc_date"], a["num_records"]) for a in adds) == [
        (date(2026, 1, 1), 3),
        (date(2026, 1, 2), 3),
    ]


def test_what_the_append_does_not_take_goes_to_delta_rs(tmp_path: Path) -> None:
    assert open_appender("s3://bucket/lake/t") is None
    assert open_appender(str(tmp_path / "missing")) is None
    uri = new_table(tmp_path)
    DeltaTable(uri).alter.add_constraint({"positive_order": '"Order" > 0'})
    assert open_appender(uri) is None  # a check constraint: delta-rs enforces it
    other = new_table(tmp_path / "other")
    appender = open_appender(other)
    assert appender is not None
    assert appender.accepts(rows(1))
    assert not appender.accepts(rows(1).append_column("new", pa.array([1, 2, 3])))
    assert not appender.accepts(rows(1).set_column(0, "Order", pa.array(["1", "2", "3"])))
    no_lsn = rows(1).set_column(
        rows(1).schema.get_field_index(layout.LSN), layout.LSN, pa.array([None, 1, 2], pa.int64())
    )
    assert not appender.accepts(no_lsn)  # a NOT NULL column with a null


def test_the_log_state_read_without_delta_rs_matches_delta_rs(tmp_path: Path) -> None:
    """Version, protocol and metadata as the appender reads them (the newest checkpoint's
    two columns and the commits after it) against delta-rs, through checkpoints, a
    compaction, a widened schema and a check constraint."""
    uri = new_table(tmp_path, **{"delta.checkpointInterval": "2"})

    def same() -> None:
        state = log_state(uri)
        assert state is not None
        version, protocol, metadata = state
        table = DeltaTable(uri)
        assert version == table.version()
        expected = table.protocol()
        assert protocol["minWriterVersion"] == expected.min_writer_version
        assert (protocol.get("writerFeatures") or None) == expected.writer_features
        assert json.loads(metadata["schemaString"]) == json.loads(table.schema().to_json())
        assert metadata["partitionColumns"] == table.metadata().partition_columns
        assert metadata["configuration"] == table.metadata().configuration

    same()
    appender = open_appender(uri)
    assert appender is not None
    for lsn in range(1, 4):
        appender.append(rows(lsn), transactions=[("t:lsn", lsn)])
        same()
    DeltaTable(uri).optimize.compact()
    same()
    write_deltalake(
        uri, rows(5).append_column("added", pa.array([1, 2, 3])), mode="append", schema_mode="merge"
    )
    same()
    DeltaTable(uri).alter.add_constraint({"positive_order": '"Order" > 0'})
    same()
    assert log_state(str(tmp_path / "missing")) is None
    last = Path(uri) / "_delta_log" / "_last_checkpoint"
    last.write_text(last.read_text()[:5])  # caught while being rewritten
    assert log_state(uri) is None  # delta-rs commits this time
