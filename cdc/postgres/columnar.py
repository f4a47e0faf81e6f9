"""The columnar capture path: pgoutput row messages -> Arrow changelog batches, no Python
object per change.

:class:`ColumnarDecoder` sits between :class:`cdc.postgres.streaming.StreamingSource` and
:class:`~cdc.postgres.protocol.assembler.ChangeAssembler`. The compiled
:class:`~cdc.postgres.protocol.compiled.ColumnBuilder` takes Inserts, Updates without an
old tuple and Deletes straight from their bytes into per-relation column buffers; every
other message goes to the assembler as before, which turns it into
:class:`~cdc.core.events.ChangeEvent` objects (key changes split into a delete and a
create, REPLICA IDENTITY FULL updates with their TOAST values copied, truncates). Before the
assembler handles a message of a relation, that relation's buffered rows are cut into a
:class:`ChangeBatch`, so the items of one table stay in stream order; the seq counter of the
transaction is shared, so every change gets the seq the assembler alone would give it.

A batch is typed column by column with :func:`cdc.core.pgtypes.text_to_arrow_lossless`
(vectorized, with the per-value parsers' exact results and fallback: a value without a
typed form is null and keeps its text in ``_cdc_fallback``), so the changelog rows equal
what :meth:`sinks.delta_changelog.DeltaChangelogSink.add` makes of the same events.

Hazard: a batch holds at most as many rows as the caller lets pile up between cuts (the
streaming source bounds it by ``max_items``); a single huge value is held once, as bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from cdc.core import pgtypes
from cdc.core.events import ChangeEvent
from cdc.core.table_schema import TableSchema
from cdc.postgres.protocol import compiled, pgoutput
from cdc.postgres.protocol.assembler import ChangeAssembler, TransactionCommitted
from sinks.delta_changelog import changelog_table

__all__ = ["ChangeBatch", "ColumnarDecoder"]

_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_TIMESTAMP = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True, slots=True)
class ChangeBatch:
    """Consecutive changes of one table in changelog form (see
    :func:`sinks.delta_changelog.changelog_table`), in ascending ``(commit_lsn, seq)``.

    ``op_counts`` counts the rows per op; ``size_bytes`` is what they took on the wire;
    ``commit_ts`` is the commit time of the newest one; ``message_lsns`` holds each row's
    own WAL position (Debezium's ``source.lsn``, :attr:`ChangeEvent.lsn
    <cdc.core.events.ChangeEvent.lsn>`) as native int64 bytes (see :attr:`lsns`);
    ``texts`` the values as PostgreSQL sent them, one string array per column (the typed
    columns are made from them; ``float4`` values, say, are wider as text than as float32).
    """

    table: TableSchema
    changes: pa.Table
    rows: int
    op_counts: dict[str, int] = field(default_factory=dict)
    size_bytes: int = 0
    commit_ts: datetime = _UNIX_EPOCH
    message_lsns: bytes = b""
    texts: tuple[pa.Array, ...] = ()

    @property
    def lsns(self) -> pa.Array:
        """Each row's own message LSN (int64), in row order."""
        return pa.Array.from_buffers(pa.int64(), self.rows, [None, pa.py_buffer(self.message_lsns)])


Item = ChangeEvent | TransactionCommitted | ChangeBatch


class ColumnarDecoder:
    """Feeds raw pgoutput messages to the compiled builder, the rest to ``assembler``.

    Example:
        >>> decoder = ColumnarDecoder(ChangeAssembler())  # doctest: +SKIP
        >>> items = decoder.feed(payload, lsn=lsn)  # doctest: +SKIP
        >>> items += decoder.cut_all()  # doctest: +SKIP
    """

    def __init__(self, assembler: ChangeAssembler) -> None:
        if compiled.ColumnBuilder is None:
            raise RuntimeError("the compiled pgoutput decoder is not built (see setup.py)")
        self.assembler = assembler
        self.builder = compiled.ColumnBuilder()
        self._schemas: dict[int, TableSchema] = {}
        self.sync()

    @property
    def pending(self) -> int:
        """Rows buffered and not yet cut into batches."""
        return int(self.builder.pending)

    def sync(self) -> None:
        """Take over the assembler's open transaction (after it handled changes alone)."""
        txn = self.assembler.transaction
        if txn is None:
            self.builder.end()
        else:
            commit_lsn, xid, commit_ts = txn
            self.builder.begin(commit_lsn, xid or 0, _micros(commit_ts), self.assembler.seq)

    def release(self) -> None:
        """Hand the open transaction's seq back to the assembler (before it runs alone)."""
        if self.assembler.in_transaction:
            self.assembler.seq = self.builder.seq

    def reset(self) -> None:
        """Forget buffered rows and relations (a lost connection: the server resends)."""
        self.builder.forget_all()
        self._schemas.clear()

    def feed(self, payload: bytes | memoryview, *, lsn: int, in_stream: bool = False) -> list[Item]:
        """Items that ``payload`` completes (often none: its row was buffered)."""
        code = self.builder.feed(payload, 0, in_stream, lsn)
        if code > 0:
            return []
        return self.not_taken(code, payload, lsn=lsn, in_stream=in_stream)

    def not_taken(
        self, code: int, payload: bytes | memoryview, *, lsn: int, in_stream: bool = False
    ) -> list[Item]:
        """Handle a message the builder returned ``code`` (<= 0) for."""
        out: list[Item] = []
        builder = self.builder
        relation = builder.relation
        if code == compiled.RELATION_FULL:
            out += self.cut(relation)
            code = builder.feed(payload, 0, in_stream, lsn)
        elif code == compiled.UNKNOWN_RELATION:
            schema = self.assembler.table_schema(relation)
            self._schemas[relation] = schema
            builder.register(relation, len(schema.columns))
            code = builder.feed(payload, 0, in_stream, lsn)
        if code > 0:
            return out
        size = len(payload) - (4 if in_stream else 0)
        message = pgoutput.decode_message(payload, in_stream=in_stream)
        return out + self.feed_message(message, lsn=lsn, size=size)

    def feed_message(self, message: pgoutput.Message, *, lsn: int, size: int = 0) -> list[Item]:
        """Hand a decoded message to the assembler, cutting first what must precede it."""
        out: list[Item] = []
        if isinstance(message, pgoutput.Insert | pgoutput.Update | pgoutput.Delete):
            out += self.cut(message.relation_id)
        elif isinstance(message, pgoutput.Truncate):
            for relation_id in message.relation_ids:
                out += self.cut(relation_id)
        elif isinstance(message, pgoutput.Relation):
            self.relation(message.relation_id, out)
        assembler = self.assembler
        in_txn = assembler.in_transaction
        if in_txn:
            assembler.seq = self.builder.seq
        out += assembler.feed(message, lsn=lsn, size=size)
        if isinstance(message, pgoutput.Begin | pgoutput.Commit) or not in_txn:
            self.sync()
        else:
            self.builder.seq = assembler.seq
        return out

    def relation(self, relation_id: int, out: list[Item]) -> None:
        """A new shape of ``relation_id`` arrives: cut its rows into ``out``, re-register
        it on its next row."""
        out += self.cut(relation_id)
        self.builder.forget(relation_id)
        self._schemas.pop(relation_id, None)

    def cut(self, relation_id: int) -> list[ChangeBatch]:
        """The buffered rows of ``relation_id`` as a batch (none if it has none)."""
        taken = self.builder.take(relation_id)
        if taken is None:
            return []
        return [_batch(self._schemas[relation_id], taken)]

    def cut_all(self) -> list[ChangeBatch]:
        """Every buffered row, one batch per relation."""
        out: list[ChangeBatch] = []
        for relation_id in self.builder.pending_relations():
            out += self.cut(relation_id)
        return out


def _micros(ts: datetime) -> int:
    return (ts - _UNIX_EPOCH) // _MICROSECOND


def _batch(schema: TableSchema, taken: tuple[Any, ...]) -> ChangeBatch:
    n, columns, unchanged, ops, op_offsets, lsns, seqs, txids, stamps, size, counts, own = taken
    texts = [
        pa.Array.from_buffers(
            pa.string(), n, [pa.py_buffer(valid), pa.py_buffer(offsets), pa.py_buffer(data)]
        )
        for valid, offsets, data in columns
    ]
    values, fallback = pgtypes.texts_to_arrow_lossless(texts, schema.columns, rows=n)
    commit_ts = pa.Array.from_buffers(_TIMESTAMP, n, [None, pa.py_buffer(stamps)])
    changes = changelog_table(
        schema,
        values,
        ops=pa.Array.from_buffers(
            pa.string(), n, [None, pa.py_buffer(op_offsets), pa.py_buffer(ops)]
        ),
        lsns=pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(lsns)]),
        seqs=pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(seqs)]),
        txids=pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(txids)]),
        commit_ts=commit_ts,
        unchanged_toast=_unchanged(schema, n, unchanged) if unchanged is not None else None,
        fallback=fallback,
    )
    last = _UNIX_EPOCH + timedelta(microseconds=int.from_bytes(stamps[-8:], "little", signed=True))
    counted = {k: v for k, v in counts.items() if v}
    return ChangeBatch(schema, changes, n, counted, size, last, own, tuple(texts))


def _unchanged(schema: TableSchema, n: int, bitmaps: list[bytes]) -> pa.Array:
    """The ``_cdc_unchanged_toast`` lists: column names per row, null for rows without."""
    flags = [
        pa.Array.from_buffers(pa.bool_(), n, [None, pa.py_buffer(bitmap)]).to_pylist()
        for bitmap in bitmaps
    ]
    names = schema.column_names
    rows = [[names[j] for j, f in enumerate(flags) if f[i]] or None for i in range(n)]
    return pa.array(rows, type=pa.list_(pa.string()))
