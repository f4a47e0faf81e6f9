"""The COPY reader of the initial snapshot: chunking, odd values, early stops and errors."""

from __future__ import annotations

import contextlib
import json
import math
import threading
import uuid
from datetime import UTC
from decimal import Decimal

import psycopg
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog import lake_layout as layout
from cdc.core.table_schema import TableSchema
from cdc.postgres import copy_drain
from cdc.postgres.errors import CopyFormatError, SourceConnectionError, SourceError
from cdc.postgres.introspect import describe_tables
from cdc.postgres.snapshot import SnapshotReader, _drain_copy, _parse_chunk
from tests.plugins.capture_path import CapturePath
from tests.plugins.postgres import PostgresServer

# Every test runs with the compiled COPY drain and with psycopg's (CDC_PURE_PYTHON=1).
pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("capture_path")]


TRICKY = [
    (1, "plain"),
    (2, ""),  # an empty string, not NULL
    (3, None),
    (4, 'a "quoted", comma'),
    (5, "two\nlines\r\nand a CR\r"),
    (6, "ünïcødé ✓"),
    (7, "\\N"),
    (8, ","),
]


def _schema(conn: psycopg.Connection, table: str) -> TableSchema:
    return describe_tables(conn, [("public", table)])[("public", table)]


def _create_big(conn: psycopg.Connection, *, repeat: int) -> None:
    """``big``: 200,000 rows of an int key and ``repeat`` md5 texts, several chunks."""
    conn.execute("CREATE TABLE big (id int PRIMARY KEY, t text)")
    conn.execute(
        "INSERT INTO big SELECT g, repeat(md5(g::text), %s) FROM generate_series(1, 200000) g",
        [repeat],
    )


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "cdc-snapshot-copy"]


def _read_all(dsn: str, schema: TableSchema, block_bytes: int) -> list[pa.Table]:
    with SnapshotReader(dsn, None, block_bytes=block_bytes) as reader:
        return list(reader.read_table(schema))


@pytest.mark.parametrize("block_bytes", [1, 40, 1 << 20])
def test_rows_survive_any_chunking(
    pg_dsn: str, pg_conn: psycopg.Connection, block_bytes: int
) -> None:
    pg_conn.execute("CREATE TABLE tricky (id int PRIMARY KEY, t text)")
    with pg_conn.cursor() as cur:
        cur.executemany("INSERT INTO tricky VALUES (%s, %s)", TRICKY)
    batches = _read_all(pg_dsn, _schema(pg_conn, "tricky"), block_bytes)
    if block_bytes == 1:
        assert len(batches) == len(TRICKY)  # a chunk per row
    rows = pa.concat_tables(batches).to_pylist()
    assert sorted((r["id"], r["t"]) for r in rows) == TRICKY
    assert not _reader_threads()


def test_one_column_table_with_nulls(pg_dsn: str, pg_conn: psycopg.Connection) -> None:
    # COPY CSV prints a NULL row of a one-column table as an empty line.
    pg_conn.execute("CREATE TABLE single (t text)")
    pg_conn.execute("INSERT INTO single VALUES (NULL), (''), (NULL), ('x'), (NULL)")
    for block_bytes in (1, 1 << 20):
        rows = pa.concat_tables(_read_all(pg_dsn, _schema(pg_conn, "single"), block_bytes))
        assert sorted(rows.column("t").to_pylist(), key=str) == sorted(
            [None, "", None, "x", None], key=str
        )


def test_empty_table_yields_nothing(pg_dsn: str, pg_conn: psycopg.Connection) -> None:
    pg_conn.execute("CREATE TABLE empty (id int PRIMARY KEY, t text)")
    assert _read_all(pg_dsn, _schema(pg_conn, "empty"), 1 << 20) == []
    assert not _reader_threads()


def test_fallback_text_per_chunk(pg_dsn: str, pg_conn: psycopg.Connection) -> None:
    pg_conn.execute("CREATE TABLE nums (id int PRIMARY KEY, n numeric(5, 2))")
    pg_conn.execute("INSERT INTO nums SELECT g, g / 100.0 FROM generate_series(1, 300) g")
    pg_conn.execute("UPDATE nums SET n = 'NaN' WHERE id = 150")
    batches = _read_all(pg_dsn, _schema(pg_conn, "nums"), 256)
    assert len(batches) > 2
    rows = {r["id"]: r for r in pa.concat_tables(batches, promote_options="default").to_pylist()}
    assert len(rows) == 300
    assert rows[150]["n"] is None and dict(rows[150][layout.FALLBACK]) == {"n": "NaN"}
    assert rows[42]["n"] == Decimal("0.42") and rows[42].get(layout.FALLBACK) is None
    assert sum(layout.FALLBACK in b.column_names for b in batches) == 1


def test_stopping_mid_table_cancels_the_copy(pg_dsn: str, pg_conn: psycopg.Connection) -> None:
    _create_big(pg_conn, repeat=4)
    big = _schema(pg_conn, "big")
    with SnapshotReader(pg_dsn, None, block_bytes=64 * 1024) as reader:
        batches = reader.read_table(big)
        first = next(batches)
        assert 0 < first.num_rows < 200_000
        batches.close()  # what a stopped pipeline does: the COPY is cancelled
        assert not _reader_threads()
        assert reader._conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.ACTIVE
    # The reader closed cleanly, and the server is free for the next one.
    assert pa.concat_tables(_read_all(pg_dsn, big, 1 << 20)).num_rows == 200_000


def test_connection_lost_mid_copy(pg_dsn: str, pg_conn: psycopg.Connection) -> None:
    _create_big(pg_conn, repeat=8)
    schema = _schema(pg_conn, "big")
    reader = SnapshotReader(pg_dsn, None, block_bytes=64 * 1024)
    try:
        batches = reader.read_table(schema)
        next(batches)
        pid = reader._conn.info.backend_pid
        pg_conn.execute("SELECT pg_terminate_backend(%s)", [pid])
        with pytest.raises(SourceConnectionError):
            for _ in batches:
                pass
        assert not _reader_threads()
    finally:
        reader._conn.close()


def test_raising_out_of_the_loop_stops_the_reader(pg_dsn: str, pg_conn: psycopg.Connection) -> None:
    # The pipeline's stop: an exception raised between batches, then the reader closes.
    _create_big(pg_conn, repeat=4)
    big = _schema(pg_conn, "big")

    class Stopped(Exception):
        pass

    with (
        pytest.raises(Stopped),
        SnapshotReader(pg_dsn, None, block_bytes=64 * 1024) as reader,
    ):
        for _batch in reader.read_table(big):
            raise Stopped
    assert not _reader_threads()
    assert reader._conn.closed


def test_partitioned_and_row_secured_tables_are_read_as_the_role_sees_them(
    pg_dsn: str, pg_conn: psycopg.Connection
) -> None:
    """An ordinary table is copied directly (``COPY t TO``), a partitioned one, which the
    server does not copy directly, through a SELECT: whole, NULLs and composite keys of
    mixed types included; and a row-level security policy still applies to the role."""
    pg_conn.execute(
        """
        CREATE TABLE "Parted" (k text, n int, v text, PRIMARY KEY (k, n)) PARTITION BY LIST (k);
        CREATE TABLE "Parted a" PARTITION OF "Parted" FOR VALUES IN ('a');
        CREATE TABLE "Parted b" PARTITION OF "Parted" FOR VALUES IN ('b');
        INSERT INTO "Parted" SELECT CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, g,
            NULLIF(md5(g::text), md5('3')) FROM generate_series(1, 40) g;
        CREATE TABLE secured (v text);
        INSERT INTO secured VALUES ('x'), (NULL), ('y');
        ALTER TABLE secured ENABLE ROW LEVEL SECURITY;
        CREATE POLICY not_y ON secured USING (v IS DISTINCT FROM 'y');
        """
    )
    parted = _schema(pg_conn, "Parted")
    rows = pa.concat_tables(_read_all(pg_dsn, parted, 1 << 20)).to_pylist()
    assert sorted((r["k"], r["n"]) for r in rows) == sorted(
        ("a" if g % 2 == 0 else "b", g) for g in range(1, 41)
    )
    assert [r["v"] for r in rows if r["n"] == 3] == [None]
    role = f"r_{uuid.uuid4().hex[:8]}"
    pg_conn.execute(f"CREATE ROLE {role} LOGIN; GRANT SELECT ON secured TO {role}")
    try:
        dsn = psycopg.conninfo.make_conninfo(pg_dsn, user=role)
        secured = pa.concat_tables(_read_all(dsn, _schema(pg_conn, "secured"), 1 << 20))
    finally:
        pg_conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
    assert sorted(secured.column("v").to_pylist(), key=str) == sorted(["x", None], key=str)


MIXED = """
    CREATE TABLE "Mixed Case" (
        "Region" text, "Seq No" bigint, "At" timestamptz, "Amount" numeric(10, 2),
        "Flag" boolean, note text, PRIMARY KEY ("Region", "Seq No", "At")
    );
    INSERT INTO "Mixed Case"
    SELECT CASE WHEN g % 3 = 0 THEN 'north, "quoted"' ELSE 'süd' || g % 5 END, g,
           timestamptz '2024-02-29 12:00+00' + g * interval '1 minute',
           CASE WHEN g % 7 = 0 THEN NULL ELSE g / 100.0 END,
           CASE WHEN g % 4 = 0 THEN NULL ELSE g % 2 = 0 END,
           CASE WHEN g % 11 = 0 THEN NULL WHEN g % 13 = 0 THEN '' ELSE md5(g::text) || E'\n' END
    FROM generate_series(1, 20000) g;
    CREATE TABLE keyless (v text, n int);
    INSERT INTO keyless SELECT CASE WHEN g % 2 = 0 THEN NULL ELSE g::text END, NULLIF(g % 3, 0)
    FROM generate_series(1, 20000) g;
"""


@pytest.mark.parametrize("table", ["Mixed Case", "keyless"])
def test_compiled_and_python_drains_read_the_same_rows(
    pg_dsn: str,
    pg_conn: psycopg.Connection,
    capture_path: CapturePath,
    monkeypatch: pytest.MonkeyPatch,
    table: str,
) -> None:
    # A composite key of mixed types, quoted mixed-case names, NULLs, empty strings,
    # quotes and newlines; and a table with no key at all.
    pg_conn.execute(MIXED)
    schema = _schema(pg_conn, table)
    # The path under test is the one taken (psycopg's libpq found in this process).
    assert (copy_drain.compiled_drain(pg_conn.pgconn) is not None) == (capture_path == "compiled")
    ours = pa.concat_tables(_read_all(pg_dsn, schema, 64 * 1024))
    monkeypatch.setenv("CDC_PURE_PYTHON", "1")
    reference = pa.concat_tables(_read_all(pg_dsn, schema, 1 << 20))
    assert ours.num_rows == reference.num_rows == 20_000
    assert ours.to_pylist() == reference.to_pylist()
    assert ours.schema == reference.schema
    assert ours.column(schema.column_names[0]).null_count == (10_000 if table == "keyless" else 0)


def test_rows_larger_than_a_chunk_arrive_whole(pg_dsn: str, pg_conn: psycopg.Connection) -> None:
    # Rows of several MiB against chunks of 1 KiB: each chunk grows to hold its row.
    pg_conn.execute("CREATE TABLE wide (id int PRIMARY KEY, t text)")
    pg_conn.execute(
        "INSERT INTO wide SELECT g, repeat(md5(g::text), g * 40000) FROM generate_series(1, 3) g"
    )
    batches = _read_all(pg_dsn, _schema(pg_conn, "wide"), 1024)
    assert len(batches) == 3
    rows = pa.concat_tables(batches).to_pylist()
    assert [(r["id"], len(r["t"])) for r in rows] == [(g, g * 40000 * 32) for g in (1, 2, 3)]


def _int_array(values: list[int | None]) -> str:
    return "{" + ",".join("NULL" if v is None else str(v) for v in values) + "}"


# Each column type the snapshot reads as text, with hypothesis values: (SQL type, values).
_FLOATS = st.floats(width=32) | st.sampled_from([float("nan"), float("inf"), -0.0])
_TEXTS = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)
TYPED_COLUMNS: list[tuple[str, str, st.SearchStrategy[str]]] = [
    ("c0", "smallint", st.integers(-(2**15), 2**15 - 1).map(str)),
    ("c1", "int", st.integers(-(2**31), 2**31 - 1).map(str)),
    ("c2", "bigint", st.integers(-(2**63), 2**63 - 1).map(str)),
    ("c3", "real", _FLOATS.map(repr).map(lambda r: {"inf": "Infinity", "nan": "NaN"}.get(r, r))),
    ("c4", "double precision", st.floats().map(repr).map(lambda r: r.replace("inf", "Infinity"))),
    ("c5", "boolean", st.sampled_from(["t", "f"])),
    ('"Text Col"', "text", _TEXTS),  # a quoted, mixed-case name
    ("c7", "varchar(8)", _TEXTS),
    ("c8", "timestamp", st.datetimes().map(str) | st.sampled_from(["infinity", "-infinity"])),
    (
        "c9",
        "timestamptz",
        st.datetimes(timezones=st.just(UTC)).map(str) | st.sampled_from(["infinity", "epoch"]),
    ),
    ("c10", "date", st.dates().map(str) | st.sampled_from(["infinity", "-infinity"])),
    ("c11", "numeric(12, 3)", st.decimals(places=3, min_value=-(10**8), max_value=10**8).map(str)),
    ("c12", "numeric", st.sampled_from(["NaN", "1e-20", "123456789012345678901234567890.5"])),
    ("c13", "jsonb", st.dictionaries(_TEXTS, _TEXTS | st.integers(), max_size=2).map(json.dumps)),
    ("c14", "int[]", st.lists(st.none() | st.integers(-5, 5), max_size=3).map(_int_array)),
    ("c15", "bytea", st.binary(max_size=6).map(lambda b: "\\x" + b.hex())),
]


@given(
    rows=st.lists(
        st.tuples(*(st.none() | values for _, _, values in TYPED_COLUMNS)), min_size=1, max_size=12
    )
)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_compiled_split_reads_every_type_as_psycopgs_drain_does(
    pg_dsn: str, pg_conn: psycopg.Connection, rows: list[tuple[str | None, ...]]
) -> None:
    """The compiled drain (rows split in C) against CDC_PURE_PYTHON=1 (pyarrow.csv), on
    values of every column type: NULLs, empty strings, quotes, NaN, infinities and the
    values that keep their text in ``_cdc_fallback``; a composite key of mixed types."""
    if copy_drain.split_rows is None:
        pytest.fail("the compiled COPY drain is not built")
    names = [name for name, _, _ in TYPED_COLUMNS]
    types = [sql_type for _, sql_type, _ in TYPED_COLUMNS]
    pg_conn.execute("DROP TABLE IF EXISTS typed")
    pg_conn.execute(
        "CREATE TABLE typed (k serial, "
        + ", ".join(f"{n} {t}" for n, t in zip(names, types, strict=True))
        + ", PRIMARY KEY (k, c1))"
    )
    with pg_conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO typed ("
            + ", ".join(names)
            + ") VALUES ("
            + ", ".join(f"%s::text::{t}" for t in types)
            + ")",
            [tuple("0" if (i == 1 and v is None) else v for i, v in enumerate(r)) for r in rows],
        )
    schema = _schema(pg_conn, "typed")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CDC_PURE_PYTHON", raising=False)
        ours = pa.concat_tables(_read_all(pg_dsn, schema, 256), promote_options="default")
        mp.setenv("CDC_PURE_PYTHON", "1")
        reference = pa.concat_tables(_read_all(pg_dsn, schema, 1 << 20), promote_options="default")
    assert ours.num_rows == reference.num_rows == len(rows)
    assert ours.schema == reference.schema
    assert _comparable(ours) == _comparable(reference)


def _comparable(table: pa.Table) -> list[dict[str, object]]:
    """Rows with float NaN as text (NaN equals nothing, itself included)."""
    return [
        {k: "NaN" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
        for row in table.to_pylist()
    ]


def test_rows_of_other_columns_raise_a_clear_error(
    pg_dsn: str, pg_conn: psycopg.Connection, capture_path: CapturePath
) -> None:
    """A COPY whose rows do not have the columns the reader expects (here two of three)
    stops with an error naming the row or the count, never with a crash or a shifted
    column: CopyFormatError from the compiled split, ArrowInvalid from pyarrow.csv."""
    pg_conn.execute("CREATE TABLE two (a int, b text)")
    pg_conn.execute("INSERT INTO two VALUES (1, 'x'), (2, NULL)")
    expected: tuple[type[Exception], str] = (
        (CopyFormatError, r"row 1 of the COPY of two is not a CSV row of its 3 columns")
        if capture_path == "compiled"
        else (pa.ArrowInvalid, r"Expected 3 columns, got 2")
    )
    with (
        psycopg.connect(pg_dsn, autocommit=True) as conn,
        pytest.raises(expected[0], match=expected[1]),
    ):
        assert (copy_drain.compiled_drain(conn.pgconn) is not None) == (capture_path == "compiled")
        with conn.cursor().copy("COPY two TO STDOUT (FORMAT csv)"):
            chunks = list(
                _drain_copy(
                    conn.pgconn,
                    conn.info.encoding,
                    1 << 20,
                    threading.Event(),
                    columns=3,
                    what="the COPY of two",
                )
            )
        for chunk in chunks:  # the Python drain's rows, parsed as the reader does
            assert not isinstance(chunk, list)
            _parse_chunk(chunk, ["a", "b", "c"])


def test_a_started_copy_runs_before_it_is_read_and_closes_unread(
    pg_dsn: str, pg_conn: psycopg.Connection
) -> None:
    """start_table sends the COPY and starts its reader at once (the pipeline readies the
    sink meanwhile); closed without a batch read, it stops the thread and cancels the COPY
    (as a stopped pipeline does: the snapshot transaction ends with it)."""
    _create_big(pg_conn, repeat=4)
    big = _schema(pg_conn, "big")
    with SnapshotReader(pg_dsn, None, block_bytes=64 * 1024) as reader:
        started = reader.start_table(big)
        assert _reader_threads()  # draining already
        active = pg_conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY %%big%%'"
            " AND state = 'active' AND pid <> pg_backend_pid()"
        ).fetchone()
        assert active == (1,)
        started.close()
        assert not _reader_threads()
        assert reader._conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.ACTIVE
    with (
        SnapshotReader(pg_dsn, None, block_bytes=64 * 1024) as reader,
        contextlib.closing(reader.start_table(big)) as again,
    ):
        assert sum(batch.num_rows for batch in again) == 200_000
    assert not _reader_threads()


def test_a_refused_copy_raises_when_started(pg_dsn: str, pg_conn: psycopg.Connection) -> None:
    pg_conn.execute("CREATE TABLE private (id int PRIMARY KEY)")
    role = f"r_{uuid.uuid4().hex[:8]}"
    pg_conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        dsn = psycopg.conninfo.make_conninfo(pg_dsn, user=role)
        with SnapshotReader(dsn, None) as reader:
            with pytest.raises(SourceError, match=r"GRANT SELECT ON public\.private"):
                reader.start_table(_schema(pg_conn, "private"))
            assert not _reader_threads()
    finally:
        pg_conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_text_of_another_encoding_is_checked_as_utf8(
    pg_server: PostgresServer, capture_path: CapturePath
) -> None:
    """A LATIN1 database sends its own bytes: ASCII text reads the same on both paths, and
    a byte no UTF-8 text holds fails the read with pyarrow's ArrowInvalid on both (the
    compiled split checks UTF-8 itself whenever the connection's encoding is not UTF8)."""
    name = f"latin1_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
        admin.execute(
            f"CREATE DATABASE {name} ENCODING 'LATIN1' TEMPLATE template0 "
            "LC_COLLATE 'C' LC_CTYPE 'C'"
        )
    try:
        dsn = pg_server.dsn_for(name)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO t VALUES (1, 'plain'), (2, NULL), (3, '')")
            schema = _schema(conn, "t")
            rows = pa.concat_tables(_read_all(dsn, schema, 1 << 20)).to_pylist()
            assert sorted((r["id"], r["v"]) for r in rows) == [(1, "plain"), (2, None), (3, "")]
            conn.execute("INSERT INTO t VALUES (4, convert_from('\\xe9'::bytea, 'LATIN1'))")
            with pytest.raises(pa.ArrowInvalid, match=r"(?i)utf-?8"):
                _read_all(dsn, schema, 1 << 20)
    finally:
        with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
