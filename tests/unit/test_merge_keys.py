"""``cdc jobs merge`` on every kind of key: composite keys of mixed types (text, uuid, numeric,
timestamps, booleans), NULL key columns, quoted mixed-case names; and the property that the
merged table plus the changes after its watermark reads exactly like the view computed from
the whole changelog. Hand-built changelog Delta tables, no PostgreSQL."""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog import lake_layout
from catalog.current_state import current_state_sql, quote_ident
from catalog.lake import Lake
from cdc.core.table_schema import ColumnSchema
from jobs.errors import TerminalJobError, TransientJobError
from jobs.merge import delta_failure, merge
from tests.plugins.lake import change, register_table, write_changes

INT4, TEXT, UUID, NUMERIC, TIMESTAMPTZ, BOOL = 23, 25, 2950, 1700, 1184, 16

#: Schema "Sales", table "Odd Tbl": quoted, mixed-case, with a space.
NAME = "Sales.Odd Tbl"
VIEW = '"Sales"."Odd Tbl"'
KEY = ("Store Id", "sku", "Token", "price", "At", "flag")
SOURCE = pa.schema(
    [
        ("Store Id", pa.int32()),
        ("sku", pa.string()),
        ("Token", pa.string()),  # uuid: the lake holds its text form
        ("price", pa.decimal128(10, 2)),
        ("At", pa.timestamp("us", "UTC")),
        ("flag", pa.bool_()),
        ("Qty", pa.int32()),
        ("Note", pa.string()),
    ]
)
COLUMNS = (
    ColumnSchema("Store Id", INT4, is_key=True),
    ColumnSchema("sku", TEXT, is_key=True),
    ColumnSchema("Token", UUID, is_key=True),
    ColumnSchema("price", NUMERIC, is_key=True),
    ColumnSchema("At", TIMESTAMPTZ, is_key=True),
    ColumnSchema("flag", BOOL, is_key=True),
    ColumnSchema("Qty", INT4),
    ColumnSchema("Note", TEXT),
)
T0 = datetime(2024, 3, 1, 12, 30, tzinfo=UTC)
T1 = datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
U0 = "6f1c1a52-5d0e-4f7e-9d7a-0b9e2b6f4c11"
U1 = "00000000-0000-0000-0000-000000000000"
#: Keys that differ in one column each, and keys with NULL columns (a NULL-able replica
#: identity; the merge matches NULL to NULL like GROUP BY does).
KEYS: list[tuple[Any, ...]] = [
    (1, "a", U0, Decimal("1.50"), T0, True),
    (1, "a", U0, Decimal("1.50"), T0, False),
    (1, "a", U0, Decimal("1.5"), T1, True),
    (2, "", U1, Decimal("-0.01"), T0, True),
    (None, "b", None, None, T1, None),
    (None, None, None, None, None, None),
]
NOTES = [None, "", "x", "long " * 40]


def key_values(key: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(KEY, key, strict=True))


def normalized(rows: list[tuple]) -> list[tuple]:
    # Decimal('1.5') and Decimal('1.50') are one value of a DECIMAL(10,2) column.
    return sorted(
        (
            tuple(v.quantize(Decimal("0.01")) if isinstance(v, Decimal) else v for v in row)
            for row in rows
        ),
        key=repr,
    )


def view_rows(root: str) -> list[tuple]:
    select = ", ".join(quote_ident(c) for c in (*KEY, "Qty", "Note"))
    with Lake(root) as lk:
        return normalized(lk.sql(f"SELECT {select} FROM {VIEW}").fetchall())


def changelog_only_rows(root: str) -> list[tuple]:
    """The current state computed from the whole changelog, ignoring the merged table."""
    with Lake(root) as lk:
        con = lk.connection
        changes = '"Sales"."Odd Tbl_changes"'
        types = {str(r[0]): str(r[1]) for r in con.execute(f"DESCRIBE {changes}").fetchall()}
        sql = current_state_sql(changes, types, KEY)
        select = ", ".join(quote_ident(c) for c in (*KEY, "Qty", "Note"))
        return normalized(con.execute(f"SELECT {select} FROM ({sql})").fetchall())


def merged_rows(root: str) -> list[tuple]:
    table = DeltaTable(lake_layout.current_uri(root, NAME)).to_pyarrow_table(
        columns=[*KEY, "Qty", "Note"]
    )
    return normalized([tuple(r.values()) for r in table.to_pylist()])


@pytest.fixture
def root(tmp_path: Path) -> str:
    lake = str(tmp_path / "lake")
    register_table(lake, NAME, COLUMNS)
    return lake


def test_composite_mixed_type_keys_with_nulls_merge(root: str) -> None:
    """The predicate that failed as "Int32 AND Boolean": one AND per key column."""
    rows = [change("c", 1, i, Qty=i, Note=f"n{i}", **key_values(k)) for i, k in enumerate(KEYS)]
    write_changes(root, NAME, rows, SOURCE)
    first = merge(root)["tables"][NAME]
    assert first["status"] == "merged" and first["rows_inserted"] == len(KEYS)
    write_changes(
        root,
        NAME,
        [
            change("u", 2, 0, ["Note"], Qty=10, **key_values(KEYS[0])),
            change("d", 2, 1, **key_values(KEYS[1])),
            change("u", 2, 2, Qty=40, Note="null keys", **key_values(KEYS[4])),
            change("d", 2, 3, **key_values(KEYS[5])),
        ],
        SOURCE,
    )
    second = merge(root)["tables"][NAME]
    assert (second["rows_updated"], second["rows_deleted"]) == (2, 2)
    expected = normalized(
        [
            (*KEYS[0], 10, "n0"),
            (*KEYS[2], 2, "n2"),
            (*KEYS[3], 3, "n3"),
            (*KEYS[4], 40, "null keys"),
        ]
    )
    assert merged_rows(root) == expected == view_rows(root) == changelog_only_rows(root)


def test_planning_errors_are_terminal_and_store_errors_transient() -> None:
    planning = DeltaError(
        "Generic DeltaTable error: type_coercion\ncaused by\nError during planning: Cannot "
        "infer common argument type for logical boolean operation Int32 AND Boolean"
    )
    assert isinstance(delta_failure("merge of x", planning), TerminalJobError)
    store = DeltaError("Generic DeltaTable error: Object Store error: Generic S3 error: timed out")
    assert isinstance(delta_failure("merge of x", store), TransientJobError)


def test_keyless_and_every_column_tables_are_skipped_with_the_reason(tmp_path: Path) -> None:
    lake = str(tmp_path / "lake")
    schema = pa.schema([("a", pa.int32()), ("b", pa.string())])
    register_table(lake, "public.nokey", (ColumnSchema("a", INT4), ColumnSchema("b", TEXT)))
    register_table(
        lake,
        "public.full",
        (ColumnSchema("a", INT4, is_key=True), ColumnSchema("b", TEXT, is_key=True)),
    )
    for name in ("public.nokey", "public.full"):
        write_changes(lake, name, [change("c", 1, a=1, b="x"), change("c", 2, a=1, b="x")], schema)
    tables = merge(lake)["tables"]
    assert tables["public.nokey"]["status"] == "skipped"
    assert "keyless" in tables["public.nokey"]["reason"]
    assert tables["public.full"]["status"] == "skipped"
    assert "identical rows" in tables["public.full"]["reason"]
    with Lake(lake) as lk:
        # Both read from the changelog: two identical rows stay two rows.
        assert lk.sql("SELECT count(*) FROM public.full").fetchone() == (2,)
        assert lk.sql("SELECT count(*) FROM public.nokey").fetchone() == (2,)


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[list[list[dict]], dict, bool]]:
    """Intervals of shuffled commits over :data:`KEYS`, each with the model state at its end
    and whether to merge after it."""
    model: dict[int, tuple[int, str | None]] = {}
    out: list[tuple[list[list[dict]], dict, bool]] = []
    lsn = 0
    for _ in range(draw(st.integers(1, 5))):
        rows: list[dict] = []
        for _ in range(draw(st.integers(1, 6))):
            lsn += draw(st.integers(1, 3))
            for s in range(draw(st.integers(1, 4))):
                present = sorted(model)
                absent = [i for i in range(len(KEYS)) if i not in model]
                kinds = ["truncate"]
                kinds += ["insert"] * 4 if absent else []
                kinds += ["update"] * 3 + ["toast"] * 3 + ["delete"] * 2 if present else []
                kind = draw(st.sampled_from(kinds))
                qty = draw(st.integers(-5, 5))
                if kind == "insert":
                    k, note = draw(st.sampled_from(absent)), draw(st.sampled_from(NOTES))
                    model[k] = (qty, note)
                    op = draw(st.sampled_from("cr"))
                    rows.append(change(op, lsn, s, Qty=qty, Note=note, **key_values(KEYS[k])))
                elif kind == "update":
                    k, note = draw(st.sampled_from(present)), draw(st.sampled_from(NOTES))
                    model[k] = (qty, note)
                    rows.append(change("u", lsn, s, Qty=qty, Note=note, **key_values(KEYS[k])))
                elif kind == "toast":
                    k = draw(st.sampled_from(present))
                    model[k] = (qty, model[k][1])
                    rows.append(change("u", lsn, s, ["Note"], Qty=qty, **key_values(KEYS[k])))
                elif kind == "delete":
                    k = draw(st.sampled_from(present))
                    del model[k]
                    rows.append(change("d", lsn, s, **key_values(KEYS[k])))
                else:
                    model.clear()
                    rows.append(change("t", lsn, s))
        order = draw(st.permutations(rows))
        cuts = sorted(draw(st.lists(st.integers(0, len(order)), max_size=2)))
        commits = [list(order[a:b]) for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)]
        out.append(([c for c in commits if c], dict(model), draw(st.booleans())))
    return out


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(histories())
def test_merged_table_plus_tail_equals_the_view_of_the_whole_changelog(
    history: list[tuple[list[list[dict]], dict, bool]],
) -> None:
    root = tempfile.mkdtemp(prefix="cdc-merge-keys-")
    try:
        register_table(root, NAME, COLUMNS)
        for commits, model, do_merge in history:
            for commit in commits:
                write_changes(root, NAME, commit, SOURCE, hours_per_lsn=5)
            if do_merge:
                merge(root)
            expected = normalized([(*KEYS[k], q, n) for k, (q, n) in model.items()])
            assert view_rows(root) == expected == changelog_only_rows(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
