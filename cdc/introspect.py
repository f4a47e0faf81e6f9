"""Table shapes from the system catalogs.

Snapshot and streaming must agree on every table's :class:`TableSchema` (the registry keys
versions by its fingerprint), so both build it here. The key of a table is, in order of
preference: its primary key; the index named by REPLICA IDENTITY USING INDEX; every column
under REPLICA IDENTITY FULL; none otherwise (such a table can only be inserted into while it
is published, and its current state keeps every row).
"""

from __future__ import annotations

from collections.abc import Iterable

import psycopg

from cdc.table_schema import REPLICA_IDENTITY_CODES, ColumnSchema, TableSchema

# Generated columns are skipped because pgoutput (PostgreSQL < 18) does not send them.
_COLUMNS_SQL = """
SELECT c.oid, n.nspname, c.relname, c.relreplident,
       a.attname, a.atttypid, a.atttypmod,
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


def _build(rows: Iterable[tuple]) -> dict[int, TableSchema]:
    grouped: dict[int, list[tuple]] = {}
    for row in rows:
        grouped.setdefault(row[0], []).append(row)
    schemas: dict[int, TableSchema] = {}
    for oid, cols in grouped.items():
        _, nsp, rel, ident_code, *_ = cols[0]
        identity = REPLICA_IDENTITY_CODES.get(ident_code, "default")
        has_pk = any(c[7] for c in cols)
        if has_pk:
            key_of = [bool(c[7]) for c in cols]
        elif identity == "index":
            key_of = [bool(c[8]) for c in cols]
        elif identity == "full":
            key_of = [True] * len(cols)
        else:
            key_of = [False] * len(cols)
        schemas[oid] = TableSchema(
            schema=nsp,
            table=rel,
            replica_identity=identity,
            columns=tuple(
                ColumnSchema(name=c[4], type_oid=c[5], type_modifier=c[6], is_key=k)
                for c, k in zip(cols, key_of, strict=True)
            ),
        )
    return schemas


def describe_relations(conn: psycopg.Connection, oids: list[int]) -> dict[int, TableSchema]:
    """Shapes of the tables with these OIDs (missing OIDs are absent from the result)."""
    return _build(conn.execute(_COLUMNS_SQL, [oids]).fetchall())


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
