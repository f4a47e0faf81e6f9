"""DuckDB connections that expose the lake's changelog tables as views.

For every changelog table ``<lake>/<schema>.<table>/changes`` (a Delta table), the connection
gets a DuckDB schema named after the source schema holding two views:

``<schema>.<table>_changes``
    The changelog itself: every landed change with all metadata columns.

``<schema>.<table>``
    The current state of the source table, computed from the changelog on every query; once
    ``cdc jobs merge`` has folded history into ``<table>/current``, from that merged table
    plus only the changes after its watermark.

The delta extension is loaded from the ``duckdb-extension-delta`` wheel by file path (and, for
object-store lakes, httpfs from ``duckdb-extension-httpfs``, see :mod:`catalog.duckdb_storage`):
no network access is needed for extensions, and none is attempted (autoload/autoinstall off).

Example:
    >>> con = connect("/data/lake")  # doctest: +SKIP
    >>> con.sql("SELECT count(*) FROM public.orders").fetchone()  # doctest: +SKIP
    (1042,)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb
import pyarrow.fs as pafs
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError, TableNotFoundError

from catalog import lake_layout
from catalog.column_lineage import current_columns
from catalog.duckdb_storage import configure_object_store, extension_path, load_extension
from catalog.errors import DeltaExtensionNotFoundError, TerminalCatalogError, TransientCatalogError
from catalog.schema_registry import SchemaRegistry
from cdc.core.table_schema import TableSchema

__all__ = [
    "MERGE_LSN_APP_ID",
    "MERGE_SEQ_APP_ID",
    "ViewInfo",
    "connect",
    "current_view_sql",
    "delta_extension_path",
    "discover_tables",
    "merge_watermark",
    "open_duckdb",
    "quote_ident",
    "quote_literal",
    "register_views",
    "toastable",
]

_log = logging.getLogger(__name__)

#: Suffix of the changelog view's name: ``<table>_changes``.
CHANGES_SUFFIX = "_changes"

#: App-transaction ids under which ``cdc jobs merge`` records, atomically with every commit to
#: a ``<table>/current`` table, the ``(_cdc_lsn, _cdc_seq)`` of the newest change folded in.
MERGE_LSN_APP_ID = "cdc-jobs:merge:lsn"
MERGE_SEQ_APP_ID = "cdc-jobs:merge:seq"

#: Smallest BIGINT: "no watermark yet" in generated SQL (every LSN is larger). Written as
#: ``(-9223372036854775808)::BIGINT``: without the parentheses ``::`` binds first and the
#: positive literal overflows.
_MIN_BIGINT = -(2**63)

# DuckDB column types that only fixed-length PostgreSQL types map to. PostgreSQL never TOASTs
# a fixed-length datum, so these columns cannot be "unchanged TOAST" and need no back-fill.
# Everything else (VARCHAR, BLOB, lists, structs, maps, and DECIMAL, since PostgreSQL's
# numeric is a variable-length, TOAST-able type) gets the back-fill.
_FIXED_WIDTH_TYPES = frozenset(
    {
        "BOOLEAN",
        "TINYINT",
        "SMALLINT",
        "INTEGER",
        "BIGINT",
        "HUGEINT",
        "UTINYINT",
        "USMALLINT",
        "UINTEGER",
        "UBIGINT",
        "UHUGEINT",
        "FLOAT",
        "DOUBLE",
        "DATE",
        "TIME",
        "TIME WITH TIME ZONE",
        "TIMESTAMP",
        "TIMESTAMP WITH TIME ZONE",
        "TIMESTAMP_S",
        "TIMESTAMP_MS",
        "TIMESTAMP_NS",
        "INTERVAL",
        "UUID",
    }
)


def quote_ident(name: str) -> str:
    """Quote ``name`` as a DuckDB identifier (``"`` doubled), whatever characters it holds.

    Example:
        >>> quote_ident('my "odd" Table')
        '"my ""odd"" Table"'
    """
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote ``value`` as a DuckDB string literal (``'`` doubled).

    Example:
        >>> quote_literal("it's")
        "'it''s'"
    """
    return "'" + value.replace("'", "''") + "'"


def delta_extension_path() -> Path:
    """The delta extension file shipped by the ``duckdb-extension-delta`` wheel.

    The wheel is built for one exact DuckDB version and stores the extension at
    ``duckdb_extension_delta/extensions/v<duckdb version>/delta.duckdb_extension``.

    Raises:
        DeltaExtensionNotFoundError: the wheel is missing, or built for another DuckDB version.

    Example:
        >>> delta_extension_path().name  # doctest: +SKIP
        'delta.duckdb_extension'
    """
    return extension_path("delta", error=DeltaExtensionNotFoundError)


@dataclass(frozen=True, slots=True)
class ViewInfo:
    """The two views registered for one changelog table.

    ``key_columns`` is empty for a keyless table (or one missing from the schema registry).
    ``current_uri`` is the merged current-state table the view reads, when ``cdc jobs merge``
    has created one, and ``merge_watermark`` the ``(lsn, seq)`` it had reached when the view
    was created.
    """

    qualified_name: str
    schema: str
    table: str
    changes_uri: str
    key_columns: tuple[str, ...]
    current_uri: str | None = None
    merge_watermark: tuple[int, int] | None = None

    @property
    def current_view(self) -> str:
        """Quoted ``"schema"."table"``: the current-state view."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.table)}"

    @property
    def changes_view(self) -> str:
        """Quoted ``"schema"."table_changes"``: the changelog view."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.table + CHANGES_SUFFIX)}"


def discover_tables(lake: str, *, storage_options: dict[str, str] | None = None) -> list[str]:
    """Qualified names of the changelog tables in ``lake``, sorted.

    A changelog table is a directory ``<schema>.<table>`` holding ``changes/_delta_log``.

    Example:
        >>> discover_tables("/data/lake")  # doctest: +SKIP
        ['public.orders', 'sales.orders']
    """
    fs, root = lake_layout.filesystem(lake, storage_options)
    try:
        entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as exc:
        raise TransientCatalogError(f"cannot list lake {lake}: {exc}") from exc
    names: list[str] = []
    candidates = [
        e.base_name
        for e in entries
        if e.type == pafs.FileType.Directory
        and "." in e.base_name
        and e.base_name not in (lake_layout.INTERNAL_DIR, lake_layout.DLQ_DIR)
    ]
    if not candidates:
        return []
    try:
        logs = fs.get_file_info([f"{root}/{name}/changes/_delta_log" for name in candidates])
    except OSError as exc:
        raise TransientCatalogError(f"cannot list lake {lake}: {exc}") from exc
    for name, log in zip(candidates, logs, strict=True):
        if log.type == pafs.FileType.Directory:
            names.append(name)
    return sorted(names)


def connect(
    lake: str,
    *,
    database: str = ":memory:",
    tables: Sequence[str] | None = None,
    storage_options: dict[str, str] | None = None,
) -> duckdb.DuckDBPyConnection:
    """Open DuckDB with the delta extension and a pair of views per changelog table.

    For each table ``schema.table`` found under ``lake`` this creates the DuckDB schema
    ``schema`` with the views ``schema.table_changes`` (the changelog) and ``schema.table``
    (the current state; see :func:`current_view_sql`), and puts every source schema on the
    ``search_path`` after ``main`` so unqualified names work.

    Every query re-reads the Delta log, so the views see commits made after ``connect``.
    Tables *created* after ``connect`` (and columns added to a table) appear only after
    :func:`register_views` runs again (``Lake.refresh()``).

    Hazards:
        * Until ``cdc jobs merge`` has created ``<table>/current``, the current view scans
          and aggregates the whole changelog on every query: its cost grows with history.
          Afterwards it reads the merged table plus the changes after the merge watermark
          read at view creation; a connection that outlives many merges reads more of the
          changelog than needed (still correct) until :func:`register_views` runs again.
          A connection opened before a table's first merge keeps the changelog-only view,
          which misses whatever ``cdc jobs retention`` drops: re-register after merging.
        * Key columns come from the lake's embedded schema registry. A table with no
          registry entry, or no key columns, is treated as keyless: its current view keeps
          every inserted/updated image and cannot apply updates or deletes.
        * DuckDB matches identifiers case-insensitively, so ``"Orders"`` and ``orders`` in
          one schema (or a table ``x_changes`` next to ``x``) cannot both get views; this
          raises :class:`~catalog.errors.TerminalCatalogError` naming them, and ``tables``
          can select the ones you want.
        * An unqualified name that exists in several source schemas resolves to the first
          schema on the search path (alphabetical), without an error: qualify such names.
        * ``search_path`` is a per-connection setting: cursors from ``con.cursor()`` do not
          inherit it.
        * Object-store lakes: DuckDB gets a secret made from ``storage_options`` (see
          :mod:`catalog.duckdb_storage`); the same options list tables and read the registry.

    Args:
        lake: lake root, a local path or an object-store URI.
        database: DuckDB database file, or ``":memory:"``. Views in a file database persist,
            but reopening it still needs this function (or ``LOAD``) for the extension.
        tables: register only these qualified names (default: every changelog table).
        storage_options: deltalake-style options of an object-store lake (credentials,
            endpoint), for DuckDB's secret, listing the lake and the registry.

    Raises:
        DeltaExtensionNotFoundError: the delta extension wheel is missing or mismatched.
        TerminalCatalogError: a requested table does not exist or lacks its registry key
            columns, or view names collide.
        TransientCatalogError: a requested table cannot be read (other tables that cannot
            be read are skipped with a logged warning).

    Example:
        >>> con = connect("/data/lake", tables=["public.orders"])  # doctest: +SKIP
        >>> con.sql("SELECT * FROM orders WHERE id = 7").fetchall()  # doctest: +SKIP
        [(7, 'shipped')]
    """
    con = open_duckdb(database, lake=lake, storage_options=storage_options)
    try:
        register_views(con, lake, tables=tables, storage_options=storage_options)
    except BaseException:
        con.close()
        raise
    return con


def open_duckdb(
    database: str = ":memory:",
    *,
    lake: str | None = None,
    storage_options: dict[str, str] | None = None,
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the delta extension loaded from the wheel, and no views.

    With an object-store ``lake`` (``s3://``, ``gs://``, ``az://``) it also loads the
    extension that reads the store and creates a DuckDB secret from ``storage_options``
    (see :mod:`catalog.duckdb_storage`). Extension autoinstall/autoload are disabled, so
    DuckDB never tries the network for extensions.

    Raises:
        DeltaExtensionNotFoundError: the delta extension wheel is missing, mismatched, or does
            not load on this platform.
        DuckDBExtensionNotFoundError: the object store's extension wheel is missing.
        ObjectStoreConfigError: the storage options cannot be made into a DuckDB secret.

    Example:
        >>> open_duckdb().sql("SELECT 1").fetchone()  # doctest: +SKIP
        (1,)
    """
    con = duckdb.connect(
        database,
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False},
    )
    try:
        load_extension(con, "delta", error=DeltaExtensionNotFoundError)
        if lake is not None:
            configure_object_store(con, lake, storage_options)
    except BaseException:
        con.close()
        raise
    return con


def register_views(
    con: duckdb.DuckDBPyConnection,
    lake: str,
    *,
    tables: Sequence[str] | None = None,
    storage_options: dict[str, str] | None = None,
    registry: SchemaRegistry | None = None,
) -> list[ViewInfo]:
    """(Re)create the views of ``lake``'s changelog tables on ``con``; see :func:`connect`.

    ``con`` must have the delta extension loaded. Safe to call again: views are replaced,
    picking up new tables and new columns. Returns the tables that got views.

    A table that cannot be read (e.g. a ``_delta_log`` without a commit yet, while a sink
    creates it) or whose registry key columns are missing from it gets no views and a
    logged warning, so one bad table does not hide the others; when ``tables`` names it
    explicitly, the error is raised instead.

    Example:
        >>> infos = register_views(con, "/data/lake")  # doctest: +SKIP
        >>> [i.current_view for i in infos]  # doctest: +SKIP
        ['"public"."orders"']
    """
    found = discover_tables(lake, storage_options=storage_options)
    if tables is not None:
        missing = sorted(set(tables) - set(found))
        if missing:
            raise TerminalCatalogError(
                f"no changelog table for {', '.join(missing)} under {lake} "
                f"(found: {', '.join(found) or 'none'})"
            )
        wanted = set(tables)
        found = [name for name in found if name in wanted]
    if registry is None:
        registry = SchemaRegistry(lake, storage_options=storage_options)

    infos: list[ViewInfo] = []
    column_types: dict[str, dict[str, str]] = {}
    merged_types: dict[str, dict[str, str]] = {}
    shapes: dict[str, list[TableSchema]] = {}
    for qualified_name in found:
        shapes[qualified_name] = [v.schema for v in registry.versions(qualified_name)]
        registered = shapes[qualified_name][-1] if shapes[qualified_name] else None
        if registered is not None:
            schema, table = registered.schema, registered.table
            keys = registered.key_columns
        else:
            # No registry entry: the directory name is all we have. Splitting at the first
            # dot is a guess when the schema name itself contains a dot.
            schema, _, table = qualified_name.partition(".")
            keys = ()
        info = ViewInfo(
            qualified_name=qualified_name,
            schema=schema,
            table=table,
            changes_uri=_scan_uri(lake, qualified_name),
            key_columns=keys,
        )
        # Probe before the transaction below: an error inside a DuckDB transaction aborts
        # it, and one unreadable table (e.g. a sink creating it right now, whose _delta_log
        # has no commit yet) must not hide every other table.
        try:
            described = con.execute(
                f"DESCRIBE SELECT * FROM delta_scan({quote_literal(info.changes_uri)})"
            ).fetchall()
            types = {str(row[0]): str(row[1]) for row in described}
            missing_keys = [k for k in keys if k not in types]
            if missing_keys:
                raise TerminalCatalogError(
                    f"{qualified_name}: key columns {missing_keys} from the schema registry "
                    f"are not in the changelog table {info.changes_uri}"
                )
            if keys:
                info, types_of_current = _with_merged_table(
                    con, info, lake, storage_options=storage_options
                )
                if types_of_current is not None:
                    merged_types[qualified_name] = types_of_current
        except (duckdb.Error, TerminalCatalogError, TransientCatalogError) as exc:
            if tables is not None:  # explicitly asked for: fail loudly
                if isinstance(exc, TerminalCatalogError | TransientCatalogError):
                    raise
                raise TransientCatalogError(
                    f"cannot read the changelog table {info.changes_uri}: {exc}"
                ) from exc
            _log.warning("no views for %s: %s", qualified_name, exc)
            continue
        infos.append(info)
        column_types[qualified_name] = types
    _check_collisions(infos)

    # One transaction, so a refresh replaces all views at once or none of them.
    con.execute("BEGIN TRANSACTION")
    try:
        for info in infos:
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(info.schema)}")
            con.execute(
                f"CREATE OR REPLACE VIEW {info.changes_view} AS "
                f"SELECT * FROM delta_scan({quote_literal(info.changes_uri)})"
            )
            types = column_types[info.qualified_name]
            versions = shapes[info.qualified_name]
            state = current_view_sql(
                info.changes_view,
                types,
                info.key_columns,
                merged=(
                    f"delta_scan({quote_literal(info.current_uri)})"
                    if info.current_uri is not None
                    else None
                ),
                merged_types=merged_types.get(info.qualified_name),
                merge_watermark=info.merge_watermark,
                every_column_key=bool(versions)
                and set(info.key_columns) == set(versions[-1].column_names),
            )
            con.execute(
                f"CREATE OR REPLACE VIEW {info.current_view} AS {_current_columns(state, types, versions)}"
            )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise

    schemas = sorted({info.schema for info in infos} - {"main"})
    search_path = ",".join(quote_ident(s) for s in ["main", *schemas])
    con.execute(f"SET search_path = {quote_literal(search_path)}")
    return infos


def _current_columns(state_sql: str, types: dict[str, str], versions: list[TableSchema]) -> str:
    """``state_sql`` narrowed to the table's columns of today: dropped columns left out,
    renamed ones shown once under their new name (see :mod:`catalog.column_lineage`)."""
    metadata = set(lake_layout.METADATA_COLUMNS)
    source = [c for c in types if c not in metadata]
    lineages = current_columns(versions, source)
    if [(lin.name, lin.sources) for lin in lineages] == [(c, (c,)) for c in source]:
        return state_sql
    columns = [lin.sql() for lin in lineages]
    if lake_layout.FALLBACK in types:
        columns.append(quote_ident(lake_layout.FALLBACK))
    return f"SELECT {', '.join(columns)} FROM ({state_sql}) AS _cdc_state"


def merge_watermark(
    current_uri: str, *, storage_options: dict[str, str] | None = None
) -> tuple[int, int] | None:
    """The ``(lsn, seq)`` up to which ``cdc jobs merge`` has folded changes into the merged
    table at ``current_uri``; ``None`` if there is no merged table or no merge committed yet.

    Raises:
        TransientCatalogError: the merged table exists but its Delta log cannot be read.

    Example:
        >>> merge_watermark("/data/lake/public.orders/current")  # doctest: +SKIP
        (23871520, 4)
    """
    try:
        if not DeltaTable.is_deltatable(current_uri, storage_options=storage_options):
            return None
        dt = DeltaTable(current_uri, storage_options=storage_options)
        lsn = dt.transaction_version(MERGE_LSN_APP_ID)
        seq = dt.transaction_version(MERGE_SEQ_APP_ID)
    except TableNotFoundError:
        return None
    except (DeltaError, OSError) as exc:
        raise TransientCatalogError(f"cannot read the Delta log of {current_uri}: {exc}") from exc
    if lsn is None:
        return None
    return (lsn, seq if seq is not None else _MIN_BIGINT)


def current_view_sql(
    changes: str,
    column_types: dict[str, str],
    key_columns: Sequence[str],
    *,
    merged: str | None = None,
    merged_types: dict[str, str] | None = None,
    merge_watermark: tuple[int, int] | None = None,
    every_column_key: bool = False,
) -> str:
    """The ``SELECT`` of the current-state view over the changelog relation ``changes``.

    ``column_types`` maps every changelog column (metadata included, in table order) to its
    DuckDB type; the view selects the non-metadata columns in that order.

    Semantics:
        * Rows at or before the latest truncate (``_cdc_op = 't'``), by
          ``(_cdc_lsn, _cdc_seq)``, are ignored.
        * Keyed tables: per key, the latest remaining row by ``(_cdc_lsn, _cdc_seq)``; the
          key is dropped unless that row's op is ``c``, ``r`` or ``u`` (so a delete, or a
          key change's ``d`` for the old key, removes it).
        * A column named in the latest row's ``_cdc_unchanged_toast`` shows the value of
          the newest earlier row of that key where the column was *not* so marked, stopping
          at the key's latest delete (a key that was deleted and comes back does not inherit
          values from its previous life); a value that is really NULL stays NULL. This
          applies to every variable-length column, as any of them may be TOASTed by future
          changes.
        * Keyless tables: every ``c``/``r``/``u`` row after the latest truncate, without
          deduplication (an update adds its new image but cannot remove the old one).
        * Tables keyed by every column (``every_column_key``: REPLICA IDENTITY FULL without
          a primary key): a multiset. Identical rows are distinct rows in PostgreSQL, so each
          distinct row appears as many times as it was inserted (or read by a snapshot) less
          the times it was deleted; capture turns every update of such a table into a
          delete and an insert. The merged table is not used for them.
        * ``_cdc_fallback`` (the exact text of values their column type cannot hold) comes
          from each key's latest row, after the source columns.

    With ``merged`` (the relation of ``<table>/current``, written by ``cdc jobs merge``; keyed
    tables only), the same result is computed from the merged rows plus only the changes
    after the merge watermark ``W``:

        * ``W`` is the larger of ``merge_watermark`` (the app-transaction watermark read when
          the view was created) and the largest ``_cdc_lsn`` present in the merged table,
          both taken at LSN granularity. Each is at or below the true watermark, so a stale
          value only re-reads a few changes the merged table already holds: re-applying them
          is idempotent (a merged row and the change that produced it share a position and
          agree on every value the view takes from them). It is never too high, because
          watermarks only grow; the one exception is deleting and rebuilding a merged table
          while a connection is open (refresh the views after that).
        * The filter on ``_cdc_lsn`` reaches the Delta scan: DuckDB does not open the
          changelog files whose log statistics lie below the literal, and skips the row
          groups below the merged table's maximum in the files it opens. The cost follows
          the merged table plus the unmerged tail, not the history; a long-lived connection
          opens more files as the literal ages, until the views are refreshed.
        * A merged row counts as a row that sent every column, at its ``(lsn, seq)``; the
          truncate rule applies to it too (dropped if before the latest truncate after
          ``W``), and the TOAST back-fill of later changes can take its values.
        * Keys without changes after ``W`` come straight from the merged table (one scan,
          no aggregation); only the keys touched after ``W`` go through the per-key
          aggregate together with their merged rows.

    Implementation: one hash aggregate per key, ``arg_max(value, position)``, where the
    position packs ``(_cdc_lsn, _cdc_seq)`` into one HUGEINT (``lsn * 2**64 + seq + 2**63``,
    exact for any int64 pair; only ``lsn = -2**63`` would overflow, and LSNs are never
    negative). The unchanged-TOAST
    back-fill is ``arg_max`` of a one-field struct ``FILTER``-ed to the rows where the column
    was sent: "last value IGNORE NULLS" as an aggregate, with the struct keeping a real NULL
    distinct from "not sent". An aggregate keeps one state per key, where the equivalent
    window function (``first_value(... IGNORE NULLS) OVER (PARTITION BY key ORDER BY lsn
    DESC, seq DESC)``) sorts and buffers every changelog row with all its columns. Measured
    on 2 threads: 1M changes over 100k keys, aggregate ~190 ms vs window ~340 ms; 300k
    updates with 2 KB TOAST-sized values under a 300 MB memory limit, ~220 ms vs ~1350 ms
    (the window spills). The window wins only for insert-only logs (1M distinct keys:
    ~300 ms vs ~170 ms), where the current state is the changelog anyway.

    Limitation: the back-fill looks only at earlier rows *of the same key*. When an UPDATE
    changes the key and leaves a TOASTed column untouched, PostgreSQL marks that column
    unchanged in the new key's ``c`` row, whose earlier value lives under the old key; the
    view then shows NULL for it until the column is next written.

    Example:
        >>> sql = current_view_sql('"s"."t_changes"', {"id": "BIGINT", "_cdc_op": "VARCHAR",
        ...     "_cdc_lsn": "BIGINT", "_cdc_seq": "BIGINT"}, ["id"])
        >>> "GROUP BY" in sql
        True
    """
    metadata = set(lake_layout.METADATA_COLUMNS)
    source_columns = [c for c in column_types if c not in metadata]
    fallback = lake_layout.FALLBACK if lake_layout.FALLBACK in column_types else None
    # The fallback map travels like a column of the latest row (never back-filled).
    row_columns = [*source_columns, *([fallback] if fallback else [])]
    op, lsn, seq = (quote_ident(c) for c in (lake_layout.OP, lake_layout.LSN, lake_layout.SEQ))
    has_toast_list = lake_layout.UNCHANGED_TOAST in column_types
    if every_column_key:
        merged = None

    def position(alias: str) -> str:
        # One HUGEINT sort key instead of a (lsn, seq) struct: arg_max over a plain integer
        # is markedly cheaper than over a struct. seq is offset by 2**63 so that it fills
        # the low 64 bits as an unsigned value and cannot borrow from lsn.
        return (
            f"({alias}{lsn}::HUGEINT * 18446744073709551616::HUGEINT"
            f" + ({alias}{seq}::HUGEINT + 9223372036854775808::HUGEINT))"
        )

    untouched = ""
    if merged is not None and key_columns:
        live, untouched = _merged_live_sql(
            changes,
            merged,
            source_columns=row_columns,
            column_types=column_types,
            merged_types=merged_types or {},
            key_columns=key_columns,
            watermark_lsn=merge_watermark[0] if merge_watermark else _MIN_BIGINT,
            position=position,
            has_toast_list=has_toast_list,
        )
    else:
        # The latest truncate; max() over no rows still yields one row (NULL), so the cross
        # join below never drops rows when there was no truncate.
        live = (
            "WITH _cdc_last_truncate AS (\n"
            f"  SELECT max({position('')}) AS pos\n"
            f"  FROM {changes} WHERE {op} = 't'\n"
            "),\n"
            "_cdc_live AS (\n"
            f"  SELECT c.*, {position('c.')} AS _cdc_pos\n"
            f"  FROM {changes} AS c, _cdc_last_truncate AS t\n"
            f"  WHERE c.{op} <> 't' AND (t.pos IS NULL OR {position('c.')} > t.pos)\n"
            ")\n"
        )

    if not key_columns:
        select = ", ".join(quote_ident(c) for c in row_columns)
        return f"{live}SELECT {select} FROM _cdc_live WHERE {op} IN ('c', 'r', 'u')"
    if every_column_key:
        # Grouped by the latest shape's columns: a dropped column's NULLs in later rows must
        # not keep a delete from meeting the insert it undoes.
        cols = ", ".join(quote_ident(c) for c in source_columns if c in key_columns)
        extra = (
            f", any_value({quote_ident(fallback)}) AS {quote_ident(fallback)}" if fallback else ""
        )
        out = cols + (f", {quote_ident(fallback)}" if fallback else "")
        return (
            f"{live}SELECT {out} FROM (\n"
            f"  SELECT {cols}{extra},\n"
            f"    unnest(range(sum(CASE WHEN {op} = 'd' THEN -1 ELSE 1 END)::BIGINT)) AS _cdc_copy\n"
            f"  FROM _cdc_live GROUP BY {cols}\n"
            ")"
        )

    # Struct field names are generated (f0, f1, ...) so that source column names never need
    # to be valid struct keys; aliases start with _cdc_ (reserved for metadata) so they
    # cannot clash with key columns.
    fixed_fields = [f"'op': {op}"]
    aggregates: list[str] = []
    projections: list[str] = []
    for i, name in enumerate(row_columns):
        col = quote_ident(name)
        if name in key_columns:
            projections.append(col)
        elif has_toast_list and name != fallback and toastable(column_types[name]):
            # A delete counts as sending NULL for every column: the back-fill stops at the
            # key's latest delete instead of reaching into its previous life (and the
            # merged table, which keeps no deleted keys, then agrees with the changelog).
            sent = (
                f"{op} = 'd' OR NOT list_contains(coalesce("
                f"{quote_ident(lake_layout.UNCHANGED_TOAST)}, []), {quote_literal(name)})"
            )
            alias = f"_cdc_t{i}"
            aggregates.append(
                f"arg_max({{'v': CASE WHEN {op} = 'd' THEN NULL ELSE {col} END}}, _cdc_pos) "
                f"FILTER (WHERE {sent}) AS {alias}"
            )
            projections.append(f"{alias}.v AS {col}")
        else:
            fixed_fields.append(f"'f{i}': {col}")
            projections.append(f"_cdc_latest.f{i} AS {col}")
    keys = ", ".join(quote_ident(k) for k in key_columns)
    aggregate_list = ",\n    ".join(
        [f"arg_max({{{', '.join(fixed_fields)}}}, _cdc_pos) AS _cdc_latest", *aggregates]
    )
    return (
        f"{live}, _cdc_per_key AS (\n"
        f"  SELECT {keys},\n    {aggregate_list}\n"
        f"  FROM _cdc_live GROUP BY {keys}\n"
        ")\n"
        f"SELECT {', '.join(projections)}\n"
        "FROM _cdc_per_key WHERE _cdc_latest.op IN ('c', 'r', 'u')"
        f"{untouched}"
    )


def _merged_live_sql(
    changes: str,
    merged: str,
    *,
    source_columns: Sequence[str],
    column_types: dict[str, str],
    merged_types: dict[str, str],
    key_columns: Sequence[str],
    watermark_lsn: int,
    position: Callable[[str], str],
    has_toast_list: bool,
) -> tuple[str, str]:
    """The ``_cdc_live`` CTEs of the merged form of the view, and its closing ``UNION ALL``
    of the untouched merged rows. See :func:`current_view_sql`."""
    op, lsn, seq = (quote_ident(c) for c in (lake_layout.OP, lake_layout.LSN, lake_layout.SEQ))
    toast = quote_ident(lake_layout.UNCHANGED_TOAST)

    def merged_column(name: str) -> str:
        # A column added to the source after the last merge is NULL in the merged rows, as
        # it is in the changelog rows written before it existed.
        col = quote_ident(name)
        wanted = column_types[name]
        have = merged_types.get(name)
        if have is None:
            return f"NULL::{wanted} AS {col}"
        if have != wanted:
            return f"CAST(m.{col} AS {wanted}) AS {col}"
        return f"m.{col}"

    columns = ", ".join(quote_ident(c) for c in source_columns)
    merged_columns = ", ".join(merged_column(c) for c in source_columns)
    keys = ", ".join(quote_ident(k) for k in key_columns)
    # IS NOT DISTINCT FROM: under REPLICA IDENTITY FULL every column is a key column, and
    # NULL keys must meet their merged row like GROUP BY groups them.
    on = " AND ".join(
        f"m.{quote_ident(k)} IS NOT DISTINCT FROM k.{quote_ident(k)}" for k in key_columns
    )
    unchanged = f", {toast}" if has_toast_list else ""
    merged_unchanged = f", NULL::VARCHAR[] AS {toast}" if has_toast_list else ""
    live = (
        # Only the changes from the watermark's LSN on. The literal is a filter DuckDB hands
        # to the Delta scan before planning: files whose log statistics lie below it are
        # never opened, and row groups below it are skipped in the files that are. (A
        # subquery on the merged table's max(_cdc_lsn) would follow merges made after the
        # view was created, but costs a second Delta log replay of the merged table on
        # every query, and only prunes row groups, not files.)
        "WITH _cdc_new AS (\n"
        f"  SELECT c.*, {position('c.')} AS _cdc_pos FROM {changes} AS c\n"
        f"  WHERE c.{lsn} >= ({watermark_lsn})::BIGINT\n"
        "),\n"
        # The latest truncate after the watermark, as (lsn, seq) BIGINTs for the merged
        # rows (cheaper than a HUGEINT per merged row); the smallest BIGINT when none.
        "_cdc_last_truncate AS (\n"
        "  SELECT max(_cdc_pos) AS pos,\n"
        f"    coalesce(arg_max({lsn}, _cdc_pos), ({_MIN_BIGINT})::BIGINT) AS lsn,\n"
        f"    coalesce(arg_max({seq}, _cdc_pos), ({_MIN_BIGINT})::BIGINT) AS seq\n"
        f"  FROM _cdc_new WHERE {op} = 't'\n"
        "),\n"
        "_cdc_touched AS (\n"
        f"  SELECT DISTINCT {keys}, true AS _cdc_mark FROM _cdc_new WHERE {op} <> 't'\n"
        "),\n"
        # One scan of the merged table, split below into the keys touched after the
        # watermark (aggregated with their changes) and the rest (returned as they are).
        "_cdc_merged AS MATERIALIZED (\n"
        f"  SELECT {merged_columns}, m.{lsn}, m.{seq},\n"
        "    k._cdc_mark IS NOT NULL AS _cdc_touched\n"
        f"  FROM {merged} AS m CROSS JOIN _cdc_last_truncate AS t\n"
        f"  LEFT JOIN _cdc_touched AS k ON {on}\n"
        f"  WHERE m.{lsn} > t.lsn OR (m.{lsn} = t.lsn AND m.{seq} > t.seq)\n"
        "),\n"
        "_cdc_live AS (\n"
        f"  SELECT {columns}, {op}{unchanged}, _cdc_pos\n"
        "  FROM _cdc_new, _cdc_last_truncate AS t\n"
        f"  WHERE {op} <> 't' AND (t.pos IS NULL OR _cdc_pos > t.pos)\n"
        "  UNION ALL\n"
        f"  SELECT {columns}, 'u'{merged_unchanged}, {position('')}\n"
        "  FROM _cdc_merged WHERE _cdc_touched\n"
        ")\n"
    )
    untouched = f"\nUNION ALL\nSELECT {columns} FROM _cdc_merged WHERE NOT _cdc_touched"
    return live, untouched


def toastable(duckdb_type: str) -> bool:
    """Whether a column of this DuckDB type can hold an unchanged-TOAST value.

    PostgreSQL never TOASTs a fixed-length datum, so only variable-length columns (text,
    bytea, arrays, json, numeric...) need the back-fill. ``cdc jobs merge`` uses the same
    rule, so the merged table and the view agree.

    Example:
        >>> toastable("VARCHAR"), toastable("BIGINT"), toastable("DECIMAL(10,2)")
        (True, False, True)
    """
    return duckdb_type.upper() not in _FIXED_WIDTH_TYPES


def _with_merged_table(
    con: duckdb.DuckDBPyConnection,
    info: ViewInfo,
    lake: str,
    *,
    storage_options: dict[str, str] | None,
) -> tuple[ViewInfo, dict[str, str] | None]:
    """``info`` with the merged table and its watermark, plus the merged table's column
    types; ``(info, None)`` when the table has no merged table yet."""
    uri = _scan_uri(lake, info.qualified_name, "current")
    try:
        if not DeltaTable.is_deltatable(uri, storage_options=storage_options):
            return info, None
    except (DeltaError, OSError) as exc:
        raise TransientCatalogError(f"cannot read the Delta log of {uri}: {exc}") from exc
    watermark = merge_watermark(uri, storage_options=storage_options)
    described = con.execute(f"DESCRIBE SELECT * FROM delta_scan({quote_literal(uri)})").fetchall()
    types = {str(row[0]): str(row[1]) for row in described}
    missing = [k for k in (*info.key_columns, lake_layout.LSN, lake_layout.SEQ) if k not in types]
    if missing:
        raise TerminalCatalogError(
            f"{info.qualified_name}: the merged table {uri} lacks the columns {missing}; "
            "it was not written by `cdc jobs merge` for the current key. Delete it and run "
            "the merge again"
        )
    return replace(info, current_uri=uri, merge_watermark=watermark), types


def _scan_uri(lake: str, qualified_name: str, which: str = "changes") -> str:
    # DuckDB resolves relative paths against its own working directory at query time; an
    # absolute path keeps the views valid if the process changes directory.
    if "://" not in lake:
        lake = os.path.abspath(os.path.expanduser(lake))
    if which == "current":
        return lake_layout.current_uri(lake, qualified_name)
    return lake_layout.changes_uri(lake, qualified_name)


def _check_collisions(infos: Sequence[ViewInfo]) -> None:
    # DuckDB resolves identifiers case-insensitively, so compare folded names.
    owners: dict[tuple[str, str], str] = {}
    for info in infos:
        for view in (info.table, info.table + CHANGES_SUFFIX):
            slot = (info.schema.casefold(), view.casefold())
            other = owners.get(slot)
            if other is not None and other != info.qualified_name:
                raise TerminalCatalogError(
                    f"tables {other} and {info.qualified_name} both need the DuckDB view "
                    f"{info.schema}.{view} (DuckDB names are case-insensitive); pass "
                    "tables=[...] to choose which to register"
                )
            owners[slot] = info.qualified_name
