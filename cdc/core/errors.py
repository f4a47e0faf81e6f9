"""The root of every error this project raises, and the two kinds callers act on.

In the style of dlt: one root, :class:`CdcError`, and two kinds beneath it that say what a
caller should do, whatever package raised the error:

* :class:`TransientError`: the operation may succeed if retried (a dropped connection, a
  server restarting, an object store that did not answer). Long-running commands retry
  these with backoff; the CLI exits 75 (``EX_TEMPFAIL``) so a supervisor restarts it.
* :class:`TerminalError`: retrying cannot help (bad configuration, a wrong password, a
  missing privilege, bytes that do not decode, a lost replication slot). The command stops,
  the CLI exits 1 and the message says what to change.

Every package keeps its errors in its own ``errors.py``: a package root derived from
:class:`CdcError` (``SinkError``, ``CatalogError``...) and concrete errors that mix in
exactly one kind. Driver errors are wrapped with ``raise ... from e`` so the cause stays
visible.

This module also holds the errors of :mod:`cdc.core` itself.
"""

from __future__ import annotations


class CdcError(Exception):
    """Root of every error raised by this project's packages."""


class TransientError(CdcError):
    """Retrying the operation may succeed. Mixed into concrete errors."""


class TerminalError(CdcError):
    """Retrying cannot help; the message says what to change. Mixed into concrete errors."""


class ConfigError(TerminalError):
    """A setting is missing or invalid."""


class DecodeError(TerminalError):
    """Bytes from the replication stream do not form a valid message."""


class ValueConversionError(TerminalError):
    """A column value's text form cannot be converted to its typed value without loss."""
