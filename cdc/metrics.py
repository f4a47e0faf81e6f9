"""Prometheus metrics of ``cdc run``, ``cdc capture`` and ``cdc sink`` (``--metrics-port``).

docs/operations.md ("Metrics") describes each. The hot paths only bump plain integers that
they keep anyway (:class:`EventCounts`); everything else is recorded once per flush, per
slot check or per heartbeat, and the per-event counts become Prometheus samples only when
``/metrics`` is scraped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

# prometheus_client is imported where metrics are made, not here: it takes about 15 ms to
# load, and a pipeline without --metrics-port only needs EventCounts.

log = logging.getLogger(__name__)

__all__ = ["EventCounts", "Metrics", "kafka_lag_collector", "serve_metrics"]

#: Change operations, in the order of the per-table counters.
OPS = ("c", "u", "d", "t", "r")


class EventCounts:
    """Changes handed to the sink, per table and operation, counted at the cost of one
    identity check and one list increment per event.

    Example:
        >>> counts = EventCounts()
        >>> counts.add(event)  # doctest: +SKIP
        >>> counts.snapshot()  # doctest: +SKIP
        {('public.orders', 'c'): 1}
    """

    def __init__(self) -> None:
        self._tables: dict[int, tuple[Any, dict[str, int]]] = {}
        self._current: Any = None
        self._ops: dict[str, int] = {}
        self._lock = threading.Lock()

    def switch(self, table: Any) -> dict[str, int]:
        """The op counters of ``table`` (a TableSchema), made current."""
        entry = self._tables.get(id(table))
        if entry is None or entry[0] is not table:
            with self._lock:
                # The schema object is kept so its id is not reused by another one.
                entry = (table, dict.fromkeys(OPS, 0))
                self._tables[id(table)] = entry
        self._current = table
        self._ops = entry[1]
        return entry[1]

    def snapshot(self) -> dict[tuple[str, str], int]:
        """``{(schema.table, op): count}``, summed over the table's schema versions."""
        with self._lock:
            entries = list(self._tables.values())
        totals: dict[tuple[str, str], int] = {}
        for table, ops in entries:
            name = table.qualified_name
            for op, n in list(ops.items()):
                if n:
                    totals[(name, op)] = totals.get((name, op), 0) + n
        return totals

    def by_table(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for (name, _op), n in self.snapshot().items():
            totals[name] = totals.get(name, 0) + n
        return totals

    def total(self) -> int:
        return sum(self.snapshot().values())


class _ScrapeTime:
    """Samples computed when ``/metrics`` is read: the per-event counts, commit ages and
    whatever ``extra`` collectors yield (the Kafka consumer lag of ``cdc sink``). A
    prometheus_client ``Collector`` (a protocol: any object with ``collect``)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        events = CounterMetricFamily(
            "cdc_events", "Changes captured, by table and operation.", labels=["table", "op"]
        )
        for counts in list(self.metrics.event_counts):
            for (table, op), n in counts.snapshot().items():
                events.add_metric([table, op], n)
        yield events
        age = GaugeMetricFamily(
            "cdc_last_commit_age_seconds",
            "Seconds since the source commit of the newest change landed downstream, by table.",
            labels=["table"],
        )
        now = time.time()
        for table, ts in sorted(self.metrics.last_commit.items()):
            age.add_metric([table], max(0.0, now - ts))
        yield age
        for extra in list(self.metrics.extra_collectors):
            yield from extra()


class Metrics:
    """The metrics of one process, in their own registry (:attr:`registry`).

    Example:
        >>> m = Metrics()
        >>> m.flushed({"tables": {"public.t": 3}}, seconds=0.01)
        >>> m.registry.get_sample_value("cdc_rows_written_total", {"table": "public.t"})
        3.0
    """

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.event_counts: list[EventCounts] = []
        self.last_commit: dict[str, float] = {}
        self.extra_collectors: list[Callable[[], Iterator[Any]]] = []
        self.flush_duration = Histogram(
            "cdc_flush_duration_seconds",
            "Time of one flush of the sink (Delta commits, or waiting for Kafka's acks).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.rows_written = Counter(
            "cdc_rows_written", "Rows made durable downstream, by table.", ["table"], registry=r
        )
        self.dead_letters = Counter(
            "cdc_dead_letters", "Messages sent to the dead-letter table/topic.", registry=r
        )
        self.snapshot_rows = Counter(
            "cdc_snapshot_rows", "Rows copied by snapshots, by table.", ["table"], registry=r
        )
        self.reconnects = Counter(
            "cdc_reconnects", "Reconnections to PostgreSQL after a lost connection.", registry=r
        )
        self.lag_bytes = Gauge(
            "cdc_replication_lag_bytes",
            "WAL bytes between the server's current position and the slot's confirmed_flush_lsn.",
            registry=r,
        )
        self.retained_bytes = Gauge(
            "cdc_slot_retained_wal_bytes",
            "WAL bytes the server keeps for the slot (current position minus restart_lsn).",
            registry=r,
        )
        self.lag_warning = Gauge(
            "cdc_slot_lag_warning",
            "1 while the slot's lag is above the warning threshold (ops.lag_warn_bytes).",
            registry=r,
        )
        self.slot_lost = Counter(
            "cdc_slot_lost", "Times the slot was found invalidated (wal_status 'lost').", registry=r
        )
        self.heartbeats = Counter(
            "cdc_heartbeats", "Heartbeat messages emitted through the slot's database.", registry=r
        )
        self.heartbeat_latency = Gauge(
            "cdc_heartbeat_latency_seconds",
            "Seconds from emitting the latest heartbeat to receiving it from the slot.",
            registry=r,
        )
        r.register(_ScrapeTime(self))

    def flushed(self, result: dict[str, Any], *, seconds: float) -> None:
        """Record one flush: its duration and the rows per table it wrote."""
        self.flush_duration.observe(seconds)
        if result.get("dead_letters"):
            self.dead_letters.inc(result["dead_letters"])
        for table, rows in (result.get("tables") or {}).items():
            if rows:
                self.rows_written.labels(table).inc(rows)

    def landed(self, table: str, commit_epoch: float) -> None:
        """The newest source commit of ``table`` now durable downstream (epoch seconds)."""
        if commit_epoch > self.last_commit.get(table, 0.0):
            self.last_commit[table] = commit_epoch


def kafka_lag_collector(settings: Any) -> Callable[[], Iterator[Any]]:
    """A scrape-time collector of ``cdc_kafka_consumer_lag{topic,partition}``: the sink
    group's lag, read from the brokers when ``/metrics`` is scraped."""
    from cdc.kafka.errors import KafkaUnavailableError
    from cdc.kafka.lag import consumer_group_lag

    def collect() -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "cdc_kafka_consumer_lag",
            "Messages of the table topics the sink group has not committed, by partition.",
            labels=["topic", "partition"],
        )
        try:
            lags = consumer_group_lag(
                settings.kafka_bootstrap(),
                group=settings.kafka_group,
                prefix=settings.topic_prefix,
                client=settings.kafka.client,
            )
        except KafkaUnavailableError as e:  # a scrape must not fail with the brokers
            log.warning("cannot read the consumer lag: %s", e)
            lags = []
        for p in lags:
            family.add_metric([p.topic, str(p.partition)], p.lag)
        yield family

    return collect


def serve_metrics(metrics: Metrics, port: int, *, host: str = "0.0.0.0") -> Any:
    """Serve ``metrics`` at ``http://host:port/metrics`` from a daemon thread; returns the
    server (``.shutdown()`` stops it). Port 0 picks a free port (``server.server_port``).

    Example:
        >>> server = serve_metrics(Metrics(), 0)  # doctest: +SKIP
    """
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server
