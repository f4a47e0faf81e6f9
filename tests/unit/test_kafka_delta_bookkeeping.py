"""Kafka-mode exactly-once bookkeeping of the Delta sinks: offsets and (lsn, seq) watermarks
per topic-partition, fencing of a writer that lost its partition, and the dead-letter
table (real Delta tables, no broker)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from deltalake import DeltaTable

from catalog import lake_layout as layout
from cdc.core.events import ChangeEvent
from cdc.core.pgtypes import Oid
from cdc.core.table_schema import ColumnSchema, TableSchema
from sinks.dead_letters import DeadLetter, DeadLetterSink, dlq_uri
from sinks.delta_changelog import DeltaChangelogSink, stream_app_id
from sinks.errors import StreamFencedError

T = TableSchema("s", "t", (ColumnSchema("id", Oid.INT4, -1, True), ColumnSchema("v", Oid.TEXT)))
TS = datetime(2026, 3, 4, tzinfo=UTC)
APP = "cdc-lakehouse:test"


def ev(key: int, lsn: int, seq: int = 0, v: str = "x") -> ChangeEvent:
    return ChangeEvent(
        op="c",
        table=T,
        before=None,
        after=(key, v),
        commit_lsn=lsn,
        seq=seq,
        txid=1,
        commit_ts=TS,
        lsn=lsn,
        size_bytes=10,
    )


def rows(root: Path) -> list[tuple]:
    table = DeltaTable(layout.changes_uri(str(root), "s.t")).to_pyarrow_table()
    return sorted(zip(*(table.column(c).to_pylist() for c in ("id", "_cdc_lsn", "v")), strict=True))


def test_each_partition_has_its_own_watermark_and_offset(tmp_path: Path) -> None:
    sink = DeltaChangelogSink(str(tmp_path), app_id=APP)
    # Partition 0 got later transactions than partition 1: both must be kept.
    sink.add(ev(1, lsn=300), stream="topic:0", offset=0)
    sink.add(ev(2, lsn=100), stream="topic:1", offset=0)
    sink.add(ev(3, lsn=200), stream="topic:1", offset=1)
    assert sink.flush()["rows"] == 3

    dt = DeltaTable(layout.changes_uri(str(tmp_path), "s.t"))
    assert dt.transaction_version(stream_app_id(APP, "topic:0", "offset")) == 0
    assert dt.transaction_version(stream_app_id(APP, "topic:1", "offset")) == 1
    assert dt.transaction_version(stream_app_id(APP, "topic:0", "lsn")) == 300
    assert dt.transaction_version(stream_app_id(APP, "topic:1", "lsn")) == 200
    assert dt.transaction_version(f"{APP}:lsn") is None  # no embedded watermark in Kafka mode

    # A new worker: capture re-sent lsn 200 and 300 after its restart (new offsets), and
    # partition 1 has a newer change at lsn 250 that partition 0's watermark must not hide.
    again = DeltaChangelogSink(str(tmp_path), app_id=APP)
    assert again.committed_offset("s.t", "topic:0") == 0
    assert again.committed_offset("s.t", "topic:1") == 1
    again.add(ev(1, lsn=300), stream="topic:0", offset=1)  # re-sent: dropped
    again.add(ev(3, lsn=200), stream="topic:1", offset=2)  # re-sent: dropped
    again.add(ev(4, lsn=250), stream="topic:1", offset=3)  # new
    again.add(ev(4, lsn=250), stream="topic:1", offset=3)  # the same message read twice
    assert again.flush()["rows"] == 1
    assert rows(tmp_path) == [(1, 300, "x"), (2, 100, "x"), (3, 200, "x"), (4, 250, "x")]
    dt = DeltaTable(layout.changes_uri(str(tmp_path), "s.t"))
    # The dropped re-send's offset counts as handled: recorded with the table's next commit.
    assert dt.transaction_version(stream_app_id(APP, "topic:0", "offset")) == 1
    assert dt.transaction_version(stream_app_id(APP, "topic:1", "offset")) == 3


def test_positions_are_not_compared_without_dedupe_but_offsets_are(tmp_path: Path) -> None:
    sink = DeltaChangelogSink(str(tmp_path), app_id=APP)
    sink.add(ev(1, lsn=500), stream="dbz:0", offset=7, dedupe=False)
    # Debezium's source.lsn goes backwards across interleaved transactions: still written.
    sink.add(ev(2, lsn=400), stream="dbz:0", offset=8, dedupe=False)
    sink.add(ev(2, lsn=400), stream="dbz:0", offset=8, dedupe=False)  # read twice
    sink.flush()
    assert rows(tmp_path) == [(1, 500, "x"), (2, 400, "x")]


def test_a_writer_that_lost_its_partition_cannot_commit_it(tmp_path: Path) -> None:
    zombie = DeltaChangelogSink(str(tmp_path), app_id=APP)
    assert zombie.committed_offset("s.t", "topic:0") is None  # what it starts from
    zombie.add(ev(1, lsn=10), stream="topic:0", offset=0)

    owner = DeltaChangelogSink(str(tmp_path), app_id=APP)
    assert owner.committed_offset("s.t", "topic:0") is None
    owner.add(ev(1, lsn=10), stream="topic:0", offset=0)
    owner.add(ev(2, lsn=20), stream="topic:0", offset=1)
    owner.flush()

    with pytest.raises(StreamFencedError, match="topic:0"):
        zombie.flush()
    assert rows(tmp_path) == [(1, 10, "x"), (2, 20, "x")]

    # Other partitions of the table are not affected by the fence.
    other = DeltaChangelogSink(str(tmp_path), app_id=APP)
    other.add(ev(3, lsn=5), stream="topic:1", offset=0)
    other.flush()
    assert (3, 5, "x") in rows(tmp_path)


def test_embedded_watermark_is_unchanged_by_the_stream_bookkeeping(tmp_path: Path) -> None:
    sink = DeltaChangelogSink(str(tmp_path), app_id=APP)
    sink.add(ev(1, lsn=10))
    sink.flush()
    dt = DeltaTable(layout.changes_uri(str(tmp_path), "s.t"))
    assert dt.transaction_version(f"{APP}:lsn") == 10
    assert dt.transaction_version(f"{APP}:seq") == 0
    again = DeltaChangelogSink(str(tmp_path), app_id=APP)
    again.add(ev(1, lsn=10))
    assert again.pending_rows == 0


def test_discard_snapshot_deletes_the_partial_copy_only(tmp_path: Path) -> None:
    sink = DeltaChangelogSink(str(tmp_path), app_id=APP)
    snapshot = ChangeEvent(op="r", table=T, before=None, after=(1, "old"), commit_lsn=99,
                           seq=0, txid=None, commit_ts=TS, lsn=99)  # fmt: skip
    sink.add(snapshot)
    sink.add(ev(2, lsn=150))
    sink.flush()
    sink.discard_snapshot([("s", "t"), ("s", "missing")], 99)
    assert rows(tmp_path) == [(2, 150, "x")]


def letter(offset: int, partition: int = 0) -> DeadLetter:
    return DeadLetter(
        reason=f"bad {offset}",
        topic="p.s.t",
        partition=partition,
        offset=offset,
        key=b'{"id": 1}',
        value=b"\xff",
        headers=[("h", b"1")],
        timestamp_ms=1767225600000,
        table=None,
    )


def test_dead_letters_are_written_once_with_their_coordinates(tmp_path: Path) -> None:
    dlq = DeadLetterSink(str(tmp_path), app_id=APP, worker="w1")
    assert dlq.add(letter(3)) and dlq.add(letter(5)) and dlq.add(letter(0, partition=1))
    assert dlq.flush() == {"dead_letters": 3, "commits": 1}

    # After a crash the same messages are read again: not written twice.
    again = DeadLetterSink(str(tmp_path), app_id=APP, worker="w2")
    assert not again.add(letter(5))
    assert again.add(letter(6))
    again.flush()
    table = DeltaTable(dlq_uri(str(tmp_path))).to_pyarrow_table().sort_by("offset")
    assert table.column("offset").to_pylist() == [0, 3, 5, 6]
    first = table.slice(1, 1).to_pylist()[0]
    assert first["reason"] == "bad 3" and first["topic"] == "p.s.t" and first["partition"] == 0
    assert first["value"] == b"\xff" and first["headers"] == [{"key": "h", "value": b"1"}]
    assert first["worker"] == "w1"
    assert first["message_ts"] == datetime(2026, 1, 1, tzinfo=UTC)

    # A worker that lost the partition to w2 cannot write its letters.
    zombie = DeadLetterSink(str(tmp_path), app_id=APP)
    zombie.committed_offset("p.s.t:0")
    newer = DeadLetterSink(str(tmp_path), app_id=APP)
    newer.add(letter(9))
    zombie.add(letter(9))
    newer.flush()
    with pytest.raises(StreamFencedError):
        zombie.flush()


def test_partition_marks_and_count_let_the_merge_cap_its_watermark(tmp_path: Path) -> None:
    from catalog.current_state import PARTITIONS_APP_ID, Watermark, partition_app_id
    from jobs.merge import stream_cap

    sink = DeltaChangelogSink(str(tmp_path), app_id=APP)
    sink.set_partition_count("topic", 3)
    sink.add(ev(1, lsn=300), stream="topic:0", offset=0)
    sink.add(ev(2, lsn=100), stream="topic:1", offset=0)
    sink.flush()
    dt = DeltaTable(layout.changes_uri(str(tmp_path), "s.t"))
    assert dt.transaction_version(PARTITIONS_APP_ID) == 3
    assert dt.transaction_version(partition_app_id(0, "lsn")) == 300
    assert dt.transaction_version(stream_app_id(APP, "topic:1", "offset")) == 0
    # Partition 2 has committed nothing: a change of it may still land anywhere.
    assert stream_cap(dt) == (Watermark(-(2**63), -(2**63)), [2])
    sink.add(ev(3, lsn=200), stream="topic:2", offset=0)
    sink.flush()
    dt = DeltaTable(layout.changes_uri(str(tmp_path), "s.t"))
    assert stream_cap(dt) == (Watermark(100, 0), [])
