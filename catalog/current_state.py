"""The current-state SQL: one source of truth for "latest row per key, unchanged TOAST filled,
deletes and truncates applied".

The DuckDB views (:mod:`catalog.duckdb_views`), ``cdc jobs merge`` (:mod:`jobs.merge`), time
travel (``<table>_as_of``) and row history (``<table>_history``) all build their SQL here, so
the merged table, the view before a merge and the view after it cannot drift apart.

Everything here is pure: functions from column names and types to SQL text, testable without
a lake. The SQL reads any relation with the changelog's columns (a ``delta_scan``, a view, an
Arrow dataset registered on a connection, or a parenthesised subquery).

Positions: a change's place in the changelog is ``(_cdc_lsn, _cdc_seq)``. The SQL packs the
pair into one HUGEINT (:func:`position_sql`) because ``arg_max`` over a plain integer is
markedly cheaper than over a struct.

Example:
    >>> sql = current_state_sql('"s"."t_changes"', {"id": "BIGINT", "_cdc_op": "VARCHAR",
    ...     "_cdc_lsn": "BIGINT", "_cdc_seq": "BIGINT"}, ["id"])
    >>> 'GROUP BY "id"' in sql
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from catalog import lake_layout

__all__ = [
    "BASE_LSN_APP_ID",
    "BASE_SEQ_APP_ID",
    "HISTORY_COLUMNS",
    "HORIZON_APP_ID",
    "MERGE_LSN_APP_ID",
    "MERGE_SEQ_APP_ID",
    "MIN_BIGINT",
    "NO_WATERMARK",
    "PARTITIONS_APP_ID",
    "Watermark",
    "batch_stats_sql",
    "changes_up_to_sql",
    "current_state_sql",
    "fold_sql",
    "history_sql",
    "keep_flags",
    "key_match_sql",
    "partition_app_id",
    "position_sql",
    "quote_ident",
    "quote_literal",
    "toastable",
]

#: App-transaction ids under which ``cdc jobs merge`` records, atomically with every commit to
#: a ``<table>/current`` table, the ``(_cdc_lsn, _cdc_seq)`` of the newest change folded in.
MERGE_LSN_APP_ID = "cdc-jobs:merge:lsn"
MERGE_SEQ_APP_ID = "cdc-jobs:merge:seq"

#: App-transaction ids of the retention base ``<table>/base`` (the state as of the newest
#: change ``cdc jobs retention`` dropped): its ``(lsn, seq)`` watermark, and the horizon, the
#: newest commit time folded in, in microseconds since the epoch. Time travel before the
#: horizon is impossible: the changes that would tell are gone.
BASE_LSN_APP_ID = "cdc-jobs:retention:lsn"
BASE_SEQ_APP_ID = "cdc-jobs:retention:seq"
HORIZON_APP_ID = "cdc-jobs:retention:horizon-us"

#: Kafka mode: app-transaction ids the sink workers record in a changelog table with every
#: commit, so that ``cdc jobs merge`` can tell how far the table is complete: the number of
#: partitions of the table's topic, and each partition's ``(lsn, seq)`` mark (the newest
#: position of that partition committed to the table). See :func:`partition_app_id`.
PARTITIONS_APP_ID = "cdc-kafka:partitions"


def partition_app_id(partition: int, kind: str) -> str:
    """The app-transaction id of a Kafka partition's ``lsn`` or ``seq`` mark in its table.

    A partition feeds exactly one table (its topic's), so the partition number names it.

    Example:
        >>> partition_app_id(2, "lsn")
        'cdc-kafka:partition:2:lsn'
    """
    return f"cdc-kafka:partition:{partition}:{kind}"


#: Smallest BIGINT: "no watermark yet" in generated SQL (every LSN is larger). Written as
#: ``(-9223372036854775808)::BIGINT``: without the parentheses ``::`` binds first and the
#: positive literal overflows.
MIN_BIGINT = -(2**63)

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

_KEEP = "_cdc_keep_"  # prefix of the fold's "value not resolved in this batch" flags


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


def toastable(duckdb_type: str) -> bool:
    """Whether a column of this DuckDB type can hold an unchanged-TOAST value.

    PostgreSQL never TOASTs a fixed-length datum, so only variable-length columns (text,
    bytea, arrays, json, numeric...) need the back-fill.

    Example:
        >>> toastable("VARCHAR"), toastable("BIGINT"), toastable("DECIMAL(10,2)")
        (True, False, True)
    """
    return duckdb_type.upper() not in _FIXED_WIDTH_TYPES


def position_sql(alias: str = "") -> str:
    """SQL: the row's ``(_cdc_lsn, _cdc_seq)`` as one HUGEINT that sorts like the pair.

    ``lsn * 2**64 + seq + 2**63``: seq is offset so that it fills the low 64 bits as an
    unsigned value and cannot borrow from lsn; exact for any int64 pair (only
    ``lsn = -2**63`` would overflow, and LSNs are never negative).

    Example:
        >>> "HUGEINT" in position_sql("c.")
        True
    """
    lsn, seq = quote_ident(lake_layout.LSN), quote_ident(lake_layout.SEQ)
    return (
        f"({alias}{lsn}::HUGEINT * 18446744073709551616::HUGEINT"
        f" + ({alias}{seq}::HUGEINT + 9223372036854775808::HUGEINT))"
    )


def key_match_sql(left: str, right: str, key_columns: Sequence[str]) -> str:
    """SQL: the rows ``left`` and ``right`` (aliases) have the same key, NULL matching NULL.

    Every comparison is parenthesised: some SQL parsers (DataFusion's, behind deltalake's
    ``MERGE``) bind ``IS NOT DISTINCT FROM`` looser than ``AND``. ``IS NOT DISTINCT FROM``
    because under REPLICA IDENTITY FULL (or a NULL-able replica-identity index) key columns
    may be NULL, and such keys must meet their row like ``GROUP BY`` groups them.

    Example:
        >>> key_match_sql("t", "s", ["a", "B"])
        '(t."a" IS NOT DISTINCT FROM s."a") AND (t."B" IS NOT DISTINCT FROM s."B")'
    """
    return " AND ".join(
        f"({left}.{quote_ident(k)} IS NOT DISTINCT FROM {right}.{quote_ident(k)})"
        for k in key_columns
    )


@dataclass(frozen=True, slots=True, order=True)
class Watermark:
    """A ``(lsn, seq)`` position in a changelog."""

    lsn: int
    seq: int

    def after_sql(self, alias: str = "") -> str:
        """SQL: the row's ``(_cdc_lsn, _cdc_seq)`` is after this position.

        The first conjunct is a plain range on ``_cdc_lsn`` so that the scan can skip files
        and row groups by their statistics.

        Example:
            >>> Watermark(3, 1).after_sql()
            '"_cdc_lsn" >= (3)::BIGINT AND ("_cdc_lsn" > (3)::BIGINT OR ("_cdc_lsn" = (3)::BIGINT AND "_cdc_seq" > (1)::BIGINT))'
        """
        lsn, seq = (
            f"{alias}{quote_ident(lake_layout.LSN)}",
            f"{alias}{quote_ident(lake_layout.SEQ)}",
        )
        # Parenthesised casts: -9223372036854775808::BIGINT would cast before negating.
        w_lsn, w_seq = f"({self.lsn})::BIGINT", f"({self.seq})::BIGINT"
        return f"{lsn} >= {w_lsn} AND ({lsn} > {w_lsn} OR ({lsn} = {w_lsn} AND {seq} > {w_seq}))"

    def at_or_before_sql(self, alias: str = "") -> str:
        """SQL: the row's ``(_cdc_lsn, _cdc_seq)`` is at or before this position."""
        return f"NOT ({self.after_sql(alias)})"

    def as_list(self) -> list[int] | None:
        """``[lsn, seq]`` for metrics, ``None`` for :data:`NO_WATERMARK`."""
        return None if self == NO_WATERMARK else [self.lsn, self.seq]


#: Before the first merge: sorts before every change.
NO_WATERMARK = Watermark(MIN_BIGINT, MIN_BIGINT)


def _source_columns(column_types: dict[str, str]) -> list[str]:
    metadata = set(lake_layout.METADATA_COLUMNS)
    return [c for c in column_types if c not in metadata]


def _row_columns(column_types: dict[str, str]) -> list[str]:
    """The source columns, then the fallback map when the changelog has one: it travels like
    a column of the latest row (never back-filled)."""
    fallback = [lake_layout.FALLBACK] if lake_layout.FALLBACK in column_types else []
    return [*_source_columns(column_types), *fallback]


def _stored_column(name: str, wanted: str, have: str | None, alias: str) -> str:
    """Column ``name`` of a stored state table (merged table, retention base) as the
    changelog's type ``wanted``: a column added to the source after the table was written
    is NULL there, as it is in the changelog rows written before it existed."""
    col = quote_ident(name)
    if have is None:
        return f"NULL::{wanted} AS {col}"
    if have != wanted:
        return f"CAST({alias}{col} AS {wanted}) AS {col}"
    return f"{alias}{col}"


def _sent_sql(name: str) -> str:
    """SQL: the change sent column ``name`` (it is not in the unchanged-TOAST list). A delete
    counts as sending NULL for every column: the back-fill stops at the key's latest delete
    instead of reaching into its previous life (and the merged table, which keeps no deleted
    keys, then agrees with the changelog)."""
    op = quote_ident(lake_layout.OP)
    return (
        f"{op} = 'd' OR NOT list_contains(coalesce("
        f"{quote_ident(lake_layout.UNCHANGED_TOAST)}, []), {quote_literal(name)})"
    )


def _sent_value_sql(name: str) -> str:
    """The one-field struct of a sent value: a real NULL stays distinct from "not sent"."""
    op = quote_ident(lake_layout.OP)
    return f"{{'v': CASE WHEN {op} = 'd' THEN NULL ELSE {quote_ident(name)} END}}"


def _backfilled(column_types: dict[str, str], key_columns: Sequence[str]) -> list[str]:
    """The source columns that get the unchanged-TOAST back-fill."""
    if lake_layout.UNCHANGED_TOAST not in column_types:
        return []
    return [
        c
        for c in _source_columns(column_types)
        if c not in key_columns and toastable(column_types[c])
    ]


@dataclass(frozen=True, slots=True)
class _PerKey:
    """``SELECT keys, aggregates FROM live GROUP BY keys`` and how to read each row column
    (``values``) and each latest-row field (``latest``) from its output."""

    sql: str
    values: dict[str, str]
    toast_aliases: dict[str, str]


def _per_key(
    live: str,
    row_columns: Sequence[str],
    key_columns: Sequence[str],
    backfilled: Sequence[str],
    *,
    latest_fields: Sequence[tuple[str, str]] = (),
) -> _PerKey:
    """The per-key aggregate shared by the view and the merge fold.

    One hash aggregate per key, ``arg_max(value, _cdc_pos)``: an aggregate keeps one state per
    key, where the equivalent window function sorts and buffers every changelog row with all
    its columns. The unchanged-TOAST back-fill is ``arg_max`` of a one-field struct
    ``FILTER``-ed to the rows where the column was sent: "last value IGNORE NULLS" as an
    aggregate. ``latest_fields`` are extra ``(name, expression)`` fields of the latest row,
    read back as ``_cdc_latest.<name>``.
    """
    # Struct field names are generated (f0, f1, ...) so that source column names never need
    # to be valid struct keys; aliases start with _cdc_ (reserved for metadata) so they
    # cannot clash with key columns.
    fixed = [f"'op': {quote_ident(lake_layout.OP)}"]
    fixed += [f"'{name}': {expr}" for name, expr in latest_fields]
    aggregates: list[str] = []
    values: dict[str, str] = {}
    toast_aliases: dict[str, str] = {}
    for i, name in enumerate(row_columns):
        if name in key_columns:
            values[name] = quote_ident(name)
        elif name in backfilled:
            alias = f"_cdc_t{i}"
            aggregates.append(
                f"arg_max({_sent_value_sql(name)}, _cdc_pos) "
                f"FILTER (WHERE {_sent_sql(name)}) AS {alias}"
            )
            values[name] = f"{alias}.v"
            toast_aliases[name] = alias
        else:
            fixed.append(f"'f{i}': {quote_ident(name)}")
            values[name] = f"_cdc_latest.f{i}"
    keys = ", ".join(quote_ident(k) for k in key_columns)
    aggregate_list = ",\n    ".join(
        [f"arg_max({{{', '.join(fixed)}}}, _cdc_pos) AS _cdc_latest", *aggregates]
    )
    sql = f"  SELECT {keys},\n    {aggregate_list}\n  FROM {live} GROUP BY {keys}\n"
    return _PerKey(sql=sql, values=values, toast_aliases=toast_aliases)


def current_state_sql(
    changes: str,
    column_types: dict[str, str],
    key_columns: Sequence[str],
    *,
    merged: str | None = None,
    merged_types: dict[str, str] | None = None,
    merge_watermark: tuple[int, int] | None = None,
    every_column_key: bool = False,
) -> str:
    """The ``SELECT`` of the current state over the changelog relation ``changes``.

    ``column_types`` maps every changelog column (metadata included, in table order) to its
    DuckDB type; the result has the non-metadata columns in that order. ``changes`` may be a
    filtered subquery: time travel is this SQL over ``(SELECT * FROM changes WHERE
    _cdc_commit_ts <= ts)``.

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

    With ``merged`` (a relation with one row per live key, the source columns and the
    ``_cdc_lsn``/``_cdc_seq`` of the change that produced it: ``<table>/current`` written by
    ``cdc jobs merge``, or a retention base; keyed tables only), the same result is computed
    from the merged rows plus only the changes after the merge watermark ``W``:

        * ``W`` is ``merge_watermark`` at LSN granularity (changes from its LSN on are
          read). A stale value only re-reads a few changes the merged table already holds:
          re-applying them is idempotent (a merged row and the change that produced it share
          a position and agree on every value the view takes from them). It is never too
          high, because watermarks only grow; the one exception is deleting and rebuilding a
          merged table while a connection is open (refresh the views after that).
        * The filter on ``_cdc_lsn`` is a literal, so it reaches the Delta scan: DuckDB does
          not open the changelog files whose log statistics lie below it, and skips the row
          groups below it in the files it opens.
        * A merged row counts as a row that sent every column, at its ``(lsn, seq)``; the
          truncate rule applies to it too (dropped if before the latest truncate after
          ``W``), and the TOAST back-fill of later changes can take its values.
        * The changes after ``W`` are aggregated per key, and one streaming scan of the
          merged table is joined to that aggregate (see :func:`_merged_state_sql`): the
          merged table is neither copied nor aggregated.

    Limitation: the back-fill looks only at earlier rows *of the same key*. When an UPDATE
    changes the key and leaves a TOASTed column untouched, PostgreSQL marks that column
    unchanged in the new key's ``c`` row, whose earlier value lives under the old key; the
    view then shows NULL for it until the column is next written.

    Example:
        >>> sql = current_state_sql('"s"."t_changes"', {"id": "BIGINT", "_cdc_op": "VARCHAR",
        ...     "_cdc_lsn": "BIGINT", "_cdc_seq": "BIGINT"}, ["id"])
        >>> "GROUP BY" in sql
        True
    """
    source_columns = _source_columns(column_types)
    fallback = lake_layout.FALLBACK if lake_layout.FALLBACK in column_types else None
    # The fallback map travels like a column of the latest row (never back-filled).
    row_columns = [*source_columns, *([fallback] if fallback else [])]
    op = quote_ident(lake_layout.OP)
    if every_column_key:
        merged = None

    if merged is not None and key_columns:
        return _merged_state_sql(
            changes,
            merged,
            row_columns=row_columns,
            column_types=column_types,
            merged_types=merged_types or {},
            key_columns=key_columns,
            watermark_lsn=merge_watermark[0] if merge_watermark else MIN_BIGINT,
        )
    live = "WITH " + _live_after_truncate_sql(changes) + "\n"

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

    per_key = _per_key(
        "_cdc_live", row_columns, key_columns, _backfilled(column_types, key_columns)
    )
    projections = [
        quote_ident(c) if c in key_columns else f"{per_key.values[c]} AS {quote_ident(c)}"
        for c in row_columns
    ]
    return (
        f"{live}, _cdc_per_key AS (\n{per_key.sql})\n"
        f"SELECT {', '.join(projections)}\n"
        "FROM _cdc_per_key WHERE _cdc_latest.op IN ('c', 'r', 'u')"
    )


def _live_after_truncate_sql(changes: str) -> str:
    """CTEs ``_cdc_last_truncate`` and ``_cdc_live``: the changes after the latest truncate,
    with their position ``_cdc_pos``."""
    op = quote_ident(lake_layout.OP)
    # max() over no rows still yields one row (NULL), so the cross join below never drops
    # rows when there was no truncate.
    return (
        "_cdc_last_truncate AS (\n"
        f"  SELECT max({position_sql()}) AS pos\n"
        f"  FROM {changes} WHERE {op} = 't'\n"
        "),\n"
        "_cdc_live AS (\n"
        f"  SELECT c.*, {position_sql('c.')} AS _cdc_pos\n"
        f"  FROM {changes} AS c, _cdc_last_truncate AS t\n"
        f"  WHERE c.{op} <> 't' AND (t.pos IS NULL OR {position_sql('c.')} > t.pos)\n"
        ")"
    )


def _merged_state_sql(
    changes: str,
    merged: str,
    *,
    row_columns: Sequence[str],
    column_types: dict[str, str],
    merged_types: dict[str, str],
    key_columns: Sequence[str],
    watermark_lsn: int,
) -> str:
    """The merged form of :func:`current_state_sql`: the merged rows ``FULL OUTER JOIN`` the
    per-key aggregate of the changes after the watermark.

    One streaming scan of the merged table probes a hash table of the (few) keys changed
    since the merge; nothing of the merged table is materialised or aggregated, so the view
    costs a plain scan of the merged table plus the tail. Per key:

    * no change since the merge: the merged row;
    * the merged row is at or after the key's latest change read (the watermark is taken
      at LSN granularity, so a few folded changes are read again): the merged row;
    * otherwise the latest change decides (a delete drops the key), and a column no change
      since the merge sent (unchanged TOAST) keeps the merged row's value.

    A truncate after the watermark drops the merged rows before it and the changes before
    it, like :func:`fold_sql` does.
    """
    op, lsn, seq = (quote_ident(c) for c in (lake_layout.OP, lake_layout.LSN, lake_layout.SEQ))

    per_key = _per_key(
        "_cdc_live",
        row_columns,
        key_columns,
        _backfilled(column_types, key_columns),
        latest_fields=[("lsn", lsn), ("seq", seq)],
    )
    merged_columns = ", ".join(
        _stored_column(c, column_types[c], merged_types.get(c), "m.") for c in row_columns
    )
    # The merged row wins when the key has no change since the merge, or none newer.
    # Compared as (lsn, seq) BIGINTs: no HUGEINT position per merged row.
    use_merged = (
        f"(p._cdc_latest IS NULL OR m.{lsn} > p._cdc_latest.lsn"
        f" OR (m.{lsn} = p._cdc_latest.lsn AND m.{seq} >= p._cdc_latest.seq))"
    )
    projections = []
    for name in row_columns:
        col = quote_ident(name)
        if name in key_columns:
            value = f"CASE WHEN p._cdc_latest IS NULL THEN m.{col} ELSE p.{col} END"
        elif name in per_key.toast_aliases:
            # Not sent by any change since the merge (NULL struct): the merged value.
            alias = per_key.toast_aliases[name]
            value = (
                f"CASE WHEN {use_merged} OR p.{alias} IS NULL THEN m.{col} "
                f"ELSE p.{per_key.values[name]} END"
            )
        else:
            value = f"CASE WHEN {use_merged} THEN m.{col} ELSE p.{per_key.values[name]} END"
        projections.append(f"{value} AS {col}")
    return (
        # Only the changes from the watermark's LSN on. The literal is a filter DuckDB hands
        # to the Delta scan before planning: files whose log statistics lie below it are
        # never opened, and row groups below it are skipped in the files that are.
        "WITH _cdc_new AS (\n"
        f"  SELECT c.*, {position_sql('c.')} AS _cdc_pos FROM {changes} AS c\n"
        f"  WHERE c.{lsn} >= ({watermark_lsn})::BIGINT\n"
        "),\n"
        # The latest truncate after the watermark; as (lsn, seq) BIGINTs for the merged
        # rows (cheaper than a HUGEINT per merged row), the smallest BIGINT when none.
        "_cdc_last_truncate AS (\n"
        "  SELECT max(_cdc_pos) AS pos,\n"
        f"    coalesce(arg_max({lsn}, _cdc_pos), ({MIN_BIGINT})::BIGINT) AS lsn,\n"
        f"    coalesce(arg_max({seq}, _cdc_pos), ({MIN_BIGINT})::BIGINT) AS seq\n"
        f"  FROM _cdc_new WHERE {op} = 't'\n"
        "),\n"
        "_cdc_live AS (\n"
        "  SELECT n.* FROM _cdc_new AS n, _cdc_last_truncate AS t\n"
        f"  WHERE n.{op} <> 't' AND (t.pos IS NULL OR n._cdc_pos > t.pos)\n"
        "),\n"
        f"_cdc_per_key AS (\n{per_key.sql}),\n"
        "_cdc_merged AS (\n"
        f"  SELECT {merged_columns}, m.{lsn}, m.{seq}\n"
        f"  FROM {merged} AS m, _cdc_last_truncate AS t\n"
        f"  WHERE m.{lsn} > t.lsn OR (m.{lsn} = t.lsn AND m.{seq} > t.seq)\n"
        ")\n"
        f"SELECT {', '.join(projections)}\n"
        f"FROM _cdc_merged AS m FULL OUTER JOIN _cdc_per_key AS p ON {key_match_sql('m', 'p', key_columns)}\n"
        f"WHERE {use_merged} OR p._cdc_latest.op IN ('c', 'r', 'u')"
    )


def keep_flags(column_types: dict[str, str], key_columns: Sequence[str]) -> dict[str, str]:
    """The fold's ``_cdc_keep_<i>`` flag of each TOAST-able non-key source column.

    Example:
        >>> keep_flags({"id": "BIGINT", "n": "INTEGER", "note": "VARCHAR",
        ...     "_cdc_unchanged_toast": "VARCHAR[]"}, ["id"])
        {'note': '_cdc_keep_2'}
    """
    backfilled = set(_backfilled(column_types, key_columns))
    return {
        name: f"{_KEEP}{i}"
        for i, name in enumerate(_source_columns(column_types))
        if name in backfilled
    }


def batch_stats_sql(changes: str, after: Watermark, *, upto: Watermark | None = None) -> str:
    """SQL returning one row about the changes after ``after`` (and at or before ``upto``)
    in the relation ``changes``: ``(n, last_lsn, last_seq, truncate_lsn, truncate_seq,
    last_commit_ts)``, the truncate columns NULL without a truncate.

    Example:
        >>> "count(*)" in batch_stats_sql("c", Watermark(5, 0))
        True
    """
    op, lsn, seq, ts = (
        quote_ident(c)
        for c in (lake_layout.OP, lake_layout.LSN, lake_layout.SEQ, lake_layout.COMMIT_TS)
    )
    pos = position_sql()
    where = after.after_sql()
    if upto is not None:
        where += f" AND {upto.at_or_before_sql()}"
    return (
        f"SELECT count(*), arg_max({lsn}, {pos}), arg_max({seq}, {pos}),\n"
        f"  arg_max({lsn}, {pos}) FILTER (WHERE {op} = 't'),\n"
        f"  arg_max({seq}, {pos}) FILTER (WHERE {op} = 't'),\n"
        f"  max({ts})\n"
        f"FROM {changes} WHERE {where}"
    )


def fold_sql(
    changes: str,
    column_types: dict[str, str],
    key_columns: Sequence[str],
    *,
    after: Watermark,
    truncate: Watermark | None,
    upto: Watermark | None = None,
) -> str:
    """SQL reducing the changes after ``after`` (and after ``truncate``, the latest truncate
    among them, if any; and at or before ``upto``, if given) to one row per key: what ``cdc
    jobs merge`` applies to the merged table.

    Output columns: the key columns, ``_cdc_op`` (the latest op: ``d`` means delete the
    key), ``_cdc_lsn``, ``_cdc_seq``, ``_cdc_commit_ts`` of the latest change, every other
    source column, and for each TOAST-able column ``c`` at source index ``i`` a boolean
    ``_cdc_keep_<i>``: true when no change in the batch sent ``c`` (every one marked it
    unchanged), so the merge keeps the merged row's value. After a truncate nothing is kept:
    the merged rows are gone.

    The per-key rules are :func:`current_state_sql`'s (the same generated aggregate), so the
    view reads the same before and after a merge.

    Example:
        >>> sql = fold_sql("c", {"id": "BIGINT", "note": "VARCHAR", "_cdc_op": "VARCHAR",
        ...     "_cdc_lsn": "BIGINT", "_cdc_seq": "BIGINT", "_cdc_commit_ts": "TIMESTAMP",
        ...     "_cdc_unchanged_toast": "VARCHAR[]"}, ["id"], after=Watermark(5, 0),
        ...     truncate=None)
        >>> "_cdc_keep_1" in sql and 'GROUP BY "id"' in sql
        True
    """
    row_columns = _row_columns(column_types)
    op, lsn, seq, ts = (
        quote_ident(c)
        for c in (lake_layout.OP, lake_layout.LSN, lake_layout.SEQ, lake_layout.COMMIT_TS)
    )
    flags = keep_flags(column_types, key_columns)
    where = f"{after.after_sql()} AND {op} <> 't'"
    if truncate is not None:
        where += f" AND {truncate.after_sql()}"
    if upto is not None:
        where += f" AND {upto.at_or_before_sql()}"
    per_key = _per_key(
        "_cdc_live",
        row_columns,
        key_columns,
        list(flags),
        latest_fields=[("lsn", lsn), ("seq", seq), ("ts", ts)],
    )
    projections = [quote_ident(k) for k in key_columns]
    projections += [
        f"_cdc_latest.op AS {op}",
        f"_cdc_latest.lsn AS {lsn}",
        f"_cdc_latest.seq AS {seq}",
        f"_cdc_latest.ts AS {ts}",
    ]
    for name in row_columns:
        if name in key_columns:
            continue
        projections.append(f"{per_key.values[name]} AS {quote_ident(name)}")
        if name in flags:
            alias = per_key.toast_aliases[name]
            keep = "false" if truncate is not None else f"{alias} IS NULL"
            projections.append(f"{keep} AS {flags[name]}")
    return (
        "WITH _cdc_live AS (\n"
        f"  SELECT *, {position_sql()} AS _cdc_pos FROM {changes}\n"
        f"  WHERE {where}\n"
        f"), _cdc_per_key AS (\n{per_key.sql})\n"
        f"SELECT {', '.join(projections)} FROM _cdc_per_key"
    )


def changes_up_to_sql(changes: str, *, commit_ts: str | None = None, lsn: str | None = None) -> str:
    """``changes`` restricted to the changes committed at or before a moment: a commit
    time (``commit_ts``, an SQL expression of type TIMESTAMPTZ) or a commit LSN (``lsn``, an
    SQL BIGINT expression). Feed it to :func:`current_state_sql` for time travel.

    Example:
        >>> changes_up_to_sql('"s"."t_changes"', lsn="42")
        '(SELECT * FROM "s"."t_changes" WHERE "_cdc_lsn" <= (42)::BIGINT)'
    """
    if (commit_ts is None) == (lsn is None):
        raise ValueError("give exactly one of commit_ts and lsn")
    if commit_ts is not None:
        bound = f"{quote_ident(lake_layout.COMMIT_TS)} <= ({commit_ts})::TIMESTAMPTZ"
    else:
        bound = f"{quote_ident(lake_layout.LSN)} <= ({lsn})::BIGINT"
    return f"(SELECT * FROM {changes} WHERE {bound})"


#: Columns of the history view besides the table's own, in this order.
HISTORY_COLUMNS: tuple[str, ...] = ("_valid_from", "_valid_to", lake_layout.OP, lake_layout.LSN)


def history_sql(
    changes: str,
    column_types: dict[str, str],
    key_columns: Sequence[str],
    *,
    base: str | None = None,
    base_types: dict[str, str] | None = None,
    base_watermark: tuple[int, int] | None = None,
) -> str:
    """The ``SELECT`` of the row-history view (SCD type 2) of a keyed table.

    One row per version of each row: every ``c``/``r``/``u`` change, with its unchanged-TOAST
    columns filled like :func:`current_state_sql` fills them, then the columns of
    :data:`HISTORY_COLUMNS`: ``_valid_from`` (the change's commit time), ``_valid_to`` (the
    commit time of the key's next change, of the next truncate, whichever comes first;
    NULL while the version is live: so a deleted row's last version ends at the delete's
    commit time), ``_cdc_op`` and ``_cdc_lsn`` of the change. Deletes and truncates end
    versions and are not versions themselves. Two changes of one key in one transaction give
    a version with ``_valid_from = _valid_to``.

    ``base`` (with its column types and ``(lsn, seq)`` watermark) is the state as of the
    retention horizon, written by ``cdc jobs retention`` before it drops old changes: each of
    its rows is one version (the latest before the horizon; earlier ones are gone), and only
    the changes after its watermark are read.

    Example:
        >>> sql = history_sql('"s"."t_changes"', {"id": "BIGINT", "_cdc_op": "VARCHAR",
        ...     "_cdc_lsn": "BIGINT", "_cdc_seq": "BIGINT", "_cdc_commit_ts": "TIMESTAMPTZ"},
        ...     ["id"])
        >>> "_valid_to" in sql and 'PARTITION BY "id"' in sql
        True
    """
    row_columns = _row_columns(column_types)
    op, lsn, seq, ts = (
        quote_ident(c)
        for c in (lake_layout.OP, lake_layout.LSN, lake_layout.SEQ, lake_layout.COMMIT_TS)
    )
    toast = quote_ident(lake_layout.UNCHANGED_TOAST)
    has_toast_list = lake_layout.UNCHANGED_TOAST in column_types
    backfilled = _backfilled(column_types, key_columns)
    columns = ", ".join(quote_ident(c) for c in row_columns)
    unchanged = f", {toast}" if has_toast_list else ""
    changes_sql = f"SELECT {columns}, {op}, {lsn}, {seq}, {ts}{unchanged} FROM {changes}"
    rows = changes_sql
    if base is not None:
        watermark = Watermark(*base_watermark) if base_watermark else NO_WATERMARK
        have = base_types or {}

        base_op = op if lake_layout.OP in have else f"'r' AS {op}"
        base_unchanged = f", NULL::VARCHAR[] AS {toast}" if has_toast_list else ""
        rows = (
            f"SELECT {', '.join(_stored_column(c, column_types[c], have.get(c), '') for c in row_columns)}, {base_op}, {lsn}, "
            f"{seq}, {ts}{base_unchanged} FROM {base}\n"
            f"  UNION ALL\n  {changes_sql} WHERE {watermark.after_sql()}"
        )
    keys = ", ".join(quote_ident(k) for k in key_columns)
    values: list[str] = []
    for name in row_columns:
        col = quote_ident(name)
        if name in backfilled:
            # "Last value sent", as a window: NULL structs (not sent) are skipped, a real
            # NULL is a struct holding NULL; a delete sends NULL for every column.
            values.append(
                f"(last_value(CASE WHEN {_sent_sql(name)} THEN {_sent_value_sql(name)} END "
                f"IGNORE NULLS) OVER _cdc_w).v AS {col}"
            )
        else:
            values.append(col)
    out = ", ".join(quote_ident(c) for c in row_columns)
    return (
        f"WITH _cdc_rows AS (\n  {rows}\n),\n"
        "_cdc_truncates AS (\n"
        f"  SELECT {position_sql()} AS _cdc_tpos, {ts} AS _cdc_tts\n"
        f"  FROM _cdc_rows WHERE {op} = 't'\n"
        "),\n"
        "_cdc_versions AS (\n"
        f"  SELECT {', '.join(values)}, {op}, {lsn}, {ts}, {position_sql()} AS _cdc_pos,\n"
        f"    lead({ts}) OVER _cdc_w AS _cdc_next_ts\n"
        f"  FROM _cdc_rows WHERE {op} <> 't'\n"
        f"  WINDOW _cdc_w AS (PARTITION BY {keys} ORDER BY {position_sql()}\n"
        "    ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)\n"
        ")\n"
        f"SELECT {out}, v.{ts} AS _valid_from,\n"
        "  CASE WHEN t._cdc_tts IS NULL THEN v._cdc_next_ts\n"
        "    WHEN v._cdc_next_ts IS NULL THEN t._cdc_tts\n"
        "    ELSE least(v._cdc_next_ts, t._cdc_tts) END AS _valid_to,\n"
        f"  v.{op}, v.{lsn}\n"
        "FROM _cdc_versions AS v\n"
        # The first truncate after the version (ASOF with < matches the nearest larger).
        "ASOF LEFT JOIN _cdc_truncates AS t ON v._cdc_pos < t._cdc_tpos\n"
        f"WHERE v.{op} IN ('c', 'r', 'u')"
    )
