"""The CLI's snapshot progress display runs only while tables are copied."""

from __future__ import annotations

import threading

from cdc.cli.app import RichSnapshotProgress


def _refresh_threads() -> int:
    # rich.live's auto-refresh thread redraws every bar ten times a second.
    return sum(1 for t in threading.enumerate() if type(t).__name__ == "_RefreshThread")


def test_the_display_starts_with_the_first_table_and_stops_with_the_snapshot() -> None:
    before = _refresh_threads()
    progress = RichSnapshotProgress()
    assert _refresh_threads() == before  # nothing drawn for a run without a snapshot
    progress.table_started("public.a", 10)
    progress.rows_copied("public.a", 10)
    progress.table_done("public.a", 10)
    progress.table_started('public."Mixed Case"', None)
    assert progress.progress is not None
    tasks = progress.progress.tasks
    assert [t.completed for t in tasks] == [10, 0]
    assert _refresh_threads() == before + 1
    progress.snapshot_finished()
    assert progress.progress is None and _refresh_threads() == before
    progress.snapshot_finished()  # the CLI calls it again when the run ends: harmless
