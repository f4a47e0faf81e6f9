"""``cdc jobs merge`` on a lake written by Kafka sink workers: capture with 3 partitions per
table, 2 sink workers committing partitions independently (so the changelog is not appended
in position order), merges in a loop during a writer's churn; afterwards the current views
and the merged tables equal PostgreSQL."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from deltalake import DeltaTable

from catalog import lake_layout
from catalog.current_state import PARTITIONS_APP_ID
from jobs.merge import merge, stream_cap
from tests.plugins.kafka_pipeline import (
    background,
    capture_thread,
    settings,
    sink_thread,
    unique,
    wait_captured,
    wait_streaming,
    wait_sunk,
)
from tests.plugins.lake import assert_lake_matches_postgres

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]

SCHEMA = """
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, note text);
CREATE TABLE "Ledger" ("Acct" int, day text, amount numeric(12, 2), PRIMARY KEY ("Acct", day));
INSERT INTO accounts SELECT g, 0, 'n' || g FROM generate_series(1, 300) g;
INSERT INTO "Ledger" SELECT g % 50, 'd' || (g / 50), g FROM generate_series(1, 200) g;
"""
TABLES = ("public.accounts", "public.Ledger")


def churn(dsn: str, stop: threading.Event, seed: int) -> int:
    rng = random.Random(seed)
    n = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            with conn.transaction():
                a, b = rng.sample(range(1, 301), 2)
                conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id = %s", [a])
                conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s", [b])
                acct, day = rng.randrange(60), f"d{rng.randrange(6)}"
                roll = rng.random()
                if roll < 0.5:
                    conn.execute(
                        'INSERT INTO "Ledger" VALUES (%s, %s, %s) ON CONFLICT ("Acct", day) '
                        "DO UPDATE SET amount = EXCLUDED.amount",
                        [acct, day, rng.randrange(10_000) / 100],
                    )
                elif roll < 0.7:
                    conn.execute('DELETE FROM "Ledger" WHERE "Acct" = %s AND day = %s', [acct, day])
                elif roll < 0.8:
                    conn.execute("DELETE FROM accounts WHERE id = %s", [rng.randrange(301, 400)])
                elif roll < 0.9:
                    conn.execute(
                        "INSERT INTO accounts VALUES (%s, 0, NULL) ON CONFLICT DO NOTHING",
                        [rng.randrange(301, 400)],
                    )
            n += 1
            time.sleep(0.003)
    return n


def test_merges_in_a_loop_beside_two_kafka_sinks_equal_postgres(
    pg_dsn: str, pg_conn: psycopg.Connection, kafka_broker: str, tmp_path: Path
) -> None:
    pg_conn.execute(SCHEMA)
    prefix, name, lake = unique("km"), unique("km"), str(tmp_path / "lake")
    group = f"{prefix}-sinks"
    capture = capture_thread(settings(kafka_broker, prefix, name, **{"source.dsn": pg_dsn}))
    sink_settings = settings(
        kafka_broker, prefix, name, **{"lake.path": lake, "kafka.group": group}
    )
    merges: list[dict[str, Any]] = []
    with background(capture):
        wait_streaming(pg_dsn, name, capture)
        sinks = (sink_thread(sink_settings, "sink-a"), sink_thread(sink_settings, "sink-b"))
        with background(*sinks):
            stop = threading.Event()
            writer = threading.Thread(target=churn, args=(pg_dsn, stop, 7), daemon=True)
            writer.start()
            deadline = time.monotonic() + 25
            while time.monotonic() < deadline:
                merges.append(merge(lake))
                for s in (capture, *sinks):
                    s.check()
                time.sleep(0.3)
            stop.set()
            writer.join(30)
            wait_captured(pg_dsn, name, capture, *sinks)
            wait_sunk(kafka_broker, prefix, group, capture, *sinks)
            merges.append(merge(lake))
        metrics = [s.result for s in sinks]
    assert all(m is not None and m["messages"] > 0 for m in metrics), "both sinks took partitions"

    merged = [t for m in merges for t in m["tables"].values() if t["status"] == "merged"]
    assert len(merged) >= 5, "merges folded changes while the sinks wrote"
    # Every merge of a Kafka-written table stopped at the oldest partition's mark.
    assert all("capped_at" in t for t in merged)
    assert all(t["watermark_after"] <= t["capped_at"] for t in merged)
    for table in TABLES:
        dt = DeltaTable(lake_layout.changes_uri(lake, table))
        assert dt.transaction_version(PARTITIONS_APP_ID) == 3
        cap, unmarked = stream_cap(dt)
        assert cap is not None and unmarked == []

    assert_lake_matches_postgres(pg_dsn, lake, "public.accounts", ["id", "balance", "note"], ["id"])
    assert_lake_matches_postgres(
        pg_dsn, lake, '"Ledger"', ["Acct", "day", "amount"], ["Acct", "day"]
    )
