"""Time travel (``<table>_as_of(ts)``, ``Lake.current(as_of=...)``) and row history
(``<table>_history``) against a real PostgreSQL: the state PostgreSQL had at several moments
while a writer changed rows equals the lake's state as of those moments, before and after
merges and compactions; the history has exactly one open version per live row.

Tables: a composite key of mixed types (int, text, uuid, numeric, timestamptz, boolean) under
quoted mixed-case names with a TOAST-able column; a keyless table; NULLs everywhere a value
may be NULL."""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from catalog.lake import Lake
from cdc.core.lsn import format_lsn, parse_lsn
from jobs.compact import compact
from jobs.merge import merge
from tests.plugins.lake import running_pipeline, wait_caught_up

pytestmark = pytest.mark.postgres

KEYED = '"Sales"."Line Items"'
KEYED_NAME = "Sales.Line Items"
KEY = ["Store", "sku", "Token", "price", "At", "ok"]
COLUMNS = [*KEY, "Qty", "Note"]
KEYLESS = "public.events"
KEYLESS_COLUMNS = ["kind", "amount"]

SETUP = f"""
CREATE SCHEMA "Sales";
CREATE TABLE {KEYED} (
    "Store" int, sku text, "Token" uuid, price numeric(10, 2), "At" timestamptz, ok boolean,
    "Qty" int, "Note" text,
    PRIMARY KEY ("Store", sku, "Token", price, "At", ok)
);
CREATE TABLE {KEYLESS} (kind text, amount numeric);
"""

SKUS = ["a", "B", "", "sku with space"]
TOKENS = ["6f1c1a52-5d0e-4f7e-9d7a-0b9e2b6f4c11", "00000000-0000-0000-0000-000000000000"]
PRICES = [Decimal("1.50"), Decimal("-0.01"), Decimal("99999999.99")]
TIMES = ["2024-03-01 12:30:00+00", "1999-12-31 23:59:59.999999+00"]


def random_key(rng: random.Random) -> tuple[Any, ...]:
    return (
        rng.randrange(3),
        rng.choice(SKUS),
        rng.choice(TOKENS),
        rng.choice(PRICES),
        rng.choice(TIMES),
        rng.random() < 0.5,
    )


class Writer:
    """Random small transactions on both tables until stopped."""

    def __init__(self, dsn: str, seed: int) -> None:
        self.dsn = dsn
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        key_match = " AND ".join(f'"{k}" = %s' for k in KEY)
        placeholders = ", ".join(["%s"] * len(COLUMNS))
        insert = f"INSERT INTO {KEYED} VALUES ({placeholders}) ON CONFLICT DO NOTHING"
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    rng = self.rng
                    # Toggling "ok" onto an existing key rolls back; carry on.
                    with contextlib.suppress(psycopg.errors.UniqueViolation):
                        self._transaction(conn, rng, insert, key_match)
                    time.sleep(0.005)
        except BaseException as e:  # reported by __exit__
            self.error = e

    def _transaction(
        self, conn: psycopg.Connection, rng: random.Random, insert: str, key_match: str
    ) -> None:
        with conn.transaction():
            for _ in range(rng.randint(1, 3)):
                key = random_key(rng)
                roll = rng.random()
                if roll < 0.4:
                    note = rng.choice([None, "n", rng.randbytes(3000).hex()])  # TOASTed
                    conn.execute(insert, [*key, rng.randrange(100), note])
                elif roll < 0.65:
                    # Leaves the TOASTed note unchanged.
                    conn.execute(
                        f'UPDATE {KEYED} SET "Qty" = %s WHERE {key_match}',
                        [rng.choice([None, rng.randrange(100)]), *key],
                    )
                elif roll < 0.8:
                    conn.execute(
                        f'UPDATE {KEYED} SET "Note" = %s WHERE {key_match}',
                        [rng.choice([None, "m", rng.randbytes(4000).hex()]), *key],
                    )
                elif roll < 0.95:
                    conn.execute(f"DELETE FROM {KEYED} WHERE {key_match}", key)
                else:
                    conn.execute(f"UPDATE {KEYED} SET ok = NOT ok WHERE {key_match}", key)
            if rng.random() < 0.5:
                conn.execute(
                    f"INSERT INTO {KEYLESS} VALUES (%s, %s)",
                    [rng.choice(["x", None]), rng.choice([Decimal("1.5"), None])],
                )

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        if self.error is not None:
            raise self.error


def snapshot(dsn: str) -> tuple[datetime, int, dict[str, list[tuple]]]:
    """PostgreSQL's state of both tables at one moment, with that moment's clock time and
    WAL position. A SHARE lock waits for running writes and blocks new ones, so every
    transaction visible here committed before the clock reading, and every other one
    after it."""
    with psycopg.connect(dsn) as conn:
        conn.execute(f"LOCK TABLE {KEYED}, {KEYLESS} IN SHARE MODE")
        moment, lsn = conn.execute(
            "SELECT clock_timestamp(), pg_current_wal_insert_lsn()::text"
        ).fetchone()  # type: ignore[misc]
        keyed = conn.execute(
            f"SELECT {', '.join(f'{chr(34)}{c}{chr(34)}' for c in COLUMNS)} FROM {KEYED}"
        ).fetchall()
        keyless = conn.execute(f"SELECT kind, amount FROM {KEYLESS}").fetchall()
    return moment, parse_lsn(lsn), {KEYED_NAME: norm(keyed), KEYLESS: norm(keyless)}


def norm(rows: list[tuple]) -> list[tuple]:
    out = []
    for row in rows:
        values = []
        for v in row:
            if isinstance(v, Decimal):
                v = str(v.normalize())  # unconstrained numeric is text in the lake
            elif isinstance(v, datetime):
                v = v.timestamp()
            elif v is not None and not isinstance(v, bool | int | str):
                v = str(v)  # uuid
            values.append(v)
        out.append(tuple(values))
    return sorted(out, key=repr)


def lake_state(lake: Lake, table: str, columns: list[str], as_of: Any) -> list[tuple]:
    rows = lake.current(table, as_of=as_of).select(columns).to_pylist()
    return norm([tuple(r.values()) for r in rows])


def test_as_of_equals_postgres_at_recorded_moments_and_history_is_consistent(
    pg_dsn: str, lake_dir: str
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(SETUP)
    moments: list[tuple[datetime, int, dict[str, list[tuple]]]] = []
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        with Writer(pg_dsn, seed=11):
            for i in range(8):
                time.sleep(0.4)
                moments.append(snapshot(pg_dsn))
                if i == 3:
                    wait_caught_up(pipeline, pg_dsn)
                    assert merge(lake_dir)["tables"][KEYED_NAME]["status"] == "merged"
                if i == 5:
                    compact(lake_dir)
        wait_caught_up(pipeline, pg_dsn)
    merge(lake_dir)
    final = snapshot(pg_dsn)
    assert final[2][KEYED_NAME], "the writer left no rows: the test proves nothing"
    assert len({len(m[2][KEYED_NAME]) for m in moments}) > 1, "the state never changed"

    with Lake(lake_dir) as lake:
        for moment, lsn, expected in [*moments, final]:
            for table, columns in ((KEYED_NAME, COLUMNS), (KEYLESS, KEYLESS_COLUMNS)):
                assert lake_state(lake, table, columns, moment) == expected[table], (
                    f"{table} as of {moment}"
                )
                # The LSN form: everything committed at or before the WAL position then.
                assert lake_state(lake, table, columns, format_lsn(lsn)) == expected[table]
        # The SQL macro answers the same as the API.
        moment, _, expected = moments[4]
        select = ", ".join(f'"{c}"' for c in COLUMNS)
        rows = lake.sql(
            f'SELECT {select} FROM "Sales"."Line Items_as_of"(?::TIMESTAMPTZ)'.replace(
                "?", f"'{moment.isoformat()}'"
            )
        ).fetchall()
        assert norm(rows) == expected[KEYED_NAME]

        # History: exactly one open version per live row, equal to it; versions of a key
        # do not overlap and follow each other.
        history = lake.history(KEYED_NAME).to_pylist()
        open_rows = [tuple(r[c] for c in COLUMNS) for r in history if r["_valid_to"] is None]
        assert norm(open_rows) == final[2][KEYED_NAME]
        by_key: dict[tuple, list[dict]] = {}
        for r in history:
            by_key.setdefault(tuple(r[c] for c in KEY), []).append(r)
        for versions in by_key.values():
            # Versions of one transaction share an LSN; all but its last end at its commit.
            versions.sort(key=lambda r: (r["_cdc_lsn"], r["_valid_to"] is None, r["_valid_to"]))
            for a, b in itertools.pairwise(versions):
                assert a["_valid_to"] is not None and a["_valid_to"] <= b["_valid_from"]
            assert all(r["_valid_from"] <= (r["_valid_to"] or r["_valid_from"]) for r in versions)
        # The history at a moment is the state at that moment.
        moment, _, expected = moments[2]
        at = [
            tuple(r[c] for c in COLUMNS)
            for r in history
            if r["_valid_from"] <= moment and (r["_valid_to"] is None or r["_valid_to"] > moment)
        ]
        assert norm(at) == expected[KEYED_NAME]
