"""Following columns through renames and drops across schema versions."""

from __future__ import annotations

from catalog.column_lineage import current_columns, renamed
from cdc.core.table_schema import ColumnSchema, TableSchema


def shape(*columns: tuple[str, int]) -> TableSchema:
    return TableSchema("s", "t", tuple(ColumnSchema(n, 25, attnum=a) for n, a in columns))


def test_renames_coalesce_old_names_and_drops_disappear() -> None:
    versions = [
        shape(("id", 1), ("name", 2), ("old", 3)),
        shape(("id", 1), ("name", 2)),  # old dropped
        shape(("id", 1), ("title", 2)),  # name -> title
        shape(("id", 1), ("label", 2), ("color", 4)),  # title -> label, color added
    ]
    lineages = current_columns(versions, ["id", "name", "old", "title", "label", "color"])
    assert [(lin.name, lin.sources) for lin in lineages] == [
        ("id", ("id",)),
        ("label", ("label", "title", "name")),
        ("color", ("color",)),
    ]
    assert renamed(lineages) == {"title": "label", "name": "label"}


def test_a_reused_name_belongs_to_the_column_that_has_it_now() -> None:
    versions = [
        shape(("id", 1), ("a", 2)),
        shape(("id", 1), ("b", 2)),  # a -> b
        shape(("id", 1), ("b", 2), ("a", 3)),  # a new, different column named a
    ]
    lineages = current_columns(versions, ["id", "a", "b"])
    assert [(lin.name, lin.sources) for lin in lineages] == [
        ("id", ("id",)),
        ("b", ("b",)),  # not coalesced with the new a's values
        ("a", ("a",)),
    ]


def test_columns_not_written_yet_and_tables_without_versions() -> None:
    versions = [shape(("id", 1)), shape(("id", 1), ("later", 2))]
    assert [lin.name for lin in current_columns(versions, ["id"])] == ["id"]
    assert [lin.sql() for lin in current_columns([], ["id", "x"])] == ['"id"', '"x"']
    # Without attnums (schemas from Relation messages alone) names are taken as they are.
    plain = [TableSchema("s", "t", (ColumnSchema("id", 23), ColumnSchema("v", 25)))]
    assert [lin.sources for lin in current_columns(plain, ["id", "v", "gone"])] == [("id",), ("v",)]
