"""Declarative per-table rules (``[[transforms.rules]]``), compiled once per table shape.

A :class:`Rule` is one config entry; :class:`Transforms` holds them all and compiles, per
:class:`~cdc.core.table_schema.TableSchema`, a :class:`TablePlan`: the chain of the rules
matching that table (in file order) turned into one DuckDB query over an Arrow batch, plus
the output shape. Within one rule the steps run in this order:

1. ``skip_operations`` drops the operations it lists (as they reach the rule);
2. ``filter`` is evaluated on the rule's input row (before its masks), with PostgreSQL 15's
   row-filter semantics: an insert or snapshot row that fails it is dropped, an update that
   fails it becomes a delete of that key, an update that passes stays an update (an upsert
   downstream), and deletes pass;
3. ``mask`` replaces values (see :mod:`transforms.masks`);
4. ``rename_columns`` renames;
5. ``add_columns`` computes new columns from the masked, renamed row;
6. ``drop_columns`` removes columns (named as the rule's input names them), last, so that
   ``add_columns`` may read them;
7. ``route`` gives the table its target ``schema.table``.

Only the columns some rule reads or masks are converted to Arrow and sent to DuckDB; the
others pass through as they are. The query runs once per batch, never per row.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import add, itemgetter
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from cdc.core import pgtypes
from cdc.core.errors import ConfigError
from cdc.core.events import ChangeEvent
from cdc.core.settings import TransformRuleSettings, TransformSettings
from cdc.core.table_schema import ColumnSchema, TableSchema, split_table_name
from transforms import expressions
from transforms.errors import TransformConfigError, TransformEvaluationError
from transforms.masks import (
    IPAD_VARIABLE,
    OPAD_VARIABLE,
    Mask,
    hash_array,
    hmac_pads,
    mask_sql,
    mask_text,
    parse_mask,
)

if TYPE_CHECKING:
    import duckdb

log = logging.getLogger(__name__)

#: The operations ``skip_operations`` accepts (Debezium's ``skipped.operations``).
SKIPPABLE = frozenset("cudt")

_TEXT = (int(pgtypes.Oid.TEXT), -1)
_TEXT_OIDS = frozenset({pgtypes.Oid.TEXT, pgtypes.Oid.VARCHAR, pgtypes.Oid.BPCHAR})


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _split_pattern(text: str) -> tuple[str, str]:
    """``schema.table`` (globs allowed) into its parts; ValueError when malformed."""
    try:
        return split_table_name(text)
    except ConfigError as e:
        raise ValueError(f"{e} (globs allowed)") from None


def _arrow_to_pg(arrow_type: pa.DataType) -> tuple[int, int] | None:
    """The PostgreSQL type an ``add_columns`` result of ``arrow_type`` is recorded as."""
    simple = {
        pa.bool_(): pgtypes.Oid.BOOL,
        pa.int8(): pgtypes.Oid.INT2,
        pa.int16(): pgtypes.Oid.INT2,
        pa.int32(): pgtypes.Oid.INT4,
        pa.int64(): pgtypes.Oid.INT8,
        pa.float32(): pgtypes.Oid.FLOAT4,
        pa.float64(): pgtypes.Oid.FLOAT8,
        pa.string(): pgtypes.Oid.TEXT,
        pa.large_string(): pgtypes.Oid.TEXT,
        pa.string_view(): pgtypes.Oid.TEXT,
        pa.date32(): pgtypes.Oid.DATE,
    }
    if arrow_type in simple:
        return int(simple[arrow_type]), -1
    if pa.types.is_timestamp(arrow_type):
        oid = pgtypes.Oid.TIMESTAMPTZ if arrow_type.tz else pgtypes.Oid.TIMESTAMP
        return int(oid), -1
    if pa.types.is_decimal(arrow_type):
        return int(pgtypes.Oid.NUMERIC), ((arrow_type.precision << 16) | arrow_type.scale) + 4
    return None


@dataclass(frozen=True)
class Rule:
    """One ``[[transforms.rules]]`` entry, checked (masks parsed, SQL parsed, names valid)."""

    index: int
    settings: TransformRuleSettings
    patterns: tuple[tuple[str, str], ...]
    masks: dict[str, Mask]
    skip: frozenset[str]
    route: tuple[str, str] | None
    filter_columns: frozenset[str]
    add_columns: dict[str, frozenset[str]]  # name -> the columns its expression reads
    source: str | None = None

    @property
    def where(self) -> str:
        """``transforms.rules[i] (tables ...) in FILE``, for messages."""
        place = f" in {self.source}" if self.source else ""
        return f"transforms.rules[{self.index}] (tables {', '.join(self.settings.tables)}){place}"

    def matches(self, schema: str, table: str) -> bool:
        return any(
            fnmatch.fnmatchcase(schema, s) and fnmatch.fnmatchcase(table, t)
            for s, t in self.patterns
        )

    def error(self, problem: str) -> TransformConfigError:
        return TransformConfigError(f"{self.where}: {problem}")

    def describe(self) -> dict[str, Any]:
        """The rule as configured (no secret is part of a rule), for status and schemas."""
        return self.settings.model_dump(exclude_defaults=True)


def compile_rule(
    settings: TransformRuleSettings,
    index: int,
    *,
    source: str | None,
    conn: Callable[[], duckdb.DuckDBPyConnection] | None = None,
) -> Rule:
    """Check one rule on its own (what does not need the table); raises
    :class:`TransformConfigError` naming the rule and ``source`` (the config file).

    ``conn`` gives the DuckDB connection that parses the rule's SQL (a connection costs
    about 20 ms of start-up: share one); without it, one is opened for the rule. A rule
    without SQL needs none."""
    rule = Rule(index, settings, (), {}, frozenset(), None, frozenset(), {}, source)
    try:
        patterns = tuple(_split_pattern(t) for t in settings.tables)
    except ValueError as e:
        raise rule.error(str(e)) from e
    masks: dict[str, Mask] = {}
    for column, spec in settings.mask.items():
        try:
            masks[column] = parse_mask(spec)
        except ValueError as e:
            raise rule.error(f"mask.{column}: {e}") from e
    route = None
    if settings.route is not None:
        try:
            route = _split_pattern(settings.route)
        except ValueError as e:
            raise rule.error(f"route: {e}") from e
        if any(ch in "".join(route) for ch in "*?["):
            raise rule.error(f"route: {settings.route!r} must name one table, not a pattern")
    skip = frozenset(settings.skip_operations)
    filter_columns: frozenset[str] = frozenset()
    added: dict[str, frozenset[str]] = {}
    if settings.filter is not None or settings.add_columns:
        own = expressions.connect() if conn is None else None
        parser = own if own is not None else conn()  # type: ignore[misc]
        try:
            if settings.filter is not None:
                try:
                    filter_columns = frozenset(
                        expressions.referenced_columns(parser, settings.filter)
                    )
                except ValueError as e:
                    raise rule.error(f"filter: {e}") from e
            for name, expression in settings.add_columns.items():
                try:
                    added[name] = frozenset(expressions.referenced_columns(parser, expression))
                except ValueError as e:
                    raise rule.error(f"add_columns.{name}: {e}") from e
        finally:
            if own is not None:
                own.close()
    for name in settings.drop_columns:
        if name in settings.rename_columns:
            raise rule.error(f"column {name!r} is both renamed and dropped")
    return Rule(index, settings, patterns, masks, skip, route, filter_columns, added, source)


# -- plans ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Col:
    """A column while a chain is compiled: where its value comes from, and its type."""

    name: str
    # ("src", index) | ("sql", alias) | ("py", hash number) | ("null", None)
    prov: tuple[str, Any]
    type_oid: int
    type_modifier: int
    is_key: bool
    attnum: int | None


@dataclass
class TablePlan:
    """The rules of one table shape, compiled. Use :meth:`Transforms.plan`."""

    source: TableSchema
    output: TableSchema
    rules: tuple[Rule, ...]
    #: Source column indexes sent to DuckDB, and the Arrow types they are built with.
    inputs: tuple[int, ...]
    input_schema: pa.Schema
    query: str | None  # None: nothing to compute (only drops, renames, routes, skips)
    computed: tuple[str, ...]  # result columns holding output values
    keep_flags: tuple[tuple[int, str], ...]  # (rule position, result column) per filter
    skips: tuple[frozenset[str], ...]  # per rule position
    #: Output values: itemgetter over (passthrough values + computed values + hashed values
    #: + (None,)).
    passthrough: tuple[int, ...]
    arrange: tuple[int, ...]
    #: Per output column: (source name or None, mask of a text fallback or None).
    fallback_map: dict[str, tuple[str, Mask | None]] = field(default_factory=dict)
    #: Source columns dropped without any rule reading them: a publication's column list
    #: may leave them out (pushdown).
    unread_drops: tuple[str, ...] = ()
    #: Text source columns the ``hash`` mask applies to directly, hashed with hashlib (the
    #: OpenSSL SHA-256 is several times faster than DuckDB's); the ones an expression reads
    #: afterwards are sent to DuckDB as ``__h<k>``.
    hashed: tuple[int, ...] = ()
    hashed_inputs: tuple[int, ...] = ()


class Transforms:
    """Every rule of a pipeline, compiled per table; the pure engine capture applies.

    Args:
        settings: The ``[transforms]`` section.
        source: The config file the rules came from, named in every error.

    Example:
        >>> t = Transforms(load_settings("cdc.toml").transforms, source="cdc.toml")  # doctest: +SKIP
        >>> t.validate(schemas)  # doctest: +SKIP  (start-up: every rule fits its tables)
        >>> events = t.apply(events)  # doctest: +SKIP
    """

    def __init__(self, settings: TransformSettings, *, source: str | None = None) -> None:
        self.source = source
        self._key = settings.hash_key.get_secret_value().encode() if settings.hash_key else None
        if self._key is not None and not self._key:
            self._key = None
        # One DuckDB connection parses every rule's SQL, then evaluates it.
        self._conn: duckdb.DuckDBPyConnection | None = None
        self.rules = tuple(
            compile_rule(r, i, source=source, conn=self._connection)
            for i, r in enumerate(settings.rules)
        )
        for rule in self.rules:
            hashed = [c for c, m in rule.masks.items() if m.kind == "hash"]
            if hashed and self._key is None:
                raise rule.error(
                    f"mask.{hashed[0]} = 'hash' needs transforms.hash_key "
                    "(or CDC_TRANSFORMS__HASH_KEY)"
                )
        ipad, opad = hmac_pads(self._key or b"")
        self._pads = (hashlib.sha256(ipad), hashlib.sha256(opad))
        self._pad_bytes = (ipad, opad)
        self._plans: dict[TableSchema, TablePlan | None] = {}
        self._last: tuple[TableSchema | None, TablePlan | None] = (None, None)
        # Off while validating against the catalog's shapes; on once running, when a
        # column list may have kept a dropped column from arriving at all.
        self._tolerate_missing = True

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __repr__(self) -> str:  # the key stays out of every repr
        return f"Transforms({len(self.rules)} rules, source={self.source!r})"

    # -- set-up -----------------------------------------------------------------------------

    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._conn is None:
            conn = expressions.connect()
            if self._key is not None:
                ipad, opad = hmac_pads(self._key)
                conn.execute(f"SET VARIABLE {IPAD_VARIABLE} = ?", [ipad])
                conn.execute(f"SET VARIABLE {OPAD_VARIABLE} = ?", [opad])
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def rules_for(self, schema: str, table: str) -> tuple[Rule, ...]:
        """The rules matching ``schema.table``, in file order."""
        return tuple(r for r in self.rules if r.matches(schema, table))

    def skipped_operations(self, schema: str, table: str) -> frozenset[str]:
        """Operations some matching rule skips before any filter could change them (the
        ones a publication's ``publish`` list may leave out)."""
        skipped: set[str] = set()
        for rule in self.rules_for(schema, table):
            skipped |= rule.skip
            if rule.settings.filter is not None:
                break  # later skips see deletes the filter made from updates
        return frozenset(skipped)

    def validate(self, tables: Iterable[TableSchema]) -> dict[str, TableSchema]:
        """Compile the plan of every table (start-up): raises :class:`TransformConfigError`
        naming the rule and the file when a rule does not fit a table, or two tables are
        routed to one target. Returns the output shape of each transformed table."""
        targets: dict[str, str] = {}
        shapes: dict[str, TableSchema] = {}
        for table in tables:
            self._tolerate_missing = False
            try:
                plan = self.plan(table)
            finally:
                self._tolerate_missing = True
            if plan is None:
                target = table.qualified_name
            else:
                target = plan.output.qualified_name
                shapes[table.qualified_name] = plan.output
            other = targets.setdefault(target, table.qualified_name)
            if other != table.qualified_name:
                rules = self.rules_for(table.schema, table.table)
                where = rules[-1].where if rules else "transforms.rules"
                raise TransformConfigError(
                    f"{where}: {other} and {table.qualified_name} would both be written to "
                    f"{target}; route each table to a table of its own"
                )
        return shapes

    def output_name(self, schema: str, table: str) -> tuple[str, str]:
        """The ``(schema, table)`` a source table is written to (its last ``route``)."""
        target = (schema, table)
        for rule in self.rules_for(schema, table):
            if rule.route is not None:
                target = rule.route
        return target

    def plan(self, table: TableSchema) -> TablePlan | None:
        """The compiled plan of ``table``'s shape (cached); None when no rule matches, or
        the shape is already a transformed one (rules never apply twice)."""
        if table is self._last[0]:
            return self._last[1]
        try:
            plan = self._plans[table]
        except KeyError:
            rules = self.rules_for(table.schema, table.table)
            plan = self._compile(table, rules) if rules and table.transforms is None else None
            self._plans[table] = plan
        self._last = (table, plan)
        return plan

    def describe(self) -> list[dict[str, Any]]:
        """Every rule as configured (the hash key excluded), for status and logs."""
        return [dict(index=r.index, **r.describe()) for r in self.rules]

    def describe_table(self, schema: str, table: str) -> list[dict[str, Any]]:
        """The rules that shape ``schema.table``, as recorded with its schema versions."""
        return [dict(index=r.index, **r.describe()) for r in self.rules_for(schema, table)]

    # -- compiling --------------------------------------------------------------------------

    def _compile(self, table: TableSchema, rules: tuple[Rule, ...]) -> TablePlan:
        # Pass 1 learns which source columns some rule reads; pass 2 writes the query
        # over just those.
        used: set[int] = set()
        hashed_used: set[int] = set()
        self._chain(table, rules, used, hashed_used, None)
        materialized = (set(used), set(hashed_used))
        chain = self._chain(table, rules, used, hashed_used, materialized)
        return self._finish(table, rules, used, hashed_used, *chain)

    def _chain(
        self,
        table: TableSchema,
        rules: tuple[Rule, ...],
        used: set[int],
        hashed_used: set[int],
        materialized: tuple[set[int], set[int]] | None,
    ) -> tuple[
        list[_Col],
        list[list[tuple[str, str]]],
        list[tuple[int, str]],
        tuple[str, str],
        set[int],
        list[int],
    ]:
        """Walk the rules over ``table``'s columns. Returns the output columns, the query's
        projections (each a list of (sql, name) over the previous one), the filters' flag
        columns, the route, the dropped source columns and the source columns hashed in
        Python. ``used`` and ``hashed_used`` collect what expressions read."""
        cols = [
            _Col(c.name, ("src", i), c.type_oid, c.type_modifier, c.is_key, c.attnum)
            for i, c in enumerate(table.columns)
        ]
        # Where each column is found in the current relation (None: not sent to DuckDB).
        rel: dict[int, str | None] = {
            id(c): (c.name if materialized is not None and i in materialized[0] else None)
            for i, c in enumerate(cols)
        }
        hashed: list[int] = []
        # Hashed values an expression reads come with the batch, so every projection
        # carries them from the start.
        carried = [f"__h{k}" for k in sorted(materialized[1])] if materialized else []
        projections: list[list[tuple[str, str]]] = []
        keep_flags: list[tuple[int, str]] = []
        route = (table.schema, table.table)
        n_sql = 0
        dropped: set[int] = set()

        def find(rule: Rule, name: str, what: str) -> _Col:
            for col in cols:
                if col.name == name:
                    return col
            raise rule.error(f"{what}: {table.qualified_name} has no column {name!r}")

        def ref(rule: Rule, name: str, what: str) -> _Col:
            col = find(rule, name, what)
            if col.prov[0] == "src":
                used.add(col.prov[1])
            elif col.prov[0] == "py":
                hashed_used.add(col.prov[1])
            return col

        def passing() -> list[tuple[str, str]]:
            items = [(_quote(a), a) for a in carried]
            for col in cols:
                where = rel[id(col)]
                if where is not None and where not in carried:
                    items.append((_quote(where), where))
            return items

        def expose() -> None:
            """A projection naming every sent column by its current name, for expressions."""
            if all(rel[id(c)] in (None, c.name) for c in cols):
                return
            items = [(_quote(a), a) for a in carried]
            for col in cols:
                where = rel[id(col)]
                if where is not None:
                    items.append((_quote(where), col.name))
                    rel[id(col)] = col.name
            projections.append(items)

        for position, rule in enumerate(rules):
            s = rule.settings
            new: list[tuple[str, str]] = []
            if s.filter is not None or rule.masks:
                expose()
            base = passing()
            if s.filter is not None:
                for name in sorted(rule.filter_columns):
                    ref(rule, name, "filter")
                alias = f"__keep{position}"
                # NULL counts as false (PostgreSQL row filters): see _apply_plan.
                new.append((f"(\n{s.filter}\n)", alias))
                keep_flags.append((position, alias))
            for name, mask in rule.masks.items():
                col = find(rule, name, f"mask.{name}")
                if col.is_key and not mask.keeps_identity:
                    raise rule.error(
                        f"mask.{name}: {name!r} identifies rows ({table.qualified_name}'s key); "
                        f"{mask} would merge distinct rows. Only 'hash' keeps keys distinct"
                    )
                if mask.kind == "null":
                    col.prov = ("null", None)
                    rel[id(col)] = None
                    continue
                if mask.kind == "hash" and col.prov[0] == "src" and col.type_oid in _TEXT_OIDS:
                    k = len(hashed)
                    hashed.append(col.prov[1])
                    col.prov = ("py", k)
                    sent = materialized is not None and k in materialized[1]
                    rel[id(col)] = f"__h{k}" if sent else None
                    col.type_oid, col.type_modifier = _TEXT
                    continue
                ref(rule, name, f"mask.{name}")
                alias = f"__c{n_sql}"
                n_sql += 1
                new.append((mask_sql(mask, _quote(rel[id(col)] or col.name)), alias))
                col.prov = ("sql", alias)
                rel[id(col)] = alias
                col.type_oid, col.type_modifier = _TEXT
            if new:
                projections.append(base + new)
                carried += [a for _, a in new]
            for old, new_name in s.rename_columns.items():
                col = find(rule, old, f"rename_columns.{old}")
                if any(c.name == new_name for c in cols if c is not col):
                    raise rule.error(
                        f"rename_columns.{old}: {table.qualified_name} already has {new_name!r}"
                    )
                col.name = new_name
            if s.add_columns:
                expose()  # the expressions read the masked, renamed row
                base = passing()
                added: list[tuple[str, str]] = []
                for name, expression in s.add_columns.items():
                    for ref_name in sorted(rule.add_columns[name]):
                        ref(rule, ref_name, f"add_columns.{name}")
                    if any(c.name == name for c in cols):
                        raise rule.error(
                            f"add_columns.{name}: {table.qualified_name} already has {name!r}"
                        )
                    alias = f"__c{n_sql}"
                    n_sql += 1
                    added.append((f"(\n{expression}\n)", alias))
                for (_, alias), name in zip(added, s.add_columns, strict=True):
                    col = _Col(name, ("sql", alias), 0, -1, False, None)
                    cols.append(col)
                    rel[id(col)] = alias
                projections.append(base + added)
                carried += [a for _, a in added]
            for name in s.drop_columns:
                found = [c for c in cols if c.name == name]
                if not found and self._tolerate_missing:
                    continue  # left out of the publication's column list (pushdown)
                if not found:
                    raise rule.error(f"drop_columns: {table.qualified_name} has no column {name!r}")
                col = found[0]
                if col.prov[0] == "src":
                    dropped.add(col.prov[1])
                if col.is_key:
                    raise rule.error(
                        f"drop_columns: {name!r} identifies rows ({table.qualified_name}'s key); "
                        "mask it with 'hash' instead"
                    )
                cols.remove(col)
            if rule.route is not None:
                route = rule.route
        return cols, projections, keep_flags, route, dropped, hashed

    def _finish(
        self,
        table: TableSchema,
        rules: tuple[Rule, ...],
        used: set[int],
        hashed_used: set[int],
        cols: list[_Col],
        projections: list[list[tuple[str, str]]],
        keep_flags: list[tuple[int, str]],
        route: tuple[str, str],
        dropped: set[int],
        hashed: list[int],
    ) -> TablePlan:
        inputs = tuple(sorted(used))
        hashed_inputs = tuple(sorted(hashed_used))
        input_schema = pa.schema(
            [
                pa.field(
                    table.columns[i].name,
                    pgtypes.arrow_type(table.columns[i].type_oid, table.columns[i].type_modifier),
                )
                for i in inputs
            ]
            + [pa.field(f"__h{k}", pa.string()) for k in hashed_inputs]
        )
        computed = tuple(c.prov[1] for c in cols if c.prov[0] == "sql")
        flags = tuple(alias for _, alias in keep_flags)
        query = None
        if projections:
            query = self._query(projections, computed + flags)
            result = self._run(query, input_schema.empty_table(), rules, table)
            for col in cols:
                if col.prov[0] == "sql" and col.type_oid == 0:
                    arrow_type = result.schema.field(col.prov[1]).type
                    pg = _arrow_to_pg(arrow_type)
                    if pg is None:
                        rule = next(r for r in rules if col.name in r.settings.add_columns)
                        raise rule.error(
                            f"add_columns.{col.name}: its type {arrow_type} has no column "
                            "type here; CAST it (to VARCHAR, BIGINT, DOUBLE, DECIMAL(p,s), "
                            "BOOLEAN, DATE or TIMESTAMP[TZ])"
                        )
                    col.type_oid, col.type_modifier = pg
            for position, alias in keep_flags:
                if result.schema.field(alias).type != pa.bool_():
                    raise rules[position].error(
                        f"filter must be a boolean expression, not {result.schema.field(alias).type}"
                    )
        output = TableSchema(
            route[0],
            route[1],
            tuple(
                ColumnSchema(c.name, c.type_oid, c.type_modifier, c.is_key, c.attnum) for c in cols
            ),
            table.replica_identity,
            # Recorded with the schema version: other rules, another version.
            transforms=orjson.dumps(
                [dict(index=r.index, **r.describe()) for r in rules], option=orjson.OPT_SORT_KEYS
            ).decode(),
        )
        passthrough = tuple(c.prov[1] for c in cols if c.prov[0] == "src")
        n_pass, n_comp = len(passthrough), len(computed)
        arrange: list[int] = []
        pass_i = comp_i = 0
        for c in cols:
            if c.prov[0] == "src":
                arrange.append(pass_i)
                pass_i += 1
            elif c.prov[0] == "sql":
                arrange.append(n_pass + comp_i)
                comp_i += 1
            elif c.prov[0] == "py":
                arrange.append(n_pass + n_comp + c.prov[1])
            else:
                arrange.append(n_pass + n_comp + len(hashed))
        fallback_map: dict[str, tuple[str, Mask | None]] = {}
        self._map_fallbacks(table, rules, fallback_map)
        return TablePlan(
            source=table,
            output=output,
            rules=rules,
            inputs=inputs,
            input_schema=input_schema,
            query=query,
            computed=computed,
            keep_flags=tuple(keep_flags),
            skips=tuple(r.skip for r in rules),
            passthrough=passthrough,
            arrange=tuple(arrange),
            fallback_map=fallback_map,
            unread_drops=tuple(table.columns[i].name for i in sorted(dropped - used)),
            hashed=tuple(hashed),
            hashed_inputs=hashed_inputs,
        )

    def _hash(self, values: list[Any]) -> list[str | None]:
        """The ``hash`` mask of text values: HMAC-SHA256 (RFC 2104) with the key's pads
        hashed once, copied per value."""
        inner, outer = self._pads
        out: list[str | None] = []
        append = out.append
        for value in values:
            if value is None:
                append(None)
                continue
            h = inner.copy()
            h.update(value.encode())
            o = outer.copy()
            o.update(h.digest())
            append(o.hexdigest())
        return out

    def _hash_column(self, column: pa.ChunkedArray) -> pa.ChunkedArray:
        """:meth:`_hash` of a text column in Arrow form: compiled when it can be."""
        chunks = []
        for chunk in column.chunks:
            hashed = hash_array(chunk, self._pad_bytes) if self._key is not None else None
            if hashed is None:
                hashed = pa.array(self._hash(chunk.to_pylist()), type=pa.string())
            chunks.append(hashed)
        return pa.chunked_array(chunks, type=pa.string())

    @staticmethod
    def _map_fallbacks(
        table: TableSchema, rules: tuple[Rule, ...], out: dict[str, tuple[str, Mask | None]]
    ) -> None:
        """Source column name -> (output name, mask) for texts kept in ``fallback``; columns
        dropped, nulled or replaced leave no entry."""
        current = {c.name: (c.name, None) for c in table.columns}  # current name -> (src, mask)
        state: dict[str, tuple[str, Mask | None]] = dict(current)
        for rule in rules:
            s = rule.settings
            for name, mask in rule.masks.items():
                if name in state:
                    src, prior = state[name]
                    if mask.kind == "null" or prior is not None:
                        # masking a masked text again: keep it simple and drop the text
                        state.pop(name)
                    else:
                        state[name] = (src, mask)
            renamed: dict[str, tuple[str, Mask | None]] = {}
            for name, value in state.items():
                renamed[s.rename_columns.get(name, name)] = value
            state = {k: v for k, v in renamed.items() if k not in s.drop_columns}
        for out_name, (src, last) in state.items():
            out[src] = (out_name, last)

    @staticmethod
    def _query(projections: list[list[tuple[str, str]]], outputs: tuple[str, ...]) -> str:
        """Nested SELECTs, one per projection; the outer one keeps the result columns."""
        relation = "batch"
        for i, items in enumerate(projections):
            select = ",\n".join(f"{sql} AS {_quote(name)}" for sql, name in items)
            relation = f"(SELECT\n{select}\nFROM {relation}) AS __p{i}"
        return f"SELECT {', '.join(_quote(a) for a in outputs)} FROM {relation}"

    def _run(
        self, query: str, batch: pa.Table, rules: tuple[Rule, ...], table: TableSchema
    ) -> pa.Table:
        import duckdb  # loaded by _connection already; here for its error class

        conn = self._connection()
        try:
            return conn.from_arrow(batch).query("batch", query).to_arrow_table()
        except duckdb.Error as e:
            # DuckDB's message names columns and functions, never values of the batch
            # unless a cast of one failed; keep only its first line.
            reason = str(e).splitlines()[0]
            if batch.num_rows == 0:
                where = rules[0].where if len(rules) == 1 else "; ".join(r.where for r in rules)
                raise TransformConfigError(
                    f"{where}: does not fit {table.qualified_name}: {reason}"
                ) from None
            raise TransformEvaluationError(
                f"rules of {table.qualified_name} failed on a batch: "
                f"{type(e).__name__} ({_without_values(reason)})"
            ) from None

    # -- applying ---------------------------------------------------------------------------

    def apply(self, events: Sequence[ChangeEvent]) -> list[ChangeEvent]:
        """Transform ``events`` (any tables, in order); returns the events to write, in the
        same order. Events are changed in place; filtered and skipped ones are left out.

        Each table's images are evaluated together, in one query per table per call: pass
        as many events at a time as arrive together (a read of the replication stream)."""
        if not self.rules:
            return list(events)
        groups: dict[int, tuple[TablePlan, list[int]]] = {}
        last_table: TableSchema | None = None
        members: list[int] | None = None
        for i, event in enumerate(events):
            table = event.table
            if table is not last_table:  # runs of one table are the common case
                last_table = table
                plan = self.plan(table)
                if plan is None:
                    members = None
                else:
                    entry = groups.get(id(plan))
                    if entry is None:
                        entry = groups[id(plan)] = (plan, [])
                    members = entry[1]
            if members is not None:
                members.append(i)
        keep = [True] * len(events)
        for plan, indexes in groups.values():
            self._apply_plan(plan, [events[i] for i in indexes], indexes, keep)
        return [e for e, k in zip(events, keep, strict=True) if k]

    def _apply_plan(
        self, plan: TablePlan, events: list[ChangeEvent], indexes: list[int], keep: list[bool]
    ) -> None:
        # Rows: every event's after image, then the before images (deletes, and updates
        # that carry one: a key change, or REPLICA IDENTITY FULL).
        images: list[tuple[Any, ...]] = [e.after for e in events if e.after is not None]
        after_row: list[int] = []
        n = 0
        for e in events:
            if e.after is not None:
                after_row.append(n)
                n += 1
            else:
                after_row.append(-1)
        before_row: list[int] = []
        for e in events:
            if e.before is not None:
                before_row.append(len(images))
                images.append(e.before)
            else:
                before_row.append(-1)
        computed: list[list[Any]] = []
        flags: list[list[Any] | None] = [None] * len(plan.rules)
        hashed = [self._hash([img[i] for img in images]) for i in plan.hashed]
        if plan.query is not None and images:
            columns: list[pa.Array] = []
            for i, field_ in zip(plan.inputs, plan.input_schema, strict=False):
                try:
                    columns.append(pa.array([img[i] for img in images], type=field_.type))
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
                    raise TransformEvaluationError(
                        f"{plan.source.qualified_name}.{field_.name}: values do not fit "
                        f"{field_.type} for the rules: {type(e).__name__}"
                    ) from None
            columns += [pa.array(hashed[k], type=pa.string()) for k in plan.hashed_inputs]
            batch = pa.Table.from_arrays(columns, schema=plan.input_schema)
            result = self._run(plan.query, batch, plan.rules, plan.source)
            computed = [result.column(a).to_pylist() for a in plan.computed]
            for position, alias in plan.keep_flags:
                flags[position] = result.column(alias).to_pylist()
        # Output rows, built column-wise by C-level itemgetters: (passthrough values +
        # computed values + (None,)) rearranged into the output column order.
        rows = list(
            map(
                _getter(plan.arrange),
                map(
                    add,
                    map(_getter(plan.passthrough), images),
                    zip(*computed, *hashed, repeat(None, len(images)), strict=True),
                ),
            )
        )
        output = plan.output
        key_positions = [i for i, c in enumerate(output.columns) if c.is_key]
        # Only the rules that skip or filter decide anything per event. Without skips, an
        # event's fate depends only on whether its new row passed every filter.
        checks = [(skip, flags[p]) for p, skip in enumerate(plan.skips) if skip or flags[p]]
        passed_all: list[Any] | None = None
        if checks and not any(skip for skip, _ in checks):
            lists = [passed for _, passed in checks]
            passed_all = lists[0] if len(lists) == 1 else list(map(all, zip(*lists, strict=True)))
        renames = plan.fallback_map
        for event, a_row, b_row, index in zip(events, after_row, before_row, indexes, strict=True):
            if passed_all is not None:
                op: str = event.op
                if a_row >= 0 and not passed_all[a_row] and op != "d" and op != "t":
                    op = "d" if op == "u" else "skip"
            elif checks:
                op = event.op
                for skip, passed in checks:
                    if op in skip:
                        op = "skip"
                        break
                    if passed is None or a_row < 0 or op in ("d", "t") or passed[a_row]:
                        continue
                    if op == "u":
                        op = "d"  # left the filter: a delete of that key
                    else:
                        op = "skip"
                        break
            else:
                op = ""
            if op == "skip":
                keep[index] = False
                continue
            if op == "d" and event.op == "u":
                new_after = rows[a_row]
                event.op = "d"
                if b_row >= 0:
                    event.before = rows[b_row]
                elif key_positions:
                    event.before = tuple(
                        v if i in key_positions else None for i, v in enumerate(new_after)
                    )
                else:
                    event.before = new_after
                event.after = None
                event.unchanged_toast = ()
                event.fallback = None
                event.table = output
                continue
            event.table = output
            if a_row >= 0:
                event.after = rows[a_row]
            if b_row >= 0:
                event.before = rows[b_row]
            if event.unchanged_toast:
                event.unchanged_toast = tuple(
                    renames[name][0] for name in event.unchanged_toast if name in renames
                )
            if event.fallback:
                event.fallback = self._fallbacks(plan, event.fallback)

    def _fallbacks(self, plan: TablePlan, fallback: dict[str, str]) -> dict[str, str] | None:
        out: dict[str, str] = {}
        for name, text in fallback.items():
            target = plan.fallback_map.get(name)
            if target is None:
                continue
            out_name, mask = target
            masked = text if mask is None else mask_text(mask, text, self._key or b"")
            if masked is not None:
                out[out_name] = masked
        return out or None

    def _arrow_values(
        self, plan: TablePlan, data: pa.Table
    ) -> tuple[list[pa.Array | pa.ChunkedArray], pa.Table | None]:
        """The output value columns of ``data`` (typed Arrow columns of ``plan.source``,
        by position), and the query's result (its filter flags), for the Arrow paths."""
        n = data.num_rows
        hashed = [self._hash_column(data.column(i)) for i in plan.hashed]
        result = None
        if plan.query is not None:
            sent = [data.column(i) for i in plan.inputs] + [hashed[k] for k in plan.hashed_inputs]
            inputs = pa.Table.from_arrays(sent, names=plan.input_schema.names)
            result = self._run(plan.query, inputs.cast(plan.input_schema), plan.rules, plan.source)
        columns: list[pa.Array | pa.ChunkedArray] = []
        n_pass, n_comp = len(plan.passthrough), len(plan.computed)
        for col, at in zip(plan.output.columns, plan.arrange, strict=True):
            target = pgtypes.arrow_type(col.type_oid, col.type_modifier)
            if at < n_pass:
                columns.append(data.column(plan.passthrough[at]))
            elif at < n_pass + n_comp:
                assert result is not None
                try:
                    columns.append(result.column(plan.computed[at - n_pass]).cast(target))
                except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                    raise TransformEvaluationError(
                        f"rules of {plan.source.qualified_name}: {col.name} does not fit "
                        f"{target}: {type(e).__name__}"
                    ) from None
            elif at < n_pass + n_comp + len(hashed):
                columns.append(hashed[at - n_pass - n_comp])
            else:
                columns.append(pa.nulls(n, type=target))
        return columns, result

    def apply_snapshot(
        self, table: TableSchema, batch: pa.Table | pa.RecordBatch, *, fallback_column: str
    ) -> tuple[TableSchema, pa.Table]:
        """Transform snapshot rows (op ``r``) in Arrow form: filter, masks, renames, added
        and dropped columns, route. ``fallback_column`` is the name of the optional map
        column of exact texts (see :mod:`cdc.postgres.snapshot`)."""
        plan = self.plan(table)
        data = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        if plan is None:
            return table, data
        columns, result = self._arrow_values(plan, data)
        names = list(plan.output.column_names)
        if fallback_column in data.column_names:
            texts = data.column(fallback_column).to_pylist()
            mapped = [None if row is None else self._fallbacks(plan, dict(row)) for row in texts]
            columns.append(pa.array(mapped, type=data.schema.field(fallback_column).type))
            names.append(fallback_column)
        out = pa.Table.from_arrays(columns, names=names)
        if plan.keep_flags and result is not None:
            mask = None
            for _, alias in plan.keep_flags:
                flag = result.column(alias)
                mask = flag if mask is None else pc.and_(mask, flag)
            out = out.filter(mask)
        return plan.output, out

    def apply_changes(
        self,
        table: TableSchema,
        changes: pa.Table,
        *,
        op_column: str,
        unchanged_column: str,
        fallback_column: str,
    ) -> tuple[TableSchema, pa.Table]:
        """Transform changes of ``table`` in changelog form (capture's columnar batches):
        the same result, row for row, as :meth:`apply` of the events they stand for.

        ``changes`` holds ``table``'s columns first (each row's image: the new row of an
        insert or update, the old one of a delete, nulls for a truncate), then metadata
        columns, among them the op (``c``/``u``/``d``/``t``/``r``), the unchanged-TOAST
        name lists and the fallback text maps, named by the ``*_column`` arguments. Updates
        carry no old row (a key change or a ``REPLICA IDENTITY FULL`` update is an event).
        Returns the output shape and the rows to write: its columns, then the same metadata
        columns; filtered and skipped rows are left out, an update that left a filter is a
        delete of its key (the key columns of the new row, the others null).

        Example:
            >>> output, rows = t.apply_changes(table, changes, op_column="_cdc_op",
            ...     unchanged_column="_cdc_unchanged_toast", fallback_column="_cdc_fallback")  # doctest: +SKIP
        """
        plan = self.plan(table)
        if plan is None or changes.num_rows == 0:
            return (table if plan is None else plan.output), changes
        n_source = len(table.columns)
        columns, result = self._arrow_values(plan, changes)
        ops = changes.column(op_column)
        keep, ops, left = self._fates(plan, ops, result)
        output = plan.output
        if left is not None and any(c.is_key for c in output.columns):
            # Updates that left a filter: deletes of their key (every column of a keyless
            # table), as apply() makes them.
            for i, col in enumerate(output.columns):
                if not col.is_key:
                    columns[i] = pc.if_else(left, pa.scalar(None, columns[i].type), columns[i])
        fields = [pa.field(c.name, v.type) for c, v in zip(output.columns, columns, strict=True)]
        for name in changes.column_names[n_source:]:
            column = changes.column(name)
            if name == op_column:
                column = ops
            elif name == unchanged_column:
                column = self._map_lists(plan, column, left, unchanged=True)
            elif name == fallback_column:
                column = self._map_lists(plan, column, left, unchanged=False)
            columns.append(column)
            fields.append(changes.schema.field(name))  # the metadata's nullability too
        out = pa.Table.from_arrays(columns, schema=pa.schema(fields))
        return output, out if keep is None else out.filter(keep)

    @staticmethod
    def _fates(
        plan: TablePlan, ops: pa.ChunkedArray | pa.Array, result: pa.Table | None
    ) -> tuple[pa.Array | None, pa.ChunkedArray | pa.Array, pa.Array | None]:
        """What the skips and filters make of each row, as :meth:`_apply_plan` decides it per
        event: the rows kept (None: all), the ops, and the updates turned into deletes
        (None: none)."""
        checks: list[tuple[frozenset[str], Any]] = []
        for position, skip in enumerate(plan.skips):
            flag = None
            for p, alias in plan.keep_flags:
                if p == position and result is not None:
                    # NULL counts as false; the flag of an old row (a delete) is not read.
                    flag = pc.fill_null(result.column(alias), False)
                    if pc.all(flag).as_py():
                        flag = None
            if skip or flag is not None:
                checks.append((skip, flag))
        if not checks:
            return None, ops, None
        keep: Any = None
        left: Any = None
        for skip, flag in checks:
            if skip:
                skipped = pc.is_in(ops, value_set=pa.array(sorted(skip), pa.string()))
                keep = pc.invert(skipped) if keep is None else pc.and_not(keep, skipped)
            if flag is None:
                continue
            failed = pc.invert(flag)
            # An insert or snapshot row that fails is dropped; an update becomes a delete
            # (a row turned into a delete earlier is not filtered again).
            dropped = pc.and_(failed, pc.is_in(ops, value_set=pa.array(["c", "r"])))
            keep = pc.invert(dropped) if keep is None else pc.and_not(keep, dropped)
            turned = pc.and_(failed, pc.equal(ops, "u"))
            if pc.any(turned).as_py():
                ops = pc.if_else(turned, "d", ops)
                left = turned if left is None else pc.or_(left, turned)
        if keep is not None:
            keep = pc.fill_null(keep, False)
            if pc.all(keep).as_py():
                keep = None
        return keep, ops, left

    def _map_lists(
        self, plan: TablePlan, column: pa.ChunkedArray, left: Any, *, unchanged: bool
    ) -> pa.ChunkedArray | pa.Array:
        """The unchanged-TOAST name lists (``unchanged``) or the fallback text maps of the
        rows, renamed, masked and cut to the output's columns; null for updates turned
        into deletes (``left``)."""
        if left is not None:
            column = pc.if_else(left, pa.scalar(None, column.type), column)
        if column.null_count == len(column):
            return column
        renames = plan.fallback_map
        values: list[Any] = column.to_pylist()
        mapped: list[Any]
        if unchanged:
            mapped = [
                None
                if row is None
                else [renames[name][0] for name in row if name in renames] or None
                for row in values
            ]
        else:
            # An empty map stays as it is, as apply() leaves an event's empty fallback.
            mapped = [
                None if row is None else self._fallbacks(plan, dict(row)) if row else row
                for row in values
            ]
        return pa.array(mapped, type=column.type)


def _getter(indexes: tuple[int, ...]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """``itemgetter(*indexes)``, returning a tuple for any number of indexes."""
    if len(indexes) > 1:
        return itemgetter(*indexes)
    if len(indexes) == 1:
        i = indexes[0]
        return lambda values: (values[i],)
    return lambda values: ()


def _without_values(reason: str) -> str:
    """DuckDB's conversion errors quote the failing value (``Could not convert string
    'abc' to INT32``): cut quoted parts, so that no row value reaches a message or a log."""
    parts = reason.split("'")
    return "'…'".join(parts[::2]) if len(parts) > 2 else reason
