"""``cdc demo``: a retail inventory workload streamed into Delta and queried with DuckDB.

Runs everything a newcomer needs to see in under a minute: a throwaway PostgreSQL (unless
``--source`` is given), existing rows copied by the snapshot, a workload of inserts,
updates and deletes streamed while it runs, and DuckDB answers over the lake.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from cdc.cli.local_postgres import LocalPostgres
from cdc.core.errors import ConfigError
from cdc.core.settings import load_settings
from cdc.pipeline import CapturePipeline
from cdc.postgres.errors import SourceConnectionError
from cdc.postgres.slots import drop_slot
from cdc.postgres.source_queries import current_wal_lsn

DEMO_SCHEMA = "retail"
PIPELINE = "cdc_demo"
TABLES = ("stores", "products", "inventory", "orders")

SCHEMA_SQL = f"""
CREATE SCHEMA {DEMO_SCHEMA};
CREATE TABLE {DEMO_SCHEMA}.stores (
    id int PRIMARY KEY, name text NOT NULL, city text NOT NULL
);
CREATE TABLE {DEMO_SCHEMA}.products (
    id int PRIMARY KEY, sku text UNIQUE NOT NULL, name text NOT NULL,
    price numeric(10, 2) NOT NULL
);
CREATE TABLE {DEMO_SCHEMA}.inventory (
    store_id int REFERENCES {DEMO_SCHEMA}.stores, product_id int REFERENCES {DEMO_SCHEMA}.products,
    quantity int NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (store_id, product_id)
);
CREATE TABLE {DEMO_SCHEMA}.orders (
    id bigserial PRIMARY KEY, store_id int NOT NULL, product_id int NOT NULL,
    quantity int NOT NULL, amount numeric(12, 2) NOT NULL,
    status text NOT NULL DEFAULT 'placed', created_at timestamptz NOT NULL DEFAULT now()
);
"""

#: One pallet goes missing every this many orders.
SHRINKAGE_EVERY = 100

CITIES = ["Lisbon", "Porto", "Madrid", "Lyon", "Turin"]
ITEMS = ["kettle", "lamp", "mug", "chair", "desk", "rug", "vase", "clock", "shelf", "pillow"]

QUERIES = {
    "Stock per store now": f"""
        SELECT s.name AS store, s.city, sum(i.quantity) AS units, count(*) AS products
        FROM {DEMO_SCHEMA}.inventory i JOIN {DEMO_SCHEMA}.stores s ON s.id = i.store_id
        GROUP BY ALL ORDER BY store""",
    "Orders per hour (created_at, UTC)": f"""
        SELECT date_trunc('hour', created_at) AS hour, count(*) AS orders,
               sum(amount) AS revenue
        FROM {DEMO_SCHEMA}.orders WHERE status <> 'cancelled'
        GROUP BY ALL ORDER BY hour DESC LIMIT 8""",
    "Stock history of product 1 in store 1": f"""
        SELECT _cdc_commit_ts AS at, _cdc_op AS op, quantity
        FROM {DEMO_SCHEMA}.inventory_changes
        WHERE store_id = 1 AND product_id = 1
        ORDER BY _cdc_lsn, _cdc_seq""",
}


def _seed(conn: psycopg.Connection, rng: random.Random) -> None:
    conn.execute(SCHEMA_SQL)
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {DEMO_SCHEMA}.stores VALUES (%s, %s, %s)",
            [(i + 1, f"{city} store", city) for i, city in enumerate(CITIES)],
        )
        products = [
            (
                i + 1,
                f"SKU-{i + 1:04d}",
                f"{ITEMS[i % len(ITEMS)]} #{i + 1}",
                Decimal(rng.randint(300, 9000)) / 100,
            )
            for i in range(40)
        ]
        cur.executemany(f"INSERT INTO {DEMO_SCHEMA}.products VALUES (%s, %s, %s, %s)", products)
        cur.execute(
            f"INSERT INTO {DEMO_SCHEMA}.inventory (store_id, product_id, quantity) "
            "SELECT s, p, 20 + (s * p) %% 30 FROM generate_series(1, %s) s, "
            "generate_series(1, %s) p",
            [len(CITIES), len(products)],
        )
        # Orders from the last few hours, so "orders per hour" has some history.
        cur.execute(
            f"INSERT INTO {DEMO_SCHEMA}.orders (store_id, product_id, quantity, amount, created_at) "
            "SELECT 1 + g % 5, 1 + g % 40, 1 + g % 3, (1 + g % 3) * 9.99, "
            "now() - (g || ' minutes')::interval FROM generate_series(1, 300) g"
        )


def _workload(
    dsn: str, seconds: float, rng: random.Random, stop: threading.Event
) -> dict[str, int]:
    """Place orders (stock goes down), restock, cancel and purge orders, change prices, and
    now and then lose a pallet (a drop far beyond a sale's 1-3 units, for the notebook's
    anomaly check to find)."""
    counts = {
        "orders": 0,
        "restocks": 0,
        "cancellations": 0,
        "purged": 0,
        "price_changes": 0,
        "shrinkage": 0,
    }
    deadline = time.monotonic() + seconds
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline and not stop.is_set():
            store, product = rng.randint(1, len(CITIES)), rng.randint(1, 40)
            qty = rng.randint(1, 3)
            with conn.transaction():
                conn.execute(
                    f"INSERT INTO {DEMO_SCHEMA}.orders (store_id, product_id, quantity, amount) "
                    f"SELECT %s, id, %s, price * %s FROM {DEMO_SCHEMA}.products WHERE id = %s",
                    [store, qty, qty, product],
                )
                conn.execute(
                    f"UPDATE {DEMO_SCHEMA}.inventory SET quantity = greatest(quantity - %s, 0), "
                    "updated_at = now() WHERE store_id = %s AND product_id = %s",
                    [qty, store, product],
                )
            counts["orders"] += 1
            if counts["orders"] % SHRINKAGE_EVERY == SHRINKAGE_EVERY // 4:
                conn.execute(
                    f"UPDATE {DEMO_SCHEMA}.inventory SET quantity = greatest(quantity - %s, 0), "
                    "updated_at = now() WHERE store_id = %s AND product_id = %s",
                    [rng.randint(15, 25), rng.randint(1, len(CITIES)), rng.randint(1, 40)],
                )
                counts["shrinkage"] += 1
            roll = rng.random()
            if roll < 0.15:
                conn.execute(
                    f"UPDATE {DEMO_SCHEMA}.inventory SET quantity = quantity + 25, "
                    "updated_at = now() WHERE store_id = %s AND product_id = %s",
                    [store, rng.randint(1, 40)],
                )
                counts["restocks"] += 1
            elif roll < 0.25:
                conn.execute(
                    f"UPDATE {DEMO_SCHEMA}.orders SET status = 'cancelled' WHERE id = "
                    f"(SELECT max(id) FROM {DEMO_SCHEMA}.orders WHERE status = 'placed')"
                )
                counts["cancellations"] += 1
            elif roll < 0.30:
                cur = conn.execute(
                    f"DELETE FROM {DEMO_SCHEMA}.orders WHERE id IN (SELECT id FROM "
                    f"{DEMO_SCHEMA}.orders WHERE status = 'cancelled' LIMIT 2)"
                )
                counts["purged"] += cur.rowcount
            elif roll < 0.33:
                conn.execute(
                    f"UPDATE {DEMO_SCHEMA}.products SET price = price * 1.05 WHERE id = %s",
                    [rng.randint(1, 40)],
                )
                counts["price_changes"] += 1
            time.sleep(0.01)
    return counts


def _print_relation(console: Console, title: str, relation: Any) -> None:
    table = Table(*relation.columns, title=title, title_justify="left", header_style="bold")
    for row in relation.fetchall():
        table.add_row(*("NULL" if v is None else str(v) for v in row))
    console.print(table)


def run_demo(
    *,
    source: str | None = None,
    lake: str | None = None,
    seconds: float = 15.0,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the demo end to end; returns the pipeline's metrics and the lake path.

    With ``source=None`` it starts a throwaway PostgreSQL from the machine's binaries (and
    removes it at the end, Ctrl-C included). With a DSN it creates the ``retail`` schema
    there, and drops the demo's slot and publication at the end so no WAL stays pinned.

    Example:
        >>> run_demo(seconds=5)["lake"]  # doctest: +SKIP
        '/tmp/cdc-demo-lake-...'
    """
    console = console or Console()
    rng = random.Random(7)
    lake_path = lake or tempfile.mkdtemp(prefix="cdc-demo-lake-")
    if Path(lake_path).exists() and any(Path(lake_path).iterdir()):
        raise ConfigError(f"the demo writes a fresh lake: {lake_path} is not empty")

    with ExitStack() as cleanup:
        if source is None:
            console.print("Starting a throwaway PostgreSQL server...")
            server = cleanup.enter_context(LocalPostgres())
            dsn = server.dsn
        else:
            dsn = source
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                if conn.execute(
                    "SELECT 1 FROM pg_namespace WHERE nspname = %s", [DEMO_SCHEMA]
                ).fetchone():
                    raise ConfigError(
                        f"schema {DEMO_SCHEMA!r} already exists in the source; the demo creates "
                        f"it afresh: DROP SCHEMA {DEMO_SCHEMA} CASCADE first"
                    )
                _seed(conn, rng)
        except psycopg.OperationalError as e:
            raise SourceConnectionError(f"cannot connect to {dsn}: {e}") from e
        if source is not None:
            cleanup.callback(_drop_demo_replication, dsn)

        settings = load_settings(
            **{
                "name": PIPELINE,
                "source.dsn": dsn,
                "source.tables": [f"{DEMO_SCHEMA}.{t}" for t in TABLES],
                "lake.path": lake_path,
                "batch.max_seconds": 0.5,
            }
        )
        stop = threading.Event()
        pipeline = CapturePipeline(settings, stop=stop)
        failure: list[BaseException] = []

        def capture() -> None:
            try:
                pipeline.run()
            except BaseException as e:  # reported by the main thread
                failure.append(e)
                stop.set()

        worker = threading.Thread(target=capture, name="cdc-pipeline", daemon=True)
        worker.start()
        cleanup.callback(worker.join, 30)
        cleanup.callback(stop.set)

        console.print(f"Snapshot of existing rows, then a {seconds:.0f}s workload...")
        counts = _workload(dsn, seconds, rng, stop)
        console.print("Workload: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        if not failure and not pipeline.wait_flushed(current_wal_lsn(dsn), timeout=30):
            console.print("[yellow]the lake did not catch up within 30 s[/]")
        stop.set()
        worker.join(30)
        if failure:
            raise failure[0]

        from catalog.lake import Lake

        with Lake(lake_path) as lk:
            matches = _compare_counts(lk, dsn)
            for title, sql in QUERIES.items():
                _print_relation(console, title, lk.sql(sql))
        console.print(
            "Rows per table, PostgreSQL vs lake current state: "
            + ", ".join(f"{t} {pg}/{lake_rows}" for t, (pg, lake_rows) in matches.items())
        )
        cdc = _cdc_command()
        console.print(f"\nThe lake is at [bold]{lake_path}[/]. Try:")
        console.print(
            f'  {cdc} query --lake {lake_path} "SELECT * FROM {DEMO_SCHEMA}.orders_changes LIMIT 5"'
        )
        console.print(f"  {cdc} tables --lake {lake_path}")
        return {"lake": lake_path, "metrics": dict(pipeline.metrics), "row_counts": matches}


def _cdc_command() -> str:
    """How to call ``cdc`` again from here: ``make demo`` runs ``.venv/bin/cdc``, which a
    newcomer's shell does not have on its PATH."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) != "cdc" or shutil.which("cdc") == argv0:
        return "cdc"
    relative = os.path.relpath(argv0)
    return relative if not relative.startswith("..") else argv0


def _compare_counts(lk: Any, dsn: str) -> dict[str, tuple[int, int]]:
    result: dict[str, tuple[int, int]] = {}
    with psycopg.connect(dsn) as conn:
        for table in TABLES:
            row = conn.execute(f"SELECT count(*) FROM {DEMO_SCHEMA}.{table}").fetchone()
            lake_row = lk.sql(f"SELECT count(*) FROM {DEMO_SCHEMA}.{table}").fetchone()
            result[table] = (int(row[0]) if row else 0, int(lake_row[0]) if lake_row else 0)
    return result


def _drop_demo_replication(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        drop_slot(conn, PIPELINE)
        conn.execute(f"DROP PUBLICATION IF EXISTS {PIPELINE}")
