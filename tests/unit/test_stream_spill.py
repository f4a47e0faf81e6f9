"""Streamed transactions (pgoutput protocol 2) spilled to disk and replayed at commit.

Uses the v2 messages captured from PostgreSQL 15 in :mod:`tests.plugins.pgoutput_samples`,
played to :class:`cdc.postgres.streaming.StreamingSource` through a stand-in for the replication
connection, so the whole receive path runs: frame parsing, in-stream decoding, spill files,
replay and the assembler. Other transactions are made from the samples by rewriting their
xid fields (bytes 1-4 of in-stream messages), the one thing that tells them apart.
"""

from __future__ import annotations

import struct
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from cdc.core.errors import DecodeError, TransientError
from cdc.core.events import ChangeEvent
from cdc.core.position import CapturePosition
from cdc.postgres.columnar import ChangeBatch
from cdc.postgres.errors import StreamSpillError
from cdc.postgres.protocol import compiled, pgoutput
from cdc.postgres.protocol.assembler import ChangeAssembler, TransactionCommitted
from cdc.postgres.protocol.walproto import PG_EPOCH
from cdc.postgres.stream_spill import StreamedTransactions
from cdc.postgres.streaming import StreamingSource
from tests.plugins import pgoutput_samples as s
from tests.plugins.replication_script import ScriptedConnection

XID = 745  # the captured transaction
SUBXID_ROLLED_BACK = 746  # its savepoint that was rolled back (STREAM_ABORT)
SUBXID_AFTER = 747  # the savepoint's next subtransaction, which committed

COMMIT = pgoutput.decode_message(s.STREAM_COMMIT)
assert isinstance(COMMIT, pgoutput.StreamCommit)

# -- building messages ------------------------------------------------------------------


def with_xid(message: bytes, xid: int) -> bytes:
    """An in-stream message (or Stream Start) with its xid field replaced."""
    return message[:1] + struct.pack(">I", xid) + message[5:]


def as_protocol_1(message: bytes) -> bytes:
    """An in-stream message as protocol 1 sends it: the same bytes without the xid."""
    return message[:1] + message[5:]


def stream_start(xid: int, first: bool) -> bytes:
    return struct.pack(">cIB", b"S", xid, 1 if first else 0)


def stream_abort(xid: int, subxid: int) -> bytes:
    return struct.pack(">cII", b"A", xid, subxid)


def stream_commit(xid: int, commit_lsn: int, seconds: int = 0) -> bytes:
    ts = (COMMIT.commit_ts + timedelta(seconds=seconds) - PG_EPOCH) // timedelta(microseconds=1)
    return struct.pack(">cIBQQq", b"c", xid, 0, commit_lsn, commit_lsn + 56, ts)


def begin(xid: int, commit_lsn: int) -> bytes:
    ts = (COMMIT.commit_ts - PG_EPOCH) // timedelta(microseconds=1)
    return struct.pack(">cQqI", b"B", commit_lsn, ts, xid)


def commit(commit_lsn: int) -> bytes:
    ts = (COMMIT.commit_ts - PG_EPOCH) // timedelta(microseconds=1)
    return struct.pack(">cBQQq", b"C", 0, commit_lsn, commit_lsn + 56, ts)


def insert_bulk(row_id: int, xid: int) -> bytes:
    """STREAM_INSERT_BULK's layout, with another id and xid."""
    text = str(row_id).encode()
    tail = b"t" + struct.pack(">I", 200) + b"x" * 200
    return (
        b"I"
        + struct.pack(">II", xid, 0x401C)
        + b"N"
        + struct.pack(">H", 2)
        + b"t"
        + struct.pack(">I", len(text))
        + text
        + tail
    )


#: The captured transaction as the server streamed it: three blocks, the rolled-back
#: savepoint's abort between the second and the third, then the commit.
CAPTURED = [
    s.STREAM_START_FIRST,
    s.STREAM_RELATION_BULK,
    s.STREAM_INSERT_BULK,
    s.STREAM_STOP,
    s.STREAM_START_NEXT,
    s.STREAM_MESSAGE,
    s.STREAM_UPDATE,
    s.STREAM_DELETE,
    s.STREAM_INSERT_SUBXACT,
    s.STREAM_STOP,
    s.STREAM_ABORT,
    s.STREAM_START_NEXT,
    s.STREAM_RELATION_SUBXACT,
    s.STREAM_INSERT_AFTER_ROLLBACK,
    s.STREAM_STOP,
    s.STREAM_COMMIT,
]

# -- the session ------------------------------------------------------------------------


class Session:
    """One replication session of ``source``: start() on a fresh scripted connection."""

    def __init__(self, source: StreamingSource) -> None:
        self.source = source
        self.conn = ScriptedConnection()
        source.start(self.conn)

    def send(
        self, messages: list[bytes | tuple[bytes, int]]
    ) -> list[ChangeEvent | TransactionCommitted]:
        """Everything the source returns for ``messages``, read by read."""
        self.conn.add(messages)
        items: list[ChangeEvent | TransactionCommitted] = []
        while self.conn.frames or self.source.in_transaction:
            batch = self.source.read(timeout=0)
            assert len(batch) <= self.source.max_items
            items.extend(batch)
        return items


def new_source(spill_dir: Path, **kwargs: Any) -> StreamingSource:
    return StreamingSource(
        "unused",
        slot="s",
        publication="p",
        position=CapturePosition("s"),
        spill_dir=spill_dir,
        **kwargs,
    )


def play(
    source: StreamingSource, messages: list[bytes | tuple[bytes, int]]
) -> list[ChangeEvent | TransactionCommitted]:
    """What ``source`` returns for ``messages`` in a new session."""
    return Session(source).send(messages)


def comparable(item: ChangeEvent | TransactionCommitted) -> tuple[Any, ...]:
    """Every field of an event except ts_ms (the wall-clock time it was built)."""
    if isinstance(item, TransactionCommitted):
        return ("commit", item.commit_lsn, item.end_lsn)
    return (
        item.op,
        item.table,
        item.before,
        item.after,
        item.commit_lsn,
        item.seq,
        item.txid,
        item.commit_ts,
        item.lsn,
        item.unchanged_toast,
        item.size_bytes,
    )


def spill_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.spill"))


# -- tests ------------------------------------------------------------------------------


def test_commit_replays_the_transaction_exactly_as_protocol_1_sends_it(tmp_path: Path) -> None:
    source = new_source(tmp_path)
    session = Session(source)
    lsns = [session.conn.next_lsn + 0x100 * i for i in range(len(CAPTURED))]
    streamed = session.send(list(CAPTURED))

    # The same transaction in protocol 1: Begin, its surviving messages without their
    # xids at the same LSNs, Commit. The rolled-back savepoint's insert is not sent.
    v1 = ChangeAssembler()
    expected: list[ChangeEvent | TransactionCommitted] = []
    expected += v1.feed(pgoutput.decode_message(begin(XID, COMMIT.commit_lsn)))
    for message, lsn in zip(CAPTURED, lsns, strict=True):
        if message[:1] not in b"RIUDM" or message is s.STREAM_INSERT_SUBXACT:
            continue  # stream control, and the aborted subtransaction's change
        payload = as_protocol_1(message)
        expected += v1.feed(pgoutput.decode_message(payload), lsn=lsn, size=len(payload))
    # Commit is Stream Commit without the xid.
    expected += v1.feed(pgoutput.decode_message(b"C" + s.STREAM_COMMIT[5:]))

    assert [comparable(i) for i in streamed] == [comparable(i) for i in expected]
    events = [i for i in streamed if isinstance(i, ChangeEvent)]
    assert [(e.op, e.seq) for e in events] == [("c", 0), ("u", 1), ("d", 2), ("c", 3)]
    assert [(e.after or e.before)[0] for e in events] == [1, 1, 2, 5000]
    assert {(e.commit_lsn, e.txid, e.commit_ts) for e in events} == {
        (COMMIT.commit_lsn, XID, COMMIT.commit_ts)
    }
    assert streamed[-1] == TransactionCommitted(COMMIT.commit_lsn, COMMIT.end_lsn)
    assert source.position.committed_lsn == COMMIT.end_lsn
    assert spill_files(tmp_path) == []
    assert source.streams.open_xids == frozenset()


def test_nothing_is_handed_on_before_the_commit_and_disk_holds_it_meanwhile(
    tmp_path: Path,
) -> None:
    source = new_source(tmp_path)
    before_commit = play(source, CAPTURED[:-1])
    assert before_commit == []
    assert source.position.committed_lsn == 0
    assert not source.in_transaction  # open streamed transactions hold nothing back
    assert source.streams.open_xids == {XID}
    [spill] = spill_files(tmp_path)
    # Eight in-stream messages (the v2 xid included) behind a 16-byte header each.
    in_stream = [m for m in CAPTURED if m[:1] in b"RIUDM"]
    assert spill.stat().st_size == sum(16 + len(m) for m in in_stream)
    source.close()
    assert list(tmp_path.iterdir()) == []  # close() removes the spill directory


#: 746 and 748 are both savepoints of 745 whose changes interleave; 746 aborts after
#: changes of 748 and of 745 itself were spilled, so the file cannot just be cut back.
INTERLEAVED_ABORT: list[bytes | tuple[bytes, int]] = [
    s.STREAM_START_FIRST,
    s.STREAM_RELATION_BULK,
    insert_bulk(10, XID),
    insert_bulk(11, SUBXID_ROLLED_BACK),
    insert_bulk(12, 748),
    insert_bulk(13, SUBXID_ROLLED_BACK),
    s.STREAM_STOP,
    s.STREAM_START_NEXT,
    insert_bulk(14, 748),
    insert_bulk(15, XID),
    s.STREAM_STOP,
    stream_abort(XID, SUBXID_ROLLED_BACK),
    stream_abort(XID, 749),  # a subtransaction with nothing spilled: no-op
    s.STREAM_COMMIT,
]


def test_an_aborted_subtransaction_loses_exactly_its_changes_even_when_later_ones_follow(
    tmp_path: Path,
) -> None:
    items = play(new_source(tmp_path), INTERLEAVED_ABORT)
    events = [i for i in items if isinstance(i, ChangeEvent)]
    assert [(e.after[0], e.seq) for e in events] == [(10, 0), (12, 1), (14, 2), (15, 3)]
    assert all(e.txid == XID for e in events)


def relation_bulk(xid: int, *extra_columns: str) -> bytes:
    """STREAM_RELATION_BULK (public.bulk: id int4 key, payload text) with more text columns."""
    ncols_at = s.STREAM_RELATION_BULK.index(b"bulk\x00") + 6
    ncols = struct.unpack_from(">H", s.STREAM_RELATION_BULK, ncols_at)[0]
    columns = b"".join(
        b"\x00" + c.encode() + b"\x00" + struct.pack(">Ii", 25, -1) for c in extra_columns
    )
    return (
        with_xid(s.STREAM_RELATION_BULK, xid)[:ncols_at]
        + struct.pack(">H", ncols + len(extra_columns))
        + s.STREAM_RELATION_BULK[ncols_at + 2 :]
        + columns
    )


def test_a_relation_sent_in_an_aborted_subtransaction_is_still_replayed(tmp_path: Path) -> None:
    # pgoutput sends a shape once per streamed transaction, tagged with the xid of the
    # subtransaction that needed it first; when that one aborts, later changes of others
    # still rely on the shape, so the replay keeps it and drops only the aborted changes.
    with StreamedTransactions(tmp_path) as streams:
        streams.start(pgoutput.StreamStart(XID, first_segment=True))
        for payload in (
            with_xid(s.STREAM_RELATION_BULK, SUBXID_ROLLED_BACK),
            s.STREAM_INSERT_SUBXACT,
            s.STREAM_INSERT_AFTER_ROLLBACK,
        ):
            streams.append(pgoutput.decode_message(payload, in_stream=True), payload, 0)
        streams.stop()
        streams.abort(pgoutput.StreamAbort(XID, SUBXID_ROLLED_BACK))
        replayed = [message for message, _, _ in streams.commit(COMMIT)]
    assert [type(m).__name__ for m in replayed] == ["Begin", "Relation", "Insert", "Commit"]
    assert replayed[1].xid == SUBXID_ROLLED_BACK
    assert replayed[2] == pgoutput.Insert(0x401C, ("5000", "after rollback"), SUBXID_AFTER)


def test_shapes_are_replayed_in_order_so_each_change_is_read_with_its_own(
    tmp_path: Path,
) -> None:
    # ALTER TABLE inside the streamed transaction: the server sends the new shape in a
    # later block, and it reaches the cache at once. The replay must give the earlier
    # changes the earlier shape again, or their tuples would not fit.
    wide_insert = (
        insert_bulk(2, XID)[:12].replace(  # tag, xid, relation id, N, then the column count
            struct.pack(">H", 2), struct.pack(">H", 3)
        )
        + insert_bulk(2, XID)[12:]
        + b"t"
        + struct.pack(">I", 4)
        + b"note"
    )
    source = new_source(tmp_path)
    items = play(
        source,
        [
            s.STREAM_START_FIRST,
            s.STREAM_RELATION_BULK,
            insert_bulk(1, XID),
            s.STREAM_STOP,
            s.STREAM_START_NEXT,
            relation_bulk(XID, "note"),
            wide_insert,
            s.STREAM_STOP,
            s.STREAM_COMMIT,
        ],
    )
    events = [i for i in items if isinstance(i, ChangeEvent)]
    assert [(e.table.column_names, e.after) for e in events] == [
        (("id", "payload"), (1, "x" * 200)),
        (("id", "payload", "note"), (2, "x" * 200, "note")),
    ]


def test_a_top_level_abort_drops_everything_and_its_file(tmp_path: Path) -> None:
    source = new_source(tmp_path)
    session = Session(source)
    items = session.send([*CAPTURED[:-1], stream_abort(XID, XID)])
    assert items == []
    assert spill_files(tmp_path) == []
    assert source.streams.open_xids == frozenset()
    # The session goes on: a later transaction (here protocol 1) arrives normally.
    items = session.send(
        [s.BEGIN_INSERT, s.TYPE_MOOD, s.RELATION_ITEMS, s.INSERT_ITEMS, s.COMMIT_INSERT]
    )
    assert [i.op for i in items if isinstance(i, ChangeEvent)] == ["c"]
    # A late abort of a transaction that is gone is harmless, as on the server side.
    assert session.send([stream_abort(XID, XID), stream_abort(XID, SUBXID_AFTER)]) == []


def test_interleaved_streamed_transactions_each_replay_alone_at_their_commit(
    tmp_path: Path,
) -> None:
    other = 900
    messages: list[bytes | tuple[bytes, int]] = [
        stream_start(XID, first=True),
        s.STREAM_RELATION_BULK,
        insert_bulk(1, XID),
        s.STREAM_STOP,
        stream_start(other, first=True),
        with_xid(s.STREAM_RELATION_BULK, other),
        insert_bulk(100, other),
        insert_bulk(101, other),
        s.STREAM_STOP,
        # A small transaction commits in between, sent whole with protocol 1 framing.
        begin(50, 0x1500000),
        as_protocol_1(insert_bulk(7, 0)),
        commit(0x1500000),
        stream_start(XID, first=False),
        insert_bulk(2, XID),
        s.STREAM_STOP,
        stream_start(other, first=False),
        insert_bulk(102, other),
        s.STREAM_STOP,
        stream_commit(other, 0x1600000, seconds=1),
        stream_commit(XID, 0x1700000, seconds=2),
    ]
    source = new_source(tmp_path, max_items=2)  # replays span several reads
    items = play(source, messages)
    summary = [
        ("commit", i.commit_lsn)
        if isinstance(i, TransactionCommitted)
        else (i.txid, i.seq, i.after[0])
        for i in items
    ]
    assert summary == [
        (50, 0, 7),
        ("commit", 0x1500000),
        (other, 0, 100),
        (other, 1, 101),
        (other, 2, 102),
        ("commit", 0x1600000),
        (XID, 0, 1),
        (XID, 1, 2),
        ("commit", 0x1700000),
    ]
    events = [i for i in items if isinstance(i, ChangeEvent)]
    assert {e.commit_lsn for e in events if e.txid == other} == {0x1600000}
    assert {e.commit_ts - COMMIT.commit_ts for e in events if e.txid == XID} == {
        timedelta(seconds=2)
    }
    assert spill_files(tmp_path) == []


def test_a_huge_transaction_is_handed_on_in_reads_of_at_most_max_items(tmp_path: Path) -> None:
    rows = 12_000
    messages: list[bytes | tuple[bytes, int]] = [s.STREAM_START_FIRST, s.STREAM_RELATION_BULK]
    messages += [insert_bulk(i, XID) for i in range(rows)]
    messages += [s.STREAM_STOP, s.STREAM_COMMIT]
    source = new_source(tmp_path, max_items=5000)
    Session(source).conn.add(messages)
    sizes = []
    committed_after = []
    seqs: list[int] = []
    while True:
        batch = source.read(timeout=0)
        if not batch:
            break
        sizes.append(len(batch))
        committed_after.append(source.position.committed_lsn)
        seqs += [i.seq for i in batch if isinstance(i, ChangeEvent)]
        # Until its commit item is returned the transaction counts as in progress, so the
        # pipeline does not confirm the server's WAL end past it.
        assert source.in_transaction == (committed_after[-1] == 0)
    assert sizes == [5000, 5000, 2001]
    assert committed_after == [0, 0, COMMIT.end_lsn]
    assert seqs == list(range(rows))
    assert spill_files(tmp_path) == []


def test_relation_messages_in_a_stream_reach_the_relation_cache_at_once(tmp_path: Path) -> None:
    # The server does not resend a shape it streamed; a protocol 1 transaction that commits
    # before the streamed one may use it right away.
    source = new_source(tmp_path)
    items = play(
        source,
        [
            s.STREAM_START_FIRST,
            s.STREAM_RELATION_BULK,
            s.STREAM_STOP,
            begin(60, 0x1500000),
            as_protocol_1(insert_bulk(8, 0)),
            commit(0x1500000),
        ],
    )
    assert [i.after for i in items if isinstance(i, ChangeEvent)] == [(8, "x" * 200)]


def test_a_connection_loss_drops_the_spills_of_unfinished_transactions(tmp_path: Path) -> None:
    source = new_source(tmp_path)
    play(source, CAPTURED[:6])
    assert source.streams.in_stream and spill_files(tmp_path)
    # start() again (what the pipeline does after a lost connection): the server sends the
    # transaction again from its first segment, which must not be refused as a duplicate.
    items = play(source, list(CAPTURED))
    assert [i.seq for i in items if isinstance(i, ChangeEvent)] == [0, 1, 2, 3]
    assert spill_files(tmp_path) == []


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([s.STREAM_COMMIT], "never streamed"),
        ([s.STREAM_START_FIRST, s.STREAM_START_NEXT], "inside the stream block"),
        ([s.STREAM_START_FIRST, s.STREAM_STOP, s.STREAM_START_FIRST], "already streamed"),
        ([s.STREAM_START_NEXT], "first segment never arrived"),
        ([s.STREAM_STOP], "without a Stream Start"),
        ([s.STREAM_START_FIRST, s.BEGIN_INSERT], "Begin inside the stream block"),
        ([s.STREAM_START_FIRST, s.STREAM_COMMIT], "StreamCommit inside"),
        ([s.BEGIN_INSERT, s.STREAM_START_FIRST], "inside a transaction"),
        (
            [s.STREAM_START_FIRST, s.STREAM_STOP, s.STREAM_START_NEXT, s.STREAM_ABORT],
            "StreamAbort inside",
        ),
    ],
)
def test_protocol_violations_are_decode_errors(
    tmp_path: Path, messages: list[bytes | tuple[bytes, int]], problem: str
) -> None:
    with pytest.raises(DecodeError, match=problem):
        play(new_source(tmp_path), messages)


def test_a_spill_cut_short_on_disk_is_a_transient_error_and_is_cleaned_up(
    tmp_path: Path,
) -> None:
    source = new_source(tmp_path)
    session = Session(source)
    session.send(CAPTURED[:-1])
    [spill] = spill_files(tmp_path)
    spill.write_bytes(spill.read_bytes()[:-10])
    with pytest.raises(StreamSpillError, match="truncated or removed") as caught:
        session.send([s.STREAM_COMMIT])
    assert isinstance(caught.value, TransientError)
    source.close()
    assert list(tmp_path.iterdir()) == []


def test_an_unusable_spill_directory_is_a_transient_error(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    streams = StreamedTransactions(not_a_directory)
    with pytest.raises(StreamSpillError, match="cannot create a spill directory"):
        streams.start(pgoutput.StreamStart(XID, first_segment=True))


def test_transactions_are_replayed_one_record_at_a_time_from_disk(tmp_path: Path) -> None:
    # The replay holds one record in memory: after the first change is read, the file is
    # still there and the rest of it has not been decoded.
    with StreamedTransactions(tmp_path) as streams:
        streams.start(pgoutput.StreamStart(XID, first_segment=True))
        for i in range(3):
            payload = insert_bulk(i, XID)
            streams.append(pgoutput.decode_message(payload, in_stream=True), payload, 0x100 + i)
        streams.stop()
        assert streams.spilled_bytes == 3 * (16 + len(insert_bulk(0, XID)))
        replay = streams.commit(COMMIT)
        assert streams.open_xids == frozenset()  # ended, even before it is read
        first = next(replay)
        assert first == (
            pgoutput.Begin(COMMIT.commit_lsn, COMMIT.commit_ts, XID),
            COMMIT.commit_lsn,
            0,
        )
        message, lsn, size = next(replay)
        assert isinstance(message, pgoutput.Insert) and message.new[0] == "0"
        assert (lsn, size) == (0x100, len(insert_bulk(0, XID)) - 4)
        assert len(spill_files(tmp_path)) == 1
        replay.close()  # abandoned mid-way (e.g. the connection dropped): file goes too
        assert spill_files(tmp_path) == []


def test_changes_spilled_undecoded_are_checked_for_their_xid(tmp_path: Path) -> None:
    with StreamedTransactions(tmp_path) as streams:
        with pytest.raises(DecodeError, match="outside a stream block"):
            streams.append_change(b"I" + bytes(20), 0)
        streams.start(pgoutput.StreamStart(7, first_segment=True))
        with pytest.raises(DecodeError, match="truncated in the xid"):
            streams.append_change(b"I\x00\x00", 0)


def test_a_malformed_streamed_change_fails_at_its_replay(tmp_path: Path) -> None:
    with StreamedTransactions(tmp_path) as streams:
        streams.start(pgoutput.StreamStart(7, first_segment=True))
        streams.append_change(b"I" + struct.pack(">I", 7) + b"\x00\x00\x40\x00X", 0x100)
        streams.stop()
        replay = streams.commit(pgoutput.StreamCommit(7, 0, 0x200, 0x210, PG_EPOCH))
        assert isinstance(next(replay)[0], pgoutput.Begin)
        with pytest.raises(DecodeError, match="Insert"):
            next(replay)


# -- the compiled columnar path: the same sessions, the same changelog rows -----------------


def _rows(items: list[Any]) -> dict[str, list[tuple[Any, ...]]]:
    """Per table, in order: (op, values, commit LSN, seq, txid) of every change."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for item in items:
        if isinstance(item, ChangeBatch):
            data = item.changes
            names = item.table.column_names
            for row in data.to_pylist():
                out.setdefault(item.table.qualified_name, []).append(
                    (
                        row["_cdc_op"],
                        tuple(row[n] for n in names),
                        row["_cdc_lsn"],
                        row["_cdc_seq"],
                        row["_cdc_txid"],
                    )
                )
        elif isinstance(item, ChangeEvent):
            values = item.before if item.op == "d" else item.after
            out.setdefault(item.table.qualified_name, []).append(
                (item.op, values, item.commit_lsn, item.seq, item.txid)
            )
    return out


def _rows_read(source: StreamingSource, messages: list[bytes | tuple[bytes, int]]) -> list[Any]:
    conn = ScriptedConnection()
    source.start(conn)  # type: ignore[arg-type]
    conn.add(messages)
    items: list[Any] = []
    while conn.frames or source.in_transaction:
        batch = source.read(timeout=0)
        rows = sum(i.rows if isinstance(i, ChangeBatch) else 1 for i in batch)
        assert rows <= source.max_items  # batches count against max_items too
        items.extend(batch)
    return items


SESSIONS: dict[str, list[bytes | tuple[bytes, int]]] = {
    "captured": CAPTURED,
    "aborted subtransaction between others": INTERLEAVED_ABORT,
    "interleaved with a whole transaction": [
        stream_start(XID, first=True),
        s.STREAM_RELATION_BULK,
        *[insert_bulk(i, XID) for i in range(700)],
        s.STREAM_STOP,
        stream_start(900, first=True),
        with_xid(s.STREAM_RELATION_BULK, 900),
        insert_bulk(100, 900),
        s.STREAM_STOP,
        begin(50, 0x1500000),
        as_protocol_1(insert_bulk(7, 0)),
        commit(0x1500000),
        stream_start(XID, first=False),
        *[insert_bulk(i, XID) for i in range(700, 1500)],
        s.STREAM_STOP,
        stream_commit(900, 0x1600000, seconds=1),
        stream_commit(XID, 0x1700000, seconds=2),
    ],
    # Over 1 MiB of spill: records cross the pieces the replay reads.
    "larger than a spill read": [
        s.STREAM_START_FIRST,
        s.STREAM_RELATION_BULK,
        *[insert_bulk(i, XID if i % 7 else SUBXID_ROLLED_BACK) for i in range(6000)],
        s.STREAM_STOP,
        stream_abort(XID, SUBXID_ROLLED_BACK),
        s.STREAM_COMMIT,
    ],
}


@pytest.mark.parametrize("max_items", [3, 5000])
@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_the_columnar_path_replays_streams_like_the_pure_one(
    tmp_path: Path, name: str, max_items: int
) -> None:
    assert compiled.AVAILABLE, "the compiled decoder is not built (see setup.py)"
    (tmp_path / "pure").mkdir()
    (tmp_path / "fast").mkdir()
    pure = _rows_read(new_source(tmp_path / "pure", max_items=max_items), SESSIONS[name])
    fast = new_source(tmp_path / "fast", max_items=max_items, columnar=True)
    got = _rows_read(fast, SESSIONS[name])
    assert any(isinstance(i, ChangeBatch) for i in got)
    assert _rows(got) == _rows(pure)
    assert [i for i in got if isinstance(i, TransactionCommitted)] == [
        i for i in pure if isinstance(i, TransactionCommitted)
    ]
    assert spill_files(tmp_path) == []
