"""The Python API for notebooks: one object to list, query and read the lake's tables.

Example:
    >>> from catalog import Lake
    >>> with Lake("/data/lake") as lake:  # doctest: +SKIP
    ...     lake.sql("SELECT status, count(*) FROM public.orders GROUP BY ALL").show()
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType

import duckdb
import pyarrow as pa

from catalog import lake_layout
from catalog.duckdb_views import (
    ViewInfo,
    discover_tables,
    open_duckdb,
    quote_ident,
    quote_literal,
    register_views,
    retention_base,
)
from catalog.errors import QueryError, TerminalCatalogError
from catalog.freshness import delta_log_facts
from catalog.schema_registry import SchemaRegistry, SchemaVersion
from cdc.core.lsn import parse_lsn

__all__ = ["Lake", "TableInfo"]


@dataclass(frozen=True, slots=True)
class TableInfo:
    """Facts about one changelog table, read from its Delta log.

    ``num_rows`` is the sum of the ``numRecords`` statistics of the live data files, or
    ``None`` if any file was written without statistics. ``last_commit_at`` is the UTC time
    of the newest Delta commit (the sink's write, not the source commit).
    """

    qualified_name: str
    key_columns: tuple[str, ...]
    delta_version: int
    num_files: int
    num_rows: int | None
    last_commit_at: datetime | None


class Lake:
    """A CDC lake: changelog Delta tables, their schema versions, and DuckDB views over them.

    The DuckDB connection is opened on first use (:meth:`sql`, :meth:`current`,
    :meth:`changes`) with the views of :func:`catalog.duckdb_views.connect`; every query sees
    the latest Delta commits. Tables created after that appear after :meth:`refresh`
    (:meth:`current` and :meth:`changes` refresh by themselves when a name is unknown).

    Hazards:
        * The current-state view recomputes from the whole changelog on every query until
          ``cdc jobs merge`` folds history into ``<table>/current``; then it reads the merged
          table plus the changes after the merge watermark as of when the views were built.
          Call :meth:`refresh` now and then on a long-lived ``Lake`` (after merges, and
          always after a table's first merge, before retention drops merged changes).
        * A ``Lake`` holds one DuckDB connection: do not share it between threads.
        * Tables without key columns in the schema registry are keyless: their current
          state keeps every inserted/updated row image.

    Args:
        root: lake root, a local path or an object-store URI.
        storage_options: deltalake-style options (credentials, endpoint) for the store.

    Example:
        >>> lake = Lake("/data/lake")  # doctest: +SKIP
        >>> lake.current("public.orders").num_rows  # doctest: +SKIP
        1042
        >>> lake.close()  # doctest: +SKIP
    """

    def __init__(self, root: str, *, storage_options: dict[str, str] | None = None) -> None:
        # Absolute local path: deltalake and DuckDB would otherwise each resolve a relative
        # path against the working directory at the time they run.
        self._root = root if "://" in root else os.path.abspath(os.path.expanduser(root))
        self._storage_options = dict(storage_options) if storage_options else None
        self._registry = SchemaRegistry(self._root, storage_options=self._storage_options)
        self._con: duckdb.DuckDBPyConnection | None = None
        self._views: dict[str, ViewInfo] = {}

    @property
    def root(self) -> str:
        return self._root

    @property
    def registry(self) -> SchemaRegistry:
        """The lake's embedded schema registry."""
        return self._registry

    @property
    def connection(self) -> duckdb.DuckDBPyConnection:
        """The DuckDB connection with the views, opened on first access.

        Example:
            >>> lake.connection.sql("SHOW ALL TABLES").fetchall()  # doctest: +SKIP
        """
        if self._con is None:
            con = open_duckdb(lake=self._root, storage_options=self._storage_options)
            try:
                self._views = {
                    v.qualified_name: v
                    for v in register_views(
                        con,
                        self._root,
                        storage_options=self._storage_options,
                        registry=self._registry,
                    )
                }
            except BaseException:
                con.close()
                raise
            self._con = con
        return self._con

    def refresh(self) -> None:
        """Re-discover tables and rebuild the views (new tables, new columns).

        Example:
            >>> lake.refresh()  # doctest: +SKIP
        """
        if self._con is None:
            self.connection  # noqa: B018 -- opening registers every table already
            return
        self._views = {
            v.qualified_name: v
            for v in register_views(
                self._con,
                self._root,
                storage_options=self._storage_options,
                registry=self._registry,
            )
        }

    def sql(self, query: str) -> duckdb.DuckDBPyRelation:
        """Run ``query`` on the lake's DuckDB connection; returns a lazy relation.

        Source schemas are on the search path, so ``orders`` works for ``public.orders``
        when no other schema has an ``orders``.

        Example:
            >>> deletes = lake.sql("SELECT * FROM orders_changes WHERE _cdc_op = 'd'")  # doctest: +SKIP
            >>> deletes.to_arrow_table().num_rows  # doctest: +SKIP
            3
        """
        try:
            return self.connection.sql(query)
        except duckdb.Error as e:
            raise QueryError(f"query failed: {e}") from e

    def query(self, query: str, *, limit: int | None = None) -> pa.Table:
        """Run ``query`` and return at most ``limit`` rows of its result as Arrow.

        Unlike :meth:`sql`, runs the query now, so errors at execution time also surface
        here, as :class:`QueryError`.

        Example:
            >>> lake.query("SELECT count(*) AS n FROM orders").to_pylist()  # doctest: +SKIP
            [{'n': 944}]
        """
        relation = self.sql(query)
        if relation is None:  # a statement with no result, e.g. SET
            return pa.table({})
        try:
            if limit is not None:
                relation = relation.limit(limit)
            return relation.to_arrow_table()
        except duckdb.Error as e:
            raise QueryError(f"query failed: {e}") from e

    def tables(self) -> list[TableInfo]:
        """Every changelog table in the lake, with facts from its Delta log.

        Reads each table's Delta log (not its data files), independent of DuckDB.

        Example:
            >>> [(t.qualified_name, t.num_rows) for t in lake.tables()]  # doctest: +SKIP
            [('public.orders', 52311)]
        """
        infos: list[TableInfo] = []
        for name in discover_tables(self._root, storage_options=self._storage_options):
            registered = self._registry.latest(name)
            infos.append(self._table_info(name, registered.key_columns if registered else ()))
        return infos

    def current(self, table: str, *, as_of: datetime | int | str | None = None) -> pa.Table:
        """The state of ``table`` (``schema.table``) as an Arrow table: now, or as of a past
        moment.

        ``as_of`` is a commit time (a ``datetime``; naive means UTC; or an ISO-8601 string)
        or a commit LSN (an ``int``, or PostgreSQL's ``'16/B374D848'`` text form): the state
        after every transaction committed at or before it, from the changelog (the
        ``<table>_as_of`` / ``<table>_as_of_lsn`` macros). Exact from the retention horizon
        on, after compactions and merges alike.

        Raises:
            TerminalCatalogError: ``as_of`` lies before the retention horizon (the message
                names it), or is not a time or an LSN.

        Example:
            >>> lake.current("public.orders").to_pylist()[:1]  # doctest: +SKIP
            [{'id': 1, 'status': 'shipped'}]
            >>> lake.current("public.orders", as_of="2024-05-01T12:00:00Z").num_rows  # doctest: +SKIP
            977
        """
        if as_of is None:
            return self.sql(f"SELECT * FROM {self._view(table).current_view}").to_arrow_table()
        moment = _moment(as_of)
        view = self._view(table)
        # The horizon moves when retention runs; the macros know the one of their creation.
        fresh = retention_base(
            lake_layout.base_uri(self._root, view.qualified_name),
            storage_options=self._storage_options,
        )
        if (fresh[1] if fresh else None) != view.horizon:
            self.refresh()
            view = self._view(table)
        if view.horizon is not None and view.base_watermark is not None:
            too_early = (
                moment < view.base_watermark[0]
                if isinstance(moment, int)
                else moment < view.horizon
            )
            if too_early:
                raise TerminalCatalogError(
                    f"{view.qualified_name}: time travel reaches back to the retention "
                    f"horizon {view.horizon.isoformat()} (LSN {view.base_watermark[0]}) only; "
                    f"`cdc jobs retention` dropped the changes before it. Asked for: {as_of}"
                )
        if isinstance(moment, int):
            query = f"SELECT * FROM {view.as_of_lsn_macro}(({moment})::BIGINT)"
        else:
            query = (
                f"SELECT * FROM {view.as_of_macro}"
                f"({quote_literal(moment.isoformat())}::TIMESTAMPTZ)"
            )
        return self.query(query)

    def history(self, table: str) -> pa.Table:
        """Every version of every row of ``table`` (the ``<table>_history`` view, SCD type 2):
        the row's columns, ``_valid_from`` and ``_valid_to`` (commit times; ``_valid_to`` is
        NULL for the live version and the delete's commit time for a deleted row),
        ``_cdc_op`` and ``_cdc_lsn``, ordered by ``_cdc_lsn``. Keyed tables only.

        Example:
            >>> lake.history("public.products").column("_valid_to").null_count  # doctest: +SKIP
            120
        """
        view = self._view(table)
        if not view.has_history:
            raise TerminalCatalogError(
                f"{view.qualified_name} has no history view: rows of a table without a "
                "primary key or replica identity (or keyed by every column) have no identity "
                "to follow through versions"
            )
        return self.query(f"SELECT * FROM {view.history_view} ORDER BY _cdc_lsn, _valid_from")

    def changes(self, table: str) -> pa.Table:
        """Every change of ``table``, ordered by ``(_cdc_lsn, _cdc_seq)``.

        Reads the whole changelog into memory; for large tables filter with :meth:`sql`
        (e.g. on the ``_cdc_date`` partition column) instead.

        Example:
            >>> lake.changes("public.orders").column("_cdc_op").to_pylist()  # doctest: +SKIP
            ['c', 'u', 'd']
        """
        view = self._view(table)
        order = f"{quote_ident(lake_layout.LSN)}, {quote_ident(lake_layout.SEQ)}"
        return self.sql(f"SELECT * FROM {view.changes_view} ORDER BY {order}").to_arrow_table()

    def schema_versions(self, table: str) -> list[SchemaVersion]:
        """The registered versions of ``table``'s shape, oldest first (empty if none).

        Example:
            >>> [v.version for v in lake.schema_versions("public.orders")]  # doctest: +SKIP
            [1, 2]
        """
        return self._registry.versions(table)

    def close(self) -> None:
        """Close the DuckDB connection (a later query opens a new one).

        Example:
            >>> lake.close()  # doctest: +SKIP
        """
        if self._con is not None:
            self._con.close()
            self._con = None
            self._views = {}

    def __enter__(self) -> Lake:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Lake({self._root!r})"

    # -- helpers --------------------------------------------------------------------------

    def _view(self, table: str) -> ViewInfo:
        self.connection  # noqa: B018 -- ensures the views exist
        if table not in self._views:
            self.refresh()  # the table may have been created since the views were built
        view = self._views.get(table)
        if view is None:
            raise TerminalCatalogError(
                f"no changelog table {table!r} in {self._root}; tables are named "
                f"'schema.table' (found: {', '.join(sorted(self._views)) or 'none'})"
            )
        return view

    def _table_info(self, name: str, key_columns: tuple[str, ...]) -> TableInfo:
        facts = delta_log_facts(
            lake_layout.changes_uri(self._root, name), storage_options=self._storage_options
        )
        return TableInfo(
            qualified_name=name,
            key_columns=key_columns,
            delta_version=facts.table.version(),
            num_files=facts.files,
            num_rows=facts.rows,
            last_commit_at=facts.last_write_at,
        )


def _moment(as_of: datetime | int | str) -> datetime | int:
    """``as_of`` as a UTC datetime or an LSN."""
    if isinstance(as_of, bool):
        raise TerminalCatalogError(f"as_of must be a time or an LSN, not {as_of!r}")
    if isinstance(as_of, int):
        return as_of
    if isinstance(as_of, datetime):
        return as_of if as_of.tzinfo is not None else as_of.replace(tzinfo=UTC)
    if isinstance(as_of, str):
        if "/" in as_of:
            try:
                return parse_lsn(as_of)
            except ValueError as e:
                raise TerminalCatalogError(f"as_of {as_of!r} is not an LSN: {e}") from e
        try:
            return _moment(datetime.fromisoformat(as_of))
        except ValueError as e:
            raise TerminalCatalogError(
                f"as_of {as_of!r} is neither an ISO-8601 time nor an LSN like '16/B374D848'"
            ) from e
    raise TerminalCatalogError(f"as_of must be a time or an LSN, not {as_of!r}")
