"""The demo's retail lake, written once per test session by the real pipeline from a
database on the session's PostgreSQL (``--pg-dsn`` included): for the notebook and the
docs examples."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from rich.console import Console

from cdc.cli.demo import run_demo
from tests.plugins.postgres import PostgresServer, temporary_database

#: Long enough for price changes and the workload's lost pallets (one every 100 orders).
DEMO_SECONDS = 3.0


@pytest.fixture(scope="session")
def demo_lake(pg_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a lake written by ``run_demo`` (``retail.stores``, ``products``,
    ``inventory``, ``orders``); the source database is dropped once the demo is done."""
    lake = tmp_path_factory.mktemp("demo") / "lake"
    level = logging.getLogger("cdc").level
    logging.getLogger("cdc").setLevel(logging.WARNING)
    try:
        with temporary_database(pg_server) as dsn:
            result = run_demo(
                source=dsn, lake=str(lake), seconds=DEMO_SECONDS, console=Console(quiet=True)
            )
    finally:
        logging.getLogger("cdc").setLevel(level)
    for table, (pg_rows, lake_rows) in result["row_counts"].items():
        assert pg_rows == lake_rows, (
            f"retail.{table}: {pg_rows} rows in PostgreSQL, {lake_rows} in the lake"
        )
    return lake
