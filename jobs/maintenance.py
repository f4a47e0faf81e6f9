"""``cdc jobs vacuum`` and ``cdc jobs checkpoint``: keep storage and the Delta logs small.

* Vacuum deletes the data files that no version within the retention period references
  (files compacted away, partitions dropped by retention, rows rewritten by merges).
* Checkpoint writes a Parquet checkpoint of each table's log, so readers replay one file plus
  a few JSON commits instead of every commit, then removes the log entries older than the
  table's log retention (``delta.logRetentionDuration``, 30 days by default) that the
  checkpoint makes unnecessary.

Both work on the changelog and the merged table of every captured table, and are safe
beside live writers: vacuum only deletes files that are not part of the current version,
and a checkpoint is a side file, not a commit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import orjson
import pyarrow.fs as pafs
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from catalog import lake_layout
from jobs.common import DEFAULT_ATTEMPTS, elapsed, lake_tables, open_table, with_conflict_retries
from jobs.errors import TerminalJobError, TransientJobError

__all__ = ["checkpoint", "vacuum"]

log = logging.getLogger(__name__)


def _delta_tables(
    lake: str, tables: Sequence[str] | None, storage_options: dict[str, str] | None
) -> list[tuple[str, str]]:
    """``(label, uri)`` of every changelog and merged table to maintain."""
    out = []
    for table in lake_tables(lake, tables=tables, storage_options=storage_options):
        out.append((f"{table.qualified_name}/changes", table.changes_uri))
        out.append((f"{table.qualified_name}/current", table.current_uri))
    return out


def vacuum(
    lake: str,
    *,
    retain: timedelta,
    tables: Sequence[str] | None = None,
    dry_run: bool = False,
    enforce_retention_duration: bool = True,
    storage_options: dict[str, str] | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
) -> dict[str, Any]:
    """Delete data files no longer referenced by any table version newer than ``retain``.

    ``retain`` is rounded up to whole hours (deltalake's unit).

    Returns metrics: ``{"tables": {"<name>/changes": {"files_deleted": n}}, "files_deleted",
    "dry_run", "retain_hours", "duration_s"}``; with ``dry_run`` the files that would go are
    counted and nothing is deleted.

    Hazards:
        * A query, merge or time-travel read of a version older than ``retain`` fails once
          its files are gone. Keep ``retain`` longer than your longest query and than the
          interval between merges.
        * A shorter ``retain`` than the table's ``delta.deletedFileRetentionDuration`` (7
          days by default) is refused unless ``enforce_retention_duration=False``
          (``--force``).

    Raises:
        TerminalJobError: ``retain`` is below the table's configured minimum.

    Example:
        >>> vacuum("./lake", retain=timedelta(days=7))["files_deleted"]  # doctest: +SKIP
        4210
    """
    if retain < timedelta(0):
        raise ValueError("retain cannot be negative")
    started = time.monotonic()
    hours = math.ceil(retain.total_seconds() / 3600)
    results: dict[str, dict[str, Any]] = {}
    for label, uri in _delta_tables(lake, tables, storage_options):
        if open_table(uri, storage_options=storage_options) is None:
            continue

        def attempt(uri: str = uri) -> list[str]:
            dt = DeltaTable(uri, storage_options=storage_options)
            try:
                return dt.vacuum(
                    retention_hours=hours,
                    dry_run=dry_run,
                    enforce_retention_duration=enforce_retention_duration,
                )
            except DeltaError as e:
                if "retention" in str(e).lower() and "minimum" in str(e).lower():
                    raise TerminalJobError(
                        f"vacuum of {uri}: {e}. Pass a longer --retain, or --force if no "
                        "reader needs versions that old"
                    ) from e
                raise

        deleted, conflicts = with_conflict_retries(f"vacuum of {uri}", attempt, attempts=attempts)
        results[label] = {"files_deleted": len(deleted), "conflicts": conflicts}
        log.info("vacuum %s: %d files%s", uri, len(deleted), " (dry run)" if dry_run else "")
    return {
        "tables": results,
        "files_deleted": sum(r["files_deleted"] for r in results.values()),
        "dry_run": dry_run,
        "retain_hours": hours,
        "duration_s": elapsed(started),
    }


def checkpoint(
    lake: str,
    *,
    tables: Sequence[str] | None = None,
    cleanup: bool = True,
    storage_options: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Checkpoint each table's Delta log (when it has commits since the last checkpoint) and
    remove expired log entries.

    Returns metrics: ``{"tables": {"<name>/changes": {"version", "checkpointed",
    "log_files_before", "log_files_after"}}, "checkpoints", "duration_s"}``.

    Hazards:
        * Writing a checkpoint holds every live file's entry in memory: a table with
          hundreds of thousands of small files needs ``cdc jobs compact`` first, or the
          checkpoint's memory spikes.
        * Log clean-up removes the history needed for time travel to versions older than
          ``delta.logRetentionDuration``.

    Example:
        >>> checkpoint("./lake")["checkpoints"]  # doctest: +SKIP
        2
    """
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    for label, uri in _delta_tables(lake, tables, storage_options):
        dt = open_table(uri, storage_options=storage_options)
        if dt is None:
            continue
        version = dt.version()
        before = _log_files(uri, storage_options)
        done = _last_checkpoint(uri, storage_options) == version
        try:
            if not done:
                dt.create_checkpoint()
            if cleanup:
                dt.cleanup_metadata()
        except (DeltaError, OSError) as e:
            raise TransientJobError(f"checkpoint of {uri} failed: {e}") from e
        results[label] = {
            "version": version,
            "checkpointed": not done,
            "log_files_before": before,
            "log_files_after": _log_files(uri, storage_options),
        }
        log.info("checkpoint %s: %s", uri, results[label])
    return {
        "tables": results,
        "checkpoints": sum(1 for r in results.values() if r["checkpointed"]),
        "duration_s": elapsed(started),
    }


def _log_dir(uri: str, storage_options: dict[str, str] | None) -> tuple[pafs.FileSystem, str]:
    fs, path = lake_layout.filesystem(uri, storage_options)
    return fs, f"{path}/_delta_log"


def _log_files(uri: str, storage_options: dict[str, str] | None) -> int:
    """Commit (``.json``) files in the table's log."""
    fs, path = _log_dir(uri, storage_options)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise TransientJobError(f"cannot list {path}: {e}") from e
    return sum(1 for i in infos if i.base_name.endswith(".json"))


def _last_checkpoint(uri: str, storage_options: dict[str, str] | None) -> int | None:
    fs, path = _log_dir(uri, storage_options)
    try:
        with fs.open_input_stream(f"{path}/_last_checkpoint") as f:
            return int(orjson.loads(f.read())["version"])
    except FileNotFoundError:
        return None
    except (OSError, KeyError, ValueError, orjson.JSONDecodeError):
        return None  # unreadable hint: checkpointing again is harmless
