"""Compaction, vacuum, checkpoint, retention and the scheduler over hand-built changelogs
(real Delta tables, no PostgreSQL)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from catalog import lake_layout
from cdc.core.table_schema import ColumnSchema
from jobs.common import parse_duration, parse_size, with_conflict_retries
from jobs.compact import compact, partitions_to_compact
from jobs.errors import CommitConflictError, TerminalJobError
from jobs.maintenance import checkpoint, vacuum
from jobs.merge import merge
from jobs.retention import droppable_partitions, retention
from jobs.schedule import ScheduleConfig, load_schedule, run_schedule
from tests.plugins.lake import change, register_table, table_checksum, write_changes

INT8, INT4, TEXT = 20, 23, 25
ORDERS = pa.schema([("id", pa.int64()), ("qty", pa.int32()), ("note", pa.string())])
ORDERS_PG = (
    ColumnSchema("id", INT8, is_key=True),
    ColumnSchema("qty", INT4),
    ColumnSchema("note", TEXT),
)
NAME = "public.orders"
ALL_COLUMNS = [
    "id",
    "qty",
    "note",
    *[c for c in lake_layout.METADATA_COLUMNS if c != "_cdc_fallback"],
]


@pytest.fixture
def lake(tmp_path: Path) -> str:
    root = str(tmp_path / "lake")
    register_table(root, NAME, ORDERS_PG)
    return root


def stream(lake: str, commits: int, *, per_commit: int = 5, first_lsn: int = 0) -> int:
    """Many small commits, as a streaming sink makes; 24 LSNs per day. Returns the next LSN."""
    lsn = first_lsn
    for _ in range(commits):
        rows = [
            change("c" if lsn < 40 else "u", lsn, s, id=(lsn * 7 + s) % 50, qty=lsn, note=f"n{lsn}")
            for s in range(per_commit)
        ]
        write_changes(lake, NAME, rows, ORDERS)
        lsn += 1
    return lsn


def files_per_partition(uri: str) -> dict[str, int]:
    adds = pa.table(DeltaTable(uri).get_add_actions(flatten=True))
    counts: dict[str, int] = {}
    for value in adds.column("partition._cdc_date").to_pylist():
        counts[str(value)] = counts.get(str(value), 0) + 1
    return counts


# -- compaction ------------------------------------------------------------------------------------


def test_compaction_packs_small_files_and_keeps_every_row(lake: str) -> None:
    stream(lake, 72)  # 3 days x 24 commits
    uri = lake_layout.changes_uri(lake, NAME)
    before = files_per_partition(uri)
    assert set(before.values()) == {24}
    checksum = table_checksum(lake, f"{NAME}_changes", ALL_COLUMNS)
    current = table_checksum(lake, NAME, ["id", "qty", "note"])

    metrics = compact(lake, min_files=4)
    result = metrics["tables"][f"{NAME}/changes"]
    assert (result["files_before"], result["files_after"]) == (72, 3)
    assert [p["partition"] for p in result["partitions"]] == [
        "2024-01-01",
        "2024-01-02",
        "2024-01-03",
    ]
    assert all(p["files_removed"] == 24 and p["files_added"] == 1 for p in result["partitions"])
    assert metrics["files_before"] == 72 and metrics["files_after"] == 3
    assert metrics["bytes_after"] < metrics["bytes_before"] and metrics["duration_s"] > 0
    assert all(before[p] >= 10 * n for p, n in files_per_partition(uri).items())
    assert table_checksum(lake, f"{NAME}_changes", ALL_COLUMNS) == checksum
    assert table_checksum(lake, NAME, ["id", "qty", "note"]) == current

    # Nothing left that needs it: the second run rewrites nothing.
    again = compact(lake, min_files=4)["tables"][f"{NAME}/changes"]
    assert again["partitions"] == [] and again["partitions_skipped"] == 3


def test_only_partitions_that_need_it_are_compacted(lake: str) -> None:
    stream(lake, 30)  # day 1: 24 files; day 2: 6 files
    result = compact(lake, min_files=8)["tables"][f"{NAME}/changes"]
    assert [p["partition"] for p in result["partitions"]] == ["2024-01-01"]
    assert result["partitions_skipped"] == 1
    assert files_per_partition(lake_layout.changes_uri(lake, NAME)) == {
        "2024-01-01": 1,
        "2024-01-02": 6,
    }


def test_z_order_and_the_merged_table(lake: str) -> None:
    for lsn in range(10):  # ten merges of new keys leave ten small files in the merged table
        rows = [change("c", lsn, s, id=lsn * 100 + s, qty=s, note="x") for s in range(20)]
        write_changes(lake, NAME, rows, ORDERS)
        merge(lake)
    current_uri = lake_layout.current_uri(lake, NAME)
    files = len(DeltaTable(current_uri).file_uris())
    assert files > 2
    view = table_checksum(lake, NAME, ["id", "qty", "note"])
    metrics = compact(lake, min_files=2, z_order=True)
    current = metrics["tables"][f"{NAME}/current"]
    assert current["files_before"] == files and current["files_after"] == 1
    assert DeltaTable(current_uri).history(1)[0]["operation"] == "OPTIMIZE"
    assert table_checksum(lake, NAME, ["id", "qty", "note"]) == view
    assert compact(lake, which="changes")["tables"].keys() == {f"{NAME}/changes"}


def test_partition_policy() -> None:
    files = pa.table(
        {
            "size_bytes": [10, 10, 10, 500, 10, 10],
            "partition._cdc_date": [date(2024, 1, d) for d in (1, 1, 1, 1, 2, 3)],
        }
    )
    assert partitions_to_compact(files, target_size=100, min_files=2) == [("2024-01-01", 3)]
    unpartitioned = pa.table({"size_bytes": [1, 2, 3]})
    assert partitions_to_compact(unpartitioned, target_size=100, min_files=3) == [(None, 3)]


# -- vacuum and checkpoint -------------------------------------------------------------------------


def test_vacuum_removes_what_compaction_left_behind(lake: str) -> None:
    stream(lake, 30)
    compact(lake, min_files=4)
    uri = lake_layout.changes_uri(lake, NAME)
    on_disk = len(list(Path(uri).rglob("*.parquet")))
    assert on_disk == 30 + 2  # the compacted files are still there

    with pytest.raises(TerminalJobError, match="--force"):
        vacuum(lake, retain=timedelta(0))
    dry = vacuum(lake, retain=timedelta(0), dry_run=True, enforce_retention_duration=False)
    assert dry["files_deleted"] == 30 and dry["dry_run"] is True
    assert len(list(Path(uri).rglob("*.parquet"))) == on_disk
    kept = vacuum(lake, retain=timedelta(days=7))
    assert kept["files_deleted"] == 0 and kept["retain_hours"] == 168

    checksum = table_checksum(lake, f"{NAME}_changes", ALL_COLUMNS)
    done = vacuum(lake, retain=timedelta(0), enforce_retention_duration=False)
    assert done["tables"][f"{NAME}/changes"]["files_deleted"] == 30
    assert len(list(Path(uri).rglob("*.parquet"))) == 2
    assert table_checksum(lake, f"{NAME}_changes", ALL_COLUMNS) == checksum


def test_checkpoint_writes_once_per_new_version(lake: str) -> None:
    stream(lake, 5)
    merge(lake)
    first = checkpoint(lake)
    changes = first["tables"][f"{NAME}/changes"]
    assert changes["checkpointed"] is True and changes["version"] == 4
    assert first["tables"][f"{NAME}/current"]["checkpointed"] is True
    assert first["checkpoints"] == 2
    log_dir = Path(lake_layout.changes_uri(lake, NAME)) / "_delta_log"
    assert (log_dir / f"{4:020d}.checkpoint.parquet").is_file()
    assert checkpoint(lake)["checkpoints"] == 0  # nothing new since
    stream(lake, 1, first_lsn=100)
    assert checkpoint(lake, tables=[NAME])["tables"][f"{NAME}/changes"]["version"] == 5
    # Readers start from the checkpoint and still see every row.
    assert table_checksum(lake, f"{NAME}_changes", ["id"])[0] == 30


# -- retention -------------------------------------------------------------------------------------

NOW = datetime(2024, 1, 10, 12, tzinfo=UTC)


def test_retention_is_limited_to_the_merge_watermark(lake: str) -> None:
    stream(lake, 24 * 4)  # 2024-01-01 .. 2024-01-04
    never = retention(lake, keep=timedelta(days=1), now=NOW)["tables"][NAME]
    assert never["status"] == "skipped" and "never merged" in never["reason"]

    # Merge up to lsn 40 (2024-01-02), then more changes arrive.
    uri = lake_layout.changes_uri(lake, NAME)
    DeltaTable(uri).delete(f"{lake_layout.LSN} > 40")
    merge(lake)
    stream(lake, 24 * 4 - 41, first_lsn=41)
    view = table_checksum(lake, NAME, ["id", "qty", "note"])

    result = retention(lake, keep=timedelta(days=1), now=NOW)
    table = result["tables"][NAME]
    assert table["requested_cutoff"] == "2024-01-09"
    assert table["partitions"] == ["2024-01-01"]  # 2024-01-02 holds lsn 41..47: not merged
    assert table["limited_by_merge"] is True and table["effective_cutoff"] == "2024-01-02"
    assert "2024-01-02" in table["reason"] and "cdc jobs merge" in table["reason"]
    assert table["rows_dropped"] == 24 * 5 == result["rows_dropped"]
    assert sorted(files_per_partition(uri)) == ["2024-01-02", "2024-01-03", "2024-01-04"]
    assert table_checksum(lake, NAME, ["id", "qty", "note"]) == view  # current state intact

    merge(lake)
    result = retention(lake, keep=timedelta(days=1), now=NOW)["tables"][NAME]
    assert result["partitions"] == ["2024-01-02", "2024-01-03", "2024-01-04"]
    assert result["limited_by_merge"] is False
    assert table_checksum(lake, NAME, ["id", "qty", "note"]) == view
    assert DeltaTable(lake_layout.current_uri(lake, NAME)).to_pyarrow_table().num_rows == view[0]


def test_retention_respects_keep_and_dry_run(lake: str) -> None:
    stream(lake, 24 * 3)
    merge(lake)
    dry = retention(lake, keep=timedelta(days=8), now=NOW, dry_run=True)
    assert dry["tables"][NAME]["partitions"] == ["2024-01-01"]
    assert dry["tables"][NAME]["status"] == "dry_run" and dry["rows_dropped"] == 0
    assert len(files_per_partition(lake_layout.changes_uri(lake, NAME))) == 3
    none = retention(lake, keep=timedelta(days=30), now=NOW)["tables"][NAME]
    assert none["status"] == "nothing_to_drop" and none["partitions"] == []


def test_retention_skips_keyless_tables(lake: str) -> None:
    register_table(lake, "logs.events", [ColumnSchema("msg", TEXT)])
    write_changes(lake, "logs.events", [change("c", 1, msg="a")], pa.schema([("msg", pa.string())]))
    result = retention(lake, keep=timedelta(0), now=NOW)["tables"]["logs.events"]
    assert result["status"] == "skipped" and "keyless" in result["reason"]


def test_droppable_partitions_policy() -> None:
    files = pa.table(
        {
            "partition._cdc_date": [date(2024, 1, d) for d in (1, 1, 2, 3, 9)],
            "max._cdc_lsn": [5, 7, 7, 8, 99],
            "max._cdc_seq": [9, 2, 3, 0, 0],
        }
    )
    # lsn 7 seq 3 is after (7, 2): 2024-01-02 is held back, 2024-01-03 too (in order).
    assert droppable_partitions(files, cutoff=date(2024, 1, 5), watermark=(7, 2)) == (
        [date(2024, 1, 1)],
        date(2024, 1, 2),
    )
    assert droppable_partitions(files, cutoff=date(2024, 1, 5), watermark=(8, 0)) == (
        [date(2024, 1, 1), date(2024, 1, 2), date(2024, 1, 3)],
        None,
    )
    no_stats = files.drop_columns(["max._cdc_lsn", "max._cdc_seq"])
    assert droppable_partitions(no_stats, cutoff=date(2024, 1, 5), watermark=(99, 0)) == (
        [],
        date(2024, 1, 1),
    )


# -- helpers ---------------------------------------------------------------------------------------


def test_durations_and_sizes() -> None:
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("1.5h") == timedelta(minutes=90)
    assert parse_duration("7d") == parse_duration("1w") == timedelta(days=7)
    assert parse_duration(30) == timedelta(seconds=30)
    assert parse_size("128MiB") == 128 * 2**20 and parse_size("1GB") == 10**9
    for bad in ("7", "abc", "-1d", "3 years"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        parse_size("0")


def test_conflicts_are_retried_then_given_up_cleanly() -> None:
    from deltalake.exceptions import CommitFailedError

    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise CommitFailedError("concurrent transaction")
        return "ok"

    assert with_conflict_retries("t", flaky, sleep=lambda _s: None) == ("ok", 2)

    def always() -> None:
        raise CommitFailedError("concurrent transaction")

    with pytest.raises(CommitConflictError, match="3 times"):
        with_conflict_retries("t", always, attempts=3, sleep=lambda _s: None)


# -- scheduler -------------------------------------------------------------------------------------


def test_schedule_config_validation(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(
        'lake = "/data/lake"\n'
        '[[jobs]]\njob = "merge"\nevery = "5m"\n'
        '[[jobs]]\njob = "compact"\ncron = "*/30 * * * *"\ntarget_size = "64MiB"\n'
        '[[jobs]]\njob = "vacuum"\ncron = "0 3 * * *"\nretain = "7d"\n'
        '[[jobs]]\njob = "retention"\ncron = "30 3 * * 0"\nkeep = "90d"\n'
        '[[jobs]]\njob = "checkpoint"\nevery = "1h"\n'
    )
    config = load_schedule(path)
    assert [j.job for j in config.jobs] == ["merge", "compact", "vacuum", "retention", "checkpoint"]
    assert config.max_concurrent_jobs == 1

    bad = {
        'job = "merge"\n': "exactly one",
        'job = "merge"\nevery = "5m"\ncron = "* * * * *"\n': "exactly one",
        'job = "merge"\ncron = "61 * * * *"\n': "61",
        'job = "vacuum"\nevery = "1h"\nretain = "soon"\n': "invalid duration",
        'job = "retention"\nevery = "1h"\n': "keep",
        'job = "explode"\nevery = "1h"\n': "explode",
        'job = "merge"\nevery = "1h"\ntabels = ["x"]\n': "tabels",
    }
    for body, message in bad.items():
        path.write_text(f"[[jobs]]\n{body}")
        with pytest.raises(TerminalJobError, match=message):
            load_schedule(path)
    path.write_text(
        '[[jobs]]\njob = "merge"\nevery = "1m"\n[[jobs]]\njob = "merge"\nevery = "2m"\n'
    )
    with pytest.raises(TerminalJobError, match="distinct 'name'"):
        load_schedule(path)
    path.write_text("jobs = [")
    with pytest.raises(TerminalJobError, match="not valid TOML"):
        load_schedule(path)


def test_schedule_runs_jobs_logs_metrics_and_stops(
    lake: str, caplog: pytest.LogCaptureFixture
) -> None:
    stream(lake, 20)
    config = ScheduleConfig.model_validate(
        {
            "jobs": [
                {"job": "merge", "every": "1s"},
                {"job": "compact", "every": "1s", "min_files": 2},
                {"job": "vacuum", "name": "bad vacuum", "every": "1s", "retain": "0s"},
            ]
        }
    )
    stop = threading.Event()
    seen: list[tuple[str, Any, Any]] = []

    def on_run(label: str, metrics: Any, error: Any) -> None:
        seen.append((label, metrics, error))
        labels = {s[0] for s in seen}
        if {"merge", "compact", "bad vacuum"} <= labels:
            stop.set()

    caplog.set_level("INFO", logger="jobs.schedule")
    timer = threading.Timer(60, stop.set)  # the test's own deadline
    timer.start()
    try:
        started = time.monotonic()
        result = run_schedule(config, lake=lake, stop=stop, on_run=on_run)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 60, "the jobs never all ran"
    assert result["runs"]["merge"] >= 1 and result["runs"]["compact"] >= 1
    assert result["failures"].get("merge", 0) == 0
    assert result["failures"]["bad vacuum"] >= 1  # retain below the table minimum
    merge_metrics = next(m for label, m, _ in seen if label == "merge")
    assert merge_metrics["tables"][NAME]["status"] in ("merged", "up_to_date")
    assert "job merge finished" in caplog.text and '"tables"' in caplog.text
    assert "job bad vacuum failed" in caplog.text
    assert DeltaTable.is_deltatable(lake_layout.current_uri(lake, NAME))
