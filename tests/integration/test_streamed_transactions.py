"""Huge transactions streamed before they commit (pgoutput protocol 2), on real PostgreSQL.

Each test database gets ``logical_decoding_work_mem = 64kB`` (the minimum) with ``ALTER
DATABASE ... SET``. Walsenders of ``replication=database`` connections do apply the
database's settings (``test_the_database_setting_reaches_the_walsender`` checks it), so a
few thousand rows make the server stream, while the other tests' databases on the shared
server keep the 64MB default. Every test also checks ``pg_stat_replication_slots`` to
prove the server really streamed rather than sent the transaction whole.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import pq, sql

from catalog.lake import Lake
from cdc.core.events import ChangeEvent
from cdc.core.position import CapturePosition
from cdc.postgres.protocol.assembler import TransactionCommitted
from cdc.postgres.replication import ReplicationConnection, session_conninfo
from cdc.postgres.slots import ensure_publication
from cdc.postgres.source_queries import current_wal_lsn
from cdc.postgres.streaming import StreamingSource
from tests.plugins.lake import (
    assert_lake_matches_postgres,
    duplicate_positions,
    running_pipeline,
    wait_caught_up,
)

# Each test runs on the compiled columnar capture path and on the pure one.
pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("capture_path")]

BIG_ROWS = 50_000


@pytest.fixture
def streaming_dsn(pg_dsn: str, pg_conn: psycopg.Connection) -> str:
    """``pg_dsn``, whose database makes walsenders stream transactions beyond 64 kB."""
    dbname = pg_conn.info.dbname
    pg_conn.execute(
        sql.SQL("ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'").format(
            sql.Identifier(dbname)
        )
    )
    return pg_dsn


def stream_stats(conn: psycopg.Connection, slot: str = "test") -> tuple[int, int]:
    """(stream_txns, stream_count) of ``slot``: transactions streamed, blocks sent."""
    row = conn.execute(
        "SELECT stream_txns, stream_count FROM pg_stat_replication_slots WHERE slot_name = %s",
        [slot],
    ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def wait_until_streamed(conn: psycopg.Connection, blocks: int = 1, slot: str = "test") -> None:
    """Wait until the server has sent at least ``blocks`` stream blocks on ``slot``."""
    deadline = time.monotonic() + 60
    while stream_stats(conn, slot)[1] < blocks:
        assert time.monotonic() < deadline, "the server never streamed the transaction"
        time.sleep(0.05)


def spill_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.spill"))


def test_the_database_setting_reaches_the_walsender(streaming_dsn: str) -> None:
    pgconn = pq.PGconn.connect(session_conninfo(streaming_dsn, replication="database").encode())
    try:
        result = pgconn.exec_(b"SHOW logical_decoding_work_mem")
        assert result.status == pq.ExecStatus.TUPLES_OK
        assert result.get_value(0, 0) == b"64kB"
    finally:
        pgconn.finish()
    with ReplicationConnection(streaming_dsn) as repl:
        assert repl.server_version >= 140000


def test_a_huge_transaction_with_a_rolled_back_savepoint_lands_exactly_once(
    streaming_dsn: str, pg_conn: psycopg.Connection, lake_dir: str, tmp_path: Path
) -> None:
    pg_conn.execute(
        "CREATE TABLE big (id int PRIMARY KEY, payload text);"
        "CREATE TABLE small (id int PRIMARY KEY, v text)"
    )
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    with (
        running_pipeline(
            streaming_dsn, lake_dir, **{"source.spill_dir": str(spill_dir)}
        ) as pipeline,
        psycopg.connect(streaming_dsn) as big,
    ):
        big.execute(
            "INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, %s) g",
            [BIG_ROWS // 2],
        )
        big.execute("SAVEPOINT sp")
        big.execute("INSERT INTO big SELECT g, 'doomed' FROM generate_series(900001, 910000) g")
        big.execute("UPDATE big SET payload = 'doomed' WHERE id <= 100")
        big.execute("ROLLBACK TO SAVEPOINT sp")
        wait_until_streamed(pg_conn, blocks=2)

        # A small transaction commits while the big one is open: it lands at once, and
        # the lake catches up with the server although the big one is only on disk.
        pg_conn.execute("INSERT INTO small VALUES (1, 'while big is open')")
        wait_caught_up(pipeline, streaming_dsn)
        assert spill_files(spill_dir), "the open transaction should wait on disk"
        with Lake(lake_dir) as lk:
            assert lk.sql("SELECT id FROM public.small").fetchall() == [(1,)]
            assert lk.sql("SELECT count(*) FROM public.big_changes").fetchone() == (0,)

        big.execute(
            "INSERT INTO big SELECT g, 'second half' FROM generate_series(%s, %s) g",
            [BIG_ROWS // 2 + 1, BIG_ROWS],
        )
        big.execute("DELETE FROM big WHERE id % 1000 = 0")
        big.execute("UPDATE big SET payload = 'updated' WHERE id % 777 = 0")
        big.commit()
        pg_conn.execute("INSERT INTO small VALUES (2, 'after big')")
        wait_caught_up(pipeline, streaming_dsn)

    streamed_txns, blocks = stream_stats(pg_conn)
    assert streamed_txns >= 1 and blocks >= 3
    assert spill_files(spill_dir) == []
    assert (
        assert_lake_matches_postgres(
            streaming_dsn, lake_dir, "public.big", ["id", "payload"], ["id"]
        )
        == BIG_ROWS - BIG_ROWS // 1000
    )
    assert_lake_matches_postgres(streaming_dsn, lake_dir, "public.small", ["id", "v"], ["id"])
    assert duplicate_positions(lake_dir, "public.big") == []
    with Lake(lake_dir) as lk:
        ops = dict(lk.sql("SELECT _cdc_op, count(*) FROM public.big_changes GROUP BY 1").fetchall())
        updated = len([i for i in range(777, BIG_ROWS + 1, 777) if i % 1000 != 0])
        assert ops == {"c": BIG_ROWS, "d": BIG_ROWS // 1000, "u": updated}
        # One transaction: one commit LSN and xid, and seq numbers without gaps.
        lsn, txids, seqs, first, last = lk.sql(
            "SELECT any_value(_cdc_lsn), count(DISTINCT _cdc_txid), count(DISTINCT _cdc_seq), "
            "min(_cdc_seq), max(_cdc_seq) FROM public.big_changes"
        ).fetchone()
        assert (txids, first, last) == (1, 0, seqs - 1) and seqs == sum(ops.values())
        assert lk.sql("SELECT count(DISTINCT _cdc_lsn) FROM public.big_changes").fetchone() == (1,)
        # Nothing of the rolled-back savepoint, and the commit order is kept.
        assert lk.sql(
            "SELECT count(*) FROM public.big_changes WHERE payload = 'doomed' OR id > 900000"
        ).fetchone() == (0,)
        small = dict(lk.sql("SELECT id, _cdc_lsn FROM public.small_changes").fetchall())
        assert small[1] < lsn < small[2]


def test_a_streamed_transaction_that_aborts_leaves_nothing(
    streaming_dsn: str, pg_conn: psycopg.Connection, lake_dir: str, tmp_path: Path
) -> None:
    pg_conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pg_conn.execute("INSERT INTO t VALUES (1, 'before')")
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    with running_pipeline(
        streaming_dsn, lake_dir, **{"source.spill_dir": str(spill_dir)}
    ) as pipeline:
        with psycopg.connect(streaming_dsn) as doomed:
            doomed.execute(
                "INSERT INTO t SELECT g, repeat('y', 100) FROM generate_series(2, 20001) g"
            )
            doomed.execute("UPDATE t SET v = 'doomed' WHERE id = 1")
            wait_until_streamed(pg_conn, blocks=2)
            doomed.rollback()
        pg_conn.execute("INSERT INTO t VALUES (0, 'after')")
        wait_caught_up(pipeline, streaming_dsn)
    assert stream_stats(pg_conn)[0] >= 1
    assert spill_files(spill_dir) == []
    assert (
        assert_lake_matches_postgres(streaming_dsn, lake_dir, "public.t", ["id", "v"], ["id"]) == 2
    )
    with Lake(lake_dir) as lk:
        assert lk.sql("SELECT _cdc_op, id FROM public.t_changes ORDER BY id").fetchall() == [
            ("c", 0),
            ("r", 1),
        ]


def test_confirming_past_an_open_streamed_transaction_loses_nothing_across_a_restart(
    streaming_dsn: str, pg_conn: psycopg.Connection, lake_dir: str
) -> None:
    pg_conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    with psycopg.connect(streaming_dsn) as open_txn:
        with running_pipeline(streaming_dsn, lake_dir) as pipeline:
            open_txn.execute(
                "INSERT INTO t SELECT g, repeat('z', 100) FROM generate_series(1, 20000) g"
            )
            wait_until_streamed(pg_conn, blocks=2)
            streamed_up_to = current_wal_lsn(streaming_dsn)
            pg_conn.execute("INSERT INTO t VALUES (-1, 'unrelated')")
            wait_caught_up(pipeline, streaming_dsn)
        # The slot is confirmed past the open transaction's streamed changes, and the
        # pipeline that received them is gone, spill and all.
        confirmed = pg_conn.execute(
            "SELECT confirmed_flush_lsn - %s::pg_lsn FROM pg_replication_slots "
            "WHERE slot_name = 'test'",
            [f"{streamed_up_to >> 32:X}/{streamed_up_to & 0xFFFFFFFF:X}"],
        ).fetchone()
        assert confirmed is not None and confirmed[0] > 0
        open_txn.commit()
    with running_pipeline(streaming_dsn, lake_dir) as pipeline:
        wait_caught_up(pipeline, streaming_dsn)
    assert (
        assert_lake_matches_postgres(streaming_dsn, lake_dir, "public.t", ["id", "v"], ["id"])
        == 20001
    )
    assert duplicate_positions(lake_dir, "public.t") == []


def read_transactions(source: StreamingSource, count: int) -> list[ChangeEvent]:
    """Events of the next ``count`` transactions from ``source``."""
    events: list[ChangeEvent] = []
    deadline = time.monotonic() + 120
    while count:
        assert time.monotonic() < deadline, f"{count} transactions never arrived"
        for item in source.read(timeout=0.2):
            if isinstance(item, TransactionCommitted):
                count -= 1
            else:
                events.append(item)
    return events


def comparable(event: ChangeEvent) -> tuple[Any, ...]:
    return (
        event.op,
        event.table.qualified_name,
        event.before,
        event.after,
        event.commit_lsn,
        event.seq,
        event.txid,
        event.commit_ts,
        event.lsn,
        event.size_bytes,
    )


@pytest.fixture
def two_slots(streaming_dsn: str, pg_conn: psycopg.Connection) -> Iterator[list[StreamingSource]]:
    """A protocol 1 and a protocol 2 source on two slots of the same publication."""
    ensure_publication(pg_conn, "pub")
    sources = []
    for slot, streaming in (("whole", False), ("streamed", True)):
        pg_conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
        source = StreamingSource(
            streaming_dsn,
            slot=slot,
            publication="pub",
            position=CapturePosition(slot),
            stream_in_progress=streaming,
        )
        sources.append(source)
    try:
        yield sources
    finally:
        for source in sources:
            source.close()


def test_protocol_2_delivers_the_same_events_as_protocol_1(
    streaming_dsn: str, pg_conn: psycopg.Connection, two_slots: list[StreamingSource]
) -> None:
    pg_conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text, n numeric)")
    with psycopg.connect(streaming_dsn) as txn:
        txn.execute("INSERT INTO t SELECT g, md5(g::text), g / 7.0 FROM generate_series(1, 5000) g")
        txn.execute("SAVEPOINT a")
        txn.execute("UPDATE t SET v = 'kept' WHERE id % 10 = 0")
        txn.execute("SAVEPOINT b")
        txn.execute("DELETE FROM t WHERE id % 3 = 0")
        txn.execute("INSERT INTO t SELECT g, 'gone', NULL FROM generate_series(10001, 13000) g")
        txn.execute("ROLLBACK TO SAVEPOINT b")
        txn.execute("RELEASE SAVEPOINT a")
        txn.execute("UPDATE t SET id = -id WHERE id <= 50")  # key changes: delete + insert
        txn.execute("TRUNCATE t")
        txn.execute("INSERT INTO t VALUES (1, 'after truncate', 1.5)")
    pg_conn.execute("INSERT INTO t VALUES (2, 'next', 2)")

    whole, streamed = two_slots
    results = []
    for source in (whole, streamed):
        source.start()
        results.append(read_transactions(source, 2))
    assert not whole._conn.stream_in_progress
    assert streamed._conn.stream_in_progress
    assert stream_stats(pg_conn, "streamed")[0] == 1
    assert stream_stats(pg_conn, "whole")[0] == 0
    assert [comparable(e) for e in results[1]] == [comparable(e) for e in results[0]]
    ops = [e.op for e in results[0]]
    assert ops.count("c") == 5000 + 50 + 2 and ops.count("u") == 500 and ops.count("t") == 1
    assert "gone" not in {e.after[1] for e in results[0] if e.after}
