"""Consumer-group lag and topic sizes, for ``cdc status`` and the sink's metrics.

The sink workers commit their group's offsets for monitoring only (Delta holds the offsets
that count), so the lag read here may trail the lake by up to one progress report.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from cdc.core.kafka_format import client_config, close_client, table_topics_pattern
from cdc.kafka.errors import KafkaUnavailableError

__all__ = ["PartitionLag", "consumer_group_lag", "topic_messages"]

#: How long one metadata or offset request may take.
TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """One partition: its log end, the group's committed offset and the difference."""

    topic: str
    partition: int
    end_offset: int
    committed: int | None
    lag: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _consumer(bootstrap: str, group: str, client: dict[str, Any] | None) -> Consumer:
    config = client_config(
        bootstrap,
        common=client,
        required={"group.id": group, "enable.auto.commit": False},
    )
    return Consumer(config)


def consumer_group_lag(
    bootstrap: str,
    *,
    group: str,
    prefix: str,
    client: dict[str, Any] | None = None,
) -> list[PartitionLag]:
    """Lag of consumer group ``group`` on every table topic of ``prefix``, by partition.

    A partition the group never committed counts its whole retained log as lag.

    Example:
        >>> sum(p.lag for p in consumer_group_lag("k:9092", group="shop-sink", prefix="shop"))  # doctest: +SKIP
        0
    """
    pattern = re.compile(table_topics_pattern(prefix))
    consumer = _consumer(bootstrap, group, client)
    try:
        metadata = consumer.list_topics(timeout=TIMEOUT)
        partitions = [
            TopicPartition(topic, p)
            for topic, meta in sorted(metadata.topics.items())
            if pattern.match(topic)
            for p in sorted(meta.partitions)
        ]
        committed = consumer.committed(partitions, timeout=TIMEOUT) if partitions else []
        lags = []
        for tp in committed:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(tp.topic, tp.partition), timeout=TIMEOUT
            )
            done = tp.offset if tp.offset >= 0 else None
            lags.append(
                PartitionLag(
                    tp.topic,
                    tp.partition,
                    high,
                    done,
                    max(0, high - (low if done is None else done)),
                )
            )
        return lags
    except KafkaException as e:
        raise KafkaUnavailableError(f"cannot read the lag of group {group!r}: {e}") from e
    finally:
        close_client(consumer)


def topic_messages(
    bootstrap: str, topic: str, *, client: dict[str, Any] | None = None
) -> int | None:
    """Messages retained in ``topic`` (log end minus log start, summed over partitions);
    ``None`` when the topic does not exist."""
    consumer = _consumer(bootstrap, "cdc-status", client)
    try:
        # All topics: asking for one by name may auto-create it on some brokers.
        meta = consumer.list_topics(timeout=TIMEOUT).topics.get(topic)
        if meta is None or meta.error is not None:
            return None
        total = 0
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=TIMEOUT)
            total += max(0, high - low)
        return total
    except KafkaException as e:
        raise KafkaUnavailableError(f"cannot read topic {topic!r}: {e}") from e
    finally:
        close_client(consumer)
