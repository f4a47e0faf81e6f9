"""Capture's position in Kafka: ``cdc capture``'s :class:`~sinks.base.PositionStore`."""

from __future__ import annotations

from typing import Any

import orjson

from catalog.errors import CatalogError
from catalog.kafka_schema_registry import CompactedTopic
from cdc.core.kafka_format import state_topic
from cdc.core.position import CapturePosition
from cdc.core.settings import Settings
from cdc.kafka.producer import wrap_kafka_error


class KafkaPositionStore:
    """Capture's slot-and-snapshot state, in the compacted topic ``<prefix>.__capture``.

    The record's key is the pipeline name, its value :meth:`CapturePosition.to_dict`. The
    embedded pipeline keeps the same state in the lake (:class:`cdc.core.position.PositionStore`);
    ``cdc capture`` has no lake.

    Hazard:
        On a broker that forgets its topics (Tansu, or a topic deleted by hand) capture
        finds the slot but no state, and stops rather than guess whether the snapshot
        finished.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        prefix: str,
        pipeline: str,
        client: dict[str, Any] | None = None,
        producer: dict[str, Any] | None = None,
        consumer: dict[str, Any] | None = None,
        replication_factor: int = -1,
    ) -> None:
        topic = state_topic(prefix)
        self.path = f"Kafka topic {topic} (key {pipeline!r})"
        self._key = pipeline.encode()
        self._replication_factor = replication_factor
        self._log = CompactedTopic(
            bootstrap, topic, client=client, producer=producer, consumer=consumer
        )
        self._ensured = False
        self._latest: CapturePosition | None = None

    @classmethod
    def for_settings(cls, settings: Settings) -> KafkaPositionStore:
        """The store of ``settings``' pipeline, with its Kafka client properties."""
        kafka = settings.kafka
        return cls(
            settings.kafka_bootstrap(),
            prefix=settings.topic_prefix,
            pipeline=settings.name,
            client=kafka.client,
            producer=kafka.producer,
            consumer=kafka.consumer,
            replication_factor=kafka.replication_factor,
        )

    def _ensure(self) -> None:
        if not self._ensured:
            self._log.ensure(replication_factor=self._replication_factor)
            self._ensured = True

    def load(self) -> CapturePosition | None:
        try:
            self._ensure()
            records = self._log.read_new()
        except CatalogError as e:
            raise wrap_kafka_error(e, f"cannot read capture state from {self.path}") from e
        for key, value, _offset in records:
            if key == self._key:
                self._latest = (
                    None if value is None else CapturePosition.from_dict(orjson.loads(value))
                )
        return self._latest

    def save(self, position: CapturePosition) -> None:
        try:
            self._ensure()
            self._log.put(self._key, orjson.dumps(position.to_dict()))
        except CatalogError as e:
            raise wrap_kafka_error(e, f"cannot save capture state to {self.path}") from e
        self._latest = position

    def close(self) -> None:
        self._log.close()
