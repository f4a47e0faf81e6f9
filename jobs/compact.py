"""``cdc jobs compact``: bin-pack the small files that streaming leaves in each partition.

The sink commits once per table per flush (every second by default), so a busy table gains
thousands of small files a day: slow scans, a long Delta log, and checkpoints whose memory
grows with the number of files. Compaction rewrites the small files of a partition into
files of about ``target_size`` (deltalake's ``optimize.compact``), optionally z-ordered by
the table's key, as one commit per partition with ``dataChange=false``.

Beside a live sink this is safe: appends and compactions of the same partition are both
retried by deltalake's conflict checker, the rows are only moved, never changed, and a
partition whose commit keeps conflicting is retried from a fresh read, or left for the next
run with a :class:`~jobs.errors.CommitConflictError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import date
from typing import Any, Literal

import pyarrow as pa
from deltalake import DeltaTable

from catalog import lake_layout
from jobs.common import (
    DEFAULT_ATTEMPTS,
    LakeTable,
    elapsed,
    lake_tables,
    open_table,
    with_conflict_retries,
)

__all__ = ["DEFAULT_MIN_FILES", "DEFAULT_TARGET_SIZE", "compact", "partitions_to_compact"]

log = logging.getLogger(__name__)

#: deltalake's own default target size.
DEFAULT_TARGET_SIZE = 128 * 1024 * 1024
#: A partition is compacted once it holds at least this many files below the target size:
#: rewriting two or three files costs more IO than it saves.
DEFAULT_MIN_FILES = 8

_PARTITION = f"partition.{lake_layout.DATE}"


def partitions_to_compact(
    files: pa.Table, *, target_size: int, min_files: int
) -> list[tuple[str | None, int]]:
    """The partitions of a table that need compaction, as ``(partition value, small files)``.

    ``files`` is ``DeltaTable.get_add_actions(flatten=True)`` as a pyarrow table; the
    partition value is the ``_cdc_date`` as ISO text, ``None`` for an unpartitioned table.
    A partition needs compaction when at least ``min_files`` of its files are smaller than
    ``target_size``. Pure, so the policy is testable without a lake.

    Example:
        >>> t = pa.table({"path": ["a", "b"], "size_bytes": [10, 20],
        ...               "partition._cdc_date": [date(2024, 1, 1)] * 2})
        >>> partitions_to_compact(t, target_size=100, min_files=2)
        [('2024-01-01', 2)]
    """
    small: dict[str | None, int] = {}
    partitions = (
        files.column(_PARTITION).to_pylist()
        if _PARTITION in files.column_names
        else [None] * files.num_rows
    )
    for value, size in zip(partitions, files.column("size_bytes").to_pylist(), strict=True):
        key = value.isoformat() if isinstance(value, date) else value
        if size < target_size:
            small[key] = small.get(key, 0) + 1
        else:
            small.setdefault(key, 0)
    return sorted(
        ((p, n) for p, n in small.items() if n >= min_files),
        key=lambda item: (item[0] is None, item[0] or ""),
    )


def compact(
    lake: str,
    *,
    tables: Sequence[str] | None = None,
    target_size: int = DEFAULT_TARGET_SIZE,
    min_files: int = DEFAULT_MIN_FILES,
    z_order: bool = False,
    which: Literal["changes", "current", "both"] = "both",
    storage_options: dict[str, str] | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
) -> dict[str, Any]:
    """Compact the partitions of each changelog (and merged) table that hold many small files.

    Args:
        lake: lake root.
        tables: only these ``schema.table`` names (default: all).
        target_size: size in bytes the rewritten files aim for.
        min_files: compact a partition only when it holds at least this many files smaller
            than ``target_size``.
        z_order: cluster rows by the table's key columns while rewriting (keyless tables are
            bin-packed only). Z-ordering rewrites every file of the partition, large ones too.
        which: ``changes`` (the changelogs), ``current`` (the merged tables written by
            ``cdc jobs merge``) or ``both``.
        storage_options: deltalake options for object stores.
        attempts: commits per partition before giving up on a conflict.

    Returns metrics: ``{"tables": {"<name>/changes": {...}}, "files_before", "files_after",
    "bytes_before", "bytes_after", "duration_s"}``; per Delta table the same totals, the
    ``partitions`` compacted (value, files removed and added), ``partitions_skipped``
    (not needing it), ``conflicts`` and ``duration_s``.

    Hazards:
        * The files compacted away stay on storage (older versions need them) until
          ``cdc jobs vacuum`` removes them: until then compaction adds bytes.
        * Each compacted partition is read into memory a file group at a time; deltalake
          bounds that by ``target_size``, so keep it well below the machine's memory.

    Raises:
        CommitConflictError: a partition's commit conflicted ``attempts`` times; the
            partitions before it stay compacted.

    Example:
        >>> compact("./lake", target_size=64 * 2**20)["files_after"]  # doctest: +SKIP
        12
    """
    if target_size <= 0 or min_files < 1:
        raise ValueError("target_size must be positive and min_files at least 1")
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    for table in lake_tables(lake, tables=tables, storage_options=storage_options):
        targets = []
        if which in ("changes", "both"):
            targets.append(("changes", table.changes_uri))
        if which in ("current", "both"):
            targets.append(("current", table.current_uri))
        for kind, uri in targets:
            dt = open_table(uri, storage_options=storage_options)
            if dt is None:
                continue  # no merged table yet
            results[f"{table.qualified_name}/{kind}"] = _compact_table(
                table,
                uri,
                target_size=target_size,
                min_files=min_files,
                z_order=z_order,
                storage_options=storage_options,
                attempts=attempts,
            )
    totals = {
        key: sum(r[key] for r in results.values())
        for key in ("files_before", "files_after", "bytes_before", "bytes_after")
    }
    return {"tables": results, **totals, "duration_s": elapsed(started)}


def _files(uri: str, storage_options: dict[str, str] | None) -> pa.Table:
    dt = open_table(uri, storage_options=storage_options)
    assert dt is not None
    return pa.table(dt.get_add_actions(flatten=True))


def _compact_table(
    table: LakeTable,
    uri: str,
    *,
    target_size: int,
    min_files: int,
    z_order: bool,
    storage_options: dict[str, str] | None,
    attempts: int,
) -> dict[str, Any]:
    started = time.monotonic()
    before = _files(uri, storage_options)
    todo = partitions_to_compact(before, target_size=target_size, min_files=min_files)
    all_partitions = (
        len(set(before.column(_PARTITION).to_pylist())) if _PARTITION in before.column_names else 1
    )
    compacted = []
    conflicts = 0
    for partition, small in todo:
        filters = [(lake_layout.DATE, "=", partition)] if partition is not None else None

        def attempt(filters: Any = filters) -> dict[str, Any]:
            # A fresh snapshot each time: after a conflict the partition's files differ.
            dt = DeltaTable(uri, storage_options=storage_options)
            if z_order and table.key_columns:
                return dt.optimize.z_order(
                    table.key_columns, partition_filters=filters, target_size=target_size
                )
            return dt.optimize.compact(partition_filters=filters, target_size=target_size)

        metrics, retried = with_conflict_retries(
            f"compaction of {uri} partition {partition}", attempt, attempts=attempts
        )
        conflicts += retried
        compacted.append(
            {
                "partition": partition,
                "small_files": small,
                "files_removed": int(metrics.get("numFilesRemoved", 0)),
                "files_added": int(metrics.get("numFilesAdded", 0)),
            }
        )
    after = _files(uri, storage_options) if compacted else before
    result = {
        "files_before": before.num_rows,
        "files_after": after.num_rows,
        "bytes_before": _bytes(before),
        "bytes_after": _bytes(after),
        "partitions": compacted,
        "partitions_skipped": all_partitions - len(compacted),
        "conflicts": conflicts,
        "duration_s": elapsed(started),
    }
    log.info(
        "compact %s: %d -> %d files in %d partitions (%.2fs)",
        uri,
        result["files_before"],
        result["files_after"],
        len(compacted),
        result["duration_s"],
    )
    return result


def _bytes(files: pa.Table) -> int:
    return int(sum(files.column("size_bytes").to_pylist())) if files.num_rows else 0
