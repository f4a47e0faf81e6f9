"""Turns decoded pgoutput messages into :class:`~cdc.core.events.ChangeEvent` objects.

Pure: no IO. It keeps the relation cache, the open transaction and the per-table value
converters. Table keys come from a ``describe`` callback (the catalog knows the primary key
even under REPLICA IDENTITY FULL, where pgoutput flags every column as part of the identity).

A change of key columns is split into a delete of the old key and an insert of the new one,
as Debezium does, so a current-state view keyed by the key drops the old row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from time import time_ns
from typing import Any

from cdc.core import pgtypes
from cdc.core.codegen import compile_function
from cdc.core.errors import DecodeError, ValueConversionError
from cdc.core.events import ChangeEvent
from cdc.core.table_schema import REPLICA_IDENTITY_CODES, ColumnSchema, TableSchema
from cdc.postgres.protocol import pgoutput

#: Given a Relation message, the table's schema with keys from the catalog and domains
#: resolved (see :func:`cdc.postgres.introspect.describe_relation_message`), or ``None`` when the
#: table is gone, in which case the message's own identity flags are used.
Describe = Callable[[pgoutput.Relation], TableSchema | None]


@dataclass(frozen=True, slots=True)
class TransactionCommitted:
    """Every change of the transaction ending at ``end_lsn`` has been emitted."""

    commit_lsn: int
    end_lsn: int


@dataclass(slots=True)
class _Table:
    schema: TableSchema
    parsers: tuple[Callable[[str], Any], ...]
    key_positions: tuple[int, ...]
    convert: Callable[[pgoutput.TupleData], tuple[Any, ...]]


def _row_converter(
    parsers: tuple[Callable[[str], Any], ...], table: str
) -> Callable[[pgoutput.TupleData], tuple[Any, ...]]:
    """One function parsing a whole row of text values (NULLs stay ``None``), generated for
    the table's column count: one call per row instead of a loop step per value, which is
    what the per-row cost of capture is made of. Raises whatever a parser raises.

    Compiled as ``<generated cdc row converter {table}>`` (see :mod:`cdc.core.codegen`)."""
    names = [f"v{i}" for i in range(len(parsers))]
    namespace: dict[str, Any] = {f"p{i}": parse for i, parse in enumerate(parsers)}
    values = "".join(f"None if {v} is None else p{i}({v}), " for i, v in enumerate(names))
    unpack = "".join(f"{v}, " for v in names) or "()"
    # Generated from the column count alone; no name from the database reaches the source.
    convert: Callable[[pgoutput.TupleData], tuple[Any, ...]] = compile_function(
        f"def convert(row):\n    {unpack} = row\n    return ({values})\n",
        name="convert",
        kind="row converter",
        label=table,
        namespace=namespace,
    )
    return convert


def schema_from_relation(rel: pgoutput.Relation) -> TableSchema:
    """A schema from the Relation message alone (keys = pgoutput's identity flags)."""
    return TableSchema(
        schema=rel.namespace,
        table=rel.name,
        replica_identity=REPLICA_IDENTITY_CODES.get(rel.replica_identity, "default"),
        columns=tuple(
            ColumnSchema(c.name, c.type_oid, c.type_modifier, c.is_key) for c in rel.columns
        ),
    )


class ChangeAssembler:
    """Feed it messages in stream order; it returns the events each one produces."""

    def __init__(self, describe: Describe | None = None) -> None:
        self._describe = describe
        self._relations = pgoutput.RelationCache()
        # Derived from the cached Relation on its first row change (schema with keys, value
        # parsers), and dropped when a new Relation for the id arrives.
        self._tables: dict[int, _Table] = {}
        self._xid: int | None = None
        self._commit_lsn = 0
        self._commit_ts: datetime | None = None
        self._seq = 0

    @property
    def in_transaction(self) -> bool:
        return self._commit_ts is not None

    @property
    def transaction(self) -> tuple[int, int | None, datetime] | None:
        """``(commit_lsn, xid, commit_ts)`` of the open transaction, or ``None``."""
        if self._commit_ts is None:
            return None
        return self._commit_lsn, self._xid, self._commit_ts

    @property
    def seq(self) -> int:
        """The seq the next change of the open transaction gets.

        A columnar decoder that takes some of the transaction's changes itself (see
        :mod:`cdc.postgres.columnar`) sets it before handing this assembler the others, so
        the numbering is the one this assembler alone would give."""
        return self._seq

    @seq.setter
    def seq(self, value: int) -> None:
        self._seq = value

    def table_schema(self, relation_id: int) -> TableSchema:
        """The schema the changes of ``relation_id`` carry (derived on first use).

        Raises:
            DecodeError: no Relation message for the id arrived.
        """
        return self._table(relation_id).schema

    def reset_transaction(self) -> None:
        """Forget a half-received transaction (after a reconnect the server resends it)."""
        self._xid = None
        self._commit_ts = None
        self._seq = 0

    def _table(self, relation_id: int) -> _Table:
        table = self._tables.get(relation_id)
        if table is None:
            table = self._derive(self._relations.get(relation_id))
            self._tables[relation_id] = table
        return table

    def _derive(self, rel: pgoutput.Relation) -> _Table:
        schema = (self._describe(rel) if self._describe else None) or schema_from_relation(rel)
        parsers = tuple(pgtypes.text_parser(c.type_oid, c.type_modifier) for c in schema.columns)
        keys = tuple(i for i, c in enumerate(schema.columns) if c.is_key)
        return _Table(schema, parsers, keys, _row_converter(parsers, schema.qualified_name))

    def _convert(
        self, table: _Table, data: pgoutput.TupleData
    ) -> tuple[tuple[Any, ...], tuple[str, ...], dict[str, str] | None]:
        """Typed values, the unchanged-TOAST columns, and the exact text of values that
        have no typed form (kept instead of rounded or dropped)."""
        if len(data) != len(table.parsers):
            raise DecodeError(
                f"{table.schema.qualified_name}: tuple has {len(data)} columns, "
                f"relation has {len(table.parsers)}"
            )
        if pgoutput.UNCHANGED_TOAST not in data:
            # The common case. (Binary values never arrive from a sound stream:
            # START_REPLICATION does not ask for them. A malformed one may carry one, which
            # a text parser refuses with a TypeError: the loop below says what is wrong.)
            try:
                return table.convert(data), (), None
            except (ValueConversionError, TypeError):
                pass  # a value without a typed form: the loop below keeps its text
        values: list[Any] = []
        unchanged: list[str] = []
        fallback: dict[str, str] | None = None
        for i, (parse, raw) in enumerate(zip(table.parsers, data, strict=True)):
            if raw is None:
                values.append(None)
            elif raw is pgoutput.UNCHANGED_TOAST:
                values.append(None)
                unchanged.append(table.schema.columns[i].name)
            elif type(raw) is not str:
                raise DecodeError(
                    f"{table.schema.qualified_name}: binary tuple data is not requested"
                )
            else:
                try:
                    values.append(parse(raw))
                except ValueConversionError:
                    values.append(None)
                    if fallback is None:
                        fallback = {}
                    fallback[table.schema.columns[i].name] = raw
        return tuple(values), tuple(unchanged), fallback

    def _event(
        self,
        op: str,
        table: _Table,
        before: tuple[Any, ...] | None,
        after: tuple[Any, ...] | None,
        lsn: int,
        size: int,
        unchanged: tuple[str, ...] = (),
        fallback: dict[str, str] | None = None,
    ) -> ChangeEvent:
        if self._commit_ts is None:
            raise DecodeError(f"{op} change outside a transaction (no Begin message)")
        # Positional, in ChangeEvent's field order: one is built per change, and keyword
        # arguments plus the ts_ms default factory cost more than the rest of this method.
        event = ChangeEvent(
            op,  # type: ignore[arg-type]
            table.schema,
            before,
            after,
            self._commit_lsn,
            self._seq,
            self._xid,
            self._commit_ts,
            lsn,
            unchanged,
            fallback,
            size,
            time_ns() // 1_000_000,
        )
        self._seq += 1
        return event

    def feed(
        self, message: pgoutput.Message, *, lsn: int = 0, size: int = 0
    ) -> list[ChangeEvent | TransactionCommitted]:
        """Events produced by ``message``; ``lsn`` is the WAL position of its XLogData."""
        if isinstance(message, pgoutput.Insert):
            table = self._table(message.relation_id)
            after, unchanged, fallback = self._convert(table, message.new)
            return [self._event("c", table, None, after, lsn, size, unchanged, fallback)]
        if isinstance(message, pgoutput.Update):
            return self._update(message, lsn, size)
        if isinstance(message, pgoutput.Delete):
            table = self._table(message.relation_id)
            before, _, fallback = self._convert(table, message.old)
            return [self._event("d", table, before, None, lsn, size, (), fallback)]
        if isinstance(message, pgoutput.Begin):
            self._xid = message.xid
            self._commit_lsn = message.final_lsn
            self._commit_ts = message.commit_ts
            self._seq = 0
            return []
        if isinstance(message, pgoutput.Commit):
            self.reset_transaction()
            return [TransactionCommitted(message.commit_lsn, message.end_lsn)]
        if isinstance(message, pgoutput.Relation):
            self._relations.add(message)
            self._tables.pop(message.relation_id, None)
            return []
        if isinstance(message, pgoutput.Truncate):
            events: list[ChangeEvent | TransactionCommitted] = []
            for relation_id in message.relation_ids:
                table = self._table(relation_id)
                events.append(self._event("t", table, None, None, lsn, size))
            return events
        # Origin, Type and logical decoding messages carry no row changes. Logical messages
        # are documented as ignored (heartbeats use them only to advance the slot).
        return []

    def _update(
        self, message: pgoutput.Update, lsn: int, size: int
    ) -> list[ChangeEvent | TransactionCommitted]:
        table = self._table(message.relation_id)
        new = message.new
        if message.old_kind == "O" and pgoutput.UNCHANGED_TOAST in new:
            # REPLICA IDENTITY FULL: the old row carries the TOASTed values the new one
            # omits, so the change leaves nothing to fill in later.
            old = message.old or ()
            new = tuple(
                o if n is pgoutput.UNCHANGED_TOAST and o is not pgoutput.UNCHANGED_TOAST else n
                for n, o in zip(new, old, strict=True)
            )
        after, unchanged, fallback = self._convert(table, new)
        before = None
        if message.old is not None:
            before, _, old_fallback = self._convert(table, message.old)
            keys = table.key_positions
            if keys and any(before[i] != after[i] for i in keys):
                # The key changed: the old row is gone, a new one exists.
                return [
                    self._event("d", table, before, None, lsn, size, (), old_fallback),
                    self._event("c", table, None, after, lsn, size, unchanged, fallback),
                ]
        return [self._event("u", table, before, after, lsn, size, unchanged, fallback)]
