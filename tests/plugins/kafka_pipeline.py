"""Helpers for Kafka-mode tests: run capture and sink workers (threads or `cdc` processes),
and wait until PostgreSQL's changes have gone all the way to the lake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from cdc.core.settings import Settings, load_settings
from cdc.pipeline import run_capture
from cdc.postgres.source_queries import current_wal_lsn
from sinks.kafka_worker import run_sink

#: Consumer properties for the tests: quick failover and quick discovery of new topics.
FAST_CONSUMER = {"session.timeout.ms": 6000, "topic.metadata.refresh.interval.ms": 1000}


def unique(stem: str) -> str:
    """A name no other test uses (slots are per server, topics per broker)."""
    return f"{stem}{uuid.uuid4().hex[:10]}"


def consume_all(
    bootstrap: str, topic: str, expected: int, *, partitions: int = 1, timeout: float = 20
) -> list[Any]:
    """The messages of ``topic``'s first ``partitions`` partitions from their start, read
    until there are ``expected`` of them (or ``timeout`` seconds passed); each partition's
    in offset order."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("read")})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            m = consumer.poll(0.5)
            if m is not None and not m.error():
                out.append(m)
    finally:
        consumer.close()
    return out


def settings(bootstrap: str, prefix: str, name: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "kafka.bootstrap": bootstrap,
        "kafka.topic_prefix": prefix,
        "kafka.consumer": FAST_CONSUMER,
        "name": name,
        "batch.max_seconds": 0.3,
    }
    values.update(overrides)
    return load_settings(**values)


class Background:
    """``target(stop)`` in a daemon thread; ``result`` is its return value."""

    def __init__(self, name: str, target: Callable[[threading.Event], dict[str, Any]]) -> None:
        self.stop = threading.Event()
        self.result: dict[str, Any] | None = None
        self.failure: BaseException | None = None
        self._target = target
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self.result = self._target(self.stop)
        except BaseException as e:
            self.failure = e

    def start(self) -> Background:
        self.thread.start()
        return self

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def finish(self, timeout: float = 60) -> dict[str, Any]:
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.thread.name} did not stop within {timeout}s"
        self.check()
        assert self.result is not None
        return self.result


@contextmanager
def background(*workers: Background) -> Iterator[tuple[Background, ...]]:
    """Start ``workers``; on exit stop them (in reverse order) and re-raise their failures."""
    for w in workers:
        w.start()
    try:
        yield workers
    finally:
        for w in reversed(workers):
            w.stop.set()
        for w in reversed(workers):
            w.finish()


def capture_thread(s: Settings) -> Background:
    return Background("capture", lambda stop: run_capture(s, stop=stop))


def sink_thread(s: Settings, name: str = "sink") -> Background:
    return Background(name, lambda stop: run_sink(s, stop=stop))


def wait_streaming(dsn: str, slot: str, *workers: Background, timeout: float = 90) -> None:
    """Wait until capture streams from ``slot`` (the snapshot, if any, is sent)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not conn.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active", [slot]
        ).fetchone():
            for w in workers:
                w.check()
            assert time.monotonic() < deadline, f"capture did not start streaming from {slot}"
            time.sleep(0.1)


def wait_captured(dsn: str, slot: str, *workers: Background, timeout: float = 120) -> int:
    """Wait until the slot confirms every change committed so far: Kafka has them all."""
    target = current_wal_lsn(dsn)
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT confirmed_flush_lsn - %s::pg_lsn FROM pg_replication_slots "
                "WHERE slot_name = %s",
                [_lsn_text(target), slot],
            ).fetchone()
            if row is not None and row[0] is not None and row[0] >= 0:
                return target
            for w in workers:
                w.check()
            assert time.monotonic() < deadline, f"capture did not confirm {target} in {timeout}s"
            time.sleep(0.1)


def _lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def table_topics(bootstrap: str, prefix: str) -> list[str]:
    topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
    return sorted(t for t in topics if t.startswith(f"{prefix}.") and ".__" not in t)


def wait_sunk(
    bootstrap: str, prefix: str, group: str, *workers: Background, timeout: float = 120
) -> None:
    """Wait until the group has handled every message now in the table topics.

    The sink commits the group's offsets after its Delta commits (for monitoring), so when
    no message exists at or after a partition's committed offset, the lake has all of it.
    The end of a partition is found by reading, not from its high watermark: Tansu reports
    the base offset of the last record batch plus one there, short of the real end.
    """
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    try:
        metadata = consumer.list_topics(timeout=10)
        partitions = [
            TopicPartition(topic, p)
            for topic in table_topics(bootstrap, prefix)
            for p in metadata.topics[topic].partitions
        ]
        assert partitions, f"no table topics with prefix {prefix!r} on {bootstrap}"
        deadline = time.monotonic() + timeout
        while True:
            committed = consumer.committed(partitions, timeout=10)
            ahead = _behind_watermark(consumer, committed)
            if ahead is None:
                consumer.assign(
                    [
                        TopicPartition(c.topic, c.partition, c.offset if c.offset >= 0 else -2)
                        for c in committed
                    ]
                )
                # Generous: on a loaded machine the first fetch of an assignment can take
                # seconds, and an empty poll must mean "nothing left", not "not fetched yet".
                ahead = _first_message(consumer, idle=5.0)
                consumer.unassign()
            if ahead is None:
                return
            for w in workers:
                w.check()
            assert time.monotonic() < deadline, (
                f"sinks still behind after {timeout}s: {ahead} is not handled"
            )
            time.sleep(0.3)
    finally:
        consumer.close()


def _behind_watermark(
    consumer: Consumer, committed: list[TopicPartition]
) -> tuple[str, int, int] | None:
    """(topic, partition, committed offset) of a partition whose group offset is below the
    high watermark: certainly not handled yet (the watermark may fall short, never beyond)."""
    for c in committed:
        _low, high = consumer.get_watermark_offsets(c, timeout=10)
        if max(c.offset, 0) < high:
            return (c.topic, c.partition, c.offset)
    return None


def _first_message(consumer: Consumer, idle: float) -> tuple[str, int, int] | None:
    """(topic, partition, offset) of the first message the assignment delivers, or None
    when nothing arrives for ``idle`` seconds."""
    deadline = time.monotonic() + idle
    while time.monotonic() < deadline:
        m = consumer.poll(0.1)
        if m is not None and m.error() is None:
            return (m.topic() or "", m.partition() or 0, m.offset() or 0)
    return None


# -- `cdc` processes ------------------------------------------------------------------------


def cdc_process(
    *args: str, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """``python -m cdc ARGS`` with the test consumer properties in its environment; its
    stderr goes to ``log`` when given (readable while it runs), else to a pipe."""
    full_env = {
        **os.environ,
        "CDC_KAFKA__CONSUMER": json.dumps(FAST_CONSUMER),
        "CDC_BATCH__MAX_SECONDS": "0.3",
        "COLUMNS": "300",  # one log record per line
        **(env or {}),
    }
    stderr: Any = subprocess.PIPE if log is None else log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "cdc", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=full_env,
    )


def wait_logged(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait until ``text`` appears in ``log``, written by the running ``proc``."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{text!r} not logged within {timeout}s"
        time.sleep(0.1)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60) -> tuple[str, str]:
    """SIGTERM, wait, and return (stdout, stderr); asserts a clean exit."""
    proc.terminate()
    out, err = proc.communicate(timeout=timeout)
    errors = (err or b"").decode()  # empty when stderr went to a log file
    assert proc.returncode == 0, errors
    return out.decode(), errors


@contextmanager
def running_through_kafka(
    dsn: str, bootstrap: str, lake: str, **overrides: Any
) -> Iterator[Callable[[], None]]:
    """Capture and one sink worker in threads, PostgreSQL -> Kafka -> ``lake``; yields a
    function that waits until every change committed so far is in the lake.

    It yields once capture streams (the snapshot is in Kafka), so changes made inside the
    block are streamed rather than copied.
    """
    prefix, name = unique("k"), unique("k")
    group = f"{prefix}-sinks"
    capture = capture_thread(settings(bootstrap, prefix, name, **{"source.dsn": dsn}, **overrides))
    sink = sink_thread(
        settings(bootstrap, prefix, name, **{"lake.path": lake, "kafka.group": group}, **overrides)
    )
    with background(capture):
        wait_streaming(dsn, name, capture)
        with background(sink):

            def caught_up() -> None:
                wait_captured(dsn, name, capture, sink)
                wait_sunk(bootstrap, prefix, group, capture, sink)

            yield caught_up
