"""Errors raised by the maintenance jobs (``jobs``).

Every error derives from :class:`JobError`. Callers decide by the two branches:

* :class:`TransientJobError`: running the job again may succeed (a commit kept conflicting
  with a live writer, the object store did not answer). Jobs are idempotent, so the next
  scheduled run simply continues.
* :class:`TerminalJobError`: retrying cannot help (a bad option, a table that is not a Delta
  table, a merge that would lose data); the message says what to change.

Driver errors (deltalake, DuckDB, pyarrow) are wrapped with ``raise ... from e`` so the
original cause stays visible.
"""

from __future__ import annotations

from cdc.core.errors import CdcError, TerminalError, TransientError


class JobError(CdcError):
    """Root of every error raised by the ``jobs`` package."""


class TransientJobError(JobError, TransientError):
    """Retrying the job may succeed."""


class TerminalJobError(JobError, TerminalError):
    """Retrying cannot help; the message says what to change."""


class CommitConflictError(TransientJobError):
    """A job's Delta commit kept conflicting with concurrent writers; nothing was committed."""
