"""Prerequisite checks for a source database (``cdc check``).

Reports what would make capture fail or lose precision before it starts: the server's
replication settings, the role's privileges, and per table its key choice under logical
replication. PostgreSQL rejects UPDATE and DELETE on a published table that has no replica
identity, which is the most common surprise in production.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import psycopg

from cdc.postgres.slots import split_table_name

Level = Literal["error", "warning", "info"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing ``cdc check`` found: how bad, about what, what is wrong, how to fix it."""

    level: Level
    subject: str
    problem: str
    fix: str = ""


_TABLES_SQL = """
SELECT c.oid, n.nspname, c.relname, c.relkind, c.relpersistence, c.relreplident,
       (SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_index i
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (i.indkey)
         WHERE i.indrelid = c.oid AND i.indisprimary) AS pk,
       (SELECT ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
         WHERE i.indrelid = c.oid AND i.indisreplident) AS identity_index,
       (SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_attribute a
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attgenerated <> '') AS generated
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
ORDER BY n.nspname, c.relname
"""


def _server_findings(conn: psycopg.Connection) -> list[Finding]:
    findings = []
    settings: dict[str, str] = dict(
        conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('wal_level', 'max_replication_slots', 'max_wal_senders')"
        ).fetchall()
    )
    if settings.get("wal_level") != "logical":
        findings.append(
            Finding(
                "error",
                "server",
                f"wal_level is {settings.get('wal_level')!r}; logical replication needs 'logical'",
                "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL",
            )
        )
    row = conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()
    slots_used = row[0] if row else 0
    if slots_used >= int(settings.get("max_replication_slots", 0)):
        findings.append(
            Finding(
                "error",
                "server",
                f"all {slots_used} replication slots are in use",
                "raise max_replication_slots, or drop a slot nobody reads "
                "(an unread slot also keeps WAL on disk)",
            )
        )
    row = conn.execute(
        "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if not row or not row[0]:
        findings.append(
            Finding(
                "error",
                "server",
                "the role lacks the REPLICATION attribute",
                "ALTER ROLE <user> WITH REPLICATION;",
            )
        )
    return findings


def _table_findings(row: tuple) -> list[Finding]:
    _, nsp, rel, kind, persistence, identity, pk, identity_index, generated = row
    name = f"{nsp}.{rel}"
    findings = []
    quoted = f'"{nsp}"."{rel}"'
    if persistence == "u":
        findings.append(
            Finding(
                "error",
                name,
                "unlogged: its changes are not written to WAL, so none are captured",
                f"ALTER TABLE {quoted} SET LOGGED;",
            )
        )
    if identity == "n":
        findings.append(
            Finding(
                "error",
                name,
                "REPLICA IDENTITY NOTHING: UPDATE and DELETE fail while the table is "
                "published, and changes carry no key",
                f"ALTER TABLE {quoted} REPLICA IDENTITY DEFAULT; (with a primary key) "
                "or REPLICA IDENTITY FULL",
            )
        )
    elif not pk and identity == "d":
        findings.append(
            Finding(
                "error",
                name,
                "no primary key and REPLICA IDENTITY DEFAULT: UPDATE and DELETE fail "
                "while the table is published; only inserts can be captured",
                f"ALTER TABLE {quoted} ADD PRIMARY KEY (...); or REPLICA IDENTITY USING "
                "INDEX <unique index on NOT NULL columns>; or REPLICA IDENTITY FULL",
            )
        )
    elif not pk and identity == "f":
        findings.append(
            Finding(
                "warning",
                name,
                "no primary key: the key is every column (REPLICA IDENTITY FULL), so the "
                "current state counts identical rows, and every change logs the whole old row",
                f"ALTER TABLE {quoted} ADD PRIMARY KEY (...);",
            )
        )
    elif not pk and identity == "i":
        findings.append(
            Finding("info", name, f"key: the columns of replica identity index {identity_index}")
        )
    elif pk and identity == "f":
        findings.append(
            Finding(
                "info",
                name,
                f"key: primary key ({', '.join(pk)}); REPLICA IDENTITY FULL also logs whole "
                "old rows, which costs WAL but is not needed",
                f"ALTER TABLE {quoted} REPLICA IDENTITY DEFAULT;",
            )
        )
    if generated:
        findings.append(
            Finding(
                "warning",
                name,
                f"generated columns {', '.join(generated)} are not published by "
                "PostgreSQL before version 18, so they are absent from the lake",
                "compute them in the query over the lake",
            )
        )
    if kind == "p":
        findings.append(
            Finding("info", name, "partitioned: all partitions land in one table (via the root)")
        )
    return findings


def check_source(conn: psycopg.Connection, *, tables: list[str] | None = None) -> list[Finding]:
    """What would stop or degrade capture from this database, most severe first.

    ``tables`` limits the table checks to those (``schema.table``); by default every user
    table is checked.

    Example:
        >>> [f.problem for f in check_source(conn) if f.level == "error"]  # doctest: +SKIP
        ['no primary key and REPLICA IDENTITY DEFAULT: UPDATE and DELETE fail ...']
    """
    wanted = {split_table_name(t) for t in tables} if tables else None
    findings = _server_findings(conn)
    for row in conn.execute(_TABLES_SQL).fetchall():
        if wanted is None or (row[1], row[2]) in wanted:
            findings.extend(_table_findings(row))
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda f: order[f.level])
