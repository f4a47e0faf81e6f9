"""Operations in Kafka mode: `cdc status --kafka` (consumer-group lag per partition, the
dead-letter count, capture's state in Kafka) and the sink's /metrics."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Producer

from cdc.metrics import Metrics, kafka_lag_collector, serve_metrics
from cdc.pipeline import run_capture
from cdc.status import pipeline_status
from sinks.kafka_worker import run_sink
from tests.plugins.kafka_pipeline import (
    Background,
    background,
    cdc_process,
    settings,
    stop_process,
    unique,
    wait_captured,
    wait_streaming,
    wait_sunk,
)
from tests.plugins.metrics import free_port, sample, scrape, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


def test_status_and_metrics_in_kafka_mode(
    pg_dsn: str, pg_conn: psycopg.Connection, kafka_broker: str, tmp_path: Path
) -> None:
    pg_conn.execute(
        'CREATE TABLE "Lines" (order_id bigint, line int, sku text, PRIMARY KEY (order_id, line))'
    )
    pg_conn.execute("""INSERT INTO "Lines" SELECT g, g % 2, NULL FROM generate_series(1, 50) g""")
    prefix, name = unique("ops"), unique("ops")
    lake = str(tmp_path / "lake")
    s = settings(kafka_broker, prefix, name, **{"source.dsn": pg_dsn, "lake.path": lake})
    capture_metrics, sink_metrics = Metrics(), Metrics()
    sink_metrics.extra_collectors.append(kafka_lag_collector(s))
    server = serve_metrics(sink_metrics, 0, host="127.0.0.1")
    port = server.server_port

    def on_flush(result: dict) -> None:
        sink_metrics.flushed(result, seconds=result["duration_s"])

    capture = Background("capture", lambda stop: run_capture(s, stop=stop, metrics=capture_metrics))
    sink = Background("sink", lambda stop: run_sink(s, stop=stop, on_flush=on_flush))
    try:
        with background(capture, sink):
            wait_streaming(pg_dsn, name, capture)
            pg_conn.execute("""UPDATE "Lines" SET sku = 'x' WHERE line = 1""")
            wait_captured(pg_dsn, name, capture)
            topic = f"{prefix}.public.Lines"
            producer = Producer({"bootstrap.servers": kafka_broker})
            producer.produce(topic, key=b'{"order_id": 1, "line": 1}', value=b"not json")
            producer.flush(10)
            wait_sunk(kafka_broker, prefix, s.kafka_group, capture, sink)

            text = scrape(port)
            assert sample(text, "cdc_rows_written_total", table="public.Lines") == 50 + 25
            assert sample(text, "cdc_dead_letters_total") == 1
            lags = [
                sample(text, "cdc_kafka_consumer_lag", topic=topic, partition=str(p))
                for p in range(s.kafka.partitions)
            ]
            assert all(lag is not None and lag >= 0 for lag in lags)

            report = pipeline_status(s, kafka=True).to_dict()
            assert report["slot"]["active"] is True
            assert report["snapshot"]["state"] == "done"  # read from <prefix>.__capture
            kafka = report["kafka"]
            assert kafka["group"] == s.kafka_group
            assert {(p["topic"], p["partition"]) for p in kafka["partitions"]} == {
                (topic, p) for p in range(s.kafka.partitions)
            }
            assert all(p["committed"] is not None for p in kafka["partitions"])
            assert kafka["dlq_messages"] == 1
            assert {t["table"]: t["rows"] for t in report["tables"]}["public.Lines"] == 75
            json.dumps(report)  # what `cdc status --json` prints
        # Capture counted what Kafka acknowledged: the snapshot and the changes.
        assert (
            capture_metrics.registry.get_sample_value(
                "cdc_rows_written_total", {"table": "public.Lines"}
            )
            == 50 + 25
        )
        assert (
            capture_metrics.registry.get_sample_value(
                "cdc_snapshot_rows_total", {"table": "public.Lines"}
            )
            == 50
        )
    finally:
        server.shutdown()


def test_capture_and_sink_commands_serve_metrics(
    pg_dsn: str, pg_conn: psycopg.Connection, kafka_broker: str, tmp_path: Path
) -> None:
    """`cdc capture --metrics-port` and `cdc sink --metrics-port`, as processes."""
    pg_conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
    pg_conn.execute("INSERT INTO items SELECT g, NULL FROM generate_series(1, 20) g")
    prefix, name = unique("opsc"), unique("opsc")
    capture_port, sink_port = free_port(), free_port()
    common = ["--kafka", kafka_broker, "--name", name, "--topic-prefix", prefix]
    capture = cdc_process(
        "capture",
        "--source",
        pg_dsn,
        *common,
        "--metrics-port",
        str(capture_port),
        log=tmp_path / "capture.log",
    )
    sink = cdc_process(
        "sink",
        "--lake",
        str(tmp_path / "lake"),
        *common,
        "--metrics-port",
        str(sink_port),
        log=tmp_path / "sink.log",
    )
    try:

        def landed() -> bool:
            try:
                text = scrape(sink_port)
            except OSError:
                return False
            return sample(text, "cdc_rows_written_total", table="public.items") == 20

        wait_for(landed, timeout=90, what="the sink to write the snapshot")
        text = scrape(sink_port)
        assert (sample(text, "cdc_flush_duration_seconds_count") or 0) >= 1
        assert any(
            sample(text, "cdc_kafka_consumer_lag", topic=f"{prefix}.public.items", partition=str(p))
            is not None
            for p in range(3)
        )
        captured = scrape(capture_port)
        assert sample(captured, "cdc_snapshot_rows_total", table="public.items") == 20
        assert sample(captured, "cdc_rows_written_total", table="public.items") == 20
    finally:
        for proc in (sink, capture):
            if proc.poll() is None:
                stop_process(proc)
