"""Publications and replication slots: idempotent set-up on a regular connection.

Hazard: a logical slot pins WAL on the server until its consumer confirms it. A slot that is
never advanced (a pipeline stopped for good) fills the disk with WAL; drop it with
:func:`drop_slot` when a pipeline is retired.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdc.core.errors import ConfigError
from cdc.core.lsn import format_lsn, parse_lsn
from cdc.core.table_schema import split_table_name as split_table_name  # re-exported
from cdc.postgres.errors import (
    PrerequisiteError,
    SlotInUseError,
    SourceConnectionError,
    SourcePrivilegeError,
)

log = logging.getLogger(__name__)


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


#: Debezium operation letters -> the publication's ``publish`` parameter values.
_PUBLISH = {"c": "insert", "u": "update", "d": "delete", "t": "truncate"}


def push_down_transforms(
    conn: psycopg.Connection,
    publication: str,
    *,
    skipped_ops: set[str],
    column_drops: dict[tuple[str, str], list[str]],
) -> dict[str, Any]:
    """Make the publication leave out what the transforms would drop anyway, so those
    values never leave PostgreSQL: the operations every table skips (its ``publish`` list)
    and columns no rule reads (per-table column lists). PostgreSQL 15+ only; idempotent,
    and undone when the rules no longer ask for it.

    Column lists need a publication of listed tables (not ``FOR ALL TABLES``), and cannot
    leave out replica-identity columns, so ``REPLICA IDENTITY FULL`` tables keep every
    column. Returns what was pushed down: ``{"publish": [...], "columns": {"s.t":
    [dropped...]}, "skipped": reason or None}``.

    Example:
        >>> push_down_transforms(conn, "cdc", skipped_ops={"d"}, column_drops={})  # doctest: +SKIP
        {'publish': ['insert', 'update', 'truncate'], 'columns': {}, 'skipped': None}
    """
    result: dict[str, Any] = {"publish": None, "columns": {}, "skipped": None}
    if conn.info.server_version < 150000:
        result["skipped"] = "PostgreSQL 15 or later is needed"
        return result
    row = conn.execute(
        "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate "
        "FROM pg_publication WHERE pubname = %s",
        [publication],
    ).fetchone()
    if row is None:
        result["skipped"] = f"publication {publication!r} does not exist"
        return result
    all_tables = bool(row[0])
    have = {op for op, on in zip("cudt", row[1:], strict=True) if on}
    want = set("cudt") - skipped_ops
    if not want:
        want = set("cudt")  # an empty list would publish nothing at all: filter in-process
    if want != have:
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} SET (publish = {})").format(
                sql.Identifier(publication),
                sql.Literal(", ".join(_PUBLISH[op] for op in "cudt" if op in want)),
            )
        )
        log.info("publication %s now publishes only %s", publication, sorted(want))
    result["publish"] = [_PUBLISH[op] for op in "cudt" if op in want]
    if all_tables:
        if column_drops:
            result["skipped"] = "column lists need a publication of listed tables"
        return result
    rows = conn.execute(
        """
        SELECT t.schemaname, t.tablename, t.attnames, c.relreplident,
               array(SELECT a.attname FROM pg_attribute a
                     WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                       AND a.attgenerated = '' ORDER BY a.attnum)
        FROM pg_publication_tables t
        JOIN pg_namespace n ON n.nspname = t.schemaname
        JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename
        WHERE t.pubname = %s ORDER BY 1, 2
        """,
        [publication],
    ).fetchall()
    entries: list[sql.Composable] = []
    changed = False
    for schema, table, attnames, identity, columns in rows:
        drops = set(column_drops.get((schema, table), ()))
        if identity == "f":
            drops = set()  # every column identifies the row
        keep = [c for c in columns if c not in drops]
        wanted_list = keep if len(keep) < len(columns) else None
        current = list(attnames) if attnames is not None else None
        if current is not None and sorted(current) == sorted(columns):
            current = None  # a list of every column is no list
        if (sorted(current) if current else None) != (sorted(wanted_list) if wanted_list else None):
            changed = True
        ident = sql.Identifier(schema, table)
        if wanted_list:
            result["columns"][f"{schema}.{table}"] = sorted(drops & set(columns))
            entries.append(
                sql.SQL("{} ({})").format(
                    ident, sql.SQL(", ").join(sql.Identifier(c) for c in wanted_list)
                )
            )
        else:
            entries.append(ident)
    if changed and entries:
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(
                sql.Identifier(publication), sql.SQL(", ").join(entries)
            )
        )
        log.info("publication %s column lists: %s", publication, result["columns"] or "none")
    return result


def publication_pushdown(conn: psycopg.Connection, publication: str) -> dict[str, Any] | None:
    """What ``publication`` leaves out (read-only): its ``publish`` list and, per table,
    the columns its column list omits; ``None`` when it does not exist."""
    row = conn.execute(
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication "
        "WHERE pubname = %s",
        [publication],
    ).fetchone()
    if row is None:
        return None
    columns: dict[str, list[str]] = {}
    if conn.info.server_version >= 150000:
        rows = conn.execute(
            """
            SELECT t.schemaname, t.tablename,
                   array(SELECT a.attname FROM pg_attribute a
                         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                           AND a.attgenerated = '' AND a.attname <> ALL (t.attnames)
                         ORDER BY a.attnum)
            FROM pg_publication_tables t
            JOIN pg_namespace n ON n.nspname = t.schemaname
            JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename
            WHERE t.pubname = %s AND t.attnames IS NOT NULL ORDER BY 1, 2
            """,
            [publication],
        ).fetchall()
        columns = {f"{s}.{t}": list(left) for s, t, left in rows if left}
    return {
        "publish": [_PUBLISH[op] for op, on in zip("cudt", row, strict=True) if on],
        "columns": columns,
    }


@dataclass(frozen=True, slots=True)
class SlotStatus:
    """A replication slot as ``pg_replication_slots`` reports it, with its lag.

    Attributes:
        lag_bytes: WAL between the server's current position and ``confirmed_flush_lsn``:
            what the consumer has not confirmed yet (``None`` when the slot has none).
        retained_bytes: WAL the server keeps for the slot (current position minus
            ``restart_lsn``); this is what fills the disk when a slot stalls.
        wal_status: ``reserved``, ``extended``, ``unreserved`` or ``lost`` (PostgreSQL 13+).
            ``lost`` means the server removed WAL the slot still needed
            (``max_slot_wal_keep_size``): the slot can never stream again.
        safe_wal_size: Bytes of WAL that can still be written before the slot is in danger
            of being lost (``None`` when ``max_slot_wal_keep_size`` is unlimited).
    """

    name: str
    plugin: str | None
    slot_type: str
    database: str | None
    temporary: bool
    active: bool
    active_pid: int | None
    restart_lsn: int | None
    confirmed_flush_lsn: int | None
    current_wal_lsn: int
    lag_bytes: int | None
    retained_bytes: int | None
    wal_status: str | None
    safe_wal_size: int | None

    @property
    def lost(self) -> bool:
        return self.wal_status == "lost"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: LSNs in PostgreSQL's ``X/Y`` form."""
        return {
            "name": self.name,
            "plugin": self.plugin,
            "slot_type": self.slot_type,
            "database": self.database,
            "temporary": self.temporary,
            "active": self.active,
            "active_pid": self.active_pid,
            "restart_lsn": format_lsn(self.restart_lsn) if self.restart_lsn is not None else None,
            "confirmed_flush_lsn": (
                format_lsn(self.confirmed_flush_lsn)
                if self.confirmed_flush_lsn is not None
                else None
            ),
            "current_wal_lsn": format_lsn(self.current_wal_lsn),
            "lag_bytes": self.lag_bytes,
            "retained_bytes": self.retained_bytes,
            "wal_status": self.wal_status,
            "safe_wal_size": self.safe_wal_size,
        }


# The insert position, not pg_current_wal_lsn() (the write position): with
# synchronous_commit=off a commit returns before its WAL is written, and the lag would read
# short until the WAL writer catches up. On a standby both fail; the newest received WAL is
# its "current" position.
_SLOT_STATUS_SQL = """
WITH now AS (
  SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
              ELSE pg_current_wal_insert_lsn() END AS lsn
)
SELECT slot_name::text, plugin::text, slot_type, database::text, temporary, active, active_pid,
       restart_lsn::text, confirmed_flush_lsn::text, wal_status, safe_wal_size,
       now.lsn::text,
       pg_wal_lsn_diff(now.lsn, confirmed_flush_lsn)::bigint,
       pg_wal_lsn_diff(now.lsn, restart_lsn)::bigint
FROM pg_replication_slots, now
"""


def _slot_status(row: tuple[object, ...]) -> SlotStatus:
    def lsn(value: object) -> int | None:
        return parse_lsn(str(value)) if value else None

    return SlotStatus(
        name=str(row[0]),
        plugin=row[1],  # type: ignore[arg-type]
        slot_type=str(row[2]),
        database=row[3],  # type: ignore[arg-type]
        temporary=bool(row[4]),
        active=bool(row[5]),
        active_pid=row[6],  # type: ignore[arg-type]
        restart_lsn=lsn(row[7]),
        confirmed_flush_lsn=lsn(row[8]),
        wal_status=row[9],  # type: ignore[arg-type]
        safe_wal_size=row[10],  # type: ignore[arg-type]
        current_wal_lsn=lsn(row[11]) or 0,
        lag_bytes=row[12],  # type: ignore[arg-type]
        retained_bytes=row[13],  # type: ignore[arg-type]
    )


def slot_status(conn: psycopg.Connection, name: str) -> SlotStatus | None:
    """Slot ``name`` with its lag, or ``None`` when there is no such slot.

    Example:
        >>> slot_status(conn, "shop").lag_bytes  # doctest: +SKIP
        1208
    """
    row = conn.execute(_SLOT_STATUS_SQL + " WHERE slot_name = %s", [name]).fetchone()
    return _slot_status(row) if row is not None else None


def list_slots(conn: psycopg.Connection) -> list[SlotStatus]:
    """Every replication slot of the server (all databases), by name.

    Example:
        >>> [s.name for s in list_slots(conn)]  # doctest: +SKIP
        ['shop']
    """
    rows = conn.execute(_SLOT_STATUS_SQL + " ORDER BY slot_name").fetchall()
    return [_slot_status(row) for row in rows]


def drop_inactive_slot(conn: psycopg.Connection, name: str, *, force: bool = False) -> None:
    """Drop slot ``name``; refuse while a consumer streams from it unless ``force``.

    ``force`` ends the walsender that holds the slot first (:func:`drop_slot`).

    Hazard: dropping the slot of a pipeline loses every change it has not confirmed; the
    pipeline then stops with a lost-slot error (or re-copies its tables, see
    ``--on-slot-lost``).
    """
    slot = slot_status(conn, name)
    if slot is None:
        raise ConfigError(f"no replication slot named {name!r}")
    if slot.active and not force:
        raise SlotInUseError(
            f"slot {name!r} is active (walsender pid {slot.active_pid}): a pipeline is "
            "streaming from it. Stop that pipeline first, or pass --force to end its "
            "connection and drop the slot anyway"
        )
    drop_slot(conn, name)


def emit_message(
    conn: psycopg.Connection, prefix: str, content: str, *, transactional: bool = False
) -> int:
    """Write a logical decoding message into the WAL of ``conn``'s database; its LSN.

    Every logical slot of the database sees it (pgoutput passes it on when the consumer
    asked for ``messages``); a non-transactional one is decoded at once, even inside an
    open transaction of the sender.
    """
    row = conn.execute(
        "SELECT pg_logical_emit_message(%s, %s, %s)::text", [transactional, prefix, content]
    ).fetchone()
    assert row is not None
    return parse_lsn(str(row[0]))
