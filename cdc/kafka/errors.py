"""Errors raised by capture's Kafka side (:mod:`cdc.kafka`)."""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException

from catalog.errors import CatalogError, TransientCatalogError
from cdc.core.errors import CdcError, TerminalError, TransientError
from cdc.core.kafka_format import is_retriable


class KafkaCaptureError(CdcError):
    """Root of the errors of :mod:`cdc.kafka`."""


class KafkaUnavailableError(KafkaCaptureError, TransientError):
    """The Kafka cluster could not be reached or did not answer in time."""


class KafkaRejectedError(KafkaCaptureError, TerminalError):
    """Kafka refused something capture needs (a topic, a record) and retrying cannot help."""


def wrap_kafka_error(
    error: KafkaError | KafkaException | CatalogError, doing: str
) -> KafkaCaptureError:
    """The error of ours that says what failed while ``doing``, of the right kind."""
    if isinstance(error, CatalogError):
        cls: type[KafkaCaptureError] = (
            KafkaUnavailableError
            if isinstance(error, TransientCatalogError)
            else KafkaRejectedError
        )
        return cls(f"{doing}: {error}")
    err = error.args[0] if isinstance(error, KafkaException) else error
    if isinstance(err, KafkaError):
        cls = KafkaUnavailableError if is_retriable(err) else KafkaRejectedError
        return cls(f"{doing}: {err.str()} ({err.name()})")
    return KafkaUnavailableError(f"{doing}: {error}")
