"""Errors raised by sinks (:mod:`sinks`).

:class:`TransientSinkError` may succeed on retry (a commit conflict with a concurrent
writer, an object store that did not answer); :class:`TerminalSinkError` will not (a schema
that cannot evolve, a table that is not a Delta table). See :mod:`cdc.core.errors`.
"""

from __future__ import annotations

from cdc.core.errors import CdcError, TerminalError, TransientError


class SinkError(CdcError):
    """Root of every error raised by the ``sinks`` package."""


class TransientSinkError(SinkError, TransientError):
    """Retrying the operation may succeed."""


class TerminalSinkError(SinkError, TerminalError):
    """Retrying cannot help; the message says what to change."""


class SinkBackpressureError(TransientSinkError):
    """The sink's buffers are full: the caller must :meth:`~sinks.base.Sink.flush` before
    adding more."""


class StreamFencedError(TransientSinkError):
    """Another writer committed a stream (topic-partition) this sink was writing: the
    caller lost the partition, must drop what it buffered and re-read from Delta."""


class IncompatibleSchemaChangeError(TerminalSinkError):
    """A column changed to a type the lake cannot hold beside the old values."""


class UndecodableMessageError(TerminalSinkError):
    """A message is not a change event we can read, or does not fit its schema. The
    message says why; the worker sends it to the dead-letter queue."""


class KafkaConsumerError(TerminalSinkError):
    """Kafka refused something the worker needs, and retrying cannot help."""


class KafkaConsumerUnavailableError(TransientSinkError):
    """The Kafka cluster could not be reached, or a seek the worker relies on failed."""
