"""The Kafka event contract: topic names, message keys, values and headers, and the client
settings every Kafka client of ours shares. No IO (:mod:`cdc.kafka.event_encoder` encodes).

One topic per table, ``<prefix>.<schema>.<table>``. Every change is one message:

* **key**: the JSON object of the table's key columns (``{"id": 42}``), encoded like the
  values, so that every change of a row goes to one partition, in commit order. A table
  without a key (no primary key, no replica-identity index) has a null key: its changes are
  spread over the partitions and have no per-row order.
* **value**: the Debezium change-event envelope of :func:`cdc.core.events.debezium_envelope`
  (``{"before", "after", "source", "op", "ts_ms", "transaction"}``), plus Debezium 2.6's
  microsecond commit time ``source.ts_us``. With the ``json-with-schema`` format, key and
  value are wrapped as Kafka Connect's ``JsonConverter`` writes them with
  ``schemas.enable=true``: ``{"schema": <Connect schema>, "payload": <envelope>}``.
* **headers**: ``cdc.schema_id`` (the id of the table schema in the schema registry),
  ``cdc.lsn`` and ``cdc.seq`` (the change's commit LSN and its order within the transaction:
  the position the sink deduplicates by) and ``cdc.commit_ts_us``. All are ASCII decimals.
* A delete is followed by a **tombstone** (same key, null value), so that compacted topics
  forget deleted rows.

Truncates have a null key (a truncate concerns every row), as Debezium's do. Messages
without a key do not go to a random partition: their partition is derived from the
change's position (:func:`keyless_partition`), so that a change capture sends again after a
restart lands where its first copy did, and the sink recognises it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final, Literal

from confluent_kafka import KafkaError

from cdc.core.table_schema import TableSchema

__all__ = [
    "HEADER_COMMIT_TS_US",
    "HEADER_LSN",
    "HEADER_SCHEMA_ID",
    "HEADER_SEQ",
    "ILLEGAL_TOPIC_CHARS",
    "Format",
    "client_config",
    "close_client",
    "dlq_topic",
    "is_retriable",
    "remember_last",
    "schemas_topic",
    "state_topic",
    "table_topics_pattern",
    "topic_name",
]

Format = Literal["json", "json-with-schema"]

HEADER_SCHEMA_ID: Final = "cdc.schema_id"
HEADER_LSN: Final = "cdc.lsn"
HEADER_SEQ: Final = "cdc.seq"
HEADER_COMMIT_TS_US: Final = "cdc.commit_ts_us"

#: Kafka's limit on topic names.
_MAX_TOPIC = 249
ILLEGAL_TOPIC_CHARS = re.compile(r"[^A-Za-z0-9._-]")


# -- topic names ----------------------------------------------------------------------------


def topic_name(prefix: str, table: TableSchema | str) -> str:
    """The topic of a table: ``<prefix>.<schema>.<table>``.

    Characters Kafka does not allow in topic names are replaced by ``_``, as Debezium does;
    so ``public."Odd Name"`` and ``public.odd_name``-like pairs can collide (capture refuses
    to send two tables to one topic).

    >>> topic_name("shop", "public.orders")
    'shop.public.orders'
    >>> topic_name("shop", 'public.Odd "Name"')
    'shop.public.Odd__Name_'
    """
    name = table if isinstance(table, str) else table.qualified_name
    topic = ILLEGAL_TOPIC_CHARS.sub("_", f"{prefix}.{name}")
    if len(topic) > _MAX_TOPIC:
        raise ValueError(f"topic name for {name!r} is longer than {_MAX_TOPIC} characters")
    return topic


def schemas_topic(prefix: str) -> str:
    """The compacted topic of the schema registry: ``<prefix>.__schemas``."""
    return f"{prefix}.__schemas"


def state_topic(prefix: str) -> str:
    """The compacted topic where capture keeps its slot and snapshot state."""
    return f"{prefix}.__capture"


def dlq_topic(prefix: str) -> str:
    """The default dead-letter topic of the sink workers: ``<prefix>.__dlq``."""
    return f"{prefix}.__dlq"


def table_topics_pattern(prefix: str) -> str:
    """A librdkafka subscription regex for every table topic of ``prefix``.

    Internal topics (``<prefix>.__schemas``, ``__dlq``, ``__capture``) start with two
    underscores after the prefix and are left out.

    >>> table_topics_pattern("shop")
    '^shop\\\\.([^_]|_[^_])'
    """
    return "^" + re.escape(prefix).replace("\\-", "-") + r"\.([^_]|_[^_])"


# -- client configuration ---------------------------------------------------------------------


def client_config(
    bootstrap: str,
    *,
    common: dict[str, Any] | None = None,
    specific: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    required: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """librdkafka configuration: ``defaults``, then the user's ``common`` and ``specific``
    properties, then ``required`` (properties the delivery guarantees depend on).

    A user property that contradicts a required one raises ``ValueError`` rather than being
    silently overridden, since it would silently weaken a guarantee either way.

    >>> client_config("k:9092", specific={"linger.ms": 20}, defaults={"linger.ms": 5})
    {'bootstrap.servers': 'k:9092', 'linger.ms': 20}
    """
    config: dict[str, Any] = {"bootstrap.servers": bootstrap}
    config.update(defaults or {})
    user = {**(common or {}), **(specific or {})}
    for key, value in (required or {}).items():
        if key in user and str(user[key]).lower() != str(value).lower():
            raise ValueError(
                f"librdkafka property {key}={user[key]!r} is not allowed: the delivery "
                f"guarantees need {key}={value!r}"
            )
    config.update(user)
    config.update(required or {})
    return config


def close_client(client: Any) -> None:
    """Release a producer's connections now rather than when the garbage collector gets to
    it (``close()`` exists in recent confluent-kafka versions only)."""
    close = getattr(client, "close", None)
    if close is not None:
        close()


# -- errors -------------------------------------------------------------------------------------

# Errors librdkafka does not flag retriable but that are about reaching the cluster, so a
# later attempt (or a restart) can succeed.
_TRANSIENT_CODES: Final = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TIMED_OUT,
        KafkaError._MSG_TIMED_OUT,
        KafkaError._RESOLVE,
        KafkaError._DESTROY,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError.NOT_CONTROLLER,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    }
)


def is_retriable(error: KafkaError) -> bool:
    """Whether an operation that failed with ``error`` may succeed when tried again.

    Fatal errors (a fenced idempotent producer, say) never are; errors librdkafka marks
    retriable are; so are connection-level errors (transport, timeouts, brokers down, a
    missing leader). Everything else (authentication, authorization, invalid configuration,
    a record too large) is not.
    """
    if error.fatal():
        return False
    return bool(error.retriable()) or error.code() in _TRANSIENT_CODES


# -- shared by the encoder and the decoder ----------------------------------------------------


def remember_last(convert: Callable[[Any], Any], kind: type) -> Callable[[Any], Any]:
    """``convert`` remembering its last argument of type ``kind`` and its result.

    For timestamps, both ways across Kafka: a transaction's rows often share one
    (``now()``), and formatting or parsing one costs more than comparing two. Equal aware
    datetimes are one instant, so they encode alike; a value of another type (a naive
    datetime never equals an aware one) always reaches ``convert``, and its error.
    """
    last: list[Any] = [None, None]

    def remembered(value: Any) -> Any:
        if value.__class__ is kind and value == last[0]:
            return last[1]
        out = convert(value)
        last[0], last[1] = value, out
        return out

    return remembered
