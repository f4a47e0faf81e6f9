"""SQL expressions of rules (``filter``, ``add_columns``): checked once, evaluated by DuckDB.

An expression must be one scalar SQL expression over the row's columns: no subquery, no
``FROM``, no window function, no second statement. It is checked by DuckDB's own parser
(``json_serialize_sql``), which also yields the columns it reads, so capture converts only
those to Arrow. The DuckDB connection that evaluates it has file and network access
disabled, so an expression cannot read or write anything outside its batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    import duckdb


def connect() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection for rule evaluation: one thread (capture runs the
    sink beside it), no file, network or extension access."""
    import duckdb  # here: DuckDB loads in about 30 ms, and only rules with SQL need it

    conn = duckdb.connect(
        config={
            "enable_external_access": False,
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "threads": 1,
        }
    )
    return conn


def _walk(node: Any, found: set[str], problems: list[str]) -> None:
    if isinstance(node, dict):
        cls = node.get("class")
        if cls == "COLUMN_REF":
            names = node.get("column_names") or []
            if names:
                found.add(str(names[-1]))
        elif cls == "SUBQUERY":
            problems.append("subqueries are not allowed")
        elif cls == "WINDOW":
            problems.append("window functions are not allowed (rows are evaluated in batches)")
        elif cls == "STAR":
            problems.append("* is not allowed")
        for value in node.values():
            _walk(value, found, problems)
    elif isinstance(node, list):
        for value in node:
            _walk(value, found, problems)


def referenced_columns(conn: duckdb.DuckDBPyConnection, expression: str) -> set[str]:
    """The column names ``expression`` reads; ValueError saying what is wrong with it.

    Example:
        >>> sorted(referenced_columns(connect(), "first_name || ' ' || \\"Last\\""))
        ['Last', 'first_name']
    """
    if not expression.strip():
        raise ValueError("empty expression")
    row = conn.execute("SELECT json_serialize_sql(?)", [f"SELECT {expression}\n"]).fetchone()
    parsed: dict[str, Any] = orjson.loads(row[0]) if row else {"error": True}
    if parsed.get("error"):
        message = parsed.get("error_message", "it does not parse")
        raise ValueError(f"not a SQL expression: {message}")
    statements = parsed["statements"]
    node = statements[0]["node"] if len(statements) == 1 else {}
    if (
        node.get("type") != "SELECT_NODE"
        or len(node.get("select_list", [])) != 1
        or node.get("from_table", {}).get("type") not in (None, "EMPTY")
        or node.get("where_clause")
        or node.get("group_expressions")
        or node.get("modifiers")
        or node.get("cte_map", {}).get("map")
    ):
        raise ValueError("must be one scalar expression (no FROM, WHERE, ';', or clauses)")
    found: set[str] = set()
    problems: list[str] = []
    _walk(node["select_list"][0], found, problems)
    if problems:
        raise ValueError(problems[0])
    return found
