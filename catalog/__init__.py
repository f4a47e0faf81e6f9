"""The table catalog: schema registry, DuckDB views over the lake, and the notebook API.

Example:
    >>> from catalog import Lake
    >>> with Lake("/data/lake") as lake:  # doctest: +SKIP
    ...     print(lake.sql("SELECT count(*) FROM public.orders").fetchone())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from catalog.duckdb_views import connect
    from catalog.errors import UnknownSchemaError
    from catalog.lake import Lake, TableInfo
    from catalog.schema_registry import SchemaRegistry, SchemaVersion

__all__ = [
    "Lake",
    "SchemaRegistry",
    "SchemaVersion",
    "TableInfo",
    "UnknownSchemaError",
    "connect",
]

# Exports are imported on first access (PEP 562): sinks and the CLI import
# catalog.lake_layout and catalog.errors on hot paths and should not pay for loading
# duckdb and deltalake (~150 ms) just to reach those small modules.
_EXPORTS = {
    "Lake": "catalog.lake",
    "TableInfo": "catalog.lake",
    "SchemaRegistry": "catalog.schema_registry",
    "SchemaVersion": "catalog.schema_registry",
    "UnknownSchemaError": "catalog.schema_registry",
    "connect": "catalog.duckdb_views",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'catalog' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
