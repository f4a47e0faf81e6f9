"""LakeDiskSync: how far the synced writes of a local lake reach (sinks.disk_sync)."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import pytest

from sinks import disk_sync
from sinks.disk_sync import LakeDiskSync
from sinks.errors import TerminalSinkError


def test_an_lsn_is_durable_once_a_sync_started_after_it_was_given(tmp_path: Path) -> None:
    (tmp_path / "part-0.parquet").write_bytes(b"x" * 4096)
    sync = LakeDiskSync(str(tmp_path))
    try:
        # No sync can have covered an LSN before it was given.
        assert sync.durable(100) == 0
        assert sync.durable_now(100) == 100
        assert sync.durable(100) == 100
        # An older LSN is durable as well; a newer one waits for its own sync.
        assert sync.durable(50) == 50
        assert sync.durable(200) == 100
        deadline = time.monotonic() + 10
        while sync.durable(200) != 200:
            assert time.monotonic() < deadline, "the background sync never finished"
            time.sleep(0.01)
    finally:
        sync.close()


def test_requests_during_a_sync_wait_for_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_sync = disk_sync.filesystem_sync()
    started = threading.Semaphore(0)
    release = threading.Semaphore(0)

    def sync(fd: int) -> None:
        started.release()
        assert release.acquire(timeout=10)
        real_sync(fd)

    monkeypatch.setattr(disk_sync, "filesystem_sync", lambda: sync)
    lake = LakeDiskSync(str(tmp_path))
    try:
        lake.durable(10)
        assert started.acquire(timeout=10)  # the sync for 10 runs
        # Written after that sync began: it does not cover 20.
        assert lake.durable(20) == 0
        release.release()
        assert started.acquire(timeout=10)  # the sync for 20 runs
        assert lake.durable(20) == 10
        release.release()
        assert lake.durable_now(20) == 20
    finally:
        release.release()
        lake.close()


def test_a_lake_not_written_yet_has_nothing_to_sync(tmp_path: Path) -> None:
    sync = LakeDiskSync(str(tmp_path / "not-yet"))
    try:
        assert sync.durable_now(7) == 7
    finally:
        sync.close()


def test_a_failing_sync_stops_the_pipeline_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def sync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(disk_sync, "filesystem_sync", lambda: sync)
    lake = LakeDiskSync(str(tmp_path))
    try:
        with pytest.raises(TerminalSinkError, match="Input/output error") as info:
            lake.durable_now(5)
        assert str(tmp_path) in str(info.value)
        assert "restart" in str(info.value)
        # And it keeps saying so: nothing after the failure is confirmed.
        with pytest.raises(TerminalSinkError):
            lake.durable(6)
    finally:
        lake.close()
