"""Errors raised by capture (``cdc``).

Every error derives from :class:`CdcError`. Callers decide what to do by the two branches:

* :class:`TransientCdcError`: the operation may succeed if retried (a dropped connection,
  a server restarting). The pipeline retries these with backoff.
* :class:`TerminalCdcError`: retrying cannot help (bad configuration, a missing privilege,
  bytes that do not decode). The pipeline stops and the message says what to do.

Driver errors are wrapped with ``raise ... from e`` so the original cause stays visible.
"""

from __future__ import annotations


class CdcError(Exception):
    """Root of every error raised by the ``cdc`` package."""


class TransientCdcError(CdcError):
    """Retrying the operation may succeed."""


class TerminalCdcError(CdcError):
    """Retrying cannot help; the message says what to change."""


class ConfigError(TerminalCdcError):
    """A setting is missing or invalid."""


class PrerequisiteError(TerminalCdcError):
    """The source database is not set up for logical replication (wal_level, privileges...)."""


class SourceConnectionError(TransientCdcError):
    """The connection to PostgreSQL failed or was lost."""


class DecodeError(TerminalCdcError):
    """Bytes from the replication stream do not form a valid message."""


class ValueConversionError(TerminalCdcError):
    """A column value's text form cannot be converted to its typed value without loss."""


class LocalPostgresError(TerminalCdcError):
    """A throwaway PostgreSQL server (demo, tests) could not be started or stopped."""
