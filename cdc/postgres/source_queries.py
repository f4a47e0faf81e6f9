"""Queries capture makes on a regular (non-replication) connection to the source while it
streams: describing a relation, re-reading TOASTed values, the server's WAL position."""

from __future__ import annotations

import psycopg

from cdc.core import pgtypes
from cdc.core.errors import ValueConversionError
from cdc.core.events import ChangeEvent
from cdc.core.lsn import parse_lsn
from cdc.core.table_schema import TableSchema
from cdc.postgres.errors import SourceConnectionError
from cdc.postgres.introspect import current_column_texts, describe_relation_message
from cdc.postgres.protocol import pgoutput
from cdc.postgres.replication import session_conninfo


class SourceQueries:
    """A regular connection to the source for catalog lookups, reopened after it breaks."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection | None = None

    def connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                self._conn = psycopg.connect(session_conninfo(self.dsn), autocommit=True)
            except psycopg.OperationalError as e:
                raise SourceConnectionError(f"cannot connect to the source: {e}") from e
        return self._conn

    def describe(self, rel: pgoutput.Relation) -> TableSchema | None:
        try:
            return describe_relation_message(self.connection(), rel)
        except psycopg.OperationalError as e:
            self.close()
            raise SourceConnectionError(f"catalog lookup failed: {e}") from e

    def fill_unchanged_toast(self, event: ChangeEvent) -> None:
        """Re-read the TOASTed values a key-changing UPDATE did not send (see
        :func:`cdc.postgres.introspect.current_column_texts`), so no row lands with a hole."""
        table = event.table
        after = event.after or ()
        position = {c.name: i for i, c in enumerate(table.columns)}
        key = {k: after[position[k]] for k in table.key_columns}
        try:
            texts = current_column_texts(self.connection(), table, key, event.unchanged_toast)
        except psycopg.OperationalError as e:
            self.close()
            raise SourceConnectionError(f"re-reading TOASTed values failed: {e}") from e
        if texts is None:
            return  # the row is gone again; its delete follows in the stream
        values = list(after)
        fallback = dict(event.fallback or {})
        for name, text in texts.items():
            column = table.columns[position[name]]
            try:
                values[position[name]] = (
                    None
                    if text is None
                    else pgtypes.text_parser(column.type_oid, column.type_modifier)(text)
                )
            except ValueConversionError:
                fallback[name] = text  # type: ignore[assignment]
        event.after = tuple(values)
        event.fallback = fallback or None
        event.unchanged_toast = ()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def current_wal_lsn(dsn: str) -> int:
    """The server's WAL insert position: once flushed past it, every commit made so far is
    in the lake.

    The insert position, not ``pg_current_wal_lsn()`` (the write position), because with
    ``synchronous_commit=off`` a commit can return before its record is written.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    return parse_lsn(row[0]) if row else 0
