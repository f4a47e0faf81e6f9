"""``cdc status``: where a pipeline stands, from the slot to the lake.

Reads, never writes: the slot from ``pg_replication_slots``, per-table freshness from the
Delta logs, the consumer group's lag from Kafka (``cdc capture`` + ``cdc sink`` mode) and the
snapshot state from the pipeline's position store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from catalog.freshness import table_freshness
from cdc.core.kafka_format import dlq_topic
from cdc.core.secrets import mask_dsn
from cdc.core.settings import Settings
from cdc.kafka.lag import consumer_group_lag, topic_messages
from cdc.kafka.position_store import KafkaPositionStore
from cdc.pipeline import transforms_status
from cdc.postgres.errors import postgres_error
from cdc.postgres.slots import slot_status
from sinks.position_store import LakePositionStore

__all__ = ["PipelineStatus", "pipeline_status"]


@dataclass(slots=True)
class PipelineStatus:
    """The report of :func:`pipeline_status`; :meth:`to_dict` is ``cdc status --json``.

    ``problems`` lists why the pipeline is unhealthy (empty: healthy): the slot is
    missing, lost or inactive, or its lag passed the limit.
    """

    pipeline: str
    source: str
    slot: dict[str, Any] | None
    tables: list[dict[str, Any]]
    kafka: dict[str, Any] | None
    snapshot: dict[str, Any] | None
    #: Transform rules in force, one entry per rule (hash key left out).
    rules: list[dict[str, Any]] = field(default_factory=list)
    #: What the publication leaves out for the rules (operations, columns), or why nothing.
    pushdown: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "source": self.source,
            "healthy": self.healthy,
            "problems": self.problems,
            "slot": self.slot,
            "tables": self.tables,
            "kafka": self.kafka,
            "snapshot": self.snapshot,
            "rules": self.rules,
            "pushdown": self.pushdown,
        }


def _slot(settings: Settings) -> dict[str, Any] | None:
    try:
        with psycopg.connect(settings.source_dsn(), autocommit=True, connect_timeout=10) as conn:
            slot = slot_status(conn, settings.slot_name)
    except psycopg.Error as e:
        raise postgres_error(e, doing="reading the slot", dsn=settings.source_dsn()) from e
    return slot.to_dict() if slot is not None else None


def _problems(slot: dict[str, Any] | None, slot_name: str, max_lag: int | None) -> list[str]:
    if slot is None:
        return [f"slot {slot_name!r} does not exist"]
    problems = []
    if slot["wal_status"] == "lost":
        problems.append(
            f"slot {slot_name!r} is lost: PostgreSQL removed WAL it needed "
            "(max_slot_wal_keep_size); the pipeline must copy its tables again"
        )
    if not slot["active"]:
        problems.append(f"slot {slot_name!r} is inactive: no pipeline is streaming from it")
    lag = slot["lag_bytes"]
    if max_lag is not None and lag is not None and lag > max_lag:
        problems.append(f"slot {slot_name!r} lags {lag} bytes, more than --max-lag {max_lag}")
    return problems


def _kafka(settings: Settings) -> dict[str, Any]:
    bootstrap = settings.kafka_bootstrap()
    client = settings.kafka.client
    partitions = consumer_group_lag(
        bootstrap, group=settings.kafka_group, prefix=settings.topic_prefix, client=client
    )
    dlq = settings.kafka.dlq_topic or dlq_topic(settings.topic_prefix)
    return {
        "group": settings.kafka_group,
        "lag": sum(p.lag for p in partitions),
        "partitions": [p.to_dict() for p in partitions],
        "dlq_topic": dlq,
        "dlq_messages": topic_messages(bootstrap, dlq, client=client) or 0,
    }


def _snapshot(settings: Settings, *, kafka: bool) -> dict[str, Any] | None:
    if kafka:
        store: Any = KafkaPositionStore.for_settings(settings)
    else:
        store = LakePositionStore(
            settings.lake.path, settings.name, storage_options=settings.lake.storage_options or None
        )
    try:
        position = store.load()
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            close()
    if position is None:
        return None
    state = position.to_dict()
    state["state"] = (
        "copying" if not position.snapshot_done or position.pending_snapshots else "done"
    )
    return state


def pipeline_status(
    settings: Settings,
    *,
    kafka: bool = False,
    lake: bool = True,
    max_lag: int | None = None,
) -> PipelineStatus:
    """What ``settings``' pipeline is doing; see :class:`PipelineStatus`.

    ``kafka`` adds the sink group's lag per partition and the dead-letter count, and reads
    the snapshot state from Kafka (``cdc capture``) instead of the lake (``cdc run``);
    ``lake=False`` skips the per-table facts (a capture-only host). ``max_lag`` (bytes)
    makes a larger slot lag a problem.

    Example:
        >>> status = pipeline_status(load_settings(**{"source.dsn": dsn}), max_lag=2**30)  # doctest: +SKIP
        >>> status.healthy, status.slot["lag_bytes"]  # doctest: +SKIP
        (True, 0)
    """
    slot = _slot(settings)
    transforms = transforms_status(settings)
    storage = settings.lake.storage_options or None
    tables = (
        [t.to_dict() for t in table_freshness(settings.lake.path, storage_options=storage)]
        if lake
        else []
    )
    return PipelineStatus(
        pipeline=settings.name,
        source=mask_dsn(settings.source_dsn()),
        slot=slot,
        tables=tables,
        kafka=_kafka(settings) if kafka else None,
        snapshot=_snapshot(settings, kafka=kafka),
        rules=transforms["rules"],
        pushdown=transforms["pushdown"],
        problems=_problems(slot, settings.slot_name, max_lag),
    )
