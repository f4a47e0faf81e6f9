"""Errors raised by the catalog (schema registries, DuckDB views, the ``Lake`` API).

See :mod:`cdc.core.errors` for the two kinds.
"""

from __future__ import annotations

from cdc.core.errors import CdcError, TerminalError, TransientError


class CatalogError(CdcError):
    """Root of every error raised by the ``catalog`` package."""


class TransientCatalogError(CatalogError, TransientError):
    """Retrying the operation may succeed."""


class TerminalCatalogError(CatalogError, TerminalError):
    """Retrying cannot help; the message says what to change."""


class DuckDBExtensionNotFoundError(TerminalCatalogError):
    """A DuckDB extension the lake needs is not installed for this DuckDB version."""


class DeltaExtensionNotFoundError(DuckDBExtensionNotFoundError):
    """DuckDB's delta extension is not installed for this DuckDB version."""


class ObjectStoreConfigError(TerminalCatalogError):
    """The lake's object store cannot be used as configured; the message names the setting."""


class UnknownSchemaError(TerminalCatalogError):
    """No registered schema has the requested id."""


class QueryError(TerminalCatalogError):
    """DuckDB rejected or failed a query."""


class UnsafeCommitsError(TerminalCatalogError):
    """The lake's store cannot commit safely with several writers; the message says what
    to change."""
