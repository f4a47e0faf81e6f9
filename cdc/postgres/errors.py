"""Errors raised by the PostgreSQL side of capture (:mod:`cdc.postgres`)."""

from __future__ import annotations

from cdc.core.errors import CdcError, TerminalError, TransientError


class PostgresError(CdcError):
    """Root of the errors of :mod:`cdc.postgres`."""


class SourceConnectionError(PostgresError, TransientError):
    """The connection to PostgreSQL failed or was lost, or the server is restarting."""


class SourceError(PostgresError, TerminalError):
    """PostgreSQL refused what capture asked, and asking again will not change that (a
    wrong password, a statement the server rejects)."""


class PrerequisiteError(SourceError):
    """The source database is not set up for logical replication (wal_level, privileges...)."""


class SlotLostError(SourceError):
    """The replication slot this pipeline streamed from is gone or invalidated: the changes
    it held are not recoverable from PostgreSQL."""


class SlotInUseError(SourceError):
    """A slot is active (a consumer streams from it) and was not to be dropped."""


class StreamSpillError(PostgresError, TransientError):
    """A streamed transaction could not be spilled to or read back from local disk."""
