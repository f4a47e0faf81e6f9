"""Errors raised by the catalog (schema registry, DuckDB views)."""

from __future__ import annotations


class CatalogError(Exception):
    """Root of every error raised by the ``catalog`` package."""


class TransientCatalogError(CatalogError):
    """Retrying the operation may succeed."""


class TerminalCatalogError(CatalogError):
    """Retrying cannot help; the message says what to change."""


class DeltaExtensionNotFound(TerminalCatalogError):
    """DuckDB's delta extension is not installed for this DuckDB version."""
