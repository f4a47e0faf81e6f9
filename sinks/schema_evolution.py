"""How a changelog table follows its source table's column types.

Added columns are appended to the Delta schema (older rows read NULL); dropped columns stay
in Delta (older rows keep their values; the current-state view hides them). A column whose
type changes follows this policy, chosen so that no value is ever rounded or dropped:

1. **Widening** (``int2 -> int4 -> int8``, ``real -> double``, ``numeric(p,s)`` to a
   ``numeric`` with at least as many integer and fraction digits, an integer to a wide enough
   ``numeric``, anything to ``text``): the table is rewritten once, in place, with the column
   converted to the wider type. Older rows stay readable, now in the new type.
2. **The lake column is text** (say ``int -> text -> int``): new values are stored as their
   text, which is lossless; the column stays text.
3. **Anything else** (``int -> date``, ``timestamp -> timestamptz``...): the sink stops with
   :class:`IncompatibleSchemaChangeError`, whose message says what to do. Nothing is written.

The rewrite reads and writes the whole table: it is cheap for small tables and takes a while
for large ones, and it conflicts with (and retries against) a concurrent compaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError

from sinks.errors import IncompatibleSchemaChangeError, TransientSinkError

_INT_ORDER = [pa.int8(), pa.int16(), pa.int32(), pa.int64()]
_INT_DIGITS = {pa.int8(): 3, pa.int16(): 5, pa.int32(): 10, pa.int64(): 19}


@dataclass(frozen=True, slots=True)
class EvolutionPlan:
    """What to do before writing rows of a new schema into an existing table."""

    widen: dict[str, pa.DataType] = field(default_factory=dict)  # rewrite these in place
    cast_incoming: dict[str, pa.DataType] = field(default_factory=dict)  # store as lake type

    def __bool__(self) -> bool:
        return bool(self.widen or self.cast_incoming)


def is_widening(old: pa.DataType, new: pa.DataType) -> bool:
    """Whether every value of ``old`` converts to ``new`` exactly."""
    if old == new or pa.types.is_string(new) or pa.types.is_large_string(new):
        return True
    if old in _INT_ORDER and new in _INT_ORDER:
        return _INT_ORDER.index(new) >= _INT_ORDER.index(old)
    if pa.types.is_float32(old) and pa.types.is_float64(new):
        return True
    if pa.types.is_decimal(new):
        if pa.types.is_decimal(old):
            return new.scale >= old.scale and new.precision - new.scale >= old.precision - old.scale
        if old in _INT_DIGITS:
            return new.precision - new.scale >= _INT_DIGITS[old]
    if pa.types.is_list(old) and pa.types.is_list(new):
        return is_widening(old.value_type, new.value_type)
    return False


def plan_evolution(lake: pa.Schema, incoming: pa.Schema, *, table: str) -> EvolutionPlan:
    """Compare the Delta table's schema with the rows about to be written.

    Example:
        >>> plan_evolution(pa.schema([("n", pa.int32())]), pa.schema([("n", pa.int64())]), table="t")
        EvolutionPlan(widen={'n': DataType(int64)}, cast_incoming={})
    """
    widen: dict[str, pa.DataType] = {}
    cast_incoming: dict[str, pa.DataType] = {}
    for new_field in incoming:
        if new_field.name not in lake.names:
            continue  # an added column: schema_mode="merge" appends it
        old = lake.field(new_field.name).type
        new = new_field.type
        if old == new or pa.types.is_null(new):
            continue
        if is_widening(old, new):
            widen[new_field.name] = new
        elif is_widening(new, old):
            # The lake's type holds every new value exactly: text, or a type the source
            # narrowed (bigint -> int) after an earlier widening.
            cast_incoming[new_field.name] = old
        else:
            raise IncompatibleSchemaChangeError(
                f"{table}.{new_field.name} changed from {old} to {new}, which the lake cannot "
                "hold beside the existing values without losing some of them. Nothing was "
                "written. To go on, either revert the type change in PostgreSQL, or stop the "
                "pipeline, move the table's directory out of the lake and capture it again "
                "with a new pipeline (--name) so that it starts from a fresh snapshot"
            )
    return EvolutionPlan(widen, cast_incoming)


def cast_columns(data: pa.Table, types: dict[str, pa.DataType]) -> pa.Table:
    """``data`` with the named columns converted; raises if a value would not survive."""
    for name, target in types.items():
        i = data.schema.get_field_index(name)
        try:
            data = data.set_column(i, pa.field(name, target), pc.cast(data.column(i), target))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise IncompatibleSchemaChangeError(f"cannot store {name} as {target}: {e}") from e
    return data


def widen_in_place(
    uri: str,
    widen: dict[str, pa.DataType],
    *,
    storage_options: dict[str, str] | None = None,
) -> int:
    """Rewrite the table at ``uri`` with the ``widen`` columns converted; returns its rows.

    One overwrite commit: readers see the old table or the new one. The table's app
    transactions (the sink's watermarks) are part of the Delta log and survive it.
    """
    dt = DeltaTable(uri, storage_options=storage_options)
    dataset = dt.to_pyarrow_dataset()
    target = pa.schema(
        [pa.field(f.name, widen.get(f.name, f.type), f.nullable) for f in dataset.schema]
    )
    rows = 0

    def batches() -> Iterator[pa.RecordBatch]:
        nonlocal rows
        for batch in dataset.to_batches():
            rows += batch.num_rows
            table = cast_columns(pa.Table.from_batches([batch]), widen)
            yield from table.to_batches()

    try:
        write_deltalake(
            dt,
            pa.RecordBatchReader.from_batches(target, batches()),
            mode="overwrite",
            schema_mode="overwrite",
            partition_by=dt.metadata().partition_columns,
            storage_options=storage_options,
        )
    except CommitFailedError as e:
        raise TransientSinkError(f"widening {uri} conflicted with another writer: {e}") from e
    return rows
