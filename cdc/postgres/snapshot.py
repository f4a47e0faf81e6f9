"""Initial snapshot: copies a table's rows inside the slot's exported snapshot.

Rows travel as COPY ... CSV bytes. A reader thread drains the COPY at the libpq level
(PostgreSQL sends one message per row) in chunks of about ``block_bytes`` of whole rows.
The compiled drain of :mod:`cdc.postgres.copy_drain` splits each row into Arrow string
columns as it takes it, without the GIL; the Python drain joins the rows and pyarrow parses
each chunk as a CSV document of its own, into the same columns. Either way the columns are
converted vectorized (:func:`cdc.core.pgtypes.text_to_arrow_lossless`), no per-row Python
runs beyond taking the message (none at all compiled), and the COPY keeps flowing while the
caller converts and writes the previous chunk (pyarrow and deltalake release the GIL).
Memory stays bounded by a few chunks, whatever the table size.

The snapshot and the stream meet at the slot's consistent point: the exported snapshot
holds exactly the transactions committed before it, and the slot streams exactly those
committed after it, so nothing is missed and nothing is seen twice.
"""

from __future__ import annotations

import contextlib
import queue
import select
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg import pq, sql

from catalog import lake_layout as layout
from cdc.core import pgtypes
from cdc.core.table_schema import TableSchema
from cdc.postgres import copy_drain
from cdc.postgres.errors import CopyFormatError, postgres_error
from cdc.postgres.replication import session_conninfo

#: Bytes of CSV parsed per Arrow batch: the unit of memory use while copying.
DEFAULT_BLOCK_BYTES = 8 * 1024 * 1024
#: Converted batches (each about ``block_bytes`` of CSV) the reader thread keeps ready.
_READ_AHEAD = 2
#: How often (seconds) a waiting reader thread checks that it is still wanted.
_POLL_SECONDS = 0.1
_POLL_MS = int(_POLL_SECONDS * 1000)


class _End:
    """Put by the reader thread after the last chunk."""


#: A chunk of the COPY: whole CSV rows joined, or already split into string columns.
_Chunk = bytes | bytearray | list[pa.Array]


def _drain_copy(
    pgconn: pq.abc.PGconn,
    encoding: str,
    block_bytes: int,
    stop: threading.Event,
    *,
    columns: int = 0,
    what: str = "the COPY",
) -> Iterator[_Chunk]:
    """Yield the rows of the COPY ... CSV OUT in progress on ``pgconn`` in chunks of whole
    rows of about ``block_bytes``; then read the COPY's final result (raising its error,
    its message decoded with ``encoding``, the connection's Python codec name).

    With the compiled drain (:mod:`cdc.postgres.copy_drain`) and ``columns`` (the number of
    columns, at least one) given, each chunk is already split into that many string
    arrays; otherwise it is the rows' CSV bytes, for :func:`_parse_chunk`.

    Runs in the reader thread: waits for the socket with ``select`` or ``poll`` (either
    releases the GIL), never inside libpq. The compiled drain takes the rows without the
    GIL at all. Stops early, leaving the COPY in progress, when ``stop`` is set; the COPY
    context (``Copy.finish``) then cancels it.
    """
    drain = copy_drain.compiled_drain(pgconn)
    copying = _Copying(pgconn, encoding, stop)
    ended: bool
    try:
        if drain is not None and columns > 0:
            ended = yield from _columns_compiled(
                drain, copying, block_bytes, columns=columns, what=what
            )
        elif drain is not None:
            ended = yield from _rows_compiled(drain, copying, block_bytes)
        else:
            ended = yield from _rows(copying, block_bytes)
    except BaseException:
        if copying.over:
            # The COPY's last rows failed (their text, or the consumer's handling of them)
            # after libpq saw its end: read its result now, or the connection stays busy
            # and the COPY context and the transaction's end fail with "another command is
            # already in progress", hiding this error.
            _copy_result(pgconn, encoding)
        raise
    if not ended:
        return
    error = _copy_result(pgconn, encoding)
    if error is not None:
        raise error


@dataclass
class _Copying:
    """The COPY a drain loop reads: its connection, the connection's Python codec name,
    the reader's stop, and ``over``, set when libpq reports the COPY's end (its result is
    then pending)."""

    pgconn: pq.abc.PGconn
    encoding: str
    stop: threading.Event
    over: bool = False


def _copy_result(pgconn: pq.abc.PGconn, encoding: str) -> psycopg.Error | None:
    """Read the result of a COPY whose end libpq has seen: its error, or None."""
    while pgconn.is_busy():
        select.select([pgconn.socket], [], [], _POLL_SECONDS)
        pgconn.consume_input()
    # As psycopg's own COPY does (generators.copy_from): the first error result wins.
    error: psycopg.Error | None = None
    while (result := pgconn.get_result()) is not None:
        if result.status != pq.ExecStatus.COMMAND_OK and error is None:
            error = psycopg.errors.error_from_result(result, encoding=encoding)
    return error


def _rows(copying: _Copying, block_bytes: int) -> Generator[bytearray, None, bool]:
    """The rows of the COPY in chunks, taken one by one with psycopg; returns whether the
    COPY ended (False: ``stop`` was set first)."""
    pgconn, stop = copying.pgconn, copying.stop
    get = pgconn.get_copy_data
    # Each row is appended to the chunk at once: keeping the rows' own buffers alive until
    # a join costs three times as much (an object per row, and the GC passes over them).
    chunk = bytearray()
    while True:
        nbytes, data = get(1)  # 1: never block; 0 means no whole row buffered yet
        if nbytes > 0:
            chunk += data
            if len(chunk) >= block_bytes:
                yield chunk
                chunk = bytearray()
        elif nbytes == 0:
            if stop.is_set():
                return False
            # Also lets the consumer thread take the GIL (about every hundred rows).
            if select.select([pgconn.socket], [], [], _POLL_SECONDS)[0]:
                pgconn.consume_input()
        else:  # -1: the COPY is over (-2 raises OperationalError in psycopg)
            copying.over = True
            break
    if chunk:
        yield chunk
    return True


def _rows_compiled(drain: Any, copying: _Copying, block_bytes: int) -> Generator[bytes, None, bool]:
    """:func:`_rows`, each chunk taken by the compiled drain in one call without the GIL."""
    while True:
        status, chunk = drain.drain(block_bytes, _POLL_MS)
        copying.over = status == copy_drain.END
        if chunk:
            yield chunk
        ended = _copy_ended(status, copying)
        if ended is not None:
            return ended


def _copy_ended(status: int, copying: _Copying) -> bool | None:
    """After a call of the compiled drain: True when the COPY is over, False when ``stop``
    is set, None to call it again; raises what psycopg raises for PQgetCopyData's -2."""
    if status == copy_drain.END:
        return True
    if status == copy_drain.FAILED:
        raise psycopg.OperationalError(copying.pgconn.get_error_message(copying.encoding))
    if copying.stop.is_set():
        return False
    return None


def _columns_compiled(
    drain: Any, copying: _Copying, block_bytes: int, *, columns: int, what: str
) -> Generator[list[pa.Array], None, bool]:
    """:func:`_rows_compiled`, each chunk split into ``columns`` string arrays by the
    drain as it takes the rows (``CopyDrain.drain_columns``)."""
    # pyarrow.csv checks that the text is UTF-8; PostgreSQL guarantees it when the
    # connection's encoding is UTF8, so only another encoding needs the check here.
    check_utf8 = copying.encoding.replace("-", "").replace("_", "").lower() != "utf8"
    done = 0
    while True:
        status, bad_row, rows, buffers = drain.drain_columns(columns, block_bytes, _POLL_MS)
        copying.over = status == copy_drain.END
        if status in (copy_drain.MALFORMED, copy_drain.TOO_LARGE):
            problem = (
                f"is not a CSV row of its {columns} columns"
                if status == copy_drain.MALFORMED
                else "holds more text in one column than an Arrow string array takes (2 GiB)"
            )
            raise CopyFormatError(f"row {done + bad_row + 1} of {what} {problem}")
        if rows:
            arrays = copy_drain.string_columns(rows, buffers)
            if check_utf8:
                for array in arrays:
                    array.validate(full=True)  # ArrowInvalid, as from pyarrow.csv
            done += rows
            yield arrays
        ended = _copy_ended(status, copying)
        if ended is not None:
            return ended


def _read_ahead(items: Iterator[object], out: queue.Queue[object], stop: threading.Event) -> None:
    """The reader thread: puts ``items``, then :class:`_End` or the exception raised."""
    end: object = _End
    try:
        for item in items:
            while True:
                if stop.is_set():
                    return
                try:
                    out.put(item, timeout=_POLL_SECONDS)
                    break
                except queue.Full:
                    continue
    except BaseException as e:  # handed to the consumer, which re-raises it
        end = e
    finally:
        if isinstance(items, Generator):
            items.close()  # here, in the thread that ran it
    out.put(end)  # never blocks for long: the consumer takes every item until this one


def _parse_chunk(chunk: bytes | bytearray, column_names: list[str]) -> pa.Table:
    """Parse a chunk of whole COPY CSV rows into string columns, as one block."""
    return pacsv.read_csv(
        pa.py_buffer(chunk),
        read_options=pacsv.ReadOptions(
            column_names=column_names, block_size=len(chunk) + 1, use_threads=False
        ),
        parse_options=pacsv.ParseOptions(
            newlines_in_values=True,
            # A one-column table prints a NULL row as an empty line: it is a row.
            ignore_empty_lines=False,
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in column_names},
            # COPY CSV writes NULL unquoted and an empty string as "".
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )


def _typed_batch(
    table: TableSchema, texts: Sequence[pa.Array | pa.ChunkedArray], rows: int
) -> pa.Table:
    """Convert one batch of text columns; values without a typed form keep their exact text
    in a ``_cdc_fallback`` map column (added only when some value needed it)."""
    columns, fallback = pgtypes.texts_to_arrow_lossless(texts, table.columns, rows=rows)
    result = pa.Table.from_arrays(columns, names=list(table.column_names))
    if fallback is not None:
        result = result.append_column(layout.FALLBACK, fallback)
    return result


class TableCopy:
    """The batches of one table's COPY in progress (:meth:`SnapshotReader.start_table`).

    An iterator of Arrow tables; :meth:`close` stops its reader thread and cancels the
    COPY if it is still running (use ``contextlib.closing``).
    """

    def __init__(self, batches: Generator[pa.Table | None, None, None]) -> None:
        self._batches = batches

    def __iter__(self) -> TableCopy:
        return self

    def __next__(self) -> pa.Table:
        batch = next(self._batches)
        assert batch is not None  # only the priming step yields None
        return batch

    def close(self) -> None:
        self._batches.close()


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
        self._dsn = dsn
        try:
            self._conn = psycopg.connect(session_conninfo(dsn), autocommit=True)
            self._conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            if snapshot_name is not None:
                self._conn.execute(
                    sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name))
                )
        except psycopg.Error as e:
            raise postgres_error(e, doing="cannot open the snapshot transaction", dsn=dsn) from e

    def _pg_class(self, table: TableSchema, columns: str, doing: str) -> tuple[Any, ...] | None:
        """``columns`` (SQL over ``pg_class``) of ``table``'s row there."""
        try:
            return self._conn.execute(
                sql.SQL("SELECT {} FROM pg_class WHERE oid = %s::regclass").format(
                    sql.SQL(columns)  # columns: constants of this module
                ),
                [sql.Identifier(table.schema, table.table).as_string(self._conn)],
            ).fetchone()
        except psycopg.Error as e:
            raise postgres_error(e, doing=f"{doing} {table.qualified_name}", dsn=self._dsn) from e

    def estimate_rows(self, table: TableSchema) -> int | None:
        """The planner's row estimate (cheap, approximate; None if never analyzed)."""
        row = self._pg_class(table, "reltuples::bigint", "estimating the rows of")
        return int(row[0]) if row and row[0] is not None and row[0] >= 0 else None

    def _copies_directly(self, table: TableSchema) -> bool:
        """Whether ``COPY table TO`` can read ``table``: an ordinary one (the server
        refuses it for a partitioned table). Row-level security policies apply to both
        forms alike."""
        row = self._pg_class(table, "relkind = 'r'", "looking up")
        return bool(row and row[0])

    def read_table(self, table: TableSchema) -> Generator[pa.Table, None, None]:
        """Yields the table's rows as Arrow tables typed like :func:`pgtypes.arrow_type`.

        The COPY starts when the first batch is asked for; :meth:`start_table` starts it
        at once.
        """
        for batch in self._read(table, primed=False):
            assert batch is not None
            yield batch

    def start_table(self, table: TableSchema) -> TableCopy:
        """:meth:`read_table`, with the COPY sent and its reader thread draining it when
        this returns, so that the server copies while the caller gets its sink ready.

        Close the generator (``contextlib.closing``) even if it is never iterated: that
        stops the reader thread and cancels the COPY. Errors of the COPY statement itself
        (no privilege) are raised here.
        """
        batches = self._read(table, primed=True)
        primed = next(batches)  # runs up to the priming point: the COPY is running
        assert primed is None
        return TableCopy(batches)

    def _read(self, table: TableSchema, *, primed: bool) -> Generator[pa.Table | None, None, None]:
        """The batches of :meth:`read_table`; with ``primed``, first a ``None`` once the
        COPY is sent and the reader thread started."""
        names = table.column_names
        columns = sql.SQL(", ").join(sql.Identifier(n) for n in names)
        relation = sql.Identifier(table.schema, table.table)
        if self._copies_directly(table):
            # The server's quickest path: a scan of the table, no executor in between.
            query = sql.SQL("COPY {} ({}) TO STDOUT (FORMAT csv)").format(relation, columns)
        else:
            # Partitioned tables: selecting from the root reads every partition, which
            # matches publishing through the root.
            query = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT csv)").format(
                columns, relation
            )
        # Column names for pyarrow must be unique and plain; the real names are reapplied.
        positional = [f"c{i}" for i in range(len(names))]
        stop = threading.Event()

        encoding = self._conn.info.encoding  # read here, not while the thread drains

        def batches() -> Iterator[pa.Table]:  # runs in the reader thread
            for chunk in _drain_copy(
                self._conn.pgconn,
                encoding,
                self.block_bytes,
                stop,
                columns=len(names),
                what=f"the COPY of {table.qualified_name}",
            ):
                if isinstance(chunk, list):  # split by the compiled drain
                    yield _typed_batch(table, chunk, len(chunk[0]))
                else:
                    parsed = _parse_chunk(chunk, positional)
                    yield _typed_batch(table, parsed.columns, parsed.num_rows)

        try:
            with self._conn.cursor().copy(query):
                yield from self._in_thread(batches(), stop, primed=primed)
        except psycopg.Error as e:
            name = table.qualified_name
            raise postgres_error(
                e,
                doing=f"snapshot of {name} failed",
                dsn=self._dsn,
                grant=f"grant it: GRANT SELECT ON {name} TO <replication user>",
            ) from e

    @staticmethod
    def _in_thread(
        items: Iterator[pa.Table], stop: threading.Event, *, primed: bool
    ) -> Iterator[pa.Table | None]:
        """``items``, produced by a thread up to :data:`_READ_AHEAD` ahead of the caller;
        with ``primed``, first a ``None`` as soon as the thread runs.

        The thread stops (and is joined) before this generator ends, however it ends; if
        the COPY is then still in progress, leaving the COPY context cancels it.
        """
        out: queue.Queue[object] = queue.Queue(maxsize=_READ_AHEAD)
        reader = threading.Thread(
            target=_read_ahead, args=(items, out, stop), name="cdc-snapshot-copy", daemon=True
        )
        reader.start()
        try:
            if primed:
                yield None
            while True:
                item = out.get()
                if item is _End:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, pa.Table)
                yield item
        finally:
            stop.set()
            while reader.is_alive():
                with contextlib.suppress(queue.Empty):  # unblock a reader waiting for room
                    out.get(timeout=_POLL_SECONDS)
            reader.join()

    def close(self) -> None:
        try:
            self._conn.execute("COMMIT")
        finally:
            self._conn.close()

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
