"""How fresh each changelog table is: the facts ``cdc status`` reports per table.

Everything comes from the Delta logs (file statistics and app transactions), plus one
filtered count of the changes that ``cdc jobs merge`` has not folded in yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError, TableNotFoundError

from catalog import lake_layout
from catalog.duckdb_views import discover_tables, merge_watermark
from catalog.errors import TerminalCatalogError, TransientCatalogError

__all__ = ["DeltaLogFacts", "TableFreshness", "delta_log_facts", "table_freshness"]


@dataclass(frozen=True, slots=True)
class DeltaLogFacts:
    """What one read of a Delta table's log tells: its live files (with their statistics),
    row count (``None`` if a file lacks statistics) and the time of the newest commit."""

    table: DeltaTable
    adds: pa.Table
    rows: int | None
    files: int
    last_write_at: datetime | None


def delta_log_facts(uri: str, *, storage_options: dict[str, str] | None = None) -> DeltaLogFacts:
    """Read the Delta log at ``uri`` (not its data files).

    Raises:
        TerminalCatalogError: there is no Delta table at ``uri``.
        TransientCatalogError: the log cannot be read now.
    """
    try:
        dt = DeltaTable(uri, storage_options=storage_options)
        adds = pa.table(dt.get_add_actions(flatten=True))
        history = dt.history(1)
    except TableNotFoundError as e:
        raise TerminalCatalogError(f"{uri} is not a Delta table: {e}") from e
    except (DeltaError, OSError) as e:
        raise TransientCatalogError(f"cannot read the Delta log of {uri}: {e}") from e
    rows: int | None = None
    if "num_records" in adds.column_names:
        records = adds.column("num_records")
        if records.null_count == 0:
            rows = int(pc.sum(records).as_py() or 0)
    elif adds.num_rows == 0:
        rows = 0
    last_write = None
    if history and history[0].get("timestamp") is not None:
        last_write = datetime.fromtimestamp(history[0]["timestamp"] / 1000, tz=UTC)
    return DeltaLogFacts(dt, adds, rows, adds.num_rows, last_write)


@dataclass(frozen=True, slots=True)
class TableFreshness:
    """One changelog table's progress.

    Attributes:
        newest_commit_at: Source commit time (``_cdc_commit_ts``) of the newest change
            landed in the lake; ``None`` for an empty table.
        age_seconds: Seconds from ``newest_commit_at`` to now. On a quiet source table this
            grows although nothing is late; compare it with the slot's lag.
        lsn_watermark: The highest ``_cdc_lsn`` landed (commit LSN of the newest change).
        rows: Changelog rows (``None`` when a file lacks statistics).
        files: Live data files of the changelog.
        last_write_at: Time of the newest Delta commit (the sink's write).
        merge_watermark: ``[lsn, seq]`` up to which ``cdc jobs merge`` folded changes into
            ``<table>/current``; ``None`` before the first merge.
        unmerged_changes: Changelog rows after the merge watermark (all rows before the
            first merge): what the current-state view recomputes on every query.
    """

    table: str
    newest_commit_at: datetime | None
    age_seconds: float | None
    lsn_watermark: int | None
    rows: int | None
    files: int
    delta_version: int
    last_write_at: datetime | None
    merge_watermark: list[int] | None
    unmerged_changes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "newest_commit_at": self.newest_commit_at.isoformat()
            if self.newest_commit_at
            else None,
            "age_seconds": self.age_seconds,
            "lsn_watermark": self.lsn_watermark,
            "rows": self.rows,
            "files": self.files,
            "delta_version": self.delta_version,
            "last_write_at": self.last_write_at.isoformat() if self.last_write_at else None,
            "merge_watermark": self.merge_watermark,
            "unmerged_changes": self.unmerged_changes,
        }


def _stat_max(adds: pa.Table, column: str) -> Any:
    name = f"max.{column}"
    if name not in adds.column_names or adds.num_rows == 0:
        return None
    return pc.max(adds.column(name)).as_py()


def _one(
    root: str, name: str, storage_options: dict[str, str] | None, now: datetime
) -> TableFreshness:
    uri = lake_layout.changes_uri(root, name)
    facts = delta_log_facts(uri, storage_options=storage_options)
    watermark = merge_watermark(
        lake_layout.current_uri(root, name), storage_options=storage_options
    )
    unmerged_filter = None
    if watermark is not None:
        lsn, seq = ds.field(lake_layout.LSN), ds.field(lake_layout.SEQ)
        w_lsn, w_seq = watermark
        unmerged_filter = (lsn > w_lsn) | ((lsn == w_lsn) & (seq > w_seq))
    try:
        unmerged = facts.table.to_pyarrow_dataset().count_rows(filter=unmerged_filter)
    except (DeltaError, OSError) as e:
        raise TransientCatalogError(f"cannot count the unmerged changes of {uri}: {e}") from e
    adds = facts.adds
    newest = _stat_max(adds, lake_layout.COMMIT_TS)
    if isinstance(newest, datetime) and newest.tzinfo is None:
        newest = newest.replace(tzinfo=UTC)
    return TableFreshness(
        table=name,
        newest_commit_at=newest,
        age_seconds=round((now - newest).total_seconds(), 3) if newest else None,
        lsn_watermark=_stat_max(adds, lake_layout.LSN),
        rows=facts.rows,
        files=facts.files,
        delta_version=facts.table.version(),
        last_write_at=facts.last_write_at,
        merge_watermark=list(watermark) if watermark else None,
        unmerged_changes=unmerged,
    )


def table_freshness(
    root: str, *, storage_options: dict[str, str] | None = None, now: datetime | None = None
) -> list[TableFreshness]:
    """The freshness of every changelog table under ``root``, by name.

    Reads Delta logs and file statistics; the count of unmerged changes scans the
    ``_cdc_lsn``/``_cdc_seq`` columns of the files after the merge watermark.

    Example:
        >>> [(t.table, t.age_seconds) for t in table_freshness("./lake")]  # doctest: +SKIP
        [('public.orders', 0.8)]
    """
    now = now or datetime.now(UTC)
    return [
        _one(root, name, storage_options, now)
        for name in discover_tables(root, storage_options=storage_options)
    ]
