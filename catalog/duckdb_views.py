"""DuckDB connections that expose the lake's changelog tables as views.

For every changelog table ``<lake>/<schema>.<table>/changes`` (a Delta table), the connection
gets a DuckDB schema named after the source schema holding two views:

``<schema>.<table>_changes``
    The changelog itself: every landed change with all metadata columns.

``<schema>.<table>``
    The current state of the source table, computed from the changelog on every query.

The delta extension is loaded from the ``duckdb-extension-delta`` wheel by file path: no
network access is needed, and none is attempted (extension autoload/autoinstall are off).

Example:
    >>> con = connect("/data/lake")  # doctest: +SKIP
    >>> con.sql("SELECT count(*) FROM public.orders").fetchone()  # doctest: +SKIP
    (1042,)
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow.fs as pafs

from catalog import lake_layout
from catalog.errors import DeltaExtensionNotFound, TerminalCatalogError, TransientCatalogError
from catalog.schema_registry import SchemaRegistry

__all__ = [
    "ViewInfo",
    "connect",
    "current_view_sql",
    "delta_extension_path",
    "discover_tables",
    "open_duckdb",
    "quote_ident",
    "quote_literal",
    "register_views",
]

_log = logging.getLogger(__name__)

#: Suffix of the changelog view's name: ``<table>_changes``.
CHANGES_SUFFIX = "_changes"

_WHEEL = "duckdb-extension-delta"

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
        DeltaExtensionNotFound: the wheel is missing, or built for another DuckDB version.

    Example:
        >>> delta_extension_path().name  # doctest: +SKIP
        'delta.duckdb_extension'
    """
    version = duckdb.__version__
    pin = f"pip install 'duckdb=={version}' '{_WHEEL}=={version}'"
    spec = importlib.util.find_spec("duckdb_extension_delta")
    if spec is None or not spec.submodule_search_locations:
        raise DeltaExtensionNotFound(
            f"the {_WHEEL} wheel is not installed; DuckDB {version} cannot download the "
            f"delta extension here. Install the wheel matching DuckDB: {pin}"
        )
    available: list[str] = []
    for location in spec.submodule_search_locations:
        extensions = Path(location) / "extensions"
        candidate = extensions / f"v{version}" / "delta.duckdb_extension"
        if candidate.is_file():
            return candidate
        if extensions.is_dir():
            available.extend(p.name for p in extensions.iterdir())
    built_for = ", ".join(sorted(available)) or "no DuckDB version"
    raise DeltaExtensionNotFound(
        f"the installed {_WHEEL} wheel ships the delta extension for {built_for}, but DuckDB "
        f"is {version}. Pin both to the same version: {pin}"
    )


@dataclass(frozen=True, slots=True)
class ViewInfo:
    """The two views registered for one changelog table.

    ``key_columns`` is empty for a keyless table (or one missing from the schema registry).
    """

    qualified_name: str
    schema: str
    table: str
    changes_uri: str
    key_columns: tuple[str, ...]

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
        * The current view scans and aggregates the whole changelog on every query: its cost
          grows with history, not with table size. A later job (``cdc jobs merge``) folds
          history into ``<table>/current``; until it exists, filter ``_changes`` by
          ``_cdc_date`` for time-bounded questions.
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
        * Object-store lakes need DuckDB credentials for the delta extension (a DuckDB
          secret); ``storage_options`` is only used to list tables and read the registry.

    Args:
        lake: lake root, a local path or an object-store URI.
        database: DuckDB database file, or ``":memory:"``. Views in a file database persist,
            but reopening it still needs this function (or ``LOAD``) for the extension.
        tables: register only these qualified names (default: every changelog table).
        storage_options: deltalake-style options for listing the lake and the registry.

    Raises:
        DeltaExtensionNotFound: the delta extension wheel is missing or mismatched.
        TerminalCatalogError: a requested table does not exist or lacks its registry key
            columns, or view names collide.
        TransientCatalogError: a requested table cannot be read (other tables that cannot
            be read are skipped with a logged warning).

    Example:
        >>> con = connect("/data/lake", tables=["public.orders"])  # doctest: +SKIP
        >>> con.sql("SELECT * FROM orders WHERE id = 7").fetchall()  # doctest: +SKIP
        [(7, 'shipped')]
    """
    con = open_duckdb(database)
    try:
        register_views(con, lake, tables=tables, storage_options=storage_options)
    except BaseException:
        con.close()
        raise
    return con


def open_duckdb(database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the delta extension loaded from the wheel, and no views.

    Extension autoinstall/autoload are disabled, so DuckDB never tries the network.

    Raises:
        DeltaExtensionNotFound: the delta extension wheel is missing, mismatched, or does
            not load on this platform.

    Example:
        >>> open_duckdb().sql("SELECT 1").fetchone()  # doctest: +SKIP
        (1,)
    """
    extension = delta_extension_path()
    con = duckdb.connect(
        database,
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False},
    )
    try:
        con.execute(f"LOAD {quote_literal(str(extension))}")
    except duckdb.Error as exc:
        con.close()
        raise DeltaExtensionNotFound(
            f"DuckDB {duckdb.__version__} could not load {extension}: {exc}. Reinstall "
            f"'{_WHEEL}=={duckdb.__version__}' for this platform"
        ) from exc
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
    for qualified_name in found:
        registered = registry.latest(qualified_name)
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
        except (duckdb.Error, TerminalCatalogError) as exc:
            if tables is not None:  # explicitly asked for: fail loudly
                if isinstance(exc, TerminalCatalogError):
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
            con.execute(
                f"CREATE OR REPLACE VIEW {info.current_view} AS "
                + current_view_sql(
                    info.changes_view, column_types[info.qualified_name], info.key_columns
                )
            )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise

    schemas = sorted({info.schema for info in infos} - {"main"})
    search_path = ",".join(quote_ident(s) for s in ["main", *schemas])
    con.execute(f"SET search_path = {quote_literal(search_path)}")
    return infos


def current_view_sql(changes: str, column_types: dict[str, str], key_columns: Sequence[str]) -> str:
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
          the newest earlier row of that key where the column was *not* so marked; a value
          that is really NULL stays NULL. This applies to every variable-length column, as
          any of them may be TOASTed by future changes.
        * Keyless tables: every ``c``/``r``/``u`` row after the latest truncate, without
          deduplication (an update adds its new image but cannot remove the old one).

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
    op, lsn, seq = (quote_ident(c) for c in (lake_layout.OP, lake_layout.LSN, lake_layout.SEQ))

    def position(alias: str) -> str:
        # One HUGEINT sort key instead of a (lsn, seq) struct: arg_max over a plain integer
        # is markedly cheaper than over a struct. seq is offset by 2**63 so that it fills
        # the low 64 bits as an unsigned value and cannot borrow from lsn.
        return (
            f"({alias}{lsn}::HUGEINT * 18446744073709551616::HUGEINT"
            f" + ({alias}{seq}::HUGEINT + 9223372036854775808::HUGEINT))"
        )

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
        select = ", ".join(quote_ident(c) for c in source_columns)
        return f"{live}SELECT {select} FROM _cdc_live WHERE {op} IN ('c', 'r', 'u')"

    has_toast_list = lake_layout.UNCHANGED_TOAST in column_types
    # Struct field names are generated (f0, f1, ...) so that source column names never need
    # to be valid struct keys; aliases start with _cdc_ (reserved for metadata) so they
    # cannot clash with key columns.
    fixed_fields = [f"'op': {op}"]
    aggregates: list[str] = []
    projections: list[str] = []
    for i, name in enumerate(source_columns):
        col = quote_ident(name)
        if name in key_columns:
            projections.append(col)
        elif has_toast_list and _toastable(column_types[name]):
            sent = (
                f"NOT list_contains(coalesce({quote_ident(lake_layout.UNCHANGED_TOAST)}, "
                f"[]), {quote_literal(name)})"
            )
            alias = f"_cdc_t{i}"
            aggregates.append(f"arg_max({{'v': {col}}}, _cdc_pos) FILTER (WHERE {sent}) AS {alias}")
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
    )


def _toastable(duckdb_type: str) -> bool:
    return duckdb_type.upper() not in _FIXED_WIDTH_TYPES


def _scan_uri(lake: str, qualified_name: str) -> str:
    # DuckDB resolves relative paths against its own working directory at query time; an
    # absolute path keeps the views valid if the process changes directory.
    if "://" not in lake:
        lake = os.path.abspath(os.path.expanduser(lake))
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
