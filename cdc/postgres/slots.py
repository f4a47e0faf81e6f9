"""Publications and replication slots: idempotent set-up on a regular connection.

Hazard: a logical slot pins WAL on the server until its consumer confirms it. A slot that is
never advanced (a pipeline stopped for good) fills the disk with WAL; drop it with
:func:`drop_slot` when a pipeline is retired.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import psycopg
from psycopg import sql

from cdc.core.errors import ConfigError
from cdc.core.lsn import parse_lsn
from cdc.postgres.errors import PrerequisiteError, SourceConnectionError, SourcePrivilegeError

log = logging.getLogger(__name__)


def split_table_name(name: str) -> tuple[str, str]:
    """``"schema.table"`` or ``"table"`` (schema ``public``) into its two parts.

    Double quotes keep dots and case: ``'"My.Schema"."T"'`` is (``My.Schema``, ``T``).
    """
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    i = 0
    while i < len(name):
        ch = name[i]
        if ch == '"':
            if quoted and i + 1 < len(name) and name[i + 1] == '"':
                current.append('"')
                i += 1
            else:
                quoted = not quoted
        elif ch == "." and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch if quoted else ch.lower())
        i += 1
    parts.append("".join(current))
    if quoted or not all(parts) or len(parts) > 2:
        raise ConfigError(f"invalid table name {name!r}: expected table or schema.table")
    return ("public", parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def check_prerequisites(conn: psycopg.Connection) -> None:
    """Raise :class:`PrerequisiteError` with the fix when logical replication cannot work."""
    row = conn.execute("SHOW wal_level").fetchone()
    if row is None or row[0] != "logical":
        raise PrerequisiteError(
            f"wal_level is {row[0] if row else 'unknown'!r}, logical replication needs "
            "'logical': run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"
        )
    row = conn.execute(
        "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if not row or not row[0]:
        info = conn.info
        raise SourcePrivilegeError(
            f"role {info.user!r} (on host {info.host}:{info.port}, database {info.dbname!r}) "
            f"lacks the REPLICATION attribute: run ALTER ROLE {info.user} WITH REPLICATION;"
        )


def ensure_publication(
    conn: psycopg.Connection, name: str, *, tables: list[str] | None = None
) -> list[tuple[str, str]]:
    """Create publication ``name`` unless it exists; return the tables it covers.

    ``tables=None`` publishes every table (``FOR ALL TABLES``, which needs a superuser).
    Partitioned tables publish through their root (``publish_via_partition_root``), so all
    partitions land in one table. Running it again with the same tables is a no-op; tables
    asked for that the publication lacks are added to it (the pipeline then copies their
    existing rows, see :mod:`cdc.postgres.incremental_snapshot`). Tables are never dropped from it
    (extra ones are logged), and switching between all tables and a list is refused.
    """
    wanted = sorted({split_table_name(t) for t in tables}) if tables is not None else None
    exists = conn.execute("SELECT puballtables FROM pg_publication WHERE pubname = %s", [name])
    row = exists.fetchone()
    try:
        if row is None:
            target: sql.Composable
            if wanted is None:
                target = sql.SQL("FOR ALL TABLES")
            else:
                target = sql.SQL("FOR TABLE {}").format(_table_list(wanted))
            # Created concurrently by another process: fine, same definition.
            with contextlib.suppress(psycopg.errors.DuplicateObject):
                conn.execute(
                    sql.SQL(
                        "CREATE PUBLICATION {} {} WITH (publish_via_partition_root = true)"
                    ).format(sql.Identifier(name), target)
                )
            return published_tables(conn, name)
        all_tables = bool(row[0])
        have = published_tables(conn, name)
        if all_tables or wanted is None:
            if all_tables != (wanted is None):
                raise ConfigError(
                    f"publication {name!r} already exists for "
                    f"{'all tables' if all_tables else 'a list of tables'}; switching to "
                    f"{'a list' if all_tables else 'all tables'} needs a new pipeline (--name)"
                )
            return have
        extra = sorted(set(have) - set(wanted))
        if extra:
            # Added by hand (ALTER PUBLICATION ... ADD TABLE): still captured, never dropped
            # behind the user's back.
            log.warning(
                "publication %s also covers %s, which --tables does not list; they are "
                "captured too (ALTER PUBLICATION %s DROP TABLE ... stops that)",
                name,
                ", ".join(f"{s}.{t}" for s, t in extra),
                name,
            )
        added = sorted(set(wanted) - set(have))
        if added:
            conn.execute(
                sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                    sql.Identifier(name), _table_list(added)
                )
            )
    except psycopg.errors.UndefinedTable as e:
        raise ConfigError(f"cannot publish {tables}: {e}".strip()) from e
    return published_tables(conn, name)


def _table_list(tables: list[tuple[str, str]]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(s, t) for s, t in tables)


def publishes_all_tables(conn: psycopg.Connection, publication: str) -> bool:
    row = conn.execute(
        "SELECT puballtables FROM pg_publication WHERE pubname = %s", [publication]
    ).fetchone()
    return bool(row and row[0])


def published_tables(conn: psycopg.Connection, publication: str) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s ORDER BY 1, 2",
        [publication],
    ).fetchall()
    return [(s, t) for s, t in rows]


@dataclass(frozen=True, slots=True)
class SlotInfo:
    name: str
    plugin: str | None
    database: str | None
    confirmed_flush_lsn: int | None
    active_pid: int | None


def get_slot(conn: psycopg.Connection, name: str) -> SlotInfo | None:
    row = conn.execute(
        "SELECT slot_name, plugin, database, confirmed_flush_lsn::text, active_pid "
        "FROM pg_replication_slots WHERE slot_name = %s",
        [name],
    ).fetchone()
    if row is None:
        return None
    return SlotInfo(
        name=row[0],
        plugin=row[1],
        database=row[2],
        confirmed_flush_lsn=parse_lsn(row[3]) if row[3] else None,
        active_pid=row[4],
    )


def check_slot_usable(slot: SlotInfo, conn: psycopg.Connection) -> None:
    """A slot of another plugin or database is a configuration mistake, not ours to drop."""
    dbname = conn.info.dbname
    if slot.plugin != "pgoutput" or slot.database != dbname:
        raise ConfigError(
            f"replication slot {slot.name!r} exists for plugin {slot.plugin!r} on database "
            f"{slot.database!r}; this pipeline needs pgoutput on {dbname!r}: choose another "
            "slot name (--name) or drop that slot"
        )


def drop_slot(conn: psycopg.Connection, name: str) -> bool:
    """Drop slot ``name`` if it exists, first ending any walsender still holding it."""
    try:
        conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE slot_name = %s AND active_pid IS NOT NULL",
            [name],
        )
        row = conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s",
            [name],
        ).fetchone()
    except psycopg.errors.ObjectInUse as e:
        raise SourceConnectionError(f"slot {name!r} is still in use: {e}") from e
    return row is not None
