# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled pgoutput row decoding into per-relation column buffers (see ``compiled.py``).

:class:`ColumnBuilder` takes raw pgoutput Insert, Update (new tuple only) and Delete
payloads, checks them as :func:`cdc.postgres.protocol.pgoutput.decode_message` does (column
count, lengths, kinds, UTF-8, no trailing bytes) and appends one row per message to the
relation's buffers: for every column the text bytes, int32 offsets, a validity bitmap and an
unchanged-TOAST bitmap; per row the op, commit LSN, seq, xid and commit time. No Python
object is made per value.

It never raises for a payload it does not take: a malformed one, a message of another kind,
an Update with an old tuple (a key change or REPLICA IDENTITY FULL), binary values, or a
row outside a transaction return 0, and the caller decodes the payload with the pure
decoder, which raises the precise :class:`~cdc.core.errors.DecodeError` (so both paths
reject exactly the same bytes with the same message).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_Resize
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

#: Returned by :meth:`ColumnBuilder.feed`.
NOT_TAKEN = 0
UNKNOWN_RELATION = -1
RELATION_FULL = -2

# A column's text bytes in one batch stay below this: Arrow string offsets are int32.
cdef Py_ssize_t _MAX_COLUMN_BYTES = 0x7FFFFFFF - 1

cdef struct Buf:
    char* data
    Py_ssize_t size
    Py_ssize_t cap


cdef int buf_reserve(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = b.size + extra
    cdef Py_ssize_t cap
    cdef char* p
    if need <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 256
    while cap < need:
        cap *= 2
    p = <char*>realloc(b.data, cap)
    if p == NULL:
        raise MemoryError()
    b.data = p
    b.cap = cap
    return 0


cdef inline void buf_free(Buf* b):
    free(b.data)
    b.data = NULL
    b.size = b.cap = 0


cdef bytes buf_bytes(Buf* b):
    return PyBytes_FromStringAndSize(b.data, b.size)


cdef inline uint32_t be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint16_t be16(const uint8_t* p) noexcept nogil:
    return <uint16_t>((<uint16_t>p[0] << 8) | p[1])


cdef bint utf8_valid(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    """Well-formed UTF-8 (Unicode table 3-7), as Python's strict decoder requires: no
    overlong forms, no surrogates, nothing above U+10FFFF."""
    cdef Py_ssize_t i = 0
    cdef uint8_t c, c1
    cdef uint64_t word
    while i < n:
        # ASCII runs, eight bytes at a time.
        while i + 8 <= n:
            memcpy(&word, s + i, 8)
            if word & 0x8080808080808080ULL:
                break
            i += 8
        if i >= n:
            break
        c = s[i]
        if c < 0x80:
            i += 1
        elif c < 0xC2:
            return False
        elif c < 0xE0:
            if i + 1 >= n or (s[i + 1] & 0xC0) != 0x80:
                return False
            i += 2
        elif c < 0xF0:
            if i + 2 >= n:
                return False
            c1 = s[i + 1]
            if c == 0xE0:
                if c1 < 0xA0 or c1 > 0xBF:
                    return False
            elif c == 0xED:
                if c1 < 0x80 or c1 > 0x9F:
                    return False
            elif (c1 & 0xC0) != 0x80:
                return False
            if (s[i + 2] & 0xC0) != 0x80:
                return False
            i += 3
        elif c < 0xF5:
            if i + 3 >= n:
                return False
            c1 = s[i + 1]
            if c == 0xF0:
                if c1 < 0x90 or c1 > 0xBF:
                    return False
            elif c == 0xF4:
                if c1 < 0x80 or c1 > 0x8F:
                    return False
            elif (c1 & 0xC0) != 0x80:
                return False
            if (s[i + 2] & 0xC0) != 0x80 or (s[i + 3] & 0xC0) != 0x80:
                return False
            i += 4
        else:
            return False
    return True


cdef class _Relation:
    """Buffered rows of one relation."""

    cdef int ncols
    cdef Buf* data
    cdef Buf* offsets
    cdef Buf* valid
    cdef Buf* unchanged
    cdef bint any_unchanged
    cdef Buf ops
    cdef Buf lsns
    cdef Buf seqs
    cdef Buf txids
    cdef Buf stamps
    cdef Buf msg_lsns  # each row's own message LSN (Debezium's source.lsn)
    cdef Py_ssize_t rows
    cdef Py_ssize_t size
    cdef Py_ssize_t counts[3]  # c, u, d

    def __cinit__(self, int ncols):
        cdef int j
        self.ncols = ncols
        n = ncols if ncols > 0 else 1
        self.data = <Buf*>realloc(NULL, n * sizeof(Buf))
        self.offsets = <Buf*>realloc(NULL, n * sizeof(Buf))
        self.valid = <Buf*>realloc(NULL, n * sizeof(Buf))
        self.unchanged = <Buf*>realloc(NULL, n * sizeof(Buf))
        if not (self.data and self.offsets and self.valid and self.unchanged):
            raise MemoryError()
        for j in range(n):
            self.data[j] = Buf(NULL, 0, 0)
            self.offsets[j] = Buf(NULL, 0, 0)
            self.valid[j] = Buf(NULL, 0, 0)
            self.unchanged[j] = Buf(NULL, 0, 0)
        self.ops = Buf(NULL, 0, 0)
        self.lsns = Buf(NULL, 0, 0)
        self.seqs = Buf(NULL, 0, 0)
        self.txids = Buf(NULL, 0, 0)
        self.stamps = Buf(NULL, 0, 0)
        self.msg_lsns = Buf(NULL, 0, 0)
        self._reset()

    cdef int _reset(self) except -1:
        cdef int j
        cdef int32_t zero = 0
        for j in range(self.ncols):
            self.data[j].size = 0
            self.offsets[j].size = 0
            buf_reserve(&self.offsets[j], 4)
            memcpy(self.offsets[j].data, &zero, 4)
            self.offsets[j].size = 4
            self.valid[j].size = 0
            self.unchanged[j].size = 0
        self.any_unchanged = False
        self.ops.size = self.lsns.size = self.seqs.size = 0
        self.txids.size = self.stamps.size = self.msg_lsns.size = 0
        self.rows = 0
        self.size = 0
        self.counts[0] = self.counts[1] = self.counts[2] = 0
        return 0

    def __dealloc__(self):
        cdef int j
        n = self.ncols if self.ncols > 0 else 1
        if self.data != NULL:
            for j in range(n):
                buf_free(&self.data[j])
                buf_free(&self.offsets[j])
                buf_free(&self.valid[j])
                buf_free(&self.unchanged[j])
        free(self.data)
        free(self.offsets)
        free(self.valid)
        free(self.unchanged)
        buf_free(&self.ops)
        buf_free(&self.lsns)
        buf_free(&self.seqs)
        buf_free(&self.txids)
        buf_free(&self.stamps)
        buf_free(&self.msg_lsns)

    cdef void _rollback(self, int upto) noexcept:
        """Undo the columns ``0 .. upto-1`` of a row that turned out malformed."""
        cdef int j
        cdef int32_t start
        for j in range(upto):
            self.offsets[j].size -= 4
            memcpy(&start, self.offsets[j].data + self.offsets[j].size - 4, 4)
            self.data[j].size = start

    cdef int _append_tuple(
        self, const uint8_t* buf, Py_ssize_t offset, Py_ssize_t end, int unchanged_mode
    ) except -2:
        """Append one TupleData at ``offset``; 1 if appended, 0 if not taken (malformed,
        binary, another column count, too big: nothing is left appended).

        ``unchanged_mode`` for ``u`` values: 1 marks them (an update), 0 leaves them null
        (a delete's old tuple: the assembler drops them), 2 does not take the row (an
        insert: the pipeline looks such values up for events, see fill_unchanged_toast)."""
        cdef bint keep_unchanged = unchanged_mode == 1
        cdef Py_ssize_t ncols, length, row = self.rows, byte = self.rows >> 3
        cdef uint8_t bit = <uint8_t>(1 << (self.rows & 7))
        cdef uint8_t kind
        cdef int j
        cdef int32_t stop
        cdef Buf* col
        if offset + 2 > end:
            return 0
        ncols = be16(buf + offset)
        offset += 2
        if ncols != self.ncols:
            return 0
        for j in range(self.ncols):
            if (row & 7) == 0:
                buf_reserve(&self.valid[j], 1)
                self.valid[j].data[byte] = 0
                self.valid[j].size = byte + 1
                buf_reserve(&self.unchanged[j], 1)
                self.unchanged[j].data[byte] = 0
                self.unchanged[j].size = byte + 1
            # Cleared for every row: a rolled-back attempt may have set them.
            self.valid[j].data[byte] &= ~bit
            self.unchanged[j].data[byte] &= ~bit
        for j in range(self.ncols):
            if offset >= end:
                self._rollback(j)
                return 0
            kind = buf[offset]
            col = &self.data[j]
            if kind == 0x74:  # t
                if offset + 5 > end:
                    self._rollback(j)
                    return 0
                length = be32(buf + offset + 1)
                offset += 5
                if length > end - offset or col.size + length > _MAX_COLUMN_BYTES:
                    self._rollback(j)
                    return 0
                if not utf8_valid(buf + offset, length):
                    self._rollback(j)
                    return 0
                buf_reserve(col, length)
                memcpy(col.data + col.size, buf + offset, length)
                col.size += length
                offset += length
                self.valid[j].data[byte] |= bit
            elif kind == 0x6E:  # n
                offset += 1
            elif kind == 0x75:  # u
                if unchanged_mode == 2:
                    self._rollback(j)
                    return 0
                offset += 1
                if keep_unchanged:
                    self.unchanged[j].data[byte] |= bit
            else:  # b (binary, never requested) or unknown: the pure path says which
                self._rollback(j)
                return 0
            buf_reserve(&self.offsets[j], 4)
            stop = <int32_t>col.size
            memcpy(self.offsets[j].data + self.offsets[j].size, &stop, 4)
            self.offsets[j].size += 4
        if offset != end:
            self._rollback(self.ncols)
            return 0
        if keep_unchanged and not self.any_unchanged:
            for j in range(self.ncols):
                if self.unchanged[j].data[byte] & bit:
                    self.any_unchanged = True
                    break
        return 1

    cdef int _append_meta(
        self, char op, int64_t lsn, int64_t seq, int64_t xid, int64_t stamp, Py_ssize_t size,
        int64_t msg_lsn,
    ) except -1:
        buf_reserve(&self.ops, 1)
        self.ops.data[self.ops.size] = op
        self.ops.size += 1
        buf_reserve(&self.lsns, 8)
        memcpy(self.lsns.data + self.lsns.size, &lsn, 8)
        self.lsns.size += 8
        buf_reserve(&self.seqs, 8)
        memcpy(self.seqs.data + self.seqs.size, &seq, 8)
        self.seqs.size += 8
        buf_reserve(&self.txids, 8)
        memcpy(self.txids.data + self.txids.size, &xid, 8)
        self.txids.size += 8
        buf_reserve(&self.stamps, 8)
        memcpy(self.stamps.data + self.stamps.size, &stamp, 8)
        self.stamps.size += 8
        buf_reserve(&self.msg_lsns, 8)
        memcpy(self.msg_lsns.data + self.msg_lsns.size, &msg_lsn, 8)
        self.msg_lsns.size += 8
        self.rows += 1
        self.size += size
        if op == 99:  # c
            self.counts[0] += 1
        elif op == 117:  # u
            self.counts[1] += 1
        else:
            self.counts[2] += 1
        return 0


cdef class ColumnBuilder:
    """Per-relation column buffers fed with raw pgoutput row messages.

    The transaction (commit LSN, xid, commit time) is set by :meth:`begin` and cleared by
    :meth:`end`; :attr:`seq` is the transaction's change counter, shared with whoever
    handles the messages this builder does not take.

    Example:
        >>> builder = ColumnBuilder()  # doctest: +SKIP
        >>> builder.register(16384, 2); builder.begin(0x16B3748, 745, 0)  # doctest: +SKIP
        >>> builder.feed(payload, 0, False)  # doctest: +SKIP
        1
        >>> builder.take(16384)  # doctest: +SKIP
    """

    cdef dict _relations
    cdef int64_t _last_id
    cdef _Relation _last
    cdef bint in_transaction
    cdef int64_t _lsn
    cdef int64_t _xid
    cdef int64_t _stamp
    cdef public int64_t seq
    cdef public Py_ssize_t pending
    cdef public int64_t received
    cdef public int64_t relation
    cdef public int code

    def __cinit__(self):
        self._relations = {}
        self._last_id = -1
        self._last = None
        self.in_transaction = False
        self.seq = 0
        self.pending = 0
        self.received = 0
        self.relation = -1
        self.code = 0

    def register(self, relation_id, int ncols):
        """Buffer rows of ``relation_id``, whose tuples must have ``ncols`` columns."""
        old = self._relations.get(relation_id)
        if old is not None and (<_Relation>old).rows:
            raise ValueError(f"relation {relation_id} still has buffered rows: take them first")
        self._relations[relation_id] = _Relation(ncols)
        self._last_id = -1
        self._last = None

    def forget(self, relation_id):
        """Stop buffering ``relation_id`` (its shape changed); take its rows first."""
        old = self._relations.pop(relation_id, None)
        if old is not None and (<_Relation>old).rows:
            self._relations[relation_id] = old
            raise ValueError(f"relation {relation_id} still has buffered rows: take them first")
        self._last_id = -1
        self._last = None

    def forget_all(self):
        """Drop every relation and buffered row, and the transaction (a lost connection)."""
        self._relations.clear()
        self._last_id = -1
        self._last = None
        self.pending = 0
        self.end()

    def begin(self, int64_t commit_lsn, int64_t xid, int64_t commit_ts_us, int64_t seq=0):
        """A transaction starts: its rows get these commit LSN, xid, commit time (Unix
        microseconds) and seqs counting up from ``seq``."""
        self.in_transaction = True
        self._lsn = commit_lsn
        self._xid = xid
        self._stamp = commit_ts_us
        self.seq = seq

    def end(self):
        self.in_transaction = False
        self.seq = 0

    def pending_relations(self):
        """Relation ids with buffered rows."""
        return [rid for rid, rel in self._relations.items() if (<_Relation>rel).rows]

    def rows(self, relation_id):
        rel = self._relations.get(relation_id)
        return (<_Relation>rel).rows if rel is not None else 0

    def feed(self, data, Py_ssize_t offset, bint in_stream, int64_t lsn=0):
        """Append the row of one pgoutput message.

        ``data`` holds the message from ``offset`` on: 0 for a bare payload, 25 for a whole
        XLogData frame (then its WAL start updates :attr:`received`). ``in_stream``: the
        protocol-2 form, with the xid after the tag (as spilled, see stream_spill).
        ``lsn``: the message's own WAL position for a bare payload (a frame carries it).

        Returns the rows now buffered (all relations) when the row was appended, else
        NOT_TAKEN (decode it with the pure decoder), UNKNOWN_RELATION (``register`` the
        relation in :attr:`relation`, then feed again) or RELATION_FULL (``take`` it, then
        feed again).
        """
        cdef Py_buffer view
        cdef const uint8_t* buf
        cdef Py_ssize_t end
        cdef int64_t start = 0
        cdef int code
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            buf = <const uint8_t*>view.buf
            end = view.len
            if offset:
                if offset != 25 or end < 26 or buf[0] != 0x77:
                    self.relation = -1
                    return 0
                start = <int64_t>((<uint64_t>be32(buf + 1) << 32) | be32(buf + 5))
                lsn = start
            code = self._feed(buf, offset, end, in_stream, lsn)
            if code > 0 and start > self.received:
                self.received = start
            return code
        finally:
            PyBuffer_Release(&view)

    cdef int _feed(
        self, const uint8_t* buf, Py_ssize_t pos, Py_ssize_t end, bint in_stream, int64_t msg_lsn
    ) except -3:
        """Append the row of the message in ``buf[pos:end]`` (at WAL ``msg_lsn``); see
        :meth:`feed`."""
        cdef Py_ssize_t begin = pos
        cdef uint8_t tag, kind
        cdef char op
        cdef uint32_t rid
        cdef _Relation rel
        cdef int appended
        self.relation = -1
        tag = buf[pos] if pos < end else 0
        if tag != 0x49 and tag != 0x55 and tag != 0x44:  # I U D
            return 0
        pos += 5 if in_stream else 1
        if pos + 5 > end:
            return 0
        rid = be32(buf + pos)
        kind = buf[pos + 4]
        pos += 5
        if tag == 0x49:
            if kind != 0x4E:
                return 0
            op = 99  # c
        elif tag == 0x55:
            if kind != 0x4E:
                return 0  # an old tuple: key change or FULL identity, the pure path
            op = 117  # u
        else:
            if kind != 0x4B and kind != 0x4F:
                return 0
            op = 100  # d
        self.relation = rid
        if not self.in_transaction:
            return 0
        if self._last is not None and self._last_id == rid:
            rel = self._last
        else:
            found = self._relations.get(rid)
            if found is None:
                return UNKNOWN_RELATION
            rel = <_Relation>found
            self._last = rel
            self._last_id = rid
        appended = rel._append_tuple(buf, pos, end, 0 if op == 100 else (1 if op == 117 else 2))
        if not appended:
            if rel.rows and (pos + 2 <= end) and be16(buf + pos) == rel.ncols:
                # Perhaps only the batch is too big for int32 offsets: cut and retry.
                if _too_big(rel, buf, pos, end):
                    return RELATION_FULL
            return 0
        rel._append_meta(
            op, self._lsn, self.seq, self._xid, self._stamp,
            end - begin - (4 if in_stream else 0), msg_lsn,
        )
        self.seq += 1
        self.pending += 1
        return <int>self.pending

    def replay_records(self, data, Py_ssize_t pos, aborted, Py_ssize_t limit):
        """Feed the spill records (see :mod:`cdc.postgres.stream_spill`) in ``data`` from
        ``pos``: row changes in their in-stream form, skipping the changes of ``aborted``
        subtransactions (a set of xids; schema messages are never skipped), until
        :attr:`pending` reaches ``limit``.

        Returns ``(pos, records, status)``: where it stopped, how many records it consumed,
        and why: 0 the data ends (or a record is incomplete) at ``pos``, 1 the record at
        ``pos`` is not taken (handle it with the pure path; :attr:`code` says why), 2
        ``limit`` is reached.
        """
        cdef Py_buffer view
        cdef const uint8_t* buf
        cdef Py_ssize_t end, length, records = 0
        cdef uint8_t tag
        cdef uint32_t xid
        cdef int code
        cdef bint check_aborted = bool(aborted)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            buf = <const uint8_t*>view.buf
            end = view.len
            while True:
                if self.pending >= limit:
                    return pos, records, 2
                if pos + 16 > end:
                    return pos, records, 0
                length = be32(buf + pos + 12)
                if length > end - pos - 16:
                    return pos, records, 0
                if length == 0:
                    self.code = 0
                    return pos, records, 1
                tag = buf[pos + 16]
                if check_aborted and tag != 0x52 and tag != 0x59:  # R Y
                    xid = be32(buf + pos + 8)
                    if xid in aborted:
                        pos += 16 + length
                        records += 1
                        continue
                # The record starts with the change's Int64 data_start (big-endian).
                code = self._feed(
                    buf, pos + 16, pos + 16 + length, True,
                    <int64_t>((<uint64_t>be32(buf + pos) << 32) | be32(buf + pos + 4)),
                )
                if code <= 0:
                    self.code = code
                    return pos, records, 1
                pos += 16 + length
                records += 1
        finally:
            PyBuffer_Release(&view)

    def drain(self, get_copy_data, Py_ssize_t limit):
        """Feed whole XLogData frames from ``get_copy_data(1)`` (psycopg's
        ``PGconn.get_copy_data``, async: it never waits) until :attr:`pending` reaches
        ``limit`` or a frame is not taken.

        Returns ``(nbytes, frame)``: ``(n > 0, frame)`` for the frame not taken (its code in
        :attr:`code`), ``(0, None)`` when nothing more is buffered or ``limit`` is reached,
        ``(n < 0, None)`` when the COPY ended.
        """
        cdef Py_ssize_t nbytes
        cdef int code
        while self.pending < limit:
            nbytes, data = get_copy_data(1)
            if nbytes <= 0:
                return nbytes, None
            code = self.feed(data, 25, False)
            if code <= 0:
                self.code = code
                return nbytes, data
        return 0, None

    def drain_spill(self, get_copy_data, bytearray out, Py_ssize_t max_bytes):
        """Inside a protocol-2 stream block: append the in-stream changes (Insert, Update,
        Delete, Truncate, logical message) that ``get_copy_data(1)`` has buffered to
        ``out`` as spill records (see :mod:`cdc.postgres.stream_spill`), undecoded, until
        ``out`` holds ``max_bytes``.

        Returns ``(nbytes, frame, records)``: the first frame that is not such a change
        (``nbytes > 0``; a Stream Stop, say) or ``(0, None, records)`` when nothing more is
        buffered or ``out`` is full, ``(n < 0, None, records)`` when the COPY ended.
        """
        cdef Py_ssize_t nbytes, records = 0, length, at
        cdef Py_buffer view
        cdef const uint8_t* buf
        cdef uint8_t tag
        cdef int64_t start
        cdef char* dst
        while len(out) < max_bytes:
            nbytes, data = get_copy_data(1)
            if nbytes <= 0:
                return nbytes, None, records
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                buf = <const uint8_t*>view.buf
                length = view.len - 25
                if view.len < 30 or buf[0] != 0x77:
                    return nbytes, data, records
                tag = buf[25]
                if tag != 0x49 and tag != 0x55 and tag != 0x44 and tag != 0x54 and tag != 0x4D:
                    return nbytes, data, records
                start = <int64_t>((<uint64_t>be32(buf + 1) << 32) | be32(buf + 5))
                at = len(out)
                PyByteArray_Resize(out, at + 16 + length)
                dst = PyByteArray_AS_STRING(out) + at
                # Int64 data_start, Int32 xid, Int32 length: big-endian, as _RECORD packs.
                memcpy(dst, buf + 1, 8)
                memcpy(dst + 8, buf + 26, 4)
                dst[12] = <char>((length >> 24) & 0xFF)
                dst[13] = <char>((length >> 16) & 0xFF)
                dst[14] = <char>((length >> 8) & 0xFF)
                dst[15] = <char>(length & 0xFF)
                memcpy(dst + 16, buf + 25, length)
                records += 1
                if start > self.received:
                    self.received = start
            finally:
                PyBuffer_Release(&view)
        return 0, None, records

    def take(self, relation_id):
        """The buffered rows of ``relation_id`` as Arrow buffers, or None; empties them.

        Returns ``(rows, columns, unchanged, ops, op_offsets, lsns, seqs, txids, stamps,
        size, counts, msg_lsns)``: per column ``(validity, offsets, data)`` bytes and, when some row
        has an unchanged TOAST value, per column its bitmap bytes (else None); the per-row
        metadata as bytes (ops one byte a row with their int32 string offsets, the others
        native int64);
        ``counts`` the rows per op ``{"c": .., "u": .., "d": ..}``; ``msg_lsns`` each row's
        own message LSN (native int64; ``lsns`` is the commit LSN).
        """
        found = self._relations.get(relation_id)
        if found is None:
            return None
        cdef _Relation rel = <_Relation>found
        if not rel.rows:
            return None
        cdef int j
        columns = [
            (buf_bytes(&rel.valid[j]), buf_bytes(&rel.offsets[j]), buf_bytes(&rel.data[j]))
            for j in range(rel.ncols)
        ]
        unchanged = (
            [buf_bytes(&rel.unchanged[j]) for j in range(rel.ncols)] if rel.any_unchanged else None
        )
        cdef bytes op_offsets = PyBytes_FromStringAndSize(NULL, (rel.rows + 1) * 4)
        cdef int32_t* op_offset = <int32_t*><char*>op_offsets
        cdef Py_ssize_t i
        for i in range(rel.rows + 1):
            op_offset[i] = <int32_t>i
        out = (
            rel.rows,
            columns,
            unchanged,
            buf_bytes(&rel.ops),
            op_offsets,
            buf_bytes(&rel.lsns),
            buf_bytes(&rel.seqs),
            buf_bytes(&rel.txids),
            buf_bytes(&rel.stamps),
            rel.size,
            {"c": rel.counts[0], "u": rel.counts[1], "d": rel.counts[2]},
            buf_bytes(&rel.msg_lsns),
        )
        self.pending -= rel.rows
        rel._reset()
        return out


cdef bint _too_big(_Relation rel, const uint8_t* buf, Py_ssize_t pos, Py_ssize_t end):
    """Whether a well-formed tuple failed only because a column's batch would pass int32."""
    cdef int j
    cdef Py_ssize_t length
    cdef uint8_t kind
    pos += 2
    for j in range(rel.ncols):
        if pos >= end:
            return False
        kind = buf[pos]
        if kind == 0x74:
            if pos + 5 > end:
                return False
            length = be32(buf + pos + 1)
            pos += 5
            if length > end - pos:
                return False
            if rel.data[j].size + length > _MAX_COLUMN_BYTES:
                return True
            pos += length
        elif kind == 0x6E or kind == 0x75:
            pos += 1
        else:
            return False
    return False
