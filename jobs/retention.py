"""``cdc jobs retention``: drop changelog partitions older than a cut-off.

Only whole ``_cdc_date`` partitions are dropped (a metadata-only Delta delete: no file is
rewritten), and only the changelog's: the merged current-state table is never touched.

Changes that ``cdc jobs merge`` has not folded into the merged table yet are never dropped,
or the current state would lose them. The cut-off is therefore limited to the merge
watermark: the job drops the oldest partitions up to the first one that holds a change after
the watermark (judged from each file's ``_cdc_lsn``/``_cdc_seq`` statistics; a file without
statistics counts as unmerged), and says so in its metrics. A table that was never merged,
and a keyless table (which cannot be merged), keeps its whole changelog.

Before dropping, the job folds every change up to the newest one it drops into the retention
base ``<table>/base`` (:func:`jobs.merge.fold_into_base`): the table's state as of that
change. The base records the retention horizon, the newest commit time folded in; time
travel (``<table>_as_of``, ``Lake.current(as_of=...)``) and the history view read the base
plus the remaining changes, and are exact from the horizon on. Asking for a moment before
the horizon is an error that names it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa

from catalog import lake_layout
from catalog.current_state import NO_WATERMARK, Watermark
from catalog.duckdb_views import merge_watermark
from catalog.errors import CatalogError
from jobs.common import (
    DEFAULT_ATTEMPTS,
    LakeTable,
    elapsed,
    lake_tables,
    open_table,
    with_conflict_retries,
)
from jobs.errors import TransientJobError
from jobs.merge import fold_into_base

__all__ = ["droppable_partitions", "newest_position", "retention"]

log = logging.getLogger(__name__)

_PARTITION = f"partition.{lake_layout.DATE}"
_MAX_LSN = f"max.{lake_layout.LSN}"
_MAX_SEQ = f"max.{lake_layout.SEQ}"


def droppable_partitions(
    files: pa.Table, *, cutoff: date, watermark: tuple[int, int]
) -> tuple[list[date], date | None]:
    """Which partitions may go: ``(dates to drop, oldest date held back by the watermark)``.

    ``files`` is ``DeltaTable.get_add_actions(flatten=True)`` of a changelog. Partitions
    older than ``cutoff`` are dropped oldest first, stopping at the first one with a file
    that may hold a change after ``watermark`` (that date is returned second). A file is
    provably merged when its largest ``_cdc_lsn`` is below the watermark's, or equal with
    its largest ``_cdc_seq`` at or below the watermark's. Pure, so testable without a lake.

    Example:
        >>> t = pa.table({"partition._cdc_date": [date(2024, 1, 1), date(2024, 1, 2)],
        ...               "max._cdc_lsn": [5, 9], "max._cdc_seq": [0, 0]})
        >>> droppable_partitions(t, cutoff=date(2024, 2, 1), watermark=(7, 0))
        ([datetime.date(2024, 1, 1)], datetime.date(2024, 1, 2))
    """
    merged: dict[date, bool] = {}
    n = files.num_rows
    partitions = files.column(_PARTITION).to_pylist() if n else []
    lsns = files.column(_MAX_LSN).to_pylist() if _MAX_LSN in files.column_names else [None] * n
    seqs = files.column(_MAX_SEQ).to_pylist() if _MAX_SEQ in files.column_names else [None] * n
    for value, lsn, seq in zip(partitions, lsns, seqs, strict=True):
        if value is None or value >= cutoff:
            continue
        done = lsn is not None and (
            lsn < watermark[0] or (lsn == watermark[0] and seq is not None and seq <= watermark[1])
        )
        merged[value] = merged.get(value, True) and done
    drop: list[date] = []
    for day in sorted(merged):
        if not merged[day]:
            return drop, day
        drop.append(day)
    return drop, None


def newest_position(files: pa.Table, *, before: date) -> Watermark:
    """The largest ``(_cdc_lsn, _cdc_seq)`` in the files of the partitions before ``before``,
    from their statistics (an upper bound: a file's largest seq need not belong to its
    largest LSN). Only called for partitions that :func:`droppable_partitions` found merged,
    whose files all have statistics.

    Example:
        >>> t = pa.table({"partition._cdc_date": [date(2024, 1, 1), date(2024, 1, 2)],
        ...               "max._cdc_lsn": [5, 9], "max._cdc_seq": [3, 0]})
        >>> newest_position(t, before=date(2024, 1, 2))
        Watermark(lsn=5, seq=3)
    """
    newest = NO_WATERMARK
    partitions = files.column(_PARTITION).to_pylist() if files.num_rows else []
    lsns = files.column(_MAX_LSN).to_pylist() if partitions else []
    seqs = files.column(_MAX_SEQ).to_pylist() if partitions else []
    for day, lsn, seq in zip(partitions, lsns, seqs, strict=True):
        if day is None or day >= before or lsn is None:
            continue
        candidate = Watermark(lsn, seq if seq is not None else 2**63 - 1)
        if (candidate.lsn, candidate.seq) > (newest.lsn, newest.seq):
            newest = candidate
    return newest


def retention(
    lake: str,
    *,
    keep: timedelta,
    tables: Sequence[str] | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
    storage_options: dict[str, str] | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
) -> dict[str, Any]:
    """Drop the changelog partitions whose whole day lies more than ``keep`` ago, except
    changes not yet merged into the current-state table.

    The cut-off is the UTC date of ``now - keep``: partitions of earlier dates go.

    Returns metrics: ``{"tables": {name: {...}}, "partitions_dropped", "rows_dropped",
    "dry_run", "duration_s"}`` where a table reports ``status`` (``dropped``, ``nothing_to_drop``
    or ``skipped`` with a ``reason``), ``requested_cutoff``, ``effective_cutoff``,
    ``limited_by_merge`` (with the reason when the watermark held partitions back),
    ``partitions`` (dropped dates), ``rows_dropped`` and ``files_removed``.

    Hazards:
        * History is gone for good once ``cdc jobs vacuum`` has removed the files: the
          ``_changes`` view and time travel no longer show it.
        * A DuckDB connection opened before the table's first merge still reads the
          current state from the changelog alone and loses the dropped rows:
          ``Lake.refresh()`` or reconnect after merging.

    Example:
        >>> retention("./lake", keep=timedelta(days=30))["partitions_dropped"]  # doctest: +SKIP
        12
    """
    if keep < timedelta(0):
        raise ValueError("keep cannot be negative")
    started = time.monotonic()
    now = now or datetime.now(UTC)
    cutoff = (now.astimezone(UTC) - keep).date()
    results: dict[str, dict[str, Any]] = {}
    for table in lake_tables(lake, tables=tables, storage_options=storage_options):
        results[table.qualified_name] = _retain(
            table,
            cutoff=cutoff,
            dry_run=dry_run,
            storage_options=storage_options,
            attempts=attempts,
        )
    return {
        "tables": results,
        "partitions_dropped": sum(len(r.get("partitions", [])) for r in results.values()),
        "rows_dropped": sum(r.get("rows_dropped", 0) for r in results.values()),
        "dry_run": dry_run,
        "duration_s": elapsed(started),
    }


def _retain(
    table: LakeTable,
    *,
    cutoff: date,
    dry_run: bool,
    storage_options: dict[str, str] | None,
    attempts: int,
) -> dict[str, Any]:
    base: dict[str, Any] = {"requested_cutoff": cutoff.isoformat()}
    if not table.key_columns:
        reason = (
            "keyless: its changes cannot be merged, so its current state needs the whole changelog"
        )
        log.info("retention %s skipped: %s", table.qualified_name, reason)
        return {**base, "status": "skipped", "reason": reason}
    try:
        watermark = merge_watermark(table.current_uri, storage_options=storage_options)
    except CatalogError as e:
        raise TransientJobError(str(e)) from e
    if watermark is None:
        reason = (
            "never merged: every change is still needed by the current state; run "
            "`cdc jobs merge` first"
        )
        log.info("retention %s skipped: %s", table.qualified_name, reason)
        return {**base, "status": "skipped", "reason": reason}

    started = time.monotonic()

    def attempt() -> dict[str, Any]:
        # Re-planned on every attempt: a conflict means the table moved on (a compaction
        # of an old partition, a merge that advanced the watermark is read next run).
        dt = open_table(table.changes_uri, storage_options=storage_options)
        if dt is None:
            return {"partitions": [], "held_back": None, "rows": 0, "files": 0}
        files = pa.table(dt.get_add_actions(flatten=True))
        drop, held_back = droppable_partitions(files, cutoff=cutoff, watermark=watermark)
        if not drop or dry_run:
            return {"partitions": drop, "held_back": held_back, "rows": 0, "files": 0}
        effective = drop[-1] + timedelta(days=1)
        # First the base: the state as of the newest change about to go, so time travel
        # and the history view keep working from the horizon on. Its own commit: if the
        # delete below then fails, the base merely holds changes the changelog still has.
        upto = newest_position(files, before=effective)
        based = fold_into_base(table, upto=upto, storage_options=storage_options, attempts=attempts)
        # A predicate on the partition column only: whole files are removed, none rewritten.
        metrics = dt.delete(predicate=f"{lake_layout.DATE} < '{effective.isoformat()}'::date")
        return {
            "partitions": drop,
            "held_back": held_back,
            "horizon": based.get("horizon"),
            "rows": int(metrics.get("num_deleted_rows", 0)),
            "files": int(metrics.get("num_removed_files", 0)),
        }

    outcome, conflicts = with_conflict_retries(
        f"retention of {table.changes_uri}", attempt, attempts=attempts
    )
    drop, held_back = outcome["partitions"], outcome["held_back"]
    effective = min(cutoff, held_back) if held_back is not None else cutoff
    result = {
        **base,
        "status": "dropped" if drop and not dry_run else "nothing_to_drop",
        "effective_cutoff": effective.isoformat(),
        "limited_by_merge": held_back is not None,
        "partitions": [d.isoformat() for d in drop],
        "rows_dropped": outcome["rows"],
        "horizon": outcome.get("horizon"),
        "files_removed": outcome["files"],
        "watermark": list(watermark),
        "conflicts": conflicts,
        "duration_s": elapsed(started),
    }
    if dry_run:
        result["status"] = "dry_run"
    if held_back is not None:
        result["reason"] = (
            f"partition {held_back.isoformat()} and later hold changes after the merge "
            f"watermark {watermark[0]}/{watermark[1]}; they are kept until `cdc jobs merge` "
            "has folded them in"
        )
        log.warning("retention %s: %s", table.qualified_name, result["reason"])
    log.info("retention %s: %s", table.qualified_name, result)
    return result
