"""Fixtures and helpers for pipeline tests: run the embedded pipeline, compare the lake with
PostgreSQL."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from catalog import lake_layout as layout
from catalog.lake import Lake
from catalog.schema_registry import SchemaRegistry
from cdc.core.settings import load_settings
from cdc.core.table_schema import ColumnSchema, TableSchema
from cdc.pipeline import CapturePipeline
from cdc.postgres.source_queries import current_wal_lsn


@pytest.fixture
def lake_dir(tmp_path: Path) -> str:
    return str(tmp_path / "lake")


@contextmanager
def running_pipeline(
    dsn: str, lake: str, *, wait_streaming: bool = True, **overrides: Any
) -> Iterator[CapturePipeline]:
    """The embedded pipeline in a background thread; stops it (flushing) on exit and
    re-raises anything it raised.

    With ``wait_streaming`` it yields once the slot exists and the snapshot is written, so
    changes made inside the block are streamed rather than copied.
    """
    values: dict[str, Any] = {
        "source.dsn": dsn,
        "lake.path": lake,
        "batch.max_seconds": 0.2,
        "name": "test",
    }
    values.update(overrides)
    pipeline = CapturePipeline(load_settings(**values))
    failure: list[BaseException] = []

    def target() -> None:
        try:
            pipeline.run()
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while wait_streaming and pipeline.position is None and not failure:
            assert thread.is_alive() and time.monotonic() < deadline, "pipeline did not start"
            time.sleep(0.02)
        if failure:
            raise failure[0]
        yield pipeline
    finally:
        pipeline.stop.set()
        thread.join(60)
        failing = sys.exc_info()[1]
        if failure and failing is not None:
            # The block failed (a wait timed out, say) because the pipeline had died: say why.
            failing.add_note(f"the pipeline had failed: {failure[0]!r}")
    assert not thread.is_alive(), "pipeline did not stop within 60 s"
    if failure:
        raise failure[0]


def wait_caught_up(pipeline: CapturePipeline, dsn: str, timeout: float = 60) -> None:
    """Wait until every change committed so far in ``dsn`` is durable in the lake."""
    target = current_wal_lsn(dsn)
    assert pipeline.wait_flushed(target, timeout=timeout), (
        f"lake did not catch up to {target} within {timeout}s; position={pipeline.position}"
    )


def _normalize(value: Any) -> Any:
    if isinstance(value, Decimal):
        return value.normalize() if value == value else "NaN"
    if isinstance(value, float) and value != value:
        return "NaN"  # NaN equals nothing, itself included
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def postgres_rows(dsn: str, table: str, columns: list[str], key: list[str]) -> list[tuple]:
    """Rows of ``table`` from PostgreSQL, uuid and json as text (as the lake holds them)."""
    with psycopg.connect(dsn) as conn:
        types = dict(
            conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                [table],
            ).fetchall()
        )
        select = ", ".join(
            f'"{c}"::text' if types[c] in ("uuid", "json", "jsonb") else f'"{c}"' for c in columns
        )
        order = ", ".join(f'"{k}"' for k in key)
        rows = conn.execute(f"SELECT {select} FROM {table} ORDER BY {order}").fetchall()
    return [tuple(_normalize(v) for v in row) for row in rows]


def lake_rows(
    lake: str,
    table: str,
    columns: list[str],
    key: list[str],
    *,
    storage_options: dict[str, str] | None = None,
) -> list[tuple]:
    """Rows of the current-state view of ``table`` in the lake."""
    select = ", ".join(f'"{c}"' for c in columns)
    order = ", ".join(f'"{k}"' for k in key)
    with Lake(lake, storage_options=storage_options) as lk:
        rows = lk.sql(f"SELECT {select} FROM {table} ORDER BY {order}").fetchall()
    return [tuple(_normalize(v) for v in row) for row in rows]


def assert_lake_matches_postgres(
    dsn: str,
    lake: str,
    table: str,
    columns: list[str],
    key: list[str],
    *,
    storage_options: dict[str, str] | None = None,
) -> int:
    """The lake's current state of ``table`` equals PostgreSQL's, row by row (so the row
    count and a checksum over all columns agree too)."""
    expected = postgres_rows(dsn, table, columns, key)
    actual = lake_rows(lake, table, columns, key, storage_options=storage_options)
    assert len(actual) == len(expected), f"{table}: lake {len(actual)} rows, pg {len(expected)}"
    for want, got in zip(expected, actual, strict=True):
        assert got == want, f"{table}: lake row {got} != postgres row {want}"
    return len(expected)


def duplicate_positions(
    lake: str, table: str, *, storage_options: dict[str, str] | None = None
) -> list[tuple]:
    """(lsn, seq) pairs that occur more than once in the changelog of ``table``."""
    with Lake(lake, storage_options=storage_options) as lk:
        return lk.sql(
            f"SELECT _cdc_lsn, _cdc_seq, count(*) FROM {table}_changes "
            "GROUP BY ALL HAVING count(*) > 1"
        ).fetchall()


# -- hand-built changelogs (no PostgreSQL) ------------------------------------------------------

#: Commit time of LSN 0 in hand-built changelogs; one hour per LSN unit (see :func:`changelog`).
CHANGELOG_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


def change(op: str, lsn: int, seq: int = 0, unchanged: Sequence[str] = (), **values: Any) -> dict:
    """One changelog row for :func:`write_changes`; unspecified source columns are NULL."""
    return {"_op": op, "_lsn": lsn, "_seq": seq, "_unchanged": list(unchanged), **values}


def changelog(source: pa.Schema, rows: Sequence[dict], *, hours_per_lsn: float = 1.0) -> pa.Table:
    """The Arrow table the sink would write for ``rows``: source columns + metadata.

    Commit times are ``CHANGELOG_EPOCH + lsn * hours_per_lsn`` hours, so histories span
    several ``_cdc_date`` partitions.
    """
    commit_ts = [CHANGELOG_EPOCH + timedelta(hours=r["_lsn"] * hours_per_lsn) for r in rows]
    columns: dict[str, pa.Array] = {
        f.name: pa.array([r.get(f.name) for r in rows], f.type) for f in source
    }
    columns.update(
        {
            layout.OP: pa.array([r["_op"] for r in rows], pa.string()),
            layout.LSN: pa.array([r["_lsn"] for r in rows], pa.int64()),
            layout.SEQ: pa.array([r["_seq"] for r in rows], pa.int64()),
            layout.TXID: pa.array([r["_lsn"] + 1000 for r in rows], pa.int64()),
            layout.COMMIT_TS: pa.array(commit_ts, pa.timestamp("us", "UTC")),
            layout.INGESTED_AT: pa.array(commit_ts, pa.timestamp("us", "UTC")),
            layout.UNCHANGED_TOAST: pa.array(
                [r["_unchanged"] or None for r in rows], pa.list_(pa.string())
            ),
            layout.DATE: pa.array([ts.date() for ts in commit_ts], pa.date32()),
        }
    )
    return pa.table(columns)


def write_changes(
    lake: str, qualified_name: str, rows: Sequence[dict], source: pa.Schema, **kwargs: Any
) -> None:
    """Append ``rows`` to the changelog of ``qualified_name`` as one Delta commit, as the
    sink does (partitioned by ``_cdc_date``)."""
    write_deltalake(
        layout.changes_uri(lake, qualified_name),
        changelog(source, rows, **kwargs),
        mode="append",
        partition_by=list(layout.PARTITION_COLUMNS),
        schema_mode="merge",
    )


def register_table(lake: str, qualified_name: str, columns: Sequence[ColumnSchema]) -> None:
    """Record ``columns`` (``is_key`` marks the key) as the table's shape in the registry."""
    schema, _, table = qualified_name.partition(".")
    SchemaRegistry(lake).register(TableSchema(schema, table, tuple(columns)))


def table_checksum(lake: str, relation: str, columns: Sequence[str]) -> tuple[int, int]:
    """``(row count, order-independent hash of all the given columns)`` of a DuckDB relation
    over the lake's views, e.g. ``public.orders_changes`` or ``public.orders``."""
    select = ", ".join(f'"{c}"' for c in columns)
    with Lake(lake) as lk:
        row = lk.sql(
            f"SELECT count(*), coalesce(sum(hash(({select}))), 0) FROM {relation}"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])
