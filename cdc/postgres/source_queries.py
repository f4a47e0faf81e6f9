"""Queries capture makes on a regular (non-replication) connection to the source while it
streams: describing a relation, re-reading TOASTed values, the server's WAL position."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from cdc.core import pgtypes
from cdc.core.errors import TransientError, ValueConversionError
from cdc.core.events import ChangeEvent
from cdc.core.lsn import parse_lsn
from cdc.core.table_schema import TableSchema
from cdc.postgres.errors import postgres_error
from cdc.postgres.introspect import current_column_texts, describe_relation_message
from cdc.postgres.protocol import pgoutput
from cdc.postgres.replication import session_conninfo


class SourceQueries:
    """A regular connection to the source for catalog lookups, reopened after it breaks.

    Every use goes through :meth:`lookup`, which classes a failure with
    :func:`~cdc.postgres.errors.postgres_error` and drops a broken connection, so a
    terminated backend becomes a transient error and the next lookup reconnects.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection | None = None

    def connection(self) -> psycopg.Connection:
        """The open connection, reconnecting if it is closed or broken. Use it inside
        :meth:`lookup`, so that a failure is classed and the connection dropped."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                self._conn = psycopg.connect(session_conninfo(self.dsn), autocommit=True)
            except psycopg.Error as e:
                raise postgres_error(e, doing="cannot connect to the source", dsn=self.dsn) from e
        return self._conn

    @contextmanager
    def lookup(self, doing: str) -> Iterator[psycopg.Connection]:
        """The connection, for queries whose failure is classed as PostgreSQL's SQLSTATE
        says (see :func:`~cdc.postgres.errors.postgres_error`).

        Example:
            >>> with queries.lookup("reading the publication") as conn:  # doctest: +SKIP
            ...     conn.execute("SELECT 1")
        """
        conn = self.connection()
        try:
            yield conn
        except psycopg.Error as e:
            error = postgres_error(e, doing=doing, dsn=self.dsn)
            if isinstance(error, TransientError) or conn.broken:
                self.close()
            raise error from e

    def describe(self, rel: pgoutput.Relation) -> TableSchema | None:
        with self.lookup(f"describing {rel.namespace}.{rel.name}") as conn:
            return describe_relation_message(conn, rel)

    def fill_unchanged_toast(self, event: ChangeEvent) -> None:
        """Re-read the TOASTed values a key-changing UPDATE did not send (see
        :func:`cdc.postgres.introspect.current_column_texts`), so no row lands with a hole."""
        table = event.table
        after = event.after or ()
        position = {c.name: i for i, c in enumerate(table.columns)}
        key = {k: after[position[k]] for k in table.key_columns}
        with self.lookup(f"re-reading TOASTed values of {table.qualified_name}") as conn:
            texts = current_column_texts(conn, table, key, event.unchanged_toast)
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
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    except psycopg.Error as e:
        raise postgres_error(e, doing="reading the server's WAL position", dsn=dsn) from e
    return parse_lsn(row[0]) if row else 0
