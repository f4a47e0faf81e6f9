"""Tests for catalog.duckdb_views and catalog.lake over hand-built changelog Delta tables.

No PostgreSQL: each test writes the rows the sink would write (after images, delete before
images, truncate rows, unchanged-TOAST markers) with ``deltalake.write_deltalake``.
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from deltalake import write_deltalake
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import catalog
from catalog import Lake, SchemaRegistry, connect, lake_layout
from catalog.current_state import current_state_sql
from catalog.duckdb_views import (
    delta_extension_path,
    open_duckdb,
    register_views,
)
from catalog.errors import DeltaExtensionNotFoundError, TerminalCatalogError, TransientCatalogError
from cdc.core.table_schema import ColumnSchema, TableSchema

INT8, INT4, TEXT, BYTEA, TEXT_ARRAY = 20, 23, 25, 17, 1009

ORDERS = pa.schema(
    [
        ("id", pa.int64()),
        ("qty", pa.int32()),
        ("note", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("blob", pa.binary()),
    ]
)
ORDERS_PG = (
    ColumnSchema("id", INT8, is_key=True),
    ColumnSchema("qty", INT4),
    ColumnSchema("note", TEXT),
    ColumnSchema("tags", TEXT_ARRAY),
    ColumnSchema("blob", BYTEA),
)
_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


def change(op: str, lsn: int, seq: int = 0, unchanged: Sequence[str] = (), **values: Any) -> dict:
    """One changelog row; unspecified source columns are NULL."""
    return {"_op": op, "_lsn": lsn, "_seq": seq, "_unchanged": list(unchanged), **values}


def changelog(source: pa.Schema, rows: Sequence[dict]) -> pa.Table:
    """The Arrow table the sink would write for ``rows``: source columns + metadata."""
    # One hour per LSN unit, so larger tables span several _cdc_date partitions (modulo, so
    # that huge test LSNs still make valid timestamps).
    commit_ts = [_EPOCH + timedelta(hours=r["_lsn"] % 10_000) for r in rows]
    columns: dict[str, pa.Array] = {
        f.name: pa.array([r.get(f.name) for r in rows], f.type) for f in source
    }
    columns.update(
        {
            lake_layout.OP: pa.array([r["_op"] for r in rows], pa.string()),
            lake_layout.LSN: pa.array([r["_lsn"] for r in rows], pa.int64()),
            lake_layout.SEQ: pa.array([r["_seq"] for r in rows], pa.int64()),
            lake_layout.TXID: pa.array([r["_lsn"] + 1000 for r in rows], pa.int64()),
            lake_layout.COMMIT_TS: pa.array(commit_ts, pa.timestamp("us", "UTC")),
            lake_layout.INGESTED_AT: pa.array(commit_ts, pa.timestamp("us", "UTC")),
            lake_layout.UNCHANGED_TOAST: pa.array(
                [r["_unchanged"] for r in rows], pa.list_(pa.string())
            ),
            lake_layout.FALLBACK: pa.array(
                [r.get("_fallback") for r in rows], pa.map_(pa.string(), pa.string())
            ),
            lake_layout.DATE: pa.array([ts.date() for ts in commit_ts], pa.date32()),
        }
    )
    return pa.table(columns)


def write(
    lake: Path | str, qualified_name: str, rows: Sequence[dict], source: pa.Schema = ORDERS
) -> None:
    """Append ``rows`` to the changelog table as one Delta commit."""
    write_deltalake(
        lake_layout.changes_uri(str(lake), qualified_name),
        changelog(source, rows),
        mode="append",
        partition_by=list(lake_layout.PARTITION_COLUMNS),
    )


def register(lake: Path | str, schema: str, table: str, columns=ORDERS_PG) -> None:
    SchemaRegistry(str(lake)).register(TableSchema(schema, table, tuple(columns)))


def rows(con: duckdb.DuckDBPyConnection, query: str) -> list[tuple]:
    return sorted(con.execute(query).fetchall(), key=repr)


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    register(tmp_path, "public", "orders")
    return tmp_path


# -- extension ------------------------------------------------------------------------------


def test_delta_extension_path_points_at_the_wheel() -> None:
    path = delta_extension_path()
    assert path.is_file()
    assert path.parent.name == f"v{duckdb.__version__}"


def test_missing_wheel_names_the_wheel_and_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DeltaExtensionNotFoundError) as info:
        delta_extension_path()
    assert "duckdb-extension-delta" in str(info.value)
    assert duckdb.__version__ in str(info.value)


def test_mismatched_duckdb_version(monkeypatch: pytest.MonkeyPatch) -> None:
    built_for = delta_extension_path().parent.name
    monkeypatch.setattr(duckdb, "__version__", "9.9.9")
    with pytest.raises(DeltaExtensionNotFoundError, match=f"{built_for}.*9.9.9.*duckdb==9.9.9"):
        delta_extension_path()


# -- current view semantics --------------------------------------------------------------------


def test_inserts_updates_deletes(lake: Path) -> None:
    write(
        lake,
        "public.orders",
        [
            change("r", 1, 0, id=1, qty=1, note="snap"),
            change("c", 2, 0, id=2, qty=2, note="two"),
            change("c", 2, 1, id=3, qty=3, note="three"),
            change("u", 3, 0, id=2, qty=20, note="two!"),
            change("d", 4, 0, id=3),
        ],
    )
    con = connect(str(lake))
    assert rows(con, "SELECT id, qty, note FROM public.orders") == [
        (1, 1, "snap"),
        (2, 20, "two!"),
    ]
    # The current view exposes the source columns and the fallback texts; the changelog view
    # has everything.
    current_cols = [d[0] for d in con.execute("SELECT * FROM public.orders").description]
    assert current_cols == [*ORDERS.names, lake_layout.FALLBACK]
    changes_cols = [d[0] for d in con.execute("SELECT * FROM public.orders_changes").description]
    assert changes_cols == [*ORDERS.names, *lake_layout.METADATA_COLUMNS]
    assert con.execute("SELECT count(*) FROM public.orders_changes").fetchone() == (5,)


def test_key_change_is_delete_plus_insert(lake: Path) -> None:
    write(lake, "public.orders", [change("c", 1, id=1, qty=1, note="a")])
    write(
        lake,
        "public.orders",
        [change("d", 2, 0, id=1), change("c", 2, 1, id=10, qty=1, note="a")],
    )
    con = connect(str(lake))
    assert rows(con, "SELECT id, qty, note FROM public.orders") == [(10, 1, "a")]


def test_delete_then_reinsert_same_key(lake: Path) -> None:
    write(
        lake,
        "public.orders",
        [
            change("c", 1, id=1, note="old"),
            change("d", 2, id=1),
            change("c", 3, id=1, note="new"),
        ],
    )
    assert rows(connect(str(lake)), "SELECT id, note FROM orders") == [(1, "new")]


def test_truncate_then_reinsert(lake: Path) -> None:
    write(
        lake,
        "public.orders",
        [
            change("c", 1, id=1, note="gone"),
            change("c", 1, 1, id=2, note="gone too"),
            # Same transaction as the truncate, but before it: also gone.
            change("u", 5, 0, id=1, note="still gone"),
            change("t", 5, 1),
            # Same transaction, after the truncate: kept.
            change("c", 5, 2, id=3, note="after"),
        ],
    )
    con = connect(str(lake))
    assert rows(con, "SELECT id, note FROM public.orders") == [(3, "after")]

    write(lake, "public.orders", [change("c", 6, id=1, note="back")])
    assert rows(con, "SELECT id, note FROM public.orders") == [(1, "back"), (3, "after")]

    # Only the latest truncate matters; an earlier one must not resurrect anything.
    write(lake, "public.orders", [change("t", 7), change("c", 8, id=9, note="only")])
    assert rows(con, "SELECT id, note FROM public.orders") == [(9, "only")]


def test_unchanged_toast_is_filled_from_earlier_rows(lake: Path) -> None:
    big = "x" * 5000
    write(
        lake,
        "public.orders",
        [
            change("c", 1, id=1, qty=1, note=big, tags=["a", "b"], blob=b"\x00\x01"),
            change("c", 1, 1, id=2, qty=1, note="small", tags=None, blob=b"z"),
        ],
    )
    write(
        lake,
        "public.orders",
        [
            # note/tags/blob not resent: the view must keep the values from lsn 1.
            change("u", 2, id=1, qty=2, unchanged=["note", "tags", "blob"]),
            # A real NULL (not marked unchanged) replaces the value.
            change("u", 2, 1, id=2, qty=2, note=None, tags=["t"], blob=b"z"),
        ],
    )
    write(
        lake,
        "public.orders",
        [
            # Second unchanged update in a row: still the value from lsn 1.
            change("u", 3, id=1, qty=3, tags=["c"], unchanged=["note", "blob"]),
            # Unchanged after a real NULL: the newest sent value is the NULL.
            change("u", 3, 1, id=2, qty=3, tags=["t2"], blob=b"y", unchanged=["note"]),
        ],
    )
    con = connect(str(lake))
    assert rows(con, "SELECT id, qty, note, tags, blob FROM public.orders") == [
        (1, 3, big, ["c"], b"\x00\x01"),
        (2, 3, None, ["t2"], b"y"),
    ]
    # The changelog itself keeps what was landed (NULL + marker).
    assert con.execute(
        "SELECT note, _cdc_unchanged_toast FROM public.orders_changes WHERE _cdc_lsn = 3 AND id = 1"
    ).fetchall() == [(None, ["note", "blob"])]


def test_unchanged_toast_null_list_means_nothing_unchanged(lake: Path) -> None:
    table = changelog(ORDERS, [change("c", 1, id=1, note="a"), change("u", 2, id=1, note=None)])
    toast = table.schema.get_field_index(lake_layout.UNCHANGED_TOAST)
    table = table.set_column(toast, lake_layout.UNCHANGED_TOAST, pa.nulls(2, pa.list_(pa.string())))
    write_deltalake(
        lake_layout.changes_uri(str(lake), "public.orders"), table, partition_by=["_cdc_date"]
    )
    assert rows(connect(str(lake)), "SELECT id, note FROM orders") == [(1, None)]


def test_order_is_lsn_then_seq_not_file_order(lake: Path) -> None:
    history = [
        change("c", 9, 0, id=1, qty=0, note="first"),
        change("u", 10, 0, id=1, qty=1, unchanged=["note"]),
        change("u", 10, 1, id=1, qty=2, note="mid"),
        change("u", 10, 2, id=1, qty=3, unchanged=["note"]),
        change("c", 11, 0, id=2, qty=1),
        change("d", 12, 0, id=2),
        change("c", 12, 1, id=2, qty=9),
        change("u", 13, 0, id=1, qty=4, unchanged=["note"]),
    ]
    rng = random.Random(7)
    shuffled = history[:]
    rng.shuffle(shuffled)
    # Newest changes committed first, rows shuffled inside each commit.
    for chunk in (shuffled[:3], shuffled[3:5], shuffled[5:]):
        write(lake, "public.orders", chunk)
    assert rows(connect(str(lake)), "SELECT id, qty, note FROM public.orders") == [
        (1, 4, "mid"),
        (2, 9, None),
    ]


def test_order_with_extreme_lsn_and_seq(lake: Path) -> None:
    # The view packs (lsn, seq) into one HUGEINT: a huge seq must not spill into the next lsn.
    big_lsn, big_seq = 2**62, 2**62
    write(
        lake,
        "public.orders",
        [
            change("u", big_lsn + 1, 0, id=1, qty=3),
            change("c", big_lsn, big_seq, id=1, qty=2),
            change("c", big_lsn, 0, id=2, qty=1),
            change("d", big_lsn, 1, id=2),
        ],
    )
    assert rows(connect(str(lake)), "SELECT id, qty FROM public.orders") == [(1, 3)]


def test_keyless_table_keeps_every_image(tmp_path: Path) -> None:
    source = pa.schema([("msg", pa.string()), ("n", pa.int64())])
    register(tmp_path, "logs", "events", [ColumnSchema("msg", TEXT), ColumnSchema("n", INT8)])
    write(
        tmp_path,
        "logs.events",
        [
            change("c", 1, msg="a", n=1),
            change("c", 1, 1, msg="a", n=1),  # duplicates are legitimate without a key
            change("t", 2),
            change("c", 3, msg="b", n=2),
            change("r", 3, 1, msg="c", n=3),
            change("u", 4, msg="c", n=4),
            change("d", 5, msg="b", n=2),
        ],
        source,
    )
    assert rows(connect(str(tmp_path)), "SELECT msg, n FROM logs.events") == [
        ("b", 2),
        ("c", 3),
        ("c", 4),
    ]


def test_table_without_registry_entry_is_keyless(tmp_path: Path) -> None:
    write(tmp_path, "public.orders", [change("c", 1, id=1, qty=1), change("u", 2, id=1, qty=2)])
    assert rows(connect(str(tmp_path)), "SELECT id, qty FROM public.orders") == [(1, 1), (1, 2)]


def test_quoted_identifiers(tmp_path: Path) -> None:
    source = pa.schema([("Order Id", pa.int64()), ('say "hi"', pa.string()), ("it's", pa.string())])
    register(
        tmp_path,
        "My Schema",
        'Or"ders',
        [
            ColumnSchema("Order Id", INT8, is_key=True),
            ColumnSchema('say "hi"', TEXT),
            ColumnSchema("it's", TEXT),
        ],
    )
    first: dict[str, Any] = {"Order Id": 1, 'say "hi"': "hello", "it's": "big"}
    second: dict[str, Any] = {"Order Id": 1, 'say "hi"': "bye"}
    write(
        tmp_path,
        'My Schema.Or"ders',
        [
            change("c", 1, **first),
            change("u", 2, unchanged=["it's"], **second),
        ],
        source,
    )
    con = connect(str(tmp_path))
    # The last value is _cdc_fallback.
    assert con.execute('SELECT * FROM "My Schema"."Or""ders"').fetchall() == [
        (1, "bye", "big", None)
    ]
    assert con.execute('SELECT count(*) FROM "My Schema"."Or""ders_changes"').fetchone() == (2,)
    described = [d[0] for d in con.execute('SELECT * FROM "Or""ders"').description]
    assert described == [*source.names, lake_layout.FALLBACK]


def test_two_schemas_with_the_same_table_name(lake: Path) -> None:
    register(lake, "sales", "orders")
    write(lake, "public.orders", [change("c", 1, id=1, note="public")])
    write(lake, "sales.orders", [change("c", 1, id=1, note="sales")])
    register(lake, "sales", "refunds")
    write(lake, "sales.refunds", [change("c", 1, id=5, note="refund")])

    con = connect(str(lake))
    assert con.execute("SELECT note FROM public.orders").fetchall() == [("public",)]
    assert con.execute("SELECT note FROM sales.orders").fetchall() == [("sales",)]
    # Unambiguous names work unqualified through the search path.
    assert con.execute("SELECT note FROM refunds").fetchall() == [("refund",)]
    assert con.execute("SELECT count(*) FROM refunds_changes").fetchone() == (1,)


def test_views_see_new_commits_through_one_connection(lake: Path) -> None:
    write(lake, "public.orders", [change("c", 1, id=1, qty=1, note="a")])
    con = connect(str(lake))
    assert rows(con, "SELECT id, qty, note FROM public.orders") == [(1, 1, "a")]

    write(lake, "public.orders", [change("u", 2, id=1, qty=2, unchanged=["note"])])
    assert rows(con, "SELECT id, qty, note FROM public.orders") == [(1, 2, "a")]

    write(lake, "public.orders", [change("c", 3, id=2, qty=5, note="b"), change("d", 3, 1, id=1)])
    assert rows(con, "SELECT id, qty, note FROM public.orders") == [(2, 5, "b")]
    assert con.execute("SELECT count(*) FROM public.orders_changes").fetchone() == (4,)


def test_tables_filter_and_unknown_table(lake: Path) -> None:
    write(lake, "public.orders", [change("c", 1, id=1)])
    write(lake, "sales.orders", [change("c", 1, id=1)])
    con = connect(str(lake), tables=["sales.orders"])
    assert con.execute("SELECT count(*) FROM sales.orders").fetchone() == (1,)
    with pytest.raises(duckdb.CatalogException):
        con.execute("SELECT * FROM public.orders")
    with pytest.raises(TerminalCatalogError, match=r"no changelog table for public\.nope"):
        connect(str(lake), tables=["public.nope"])


def test_case_insensitive_collision_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "public.orders", [change("c", 1, id=1)])
    write(tmp_path, "public.Orders", [change("c", 1, id=1)])
    with pytest.raises(TerminalCatalogError, match="case-insensitive"):
        connect(str(tmp_path))
    con = connect(str(tmp_path), tables=["public.Orders"])
    assert con.execute('SELECT count(*) FROM public."Orders"').fetchone() == (1,)


def test_missing_key_column_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    register(tmp_path, "public", "orders", [ColumnSchema("order_id", INT8, is_key=True)])
    write(tmp_path, "public.orders", [change("c", 1, id=1)])
    with pytest.raises(TerminalCatalogError, match="order_id"):
        connect(str(tmp_path), tables=["public.orders"])
    # Without an explicit request, the table is skipped with a warning.
    connect(str(tmp_path))
    assert "order_id" in caplog.text


def test_unreadable_table_does_not_hide_the_others(
    lake: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(lake, "public.orders", [change("c", 1, id=1)])
    (lake / "public.being_created" / "changes" / "_delta_log").mkdir(parents=True)
    con = connect(str(lake))
    assert con.execute("SELECT id FROM public.orders").fetchall() == [(1,)]
    assert "public.being_created" in caplog.text
    with pytest.raises(TransientCatalogError, match="being_created"):
        connect(str(lake), tables=["public.being_created"])


def test_non_table_directories_are_ignored(lake: Path) -> None:
    write(lake, "public.orders", [change("c", 1, id=1)])
    (lake / "public.no_log" / "changes").mkdir(parents=True)
    (lake / "_dlq").mkdir()
    (lake / "notes.txt").write_text("hello")
    infos = register_views(open_duckdb(), str(lake))
    assert [i.qualified_name for i in infos] == ["public.orders"]
    assert infos[0].key_columns == ("id",)


def test_empty_lake(tmp_path: Path) -> None:
    con = connect(str(tmp_path / "does-not-exist"))
    assert con.execute("SELECT 42").fetchone() == (42,)


def test_file_database_persists_views(lake: Path, tmp_path: Path) -> None:
    write(lake, "public.orders", [change("c", 1, id=1)])
    database = str(tmp_path / "views.duckdb")
    connect(str(lake), database=database).close()
    con = connect(str(lake), database=database)  # re-registering replaces, not fails
    assert con.execute("SELECT id FROM public.orders").fetchall() == [(1,)]


def test_current_state_sql_shape() -> None:
    types = {"id": "BIGINT", "qty": "INTEGER", "note": "VARCHAR", "price": "DECIMAL(10,2)"}
    types.update({c: "BIGINT" for c in lake_layout.METADATA_COLUMNS})
    sql = current_state_sql('"s"."t_changes"', types, ["id"])
    assert 'GROUP BY "id"' in sql
    # Variable-length columns (and numeric) get the unchanged-TOAST back-fill; ints do not.
    assert "'note')" in sql and "'price')" in sql and "'qty')" not in sql


# -- Lake ----------------------------------------------------------------------------------------


def test_lake_api(lake: Path) -> None:
    write(lake, "public.orders", [change("c", 1, id=1, note="a"), change("c", 2, id=2)])
    write(lake, "public.orders", [change("u", 3, id=1, unchanged=["note"], qty=7)])
    with Lake(str(lake)) as lk:
        [info] = lk.tables()
        assert info.qualified_name == "public.orders"
        assert info.key_columns == ("id",)
        assert info.delta_version == 1
        assert info.num_files == 2  # one file per commit: every row is in one _cdc_date
        assert info.num_rows == 3
        assert info.last_commit_at is not None and info.last_commit_at.tzinfo is UTC

        current = lk.current("public.orders")
        assert current.schema.names == [*ORDERS.names, lake_layout.FALLBACK]
        assert sorted(current.select(["id", "qty", "note"]).to_pylist(), key=str) == [
            {"id": 1, "qty": 7, "note": "a"},
            {"id": 2, "qty": None, "note": None},
        ]
        assert lk.changes("public.orders").column(lake_layout.LSN).to_pylist() == [1, 2, 3]
        assert lk.sql("SELECT count(*) FROM orders").fetchone() == (2,)
        assert [v.version for v in lk.schema_versions("public.orders")] == [1]

        # A table created after the connection opened is found on first use.
        register(lake, "sales", "orders")
        write(lake, "sales.orders", [change("c", 1, id=5)])
        assert lk.current("sales.orders").column("id").to_pylist() == [5]
        with pytest.raises(TerminalCatalogError, match=r"no changelog table 'nope\.nope'"):
            lk.current("nope.nope")
    assert lk._con is None


def test_package_exports() -> None:
    assert {"Lake", "SchemaRegistry", "connect"} <= set(catalog.__all__)


# -- property test -------------------------------------------------------------------------------

KEYS = range(4)


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[list[dict]], dict[int, tuple[int, str | None]]]:
    """Random valid change histories on a small key space, plus the expected final state.

    Returns the rows grouped into Delta commits (shuffled inside and across commits; order
    is only by lsn/seq) and a model ``key -> (qty, note)``.
    """
    model: dict[int, tuple[int, str | None]] = {}
    out: list[dict] = []
    # NULL is a real value too: it must survive unchanged-TOAST updates as NULL.
    note_values = st.sampled_from([None, "", "a", "b", "ab"])
    lsn = 0
    for _ in range(draw(st.integers(1, 25))):
        lsn += draw(st.integers(1, 3))
        for seq in range(draw(st.integers(1, 3))):
            present, absent = sorted(model), [k for k in KEYS if k not in model]
            # Weights by repetition: truncates are rare so that state survives to the end.
            kinds = ["truncate"]
            if absent:
                kinds += ["insert"] * 4
            if present:
                kinds += ["update"] * 3 + ["toast_update"] * 4 + ["delete"] * 2
            if present and absent:
                kinds += ["key_change"] * 2
            kind = draw(st.sampled_from(kinds))
            qty = draw(st.integers(0, 9))
            s = seq * 2  # room for the second row of a key change
            if kind == "insert":
                key, note = draw(st.sampled_from(absent)), draw(note_values)
                model[key] = (qty, note)
                out.append(change(draw(st.sampled_from("cr")), lsn, s, id=key, qty=qty, note=note))
            elif kind == "update":
                key, note = draw(st.sampled_from(present)), draw(note_values)
                model[key] = (qty, note)
                out.append(change("u", lsn, s, id=key, qty=qty, note=note))
            elif kind == "toast_update":
                key = draw(st.sampled_from(present))
                model[key] = (qty, model[key][1])
                out.append(change("u", lsn, s, ["note"], id=key, qty=qty))
            elif kind == "delete":
                key = draw(st.sampled_from(present))
                del model[key]
                out.append(change("d", lsn, s, id=key))
            elif kind == "key_change":
                old, new = draw(st.sampled_from(present)), draw(st.sampled_from(absent))
                note = model.pop(old)[1]
                model[new] = (qty, note)
                out.append(change("d", lsn, s, id=old))
                out.append(change("c", lsn, s + 1, id=new, qty=qty, note=note))
            else:
                model.clear()
                out.append(change("t", lsn, s))
    order = draw(st.permutations(out))
    cuts = sorted(draw(st.lists(st.integers(0, len(order)), max_size=3)))
    commits = [list(order[a:b]) for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)]
    return [c for c in commits if c], model


@pytest.fixture(scope="module")
def shared_con() -> Iterator[duckdb.DuckDBPyConnection]:
    con = open_duckdb()
    yield con
    con.close()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(histories())
def test_current_view_matches_model(
    shared_con: duckdb.DuckDBPyConnection,
    history: tuple[list[list[dict]], dict[int, tuple[int, str | None]]],
) -> None:
    commits, model = history
    root = tempfile.mkdtemp(prefix="cdc-lake-")
    try:
        register(root, "public", "orders")
        for commit in commits:
            write(root, "public.orders", commit)
        register_views(shared_con, root)
        got = {
            k: (q, n)
            for k, q, n in shared_con.execute("SELECT id, qty, note FROM orders").fetchall()
        }
        assert got == model
    finally:
        shutil.rmtree(root, ignore_errors=True)
