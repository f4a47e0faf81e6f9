"""The Kafka path: ``cdc capture`` into Kafka against ``pg_recvlogical``, and ``cdc sink``
from Kafka into Delta against a bare confluent-kafka consumer.

Run it alone with ``python -m benchmarks.kafka_path`` (it starts its own PostgreSQL and a
memory-only Tansu broker). One table (``bigint`` key, ``timestamptz``, ``int``, 65-char
``text``, the shape of :mod:`benchmarks.capture`) gets one committed transaction inserting
``--rows`` rows (1,000,000 by default). Every reader below runs as a child process and is
timed from its start, process start-up included, one after the other:

* ``kafka_capture``: both slots (one for ``pg_recvlogical``, one for ``cdc capture``) are
  created before the load, so both decode exactly the same WAL from the same start.
  ``pg_recvlogical --endpos`` (pgoutput, the options capture uses, output to /dev/null) is timed
  until it exits; ``cdc capture --snapshot never`` (topics of 3 partitions, the default)
  until the slot's ``confirmed_flush_lsn`` reaches the load's end LSN, which capture
  confirms only once Kafka has acknowledged every message up to it. Ratio: capture rows/s
  over ``pg_recvlogical`` rows/s; target >= 0.50. ``cdc_capture_cpu_s`` is the CPU time
  capture used until then (all its threads; on a shared machine steadier than wall time).
* ``kafka_sink``: over the topic capture just wrote. It is first read whole, untimed, to
  check it holds N messages and to learn each partition's last offset (Tansu's high
  watermarks lag behind its last batch, so they are not used). The limit is a child
  Python process running a bare confluent-kafka consumer (fresh group,
  ``auto.offset.reset=earliest``,
  ``session.timeout.ms=6000``, ``consume(num_messages=10000)``, each ``msg.value()``
  touched and nothing else) until it has N messages; it reports the wall-clock time at
  that point (its close is not timed). ``cdc sink`` (fresh group, the same
  ``session.timeout.ms``, into a fresh lake) is timed until the Kafka offsets it records
  in Delta with each commit (app transactions ``cdc-lakehouse:<name>:<topic>:<p>:offset``)
  reach the last offset of every partition, polled every 0.2 s on one DeltaTable brought up
  to date incrementally; then it is stopped with SIGTERM (not timed). ``rows_in_lake``
  counts the rows of the changelog table afterwards (it must equal ``rows``). Ratio: sink
  rows/s over raw-consumer rows/s; target >= 0.70. ``raw_consume_cpu_s`` and
  ``cdc_sink_cpu_s`` are the CPU seconds (user + system, all threads) each had used when
  it was done: steadier than wall-clock times on a shared machine.

Both consumers join a consumer group, which takes about 3 s on Tansu, so at small sizes the
join dominates both times. The numbers are wall-clock times on a possibly shared machine:
compare ratios, not absolutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from deltalake import DeltaTable

from benchmarks import _common as c
from catalog import lake_layout as layout
from cdc.core.kafka_format import topic_name
from sinks.delta_changelog import stream_app_id

CAPTURE_TARGET = 0.50
SINK_TARGET = 0.70
TABLE = "public.kp"
PUBLICATION = "bench_kp"
PIPELINE = "bench_kp"  # capture's name: the topic prefix
SINK_NAME = "bench_kp_sink"
PARTITIONS = 3
#: librdkafka consumer properties both consumers get: Tansu assigns in ~3 s with these.
CONSUMER = {"session.timeout.ms": 6000}

#: The bare consumer: argv is bootstrap, topic, group, messages, consumer properties (JSON).
#: Prints JSON: the wall-clock time (time.time()) of its first and of its last message.
RAW_CONSUMER = """
import json, resource, sys, time
from confluent_kafka import Consumer
bootstrap, topic, group, wanted = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
consumer = Consumer({
    **json.loads(sys.argv[5]),
    "bootstrap.servers": bootstrap,
    "group.id": group,
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
})
consumer.subscribe([topic])
seen = size = 0
first = None
while seen < wanted:
    for msg in consumer.consume(num_messages=10000, timeout=1.0):
        if msg.error() is not None:
            continue
        value = msg.value()
        size += len(value) if value is not None else 0
        seen += 1
    if first is None and seen:
        first = time.time()
done = time.time()
usage = resource.getrusage(resource.RUSAGE_SELF)
consumer.close()
print(json.dumps({"first_at": first, "done_at": done, "messages": seen, "bytes": size,
                  "cpu_s": usage.ru_utime + usage.ru_stime}))
"""


def _cdc_capture(dsn: str, bootstrap: str, slot: str, end: int) -> tuple[float, float]:
    """Wall seconds until ``end`` is confirmed, and the CPU seconds capture used until then
    (its own threads, librdkafka's among them)."""
    cpu: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        wall = c.time_child(
            c.cdc_command(
                "capture",
                *("--source", dsn, "--kafka", bootstrap, "--name", PIPELINE),
                *("--tables", TABLE, "--snapshot", "never", "--partitions", str(PARTITIONS)),
            ),
            lambda: c.confirmed_lsn(conn, slot) >= end,
            what="cdc capture",
            env={"CDC_SOURCE__PUBLICATION": PUBLICATION, "CDC_SOURCE__SLOT": slot},
            before_stop=lambda pid: cpu.append(c.cpu_seconds(pid)),
        )
    return wall, cpu[0]


def _topic_contents(bootstrap: str, topic: str, rows: int) -> dict[int, tuple[int, int]]:
    """Messages and last offset of each partition of ``topic``, read whole (untimed).

    Read rather than asked for: Tansu's high watermarks lag behind the last batch.
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}"})
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        counts = dict.fromkeys(partitions, 0)
        last = dict.fromkeys(partitions, -1)
        seen, idle_since = 0, time.monotonic()
        while seen < rows and time.monotonic() - idle_since < 5:
            messages = consumer.consume(num_messages=10000, timeout=0.5)
            if messages:
                idle_since = time.monotonic()
            for msg in messages:
                if msg.error() is None:
                    p, offset = msg.partition(), msg.offset()
                    assert p is not None and offset is not None
                    counts[p] += 1
                    last[p] = max(last[p], offset)
                    seen += 1
        return {p: (counts[p], last[p]) for p in partitions}
    finally:
        consumer.close()


def _raw_consume(bootstrap: str, topic: str, rows: int) -> tuple[float, float, float]:
    """Seconds until the bare consumer had ``rows`` messages, until its first one, and the
    CPU seconds it had used by then."""
    started = time.time()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            RAW_CONSUMER,
            bootstrap,
            topic,
            f"bench-raw-{uuid.uuid4()}",
            str(rows),
            json.dumps(CONSUMER),
        ],
        check=True,
        capture_output=True,
        timeout=1800,
    )
    report = json.loads(done.stdout)
    return report["done_at"] - started, report["first_at"] - started, report["cpu_s"]


class _SinkOffsets:
    """Whether the offsets ``cdc sink`` recorded in Delta cover every message of the topic."""

    def __init__(self, lake: Path, topic: str, contents: dict[int, tuple[int, int]]) -> None:
        self.uri = layout.changes_uri(str(lake), TABLE)
        app_id = f"cdc-lakehouse:{SINK_NAME}"
        # The recorded offset is that of the last message a commit covers.
        self.wanted = {
            stream_app_id(app_id, f"{topic}:{p}", "offset"): last
            for p, (count, last) in contents.items()
            if count
        }
        self.table: DeltaTable | None = None

    def __call__(self) -> bool:
        if self.table is None:
            if not DeltaTable.is_deltatable(self.uri):
                return False
            self.table = DeltaTable(self.uri)
        else:
            self.table.update_incremental()
        for app, last in self.wanted.items():
            recorded = self.table.transaction_version(app)
            if recorded is None or recorded < last:
                return False
        return True


def _cdc_sink(
    bootstrap: str, topic: str, lake: Path, contents: dict[int, tuple[int, int]]
) -> tuple[float, float]:
    """Seconds until ``cdc sink`` had recorded every offset in Delta, and the CPU seconds
    it had used by then."""
    cpu: list[float] = []
    seconds = c.time_child(
        c.cdc_command(
            "sink",
            *("--kafka", bootstrap, "--lake", str(lake), "--group", f"bench-sink-{uuid.uuid4()}"),
            *("--topic-prefix", PIPELINE, "--topics", topic, "--name", SINK_NAME),
        ),
        _SinkOffsets(lake, topic, contents),
        what="cdc sink",
        env={"CDC_KAFKA__CONSUMER": json.dumps(CONSUMER)},
        interval=0.2,
        before_stop=lambda pid: cpu.append(c.cpu_seconds(pid)),
    )
    return seconds, cpu[0]


def run(dsn: str, workdir: Path, rows: int, bootstrap: str) -> list[dict[str, Any]]:
    recv_slot, cdc_slot = "bench_kp_recv", "bench_kp_cdc"
    with psycopg.connect(dsn, autocommit=True) as conn:
        c.create_table(conn, TABLE, publication=PUBLICATION)
        for slot in (recv_slot, cdc_slot):
            c.drop_slot(conn, slot)
            c.create_slot(conn, slot)
        load_s = c.insert_rows(conn, TABLE, rows)
        end = c.current_lsn(conn)
        conn.execute("CHECKPOINT")

    recv_s = c.pg_recvlogical(dsn, slot=recv_slot, publication=PUBLICATION, end=end)
    capture_s, capture_cpu_s = _cdc_capture(dsn, bootstrap, cdc_slot, end)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for slot in (recv_slot, cdc_slot):
            c.drop_slot(conn, slot)
    topic = topic_name(PIPELINE, TABLE)
    contents = _topic_contents(bootstrap, topic, rows)
    in_topic = sum(count for count, _last in contents.values())
    if in_topic != rows:
        raise RuntimeError(f"topic {topic} holds {in_topic} messages, not {rows}")
    capture = {
        "measure": "kafka_capture",
        "rows": rows,
        "messages_in_topic": in_topic,
        "partitions": len(contents),
        "load_s": round(load_s, 2),
        "pg_recvlogical_s": round(recv_s, 2),
        "cdc_capture_s": round(capture_s, 2),
        "cdc_capture_cpu_s": round(capture_cpu_s, 2),
        "pg_recvlogical_rows_per_s": round(rows / recv_s),
        "cdc_capture_rows_per_s": round(rows / capture_s),
        "ratio": c.ratio(recv_s, capture_s),
        "target": CAPTURE_TARGET,
    }
    print(json.dumps(capture), flush=True)

    raw_s, raw_first_s, raw_cpu_s = _raw_consume(bootstrap, topic, rows)
    lake = workdir / "lake-kafka"
    sink_s, sink_cpu_s = _cdc_sink(bootstrap, topic, lake, contents)
    in_lake = DeltaTable(layout.changes_uri(str(lake), TABLE)).to_pyarrow_dataset().count_rows()
    if in_lake != rows:
        raise RuntimeError(f"the lake holds {in_lake} rows of {TABLE}, not {rows}")
    sink = {
        "measure": "kafka_sink",
        "rows": rows,
        "rows_in_lake": in_lake,
        "partitions": len(contents),
        "raw_consume_s": round(raw_s, 2),
        "raw_first_message_s": round(raw_first_s, 2),
        "cdc_sink_s": round(sink_s, 2),
        "raw_consume_cpu_s": round(raw_cpu_s, 2),
        "cdc_sink_cpu_s": round(sink_cpu_s, 2),
        "raw_consume_rows_per_s": round(rows / raw_s),
        "cdc_sink_rows_per_s": round(rows / sink_s),
        "ratio": c.ratio(raw_s, sink_s),
        "target": SINK_TARGET,
    }
    print(json.dumps(sink), flush=True)
    return [capture, sink]


def main(argv: list[str] | None = None) -> int:
    return c.standalone_main(
        "python -m benchmarks.kafka_path",
        lambda dsn, workdir, args: run(dsn, workdir, args.rows, args.bootstrap),
        passed=lambda results: all(
            r["ratio"] >= SINK_TARGET for r in results if r["measure"] == "kafka_sink"
        ),
        argv=argv,
        rows=1_000_000,
        kafka=True,
    )


if __name__ == "__main__":
    sys.exit(main())
