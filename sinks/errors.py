"""Errors raised by sinks.

:class:`SinkError` is the root. :class:`TransientSinkError` may succeed on retry (a commit
conflict with a concurrent writer, an object store hiccup); :class:`TerminalSinkError` will
not (a schema that cannot evolve, a corrupted table).
"""

from __future__ import annotations


class SinkError(Exception):
    """Root of every error raised by the ``sinks`` package."""


class TransientSinkError(SinkError):
    """Retrying the operation may succeed."""


class TerminalSinkError(SinkError):
    """Retrying cannot help; the message says what to change."""


class SinkBackpressure(TransientSinkError):
    """The sink's buffers are full: the caller must :meth:`flush` before adding more."""
