"""Table shapes from the system catalogs.

Snapshot and streaming must agree on every table's :class:`TableSchema` (the registry keys
versions by its fingerprint), so both build it here. Domain types are resolved to their base
type (a domain over ``integer`` is stored as an integer), because pgoutput and the catalog
both name the domain itself, which has no mapping of its own. The key of a table is, in order of
preference: its primary key; the index named by REPLICA IDENTITY USING INDEX; every column
under REPLICA IDENTITY FULL; none otherwise (such a table can only be inserted into while it
is published, and its current state keeps every row).
"""

from __future__ import annotations

from collections.abc import Iterable

import psycopg
from psycopg import sql

from cdc.core.table_schema import REPLICA_IDENTITY_CODES, ColumnSchema, TableSchema
from cdc.postgres.protocol.pgoutput import Relation

# Generated columns are skipped because pgoutput (PostgreSQL < 18) does not send them.
_COLUMNS_SQL = """
SELECT c.oid, n.nspname, c.relname, c.relreplident,
       a.attname, a.atttypid, a.atttypmod, a.attnum,
       coalesce(a.attnum = ANY (pk.indkey), false) AS in_pk,
       coalesce(a.attnum = ANY (ri.indkey), false) AS in_identity_index
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
     AND a.attgenerated = ''
LEFT JOIN pg_index pk ON pk.indrelid = c.oid AND pk.indisprimary
LEFT JOIN pg_index ri ON ri.indrelid = c.oid AND ri.indisreplident
WHERE c.oid = ANY (%s)
ORDER BY c.oid, a.attnum
"""


def resolve_domains(conn: psycopg.Connection, oids: Iterable[int]) -> dict[int, tuple[int, int]]:
    """``{domain oid: (base type oid, type modifier)}`` for the domains among ``oids``,
    following domains over domains down to a real type."""
    resolved: dict[int, tuple[int, int]] = {}
    pending = {o: o for o in set(oids)}  # original oid -> oid to look up next
    typmods: dict[int, int] = {}
    while pending:
        rows = conn.execute(
            "SELECT oid, typbasetype, typtypmod FROM pg_type "
            "WHERE oid = ANY (%s) AND typtype = 'd'",
            [list(set(pending.values()))],
        ).fetchall()
        base_of = {oid: (base, typmod) for oid, base, typmod in rows}
        next_pending = {}
        for original, current in pending.items():
            if current in base_of:
                base, typmod = base_of[current]
                if typmod != -1:  # the outermost explicit modifier wins
                    typmods.setdefault(original, typmod)
                next_pending[original] = base
            elif current != original:
                resolved[original] = (current, typmods.get(original, -1))
        pending = next_pending
    return resolved


def _with_base_types(conn: psycopg.Connection, schema: TableSchema) -> TableSchema:
    domains = resolve_domains(conn, (c.type_oid for c in schema.columns))
    if not domains:
        return schema
    return TableSchema(
        schema=schema.schema,
        table=schema.table,
        replica_identity=schema.replica_identity,
        columns=tuple(
            ColumnSchema(c.name, *domains[c.type_oid], c.is_key, c.attnum)
            if c.type_oid in domains
            else c
            for c in schema.columns
        ),
    )


def _build(rows: Iterable[tuple]) -> dict[int, TableSchema]:
    grouped: dict[int, list[tuple]] = {}
    for row in rows:
        grouped.setdefault(row[0], []).append(row)
    schemas: dict[int, TableSchema] = {}
    for oid, cols in grouped.items():
        _, nsp, rel, ident_code, *_ = cols[0]
        identity = REPLICA_IDENTITY_CODES.get(ident_code, "default")
        has_pk = any(c[8] for c in cols)
        if has_pk:
            key_of = [bool(c[8]) for c in cols]
        elif identity == "index":
            key_of = [bool(c[9]) for c in cols]
        elif identity == "full":
            key_of = [True] * len(cols)
        else:
            key_of = [False] * len(cols)
        schemas[oid] = TableSchema(
            schema=nsp,
            table=rel,
            replica_identity=identity,
            columns=tuple(
                ColumnSchema(name=c[4], type_oid=c[5], type_modifier=c[6], is_key=k, attnum=c[7])
                for c, k in zip(cols, key_of, strict=True)
            ),
        )
    return schemas


def describe_relations(conn: psycopg.Connection, oids: list[int]) -> dict[int, TableSchema]:
    """Shapes of the tables with these OIDs (missing OIDs are absent from the result)."""
    built = _build(conn.execute(_COLUMNS_SQL, [oids]).fetchall())
    return {oid: _with_base_types(conn, schema) for oid, schema in built.items()}


def describe_relation_message(conn: psycopg.Connection, rel: Relation) -> TableSchema | None:
    """The schema of a streamed table: columns and types exactly as the Relation message
    says (it describes the tuples that follow, even if the table changed again since), keys
    from the catalog (pgoutput flags every column under REPLICA IDENTITY FULL), domains
    resolved. ``None`` when the table no longer exists."""
    current = describe_relations(conn, [rel.relation_id]).get(rel.relation_id)
    if current is None:
        return None
    keys = set(current.key_columns)
    attnums = {c.name: c.attnum for c in current.columns}
    message = TableSchema(
        schema=rel.namespace,
        table=rel.name,
        replica_identity=REPLICA_IDENTITY_CODES.get(rel.replica_identity, "default"),
        columns=tuple(
            ColumnSchema(c.name, c.type_oid, c.type_modifier, c.name in keys, attnums.get(c.name))
            for c in rel.columns
        ),
    )
    return _with_base_types(conn, message)


def describe_tables(
    conn: psycopg.Connection, tables: list[tuple[str, str]]
) -> dict[tuple[str, str], TableSchema]:
    """Shapes of ``(schema, table)`` pairs, keyed by the pair."""
    if not tables:
        return {}
    rows = conn.execute(
        "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN unnest(%s::text[], %s::text[]) AS t(s, r) ON n.nspname = t.s AND c.relname = t.r",
        [[s for s, _ in tables], [t for _, t in tables]],
    ).fetchall()
    by_oid = describe_relations(conn, [r[0] for r in rows])
    return {(s.schema, s.table): s for s in by_oid.values()}


def current_column_texts(
    conn: psycopg.Connection,
    table: TableSchema,
    key: dict[str, object],
    columns: Iterable[str],
) -> dict[str, str | None] | None:
    """The text form of ``columns`` in the row with this key now, or ``None`` if no such row.

    Re-reads values that the stream could not carry: an UPDATE that changes the key under
    REPLICA IDENTITY DEFAULT sends neither the unchanged TOASTed values nor the old row.
    It reads the value as it is *now*; a later change to it is captured as its own event.
    """
    names = list(columns)
    query = sql.SQL("SELECT {} FROM {} WHERE {}").format(
        sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(n)) for n in names),
        sql.Identifier(table.schema, table.table),
        sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder()) for k in key
        ),
    )
    row = conn.execute(query, list(key.values())).fetchone()
    return None if row is None else dict(zip(names, row, strict=True))
