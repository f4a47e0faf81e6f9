"""Tests for catalog.schema_registry: versioning, idempotence, reload from disk, errors."""

from __future__ import annotations

import json
import os
from datetime import UTC
from pathlib import Path

import pytest

from catalog.errors import TerminalCatalogError, UnknownSchemaError
from catalog.schema_registry import SchemaRegistry, SchemaVersion, _write_new_local
from cdc.core.table_schema import ColumnSchema, TableSchema

INT8, TEXT = 20, 25


def orders(*extra: ColumnSchema, schema: str = "public") -> TableSchema:
    return TableSchema(
        schema,
        "orders",
        (ColumnSchema("id", INT8, is_key=True), ColumnSchema("note", TEXT), *extra),
    )


def version_files(root: Path, qualified_name: str) -> list[str]:
    directory = root / "_cdc" / "schemas" / qualified_name
    return sorted(os.listdir(directory)) if directory.exists() else []


def test_register_writes_version_file(tmp_path: Path) -> None:
    reg = SchemaRegistry(str(tmp_path))
    schema = orders()

    assert reg.register(schema) == schema.schema_id()

    assert version_files(tmp_path, "public.orders") == ["v000001.json"]
    data = json.loads((tmp_path / "_cdc/schemas/public.orders/v000001.json").read_text())
    assert data["schema_id"] == schema.schema_id()
    assert data["version"] == 1
    assert data["fingerprint"] == schema.fingerprint()
    assert data["schema"] == schema.to_dict()
    assert data["registered_at"].endswith("+00:00")


def test_register_is_idempotent(tmp_path: Path) -> None:
    reg = SchemaRegistry(str(tmp_path))
    first = reg.register(orders())
    assert reg.register(orders()) == first
    # Another process (fresh cache) registering the same shape does not write either.
    assert SchemaRegistry(str(tmp_path)).register(orders()) == first
    assert version_files(tmp_path, "public.orders") == ["v000001.json"]


def test_changed_shape_writes_next_version(tmp_path: Path) -> None:
    reg = SchemaRegistry(str(tmp_path))
    v1, v2 = orders(), orders(ColumnSchema("qty", 23))
    id1, id2 = reg.register(v1), reg.register(v2)

    assert id1 != id2
    assert version_files(tmp_path, "public.orders") == ["v000001.json", "v000002.json"]
    assert reg.latest("public.orders") == v2
    versions = reg.versions("public.orders")
    assert [(v.version, v.schema_id, v.schema) for v in versions] == [(1, id1, v1), (2, id2, v2)]
    assert all(v.registered_at.tzinfo is UTC for v in versions)
    assert versions[0].registered_at <= versions[1].registered_at
    # A shape equal to an older version returns that version's id without writing
    # (documented hazard: latest() keeps reporting v2).
    assert reg.register(v1) == id1
    assert len(version_files(tmp_path, "public.orders")) == 2


def test_reload_from_disk(tmp_path: Path) -> None:
    writer = SchemaRegistry(str(tmp_path))
    a, b = orders(), orders(schema="sales")
    writer.register(a)
    writer.register(b)
    writer.register(orders(ColumnSchema("qty", 23)))

    reader = SchemaRegistry(str(tmp_path))
    assert reader.tables() == ["public.orders", "sales.orders"]
    assert reader.get(a.schema_id()) == a
    assert reader.get(b.schema_id()) == b
    assert [v.version for v in reader.versions("public.orders")] == [1, 2]
    assert isinstance(reader.versions("sales.orders")[0], SchemaVersion)


def test_reader_sees_versions_registered_later_by_another_instance(tmp_path: Path) -> None:
    reader = SchemaRegistry(str(tmp_path))
    writer = SchemaRegistry(str(tmp_path))
    writer.register(orders())
    assert reader.latest("public.orders") == orders()  # caches v1

    newer = orders(ColumnSchema("qty", 23))
    writer.register(newer)
    assert reader.latest("public.orders") == newer
    assert reader.get(newer.schema_id()) == newer


def test_unknown_table_and_id(tmp_path: Path) -> None:
    reg = SchemaRegistry(str(tmp_path))
    assert reg.latest("public.nope") is None
    assert reg.versions("public.nope") == []
    assert reg.tables() == []
    with pytest.raises(UnknownSchemaError, match="schema id 42 is not registered"):
        reg.get(42)
    assert issubclass(UnknownSchemaError, TerminalCatalogError)


def test_file_uri_root(tmp_path: Path) -> None:
    reg = SchemaRegistry(tmp_path.as_uri())
    reg.register(orders())
    assert version_files(tmp_path, "public.orders") == ["v000001.json"]
    assert SchemaRegistry(str(tmp_path)).latest("public.orders") == orders()


def test_quoted_names_round_trip(tmp_path: Path) -> None:
    odd = TableSchema(
        "My Schema",
        'Or"ders',
        (ColumnSchema("Order Id", INT8, is_key=True), ColumnSchema("it's", TEXT)),
    )
    SchemaRegistry(str(tmp_path)).register(odd)
    assert SchemaRegistry(str(tmp_path)).latest('My Schema.Or"ders') == odd


def test_name_with_slash_is_rejected(tmp_path: Path) -> None:
    reg = SchemaRegistry(str(tmp_path))
    with pytest.raises(TerminalCatalogError, match="cannot be stored"):
        reg.register(TableSchema("a/b", "t", (ColumnSchema("id", INT8),)))


def test_corrupt_file_is_a_terminal_error(tmp_path: Path) -> None:
    SchemaRegistry(str(tmp_path)).register(orders())
    (tmp_path / "_cdc/schemas/public.orders/v000001.json").write_text("{not json")
    with pytest.raises(TerminalCatalogError, match="not a valid schema version"):
        SchemaRegistry(str(tmp_path)).latest("public.orders")


def test_file_whose_content_disagrees_with_its_path_is_rejected(tmp_path: Path) -> None:
    SchemaRegistry(str(tmp_path)).register(orders())
    directory = tmp_path / "_cdc/schemas/public.orders"
    (directory / "v000001.json").rename(directory / "v000002.json")
    with pytest.raises(TerminalCatalogError, match="path says version 2"):
        SchemaRegistry(str(tmp_path)).versions("public.orders")


def test_temp_files_are_ignored_and_cleaned(tmp_path: Path) -> None:
    reg = SchemaRegistry(str(tmp_path))
    reg.register(orders())
    directory = tmp_path / "_cdc/schemas/public.orders"
    # A writer that crashed mid-write leaves only a hidden temp file.
    (directory / ".v000002.json.dead.tmp").write_text("{partial")
    assert [v.version for v in SchemaRegistry(str(tmp_path)).versions("public.orders")] == [1]
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp") and "dead" not in n]


def test_exclusive_create_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "v000001.json"
    assert _write_new_local(str(target), b"first")
    assert not _write_new_local(str(target), b"second")
    assert target.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["v000001.json"]


def test_concurrent_writer_taking_the_version_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = SchemaRegistry(str(tmp_path))
    reg.register(orders())
    other = orders(ColumnSchema("other", TEXT))
    mine = orders(ColumnSchema("qty", 23))

    # Make another process win the race for v2 right before our write.
    original = reg._write_new
    raced = False

    def racing_write(path: str, payload: bytes) -> bool:
        nonlocal raced
        if not raced:
            raced = True
            SchemaRegistry(str(tmp_path)).register(other)
        return original(path, payload)

    monkeypatch.setattr(reg, "_write_new", racing_write)
    assert reg.register(mine) == mine.schema_id()
    versions = SchemaRegistry(str(tmp_path)).versions("public.orders")
    assert [(v.version, v.schema) for v in versions][1:] == [(2, other), (3, mine)]
