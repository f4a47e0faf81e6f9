"""Generated per-table functions show their source in tracebacks (cdc.core.codegen)."""

from __future__ import annotations

import linecache
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from cdc.core import pgtypes
from cdc.core.codegen import compile_function, generated_filename
from cdc.core.pgtypes import Oid
from cdc.core.table_schema import ColumnSchema, TableSchema
from cdc.kafka.event_encoder import EventEncoder
from cdc.postgres.protocol.assembler import ChangeAssembler
from cdc.postgres.protocol.pgoutput import Begin, Insert, Relation, RelationColumn


def _frames(exc: BaseException) -> list[traceback.FrameSummary]:
    return list(traceback.extract_tb(exc.__traceback__))


def test_a_traceback_from_generated_code_shows_the_generated_line() -> None:
    source = "def f(x):\n    y = x + 1\n    return y / x\n"
    f = compile_function(source, name="f", kind="example", label="t", namespace={})
    with pytest.raises(ZeroDivisionError) as info:
        f(0)
    text = "".join(traceback.format_exception(info.value))
    assert 'File "<generated cdc example t>", line 3, in f' in text
    assert "    return y / x" in text
    assert linecache.getline("<generated cdc example t>", 2) == "    y = x + 1\n"


def test_changed_source_gets_its_own_name_and_equal_source_reuses_it() -> None:
    first = compile_function(
        "def g():\n    return 1\n", name="g", kind="example", label="v", namespace={}
    )
    again = compile_function(
        "def g():\n    return 1\n", name="g", kind="example", label="v", namespace={}
    )
    other = compile_function(
        "def g():\n    return 2\n", name="g", kind="example", label="v", namespace={}
    )
    assert first.__code__.co_filename == again.__code__.co_filename == "<generated cdc example v>"
    assert other.__code__.co_filename == "<generated cdc example v #2>"
    assert linecache.getline(other.__code__.co_filename, 2) == "    return 2\n"
    # Names from the database only name the file; unprintable characters are shown as '?'.
    assert generated_filename("example", 'a"b\nc', "x") == '<generated cdc example a"b?c>'


def test_the_assemblers_row_converter_shows_its_line_when_a_parser_breaks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A parser failing with something other than a conversion error (a bug, not a bad
    value) surfaces with the row converter's generated line."""
    real_text_parser = pgtypes.text_parser

    def text_parser(oid: int, modifier: int) -> Callable[[str], Any]:
        parse = real_text_parser(oid, modifier)
        if oid != Oid.TIMESTAMPTZ:
            return parse

        def broken(text: str) -> Any:
            if text.startswith("1999"):
                raise ZeroDivisionError("a parser bug")
            return parse(text)

        return broken

    monkeypatch.setattr(pgtypes, "text_parser", text_parser)
    assembler = ChangeAssembler()
    rel = Relation(
        relation_id=1,
        namespace="Sales",
        name="Order Lines",
        replica_identity="d",
        columns=(
            RelationColumn(name="id", type_oid=Oid.INT4, type_modifier=-1, is_key=True),
            RelationColumn(name="at", type_oid=Oid.TIMESTAMPTZ, type_modifier=-1, is_key=False),
        ),
    )
    assembler.feed(rel)
    assembler.feed(Begin(final_lsn=10, commit_ts=datetime(2026, 1, 1, tzinfo=UTC), xid=5))
    [event] = assembler.feed(Insert(relation_id=1, new=("7", "2026-01-01 00:00:00+00")))
    assert event.after == (7, datetime(2026, 1, 1, tzinfo=UTC))  # type: ignore[union-attr]
    with pytest.raises(ZeroDivisionError) as info:
        assembler.feed(Insert(relation_id=1, new=("8", "1999-01-01 00:00:00+00")))
    generated = [f for f in _frames(info.value) if f.filename.startswith("<generated")]
    assert [f.filename for f in generated] == ["<generated cdc row converter Sales.Order Lines>"]
    assert "p1(v1)" in (generated[0].line or "")


def test_the_kafka_encoders_compiled_row_raises_with_its_line() -> None:
    """A row of the wrong length is not hidden by a slower path: it raises out of the
    generated row encoder, whose line the traceback shows."""
    table = TableSchema(
        "public",
        "codegen_orders",  # a name no other test compiles a different shape for
        (ColumnSchema("id", Oid.INT8, is_key=True), ColumnSchema("note", Oid.TEXT)),
    )
    encoder = EventEncoder(prefix="shop", database="shop")
    codec = encoder.codec(table)
    with pytest.raises(ValueError, match="not enough values") as info:
        codec.row((1,))
    [frame] = [f for f in _frames(info.value) if f.filename.startswith("<generated")]
    assert frame.filename == "<generated cdc row encoder public.codegen_orders>"
    assert frame.line == "v0, v1,  = values"
