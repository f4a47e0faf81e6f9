"""The compiled drain's split of COPY ... CSV rows into string columns, against pyarrow.csv.

The snapshot reads the same rows either way: the compiled drain splits each row as it takes
it (``CopyDrain.drain_columns``, here through ``split_rows``, the same C code without a
connection); the Python drain joins the rows and parses them with ``pyarrow.csv``
(``snapshot._parse_chunk``). Rows are written as PostgreSQL's ``CopyAttributeOutCSV`` does;
real servers' rows are compared in tests/integration/test_snapshot_reader.py.
"""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc.postgres import copy_drain
from cdc.postgres.snapshot import _parse_chunk

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _built() -> None:
    # As tests.plugins.capture_path: a missing extension fails, CI must build it.
    if copy_drain.split_rows is None:
        pytest.fail("the compiled COPY drain is not built: python setup.py build_ext --inplace")


def csv_field(value: str | None, *, single: bool) -> bytes:
    """One field as PostgreSQL writes it in COPY ... CSV (default options)."""
    if value is None:
        return b""  # NULL: nothing, unquoted
    quote = (
        value == ""  # the NULL string itself, so quoted
        or any(c in value for c in ',"\n\r')
        or (single and value == "\\.")  # alone on a line it would end the data
    )
    if not quote:
        return value.encode()
    return b'"' + value.replace('"', '""').encode() + b'"'


def csv_row(values: list[str | None]) -> bytes:
    return b",".join(csv_field(v, single=len(values) == 1) for v in values) + b"\n"


def split(rows: list[bytes], ncols: int) -> list[pa.Array]:
    status, bad_row, n, buffers = copy_drain.split_rows(rows, ncols)
    assert (status, bad_row) == (copy_drain.MORE, -1)
    return copy_drain.string_columns(n, buffers)


def parsed(rows: list[bytes], ncols: int) -> list[pa.Array]:
    table = _parse_chunk(b"".join(rows), [f"c{i}" for i in range(ncols)])
    return [column.combine_chunks() for column in table.columns]


TEXT = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", ",", '"', '""', "\n", "\r\n", "\r", "\\.", "\\N", "NULL", " ", 'a,"b"\nc']
)
VALUES = st.none() | TEXT


@given(
    st.integers(1, 5).flatmap(
        lambda ncols: st.lists(st.lists(VALUES, min_size=ncols, max_size=ncols), max_size=30)
    )
)
@settings(max_examples=500, deadline=None)
def test_split_equals_pyarrow_csv(rows: list[list[str | None]]) -> None:
    if not rows:
        return
    ncols = len(rows[0])
    lines = [csv_row(r) for r in rows]
    ours = split(lines, ncols)
    for array in ours:
        array.validate(full=True)
    assert ours == parsed(lines, ncols)
    assert [list(r) for r in zip(*(a.to_pylist() for a in ours), strict=True)] == rows


def test_nulls_empty_strings_and_quotes() -> None:
    rows = [["1", None, ""], [None, '"x", y', "two\nlines"], ["", "", None]]
    columns = split([csv_row(r) for r in rows], 3)
    assert [c.to_pylist() for c in columns] == [
        ["1", None, ""],
        [None, '"x", y', ""],
        ["", "two\nlines", None],
    ]
    assert [c.null_count for c in columns] == [1, 1, 1]


def test_one_column_null_rows_are_empty_lines() -> None:
    columns = split([b"\n", b'""\n', b"x\n", b'"\\."\n'], 1)
    assert columns[0].to_pylist() == [None, "", "x", "\\."]


def test_no_rows() -> None:
    assert [c.to_pylist() for c in split([], 2)] == [[], []]


@pytest.mark.parametrize(
    "row",
    [
        b"1,2\n",  # a field missing
        b"1,2,3,4\n",  # a field too many
        b'1,"open,3\n',  # an unclosed quote
        b'1,"a"b,3\n',  # text after the closing quote
        b"1,2,3",  # no end of line
        b"",
    ],
)
def test_malformed_rows_are_reported_with_their_number(row: bytes) -> None:
    good = csv_row(["a", "b", "c"])
    status, bad_row, n, columns = copy_drain.split_rows([good, good, row, good], 3)
    assert (status, bad_row, n, columns) == (copy_drain.MALFORMED, 2, 0, None)


def test_a_column_needs_at_least_one_field() -> None:
    with pytest.raises(ValueError, match="at least one column"):
        copy_drain.split_rows([b"\n"], 0)


@given(st.lists(st.binary(max_size=40), max_size=20), st.integers(1, 6))
@FUZZ
def test_fuzz_any_bytes_split_or_malformed(rows: list[bytes], ncols: int) -> None:
    """Whatever the bytes, the split either reports the row that does not fit or returns
    well-formed columns: offsets in bounds, as many values as rows (never a crash)."""
    status, bad_row, n, buffers = copy_drain.split_rows(rows, ncols)
    if status == copy_drain.MALFORMED:
        assert 0 <= bad_row < len(rows) and buffers is None
        return
    assert (status, n) == (copy_drain.MORE, len(rows))
    for offsets, data, validity, nulls in buffers:
        # As binary: the text of random bytes need not be UTF-8 (the reader checks it
        # when the connection's encoding is not UTF8).
        array = pa.BinaryArray.from_buffers(
            pa.binary(),
            n,
            [
                None if validity is None else pa.py_buffer(validity),
                pa.py_buffer(offsets),
                pa.py_buffer(data),
            ],
            nulls,
        )
        array.validate(full=True)
        assert array.null_count == nulls


@given(
    st.lists(st.lists(VALUES, min_size=3, max_size=3), min_size=1, max_size=10),
    st.data(),
)
@FUZZ
def test_fuzz_edited_rows(rows: list[list[str | None]], data: st.DataObject) -> None:
    """Valid rows with bytes cut, doubled or swapped: the same two outcomes, and any row
    the split accepts is one pyarrow.csv reads the same way."""
    lines = [csv_row(r) for r in rows]
    i = data.draw(st.integers(0, len(lines) - 1))
    line = lines[i]
    at = data.draw(st.integers(0, max(len(line) - 1, 0)))
    edit = data.draw(st.sampled_from(["cut", "double", "swap"]))
    if edit == "cut":
        line = line[:at] + line[at + 1 :]
    elif edit == "double":
        line = line[:at] + line[at : at + 1] * 2 + line[at + 1 :]
    else:
        line = line[:at] + data.draw(st.sampled_from([b",", b'"', b"\n", b"x"])) + line[at + 1 :]
    lines[i] = line
    status, bad_row, n, buffers = copy_drain.split_rows(lines, 3)
    if status == copy_drain.MALFORMED:
        assert bad_row == i
        return
    assert status == copy_drain.MORE
    ours = copy_drain.string_columns(n, buffers)
    # An unquoted field with a newline inside is one pyarrow.csv would cut into two rows,
    # and a cut character is no UTF-8 (which pyarrow.csv checks, and the reader checks
    # unless PostgreSQL does): PostgreSQL writes neither, so only other rows are compared.
    if b"\n" not in line[:-1] and b"\r" not in line and _is_utf8(line):
        assert ours == parsed(lines, 3)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True
