"""The schema-evolution policy for changelog tables (pure parts, and the in-place rewrite)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from sinks.errors import IncompatibleSchemaChangeError
from sinks.schema_evolution import is_widening, plan_evolution, widen_in_place


@pytest.mark.parametrize(
    ("old", "new", "widening"),
    [
        (pa.int16(), pa.int32(), True),
        (pa.int32(), pa.int64(), True),
        (pa.int64(), pa.int32(), False),
        (pa.float32(), pa.float64(), True),
        (pa.decimal128(10, 2), pa.decimal128(12, 2), True),
        (pa.decimal128(10, 2), pa.decimal128(12, 4), True),
        (pa.decimal128(10, 2), pa.decimal128(10, 3), False),  # one integer digit fewer
        (pa.int32(), pa.decimal128(12, 2), True),
        (pa.int64(), pa.decimal128(12, 2), False),
        (pa.int32(), pa.string(), True),  # int -> text: every value has a text form
        (pa.string(), pa.int32(), False),
        (pa.timestamp("us"), pa.timestamp("us", tz="UTC"), False),
        (pa.list_(pa.int32()), pa.list_(pa.int64()), True),
    ],
)
def test_is_widening(old: pa.DataType, new: pa.DataType, widening: bool) -> None:
    assert is_widening(old, new) is widening


def test_plan_widens_casts_or_refuses() -> None:
    lake = pa.schema([("id", pa.int32()), ("note", pa.string()), ("at", pa.date32())])
    assert not plan_evolution(lake, lake, table="t")
    assert not plan_evolution(lake, pa.schema([("id", pa.int32()), ("new", pa.int8())]), table="t")
    plan = plan_evolution(lake, pa.schema([("id", pa.int64()), ("note", pa.int32())]), table="t")
    assert plan.widen == {"id": pa.int64()}
    assert plan.cast_incoming == {"note": pa.string()}  # text -> int: stored as text
    with pytest.raises(
        IncompatibleSchemaChangeError, match=r"t\.at changed from date32\[day\] to int32"
    ):
        plan_evolution(lake, pa.schema([("at", pa.int32())]), table="t")


def test_widen_in_place_keeps_rows_partitions_and_watermarks(tmp_path: Path) -> None:
    uri = str(tmp_path / "t")
    data = pa.table(
        {
            "id": pa.array([1, 2, 2**31 - 1], pa.int32()),
            "d": pa.array(["2026-01-01", "2026-01-02", "2026-01-02"]),
        }
    )
    write_deltalake(
        uri,
        data,
        partition_by=["d"],
        commit_properties=CommitProperties(app_transactions=[Transaction("sink:lsn", 42)]),
    )
    assert widen_in_place(uri, {"id": pa.int64()}) == 3
    dt = DeltaTable(uri)
    assert pa.schema(dt.schema().to_arrow()).field("id").type == pa.int64()
    assert dt.metadata().partition_columns == ["d"]
    assert dt.transaction_version("sink:lsn") == 42
    assert sorted(dt.to_pyarrow_table()["id"].to_pylist()) == [1, 2, 2**31 - 1]
    write_deltalake(uri, pa.table({"id": pa.array([2**40]), "d": ["2026-01-03"]}), mode="append")
    assert DeltaTable(uri).to_pyarrow_table().num_rows == 4
