"""Errors raised by the command line's own helpers."""

from __future__ import annotations

from cdc.core.errors import TerminalError


class LocalPostgresError(TerminalError):
    """A throwaway PostgreSQL server (demo, tests) could not be started or stopped."""
