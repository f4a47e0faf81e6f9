"""The Delta changelog sink with many tables: concurrent commits, per-table schedules, and
what capture may confirm while some tables still hold rows (real Delta tables)."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from deltalake import DeltaTable

from catalog import lake_layout as layout
from cdc.core.events import ChangeEvent
from cdc.core.pgtypes import Oid
from cdc.core.position import CommittedTransactions
from cdc.core.settings import BatchSettings
from cdc.core.table_schema import ColumnSchema, TableSchema
from sinks.delta_changelog import DeltaChangelogSink
from sinks.errors import SinkError

TS = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)


def composite(i: int) -> TableSchema:
    """A table keyed on (text, date, numeric), with a nullable column; every third one a
    quoted mixed-case name."""
    name = f"Orders {i}" if i % 3 == 0 else f"orders_{i}"
    return TableSchema(
        "Shop",
        name,
        (
            ColumnSchema("Region", Oid.TEXT, -1, True),
            ColumnSchema("day", Oid.DATE, -1, True),
            ColumnSchema("n", Oid.NUMERIC, (10 << 16 | 1) + 4, True),  # numeric(10,1)
            ColumnSchema("note", Oid.TEXT),
        ),
    )


KEYLESS = TableSchema("shop", "log", (ColumnSchema("line", Oid.TEXT), ColumnSchema("at", Oid.INT8)))


def event(table: TableSchema, values: tuple, lsn: int, seq: int = 0) -> ChangeEvent:
    return ChangeEvent(
        op="c",
        table=table,
        before=None,
        after=values,
        commit_lsn=lsn,
        seq=seq,
        txid=7,
        commit_ts=TS,
        lsn=lsn,
        size_bytes=40,
    )


def row(table: TableSchema, k: int) -> tuple:
    if table is KEYLESS:
        return (None if k % 2 else f"line {k}", k)
    return (f"r{k}", date(2026, 1, 1 + k % 28), Decimal(k) / 10, None if k % 2 else f"n{k}")


def versions(root: Path, table: TableSchema) -> int:
    return DeltaTable(layout.changes_uri(str(root), table.qualified_name)).version()


def written(root: Path, table: TableSchema) -> list[dict]:
    uri = layout.changes_uri(str(root), table.qualified_name)
    data = DeltaTable(uri).to_pyarrow_table().sort_by([("_cdc_lsn", "ascending")])
    return data.select([c.name for c in table.columns] + ["_cdc_lsn"]).to_pylist()


def expected(table: TableSchema, lsns: list[int], keys: list[int] | None = None) -> list[dict]:
    """The rows ``row(table, key)`` written at ``lsns`` (the keys default to the LSNs)."""
    names = [c.name for c in table.columns]
    return [
        dict(zip(names, row(table, k), strict=True), _cdc_lsn=lsn)
        for k, lsn in zip(keys or lsns, lsns, strict=True)
    ]


def test_a_flush_of_many_tables_commits_each_once_concurrently(tmp_path: Path) -> None:
    tables = [composite(i) for i in range(40)] + [KEYLESS]
    sink = DeltaChangelogSink(str(tmp_path), app_id="t", batch=BatchSettings(commit_threads=4))
    lsns: dict[str, list[int]] = {t.qualified_name: [] for t in tables}
    lsn = 100
    for _ in range(3):  # interleaved, as transactions touching every table arrive
        for t in tables:
            lsn += 1
            sink.add(event(t, row(t, lsn), lsn))
            lsns[t.qualified_name].append(lsn)
    metrics = sink.flush()
    assert metrics["commits"] == len(tables) and metrics["rows"] == 3 * len(tables)
    assert metrics["tables"] == {t.qualified_name: 3 for t in tables}
    assert sink.pending_rows == 0 and sink.pending_since() is None
    for t in tables:
        assert versions(tmp_path, t) == 0  # one commit each
        assert written(tmp_path, t) == expected(t, lsns[t.qualified_name])
        uri = layout.changes_uri(str(tmp_path), t.qualified_name)
        assert DeltaTable(uri).transaction_version("t:lsn") == lsns[t.qualified_name][-1]
    assert sink.flush()["commits"] == 0
    sink.close()


def test_a_failed_table_keeps_its_rows_and_the_others_stay_committed(tmp_path: Path) -> None:
    good, bad = composite(1), composite(2)
    sink = DeltaChangelogSink(str(tmp_path), app_id="t", batch=BatchSettings(commit_threads=4))
    # A file where the bad table's directory should be: its commit fails.
    blocker = Path(layout.table_dir(str(tmp_path), bad.qualified_name))
    blocker.write_text("in the way")
    sink.add(event(good, row(good, 1), 1))
    sink.add(event(bad, row(bad, 2), 2))
    sink.add(event(KEYLESS, row(KEYLESS, 3), 3))
    with pytest.raises(SinkError):
        sink.flush()
    assert written(tmp_path, good) == expected(good, [1])
    assert written(tmp_path, KEYLESS) == expected(KEYLESS, [3])
    assert sink.pending_rows == 1 and sink.pending_since() == 2
    # More rows for every table, then the way is clear: the failed rows come first.
    sink.add(event(bad, row(bad, 4), 4))
    sink.add(event(good, row(good, 5), 5))
    blocker.unlink()
    metrics = sink.flush()
    assert metrics["tables"] == {bad.qualified_name: 2, good.qualified_name: 1}
    assert written(tmp_path, bad) == expected(bad, [2, 4])
    assert written(tmp_path, good) == expected(good, [1, 5])
    assert versions(tmp_path, good) == 1 and versions(tmp_path, KEYLESS) == 0
    sink.close()


def test_each_table_flushes_on_its_own_schedule(tmp_path: Path) -> None:
    busy, quiet = composite(1), composite(2)
    sink = DeltaChangelogSink(
        str(tmp_path), app_id="t", batch=BatchSettings(max_rows=10, max_seconds=0.3)
    )
    sink.add(event(quiet, row(quiet, 1), 1))
    for lsn in range(2, 5):
        sink.add(event(busy, row(busy, lsn), lsn))
    assert not sink.flush_due()
    sink.add(event(busy, row(busy, 5), 5))  # 4 of 10 rows, two tables: busy holds its share?
    assert not sink.flush_due()
    sink.add(event(busy, row(busy, 6), 6))  # 5 rows: its share of max_rows
    assert sink.flush_due()
    sink.flush_due_tables()
    # The commit runs in a commit thread; its rows count as pending until it has landed.
    assert sink.pending_rows == 6 and sink.pending_since() == 1
    deadline = time.monotonic() + 30
    while not sink.flush_due() and time.monotonic() < deadline:
        time.sleep(0.01)
    landed = sink.flush_due_tables()
    assert landed["tables"] == {busy.qualified_name: 5}
    assert sink.pending_rows == 1 and sink.pending_since() == 1
    assert written(tmp_path, busy) == expected(busy, [2, 3, 4, 5, 6])
    uri = layout.changes_uri(str(tmp_path), quiet.qualified_name)
    assert not DeltaTable.is_deltatable(uri)  # the quiet table waits for its own age
    assert 0 < sink.seconds_until_flush() <= 0.3
    time.sleep(0.3)
    assert sink.flush_due()
    sink.flush_due_tables()
    metrics = sink.flush()  # waits for the running commit
    assert metrics["tables"] == {quiet.qualified_name: 1}
    assert sink.pending_rows == 0 and sink.pending_since() is None
    assert written(tmp_path, quiet) == expected(quiet, [1])
    sink.close()


def wait_landed(sink: DeltaChangelogSink) -> dict:
    """The next flush_due_tables once a running commit has ended."""
    deadline = time.monotonic() + 30
    while not sink.flush_due() and time.monotonic() < deadline:
        time.sleep(0.01)
    return sink.flush_due_tables()


def test_what_capture_may_confirm_while_one_table_holds_rows(tmp_path: Path) -> None:
    """Transactions committed at 10, 20, 30 and 40 (ending at 15, 25, 35, 45). The one at
    30 left a row in table b, which is not due; table a is flushed: capture may confirm
    the end of 20, and everything once b is flushed too."""
    a, b = composite(1), composite(2)
    sink = DeltaChangelogSink(
        str(tmp_path), app_id="t", batch=BatchSettings(max_rows=4, max_seconds=60)
    )
    done = CommittedTransactions()
    sink.add(event(a, row(a, 10), 10))
    sink.add(event(b, row(b, 11), 10, 1))
    done.add(10, 15)
    sink.add(event(a, row(a, 20), 20))
    done.add(20, 25)
    sink.flush()
    assert sink.pending_since() is None
    done.clear()  # nothing pending: capture confirms all it received
    sink.add(event(b, row(b, 30), 30))
    done.add(30, 35)
    sink.add(event(a, row(a, 40), 40))
    sink.add(event(a, row(a, 41), 40, 1))
    done.add(40, 45)
    assert sink.flush_due()  # a holds its share of max_rows (2 of 4, two tables)
    sink.flush_due_tables()
    assert sink.pending_since() == 30
    assert done.durable_end(30) is None  # 30 itself is not durable
    assert wait_landed(sink)["tables"] == {a.qualified_name: 2}
    assert sink.pending_rows == 1 and sink.pending_since() == 30  # b's row, not a's
    assert written(tmp_path, a) == expected(a, [10, 20, 40, 40], keys=[10, 20, 40, 41])
    assert done.durable_end(30) is None
    sink.flush()
    assert sink.pending_since() is None
    assert written(tmp_path, b) == expected(b, [10, 30], keys=[11, 30])
    sink.close()


def test_committed_transactions_give_the_newest_end_below_the_oldest_pending() -> None:
    done = CommittedTransactions()
    for commit in (100, 200, 300):
        done.add(commit, commit + 50)
    assert done.durable_end(100) is None
    assert done.durable_end(250) == 250
    assert len(done) == 1
    assert done.durable_end(10**9) == 350
    assert done.durable_end(10**9) is None


def test_commits_start_only_as_fast_as_the_threads_take_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slow commits (0.2 s each, as on a distant object store) and one commit thread:
    flush_due_tables queues no more than the thread starts before the next call, the
    table waiting longest first, and a waiting table's new rows go into its first commit
    instead of waiting for a second one."""
    import sinks.delta_append as delta_append

    real_append = delta_append.LocalAppender.append

    def slow_append(self: delta_append.LocalAppender, *args: Any, **kwargs: Any) -> int | None:
        time.sleep(0.2)
        return real_append(self, *args, **kwargs)

    tables = [composite(i) for i in range(3)] + [KEYLESS]
    sink = DeltaChangelogSink(
        str(tmp_path), app_id="t", batch=BatchSettings(max_seconds=0.05, commit_threads=1)
    )
    for table in tables:
        sink.ensure_table(table)
    monkeypatch.setattr(delta_append.LocalAppender, "append", slow_append)
    for table in tables:  # times the commits: 0.2 s
        sink.add(event(table, row(table, 1), 1))
    sink.flush()
    sink.flush_due_tables()
    sink.flush_due_tables()  # called back to back: the caller comes back at once
    for lsn, table in enumerate(tables, start=2):
        sink.add(event(table, row(table, lsn), lsn))
        time.sleep(0.01)  # tables[0] waits longest
    time.sleep(0.06)
    sink.flush_due_tables()
    assert sink.seconds_until_flush() > 0  # the thread is taken: nothing else may start
    assert not sink.flush_due_tables()["commits"]
    last = tables[-1]
    sink.add(event(last, row(last, 9), 9))  # joins the rows still waiting
    landed = wait_landed(sink)
    assert landed["tables"] == {tables[0].qualified_name: 1}  # the oldest went first
    while sink.pending_rows:
        wait_landed(sink)
    assert [versions(tmp_path, t) for t in tables] == [2, 2, 2, 2]  # one commit each
    assert written(tmp_path, last) == expected(last, [1, 5, 9])
    sink.close()
