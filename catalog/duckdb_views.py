"""DuckDB connections that expose the lake's changelog tables as views.

For every changelog table ``<lake>/<schema>.<table>/changes`` (a Delta table), the connection
gets a DuckDB schema named after the source schema holding these views and table macros:

``<schema>.<table>_changes``
    The changelog itself: every landed change with all metadata columns.

``<schema>.<table>``
    The current state of the source table, computed from the changelog on every query; once
    ``cdc jobs merge`` has folded history into ``<table>/current``, from that merged table
    plus only the changes after its watermark.

``<schema>.<table>_as_of(ts)`` and ``<schema>.<table>_as_of_lsn(lsn)``
    Table macros: the state as of commit time ``ts`` (TIMESTAMPTZ; a string is read in the
    session's ``TimeZone``) or commit LSN ``lsn`` (BIGINT): every change committed at or
    before it, deletes and truncates applied, unchanged TOAST filled. Exact from the
    retention horizon on; before it they fail with an error naming the horizon.

``<schema>.<table>_history``
    Keyed tables only: one row per version of each row (SCD type 2), the table's columns
    then ``_valid_from``, ``_valid_to`` (NULL for the live version, the delete's commit
    time for a deleted row), ``_cdc_op`` and ``_cdc_lsn``.

All of them are built from :mod:`catalog.current_state`.

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
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow.fs as pafs
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError, TableNotFoundError

from catalog import lake_layout
from catalog.column_lineage import current_columns
from catalog.current_state import (
    BASE_LSN_APP_ID,
    BASE_SEQ_APP_ID,
    HISTORY_COLUMNS,
    HORIZON_APP_ID,
    MERGE_LSN_APP_ID,
    MERGE_SEQ_APP_ID,
    MIN_BIGINT,
    changes_up_to_sql,
    current_state_sql,
    history_sql,
    quote_ident,
    quote_literal,
    toastable,
)
from catalog.errors import DeltaExtensionNotFoundError, TerminalCatalogError, TransientCatalogError
from catalog.schema_registry import SchemaRegistry
from cdc.core.table_schema import TableSchema

__all__ = [
    "MERGE_LSN_APP_ID",
    "MERGE_SEQ_APP_ID",
    "ViewInfo",
    "connect",
    "delta_extension_path",
    "discover_tables",
    "merge_watermark",
    "open_duckdb",
    "quote_ident",
    "quote_literal",
    "register_views",
    "retention_base",
    "toastable",
]

_log = logging.getLogger(__name__)

#: Suffix of the changelog view's name: ``<table>_changes``.
CHANGES_SUFFIX = "_changes"
#: Suffixes of the time-travel macros and the row-history view.
AS_OF_SUFFIX = "_as_of"
AS_OF_LSN_SUFFIX = "_as_of_lsn"
HISTORY_SUFFIX = "_history"

_WHEEL = "duckdb-extension-delta"


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
    version = duckdb.__version__
    pin = f"pip install 'duckdb=={version}' '{_WHEEL}=={version}'"
    spec = importlib.util.find_spec("duckdb_extension_delta")
    if spec is None or not spec.submodule_search_locations:
        raise DeltaExtensionNotFoundError(
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
    raise DeltaExtensionNotFoundError(
        f"the installed {_WHEEL} wheel ships the delta extension for {built_for}, but DuckDB "
        f"is {version}. Pin both to the same version: {pin}"
    )


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
    #: The retention base (``<table>/base``), its watermark and the retention horizon, when
    #: ``cdc jobs retention`` has dropped changes; read when the views were created.
    base_uri: str | None = None
    base_watermark: tuple[int, int] | None = None
    horizon: datetime | None = None
    #: Whether the ``<table>_history`` view exists (keyed tables not keyed by every column).
    has_history: bool = False

    @property
    def current_view(self) -> str:
        """Quoted ``"schema"."table"``: the current-state view."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.table)}"

    @property
    def changes_view(self) -> str:
        """Quoted ``"schema"."table_changes"``: the changelog view."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.table + CHANGES_SUFFIX)}"

    @property
    def as_of_macro(self) -> str:
        """Quoted ``"schema"."table_as_of"``: the time-travel table macro (a commit time)."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.table + AS_OF_SUFFIX)}"

    @property
    def as_of_lsn_macro(self) -> str:
        """Quoted ``"schema"."table_as_of_lsn"``: the time-travel table macro (an LSN)."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.table + AS_OF_LSN_SUFFIX)}"

    @property
    def history_view(self) -> str:
        """Quoted ``"schema"."table_history"``: the row-history (SCD2) view."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.table + HISTORY_SUFFIX)}"


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
    (the current state; see :func:`catalog.current_state.current_state_sql`), the time-travel
    macros ``schema.table_as_of(ts)`` and ``schema.table_as_of_lsn(lsn)`` and, for keyed
    tables, the history view ``schema.table_history`` (see the module docstring), and puts
    every source schema on the ``search_path`` after ``main`` so unqualified names work.

    Every query re-reads the Delta log, so the views see commits made after ``connect``.
    Tables *created* after ``connect`` (and columns added to a table) appear only after
    :func:`register_views` runs again (``Lake.refresh()``).

    Hazards:
        * The time-travel macros check the retention horizon read when they were created;
          after ``cdc jobs retention`` moves it, refresh (``Lake.current(as_of=...)``
          re-reads it itself), or a moment between the old and the new horizon reads an
          incomplete state.
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
        * Object-store lakes need DuckDB credentials for the delta extension (a DuckDB
          secret); ``storage_options`` is only used to list tables and read the registry.

    Args:
        lake: lake root, a local path or an object-store URI.
        database: DuckDB database file, or ``":memory:"``. Views in a file database persist,
            but reopening it still needs this function (or ``LOAD``) for the extension.
        tables: register only these qualified names (default: every changelog table).
        storage_options: deltalake-style options for listing the lake and the registry.

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
        DeltaExtensionNotFoundError: the delta extension wheel is missing, mismatched, or does
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
        raise DeltaExtensionNotFoundError(
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
    merged_types: dict[str, dict[str, str]] = {}
    base_types: dict[str, dict[str, str]] = {}
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
                info, types_of_base = _with_base(con, info, lake, storage_options=storage_options)
                if types_of_base is not None:
                    base_types[qualified_name] = types_of_base
                versions = shapes[qualified_name]
                every_column_key = bool(versions) and set(keys) == set(versions[-1].column_names)
                info = replace(info, has_history=not every_column_key)
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
            every_column_key = bool(versions) and set(info.key_columns) == set(
                versions[-1].column_names
            )
            state = current_state_sql(
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
                every_column_key=every_column_key,
            )
            con.execute(
                f"CREATE OR REPLACE VIEW {info.current_view} AS {_current_columns(state, types, versions)}"
            )
            _create_time_travel(
                con,
                info,
                types,
                versions,
                base_types=base_types.get(info.qualified_name),
                every_column_key=every_column_key,
            )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise

    schemas = sorted({info.schema for info in infos} - {"main"})
    search_path = ",".join(quote_ident(s) for s in ["main", *schemas])
    con.execute(f"SET search_path = {quote_literal(search_path)}")
    return infos


def _current_columns(
    state_sql: str,
    types: dict[str, str],
    versions: list[TableSchema],
    extra: Sequence[str] = (),
) -> str:
    """``state_sql`` narrowed to the table's columns of today: dropped columns left out,
    renamed ones shown once under their new name (see :mod:`catalog.column_lineage`);
    ``extra`` columns of ``state_sql`` are kept at the end."""
    metadata = set(lake_layout.METADATA_COLUMNS)
    source = [c for c in types if c not in metadata]
    lineages = current_columns(versions, source)
    if [(lin.name, lin.sources) for lin in lineages] == [(c, (c,)) for c in source]:
        return state_sql
    columns = [lin.sql() for lin in lineages]
    if lake_layout.FALLBACK in types:
        columns.append(quote_ident(lake_layout.FALLBACK))
    columns += [quote_ident(c) for c in extra]
    return f"SELECT {', '.join(columns)} FROM ({state_sql}) AS _cdc_state"


def _create_time_travel(
    con: duckdb.DuckDBPyConnection,
    info: ViewInfo,
    types: dict[str, str],
    versions: list[TableSchema],
    *,
    base_types: dict[str, str] | None,
    every_column_key: bool,
) -> None:
    """The ``<table>_as_of(ts)`` and ``<table>_as_of_lsn(lsn)`` table macros and, for keyed
    tables, the ``<table>_history`` view; see :func:`connect`."""
    base = f"delta_scan({quote_literal(info.base_uri)})" if info.base_uri else None
    # Macro parameters start with _cdc_ (reserved for metadata) so they never shadow a
    # source column of the same name.
    moment = "_cdc_moment"
    if info.horizon is not None and info.base_watermark is not None:
        horizon = info.horizon.isoformat()
        ts_bound = (
            f"CASE WHEN {moment}::TIMESTAMPTZ < {quote_literal(horizon)}::TIMESTAMPTZ "
            f"THEN error({quote_literal(_before_horizon(info, horizon))} || {moment}::VARCHAR) "
            f"ELSE {moment}::TIMESTAMPTZ END"
        )
        lsn_bound = (
            f"CASE WHEN {moment}::BIGINT < ({info.base_watermark[0]})::BIGINT "
            f"THEN error({quote_literal(_before_horizon(info, horizon))} || {moment}::VARCHAR) "
            f"ELSE {moment}::BIGINT END"
        )
    else:
        ts_bound, lsn_bound = moment, moment
    for macro, bounded in (
        (info.as_of_macro, changes_up_to_sql(info.changes_view, commit_ts=ts_bound)),
        (info.as_of_lsn_macro, changes_up_to_sql(info.changes_view, lsn=lsn_bound)),
    ):
        state = current_state_sql(
            bounded,
            types,
            info.key_columns,
            merged=base,
            merged_types=base_types,
            merge_watermark=info.base_watermark,
            every_column_key=every_column_key,
        )
        con.execute(
            f"CREATE OR REPLACE MACRO {macro}({moment}) AS TABLE "
            f"{_current_columns(state, types, versions)}"
        )
    if info.has_history:
        history = history_sql(
            info.changes_view,
            types,
            info.key_columns,
            base=base,
            base_types=base_types,
            base_watermark=info.base_watermark,
        )
        con.execute(
            f"CREATE OR REPLACE VIEW {info.history_view} AS "
            f"{_current_columns(history, types, versions, HISTORY_COLUMNS)}"
        )


def _before_horizon(info: ViewInfo, horizon: str) -> str:
    assert info.base_watermark is not None
    return (
        f"{info.qualified_name}: time travel reaches back to the retention horizon {horizon} "
        f"(LSN {info.base_watermark[0]}) only; `cdc jobs retention` dropped the changes "
        "before it. Asked for: "
    )


def retention_base(
    base_uri: str, *, storage_options: dict[str, str] | None = None
) -> tuple[tuple[int, int], datetime] | None:
    """The ``(lsn, seq)`` watermark and the horizon (newest commit time folded in) of the
    retention base at ``base_uri``; ``None`` when ``cdc jobs retention`` has dropped nothing
    of the table yet.

    Raises:
        TransientCatalogError: the base exists but its Delta log cannot be read.

    Example:
        >>> retention_base("/data/lake/public.orders/base")  # doctest: +SKIP
        ((23871520, 4), datetime.datetime(2024, 5, 1, 23, 59, 58, tzinfo=datetime.timezone.utc))
    """
    try:
        if not DeltaTable.is_deltatable(base_uri, storage_options=storage_options):
            return None
        dt = DeltaTable(base_uri, storage_options=storage_options)
        lsn = dt.transaction_version(BASE_LSN_APP_ID)
        seq = dt.transaction_version(BASE_SEQ_APP_ID)
        horizon_us = dt.transaction_version(HORIZON_APP_ID)
    except TableNotFoundError:
        return None
    except (DeltaError, OSError) as exc:
        raise TransientCatalogError(f"cannot read the Delta log of {base_uri}: {exc}") from exc
    if lsn is None or horizon_us is None:
        return None
    horizon = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=horizon_us)
    return (lsn, seq if seq is not None else MIN_BIGINT), horizon


def _with_base(
    con: duckdb.DuckDBPyConnection,
    info: ViewInfo,
    lake: str,
    *,
    storage_options: dict[str, str] | None,
) -> tuple[ViewInfo, dict[str, str] | None]:
    """``info`` with the retention base, plus the base's column types; ``(info, None)``
    when retention has not dropped anything of the table yet."""
    uri = _scan_uri(lake, info.qualified_name, lake_layout.BASE_DIR)
    found = retention_base(uri, storage_options=storage_options)
    if found is None:
        return info, None
    watermark, horizon = found
    described = con.execute(f"DESCRIBE SELECT * FROM delta_scan({quote_literal(uri)})").fetchall()
    types = {str(row[0]): str(row[1]) for row in described}
    return replace(info, base_uri=uri, base_watermark=watermark, horizon=horizon), types


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
    return (lsn, seq if seq is not None else MIN_BIGINT)


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
    if which == lake_layout.BASE_DIR:
        return lake_layout.base_uri(lake, qualified_name)
    return lake_layout.changes_uri(lake, qualified_name)


def _check_collisions(infos: Sequence[ViewInfo]) -> None:
    # DuckDB resolves identifiers case-insensitively, so compare folded names.
    owners: dict[tuple[str, str], str] = {}
    for info in infos:
        for view in (info.table, info.table + CHANGES_SUFFIX, info.table + HISTORY_SUFFIX):
            slot = (info.schema.casefold(), view.casefold())
            other = owners.get(slot)
            if other is not None and other != info.qualified_name:
                raise TerminalCatalogError(
                    f"tables {other} and {info.qualified_name} both need the DuckDB view "
                    f"{info.schema}.{view} (DuckDB names are case-insensitive); pass "
                    "tables=[...] to choose which to register"
                )
            owners[slot] = info.qualified_name
