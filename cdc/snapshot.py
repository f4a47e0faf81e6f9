"""Initial snapshot: copies a table's rows inside the slot's exported snapshot.

Rows travel as COPY ... CSV bytes into pyarrow's streaming CSV reader and are converted
column by column (:func:`cdc.pgtypes.text_to_arrow`), so no per-row Python runs. Memory
stays bounded by the CSV block size, whatever the table size.

The snapshot and the stream meet at the slot's consistent point: the exported snapshot
holds exactly the transactions committed before it, and the slot streams exactly those
committed after it, so nothing is missed and nothing is seen twice.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg import sql

from catalog import lake_layout as layout
from cdc import pgtypes
from cdc.errors import PrerequisiteError, SourceConnectionError
from cdc.replication import session_conninfo
from cdc.table_schema import TableSchema

#: Bytes of CSV parsed per Arrow batch: the unit of memory use while copying.
DEFAULT_BLOCK_BYTES = 8 * 1024 * 1024


class _CopyStream(io.RawIOBase):
    """A readable file over the blocks psycopg's COPY yields."""

    def __init__(self, blocks: Iterable[bytes | bytearray | memoryview]) -> None:
        self._blocks = iter(blocks)
        self._block: memoryview = memoryview(b"")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while self._pos >= len(self._block):
            try:
                self._block = memoryview(next(self._blocks))
            except StopIteration:
                return 0
            self._pos = 0
        n = min(len(buffer), len(self._block) - self._pos)
        buffer[:n] = self._block[self._pos : self._pos + n]
        self._pos += n
        return n


def _typed_batch(table: TableSchema, batch: pa.RecordBatch) -> pa.Table:
    """Convert one batch of text columns; values without a typed form keep their exact text
    in a ``_cdc_fallback`` map column (added only when some value needed it)."""
    columns: list[pa.Array] = []
    fallbacks: dict[str, pa.Array] = {}
    for i, c in enumerate(table.columns):
        typed, fallback = pgtypes.text_to_arrow_lossless(
            batch.column(i), c.type_oid, c.type_modifier
        )
        columns.append(typed)
        if fallback is not None:
            fallbacks[c.name] = fallback
    result = pa.Table.from_arrays(columns, names=list(table.column_names))
    if fallbacks:
        texts = {name: arr.to_pylist() for name, arr in fallbacks.items()}
        rows = [
            {name: t[i] for name, t in texts.items() if t[i] is not None} or None
            for i in range(batch.num_rows)
        ]
        result = result.append_column(
            layout.FALLBACK, pa.array(rows, type=pa.map_(pa.string(), pa.string()))
        )
    return result


class SnapshotReader:
    """Reads tables as they were in one exported snapshot.

    Example:
        >>> with SnapshotReader(dsn, snapshot_name) as reader:  # doctest: +SKIP
        ...     for batch in reader.read_table(schema):
        ...         print(batch.num_rows)
    """

    def __init__(
        self, dsn: str, snapshot_name: str | None, *, block_bytes: int = DEFAULT_BLOCK_BYTES
    ) -> None:
        self.block_bytes = block_bytes
        try:
            self._conn = psycopg.connect(session_conninfo(dsn), autocommit=True)
            self._conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            if snapshot_name is not None:
                self._conn.execute(
                    sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name))
                )
        except psycopg.Error as e:
            raise SourceConnectionError(f"cannot open the snapshot transaction: {e}") from e

    def estimate_rows(self, table: TableSchema) -> int | None:
        """The planner's row estimate (cheap, approximate; None if never analyzed)."""
        row = self._conn.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
            [sql.Identifier(table.schema, table.table).as_string(self._conn)],
        ).fetchone()
        return int(row[0]) if row and row[0] is not None and row[0] >= 0 else None

    def read_table(self, table: TableSchema) -> Iterator[pa.Table]:
        """Yields the table's rows as Arrow tables typed like :func:`pgtypes.arrow_type`."""
        names = table.column_names
        # Partitioned tables: selecting from the root reads every partition, which matches
        # publishing through the root.
        query = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT csv)").format(
            sql.SQL(", ").join(sql.Identifier(n) for n in names),
            sql.Identifier(table.schema, table.table),
        )
        # Column names for pyarrow must be unique and plain; the real names are reapplied.
        positional = [f"c{i}" for i in range(len(names))]
        read_options = pacsv.ReadOptions(
            column_names=positional, block_size=self.block_bytes, use_threads=False
        )
        parse_options = pacsv.ParseOptions(
            newlines_in_values=True,
            # A one-column table prints a NULL row as an empty line: it is a row.
            ignore_empty_lines=False,
        )
        convert_options = pacsv.ConvertOptions(
            column_types={n: pa.string() for n in positional},
            # COPY CSV writes NULL unquoted and an empty string as "".
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        )
        try:
            with self._conn.cursor().copy(query) as copy:
                stream = io.BufferedReader(_CopyStream(copy), buffer_size=1024 * 1024)
                if not stream.peek(1):
                    return  # an empty table: pyarrow refuses an empty CSV stream
                reader = pacsv.open_csv(
                    stream,
                    read_options=read_options,
                    parse_options=parse_options,
                    convert_options=convert_options,
                )
                for batch in reader:
                    yield _typed_batch(table, batch)
        except psycopg.OperationalError as e:
            raise SourceConnectionError(f"snapshot of {table.qualified_name} failed: {e}") from e
        except psycopg.errors.InsufficientPrivilege as e:
            raise PrerequisiteError(
                f"cannot read {table.qualified_name}: {e}. Grant it: GRANT SELECT ON "
                f"{table.qualified_name} TO <replication user>"
            ) from e

    def close(self) -> None:
        try:
            self._conn.execute("COMMIT")
        finally:
            self._conn.close()

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
