# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled draining of a COPY OUT through libpq, without the GIL (see ``copy_drain.py``).

PostgreSQL sends one CopyData message per row, and ``PQgetCopyData`` hands over one row per
call. Taken from Python that is a method call, a buffer object and a bytearray append per
row (about a third of a microsecond each, a third of a second per million rows, holding the
GIL). :class:`CopyDrain` makes the same calls in C and joins the rows into one buffer of
whole rows, waiting for the socket with ``poll`` when libpq has no whole row buffered.
:meth:`CopyDrain.drain_columns` goes one step further for COPY ... CSV: it splits each row
into its fields as it takes it, into one Arrow string column (offsets, data, validity) per
table column, so that no CSV parser runs afterwards and the GIL is not taken for it.

libpq is called through function pointers taken from the libpq the connection was made
with (psycopg may bring its own copy): this module links against no libpq of its own.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, uint8_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memchr, memcpy, memset


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    enum: POLLIN


ctypedef int (*get_copy_data_t)(void* conn, char** buffer, int async_) noexcept nogil
ctypedef int (*consume_input_t)(void* conn) noexcept nogil
ctypedef void (*freemem_t)(void* ptr) noexcept nogil
ctypedef int (*socket_t)(const void* conn) noexcept nogil

cdef enum:
    _MORE = 0
    _END = 1
    _FAILED = 2
    _NO_MEMORY = 3
    _MALFORMED = 4
    _TOO_LARGE = 5

#: What :meth:`CopyDrain.drain` returns beside the rows.
MORE = _MORE  # the buffer is full, or the wait timed out: call again
END = _END  # the COPY is over; its result is still to be read
FAILED = _FAILED  # libpq failed (PQgetCopyData -2, or PQconsumeInput 0): see PQerrorMessage
MALFORMED = _MALFORMED  # drain_columns: a row is not a CSV row of the expected columns
TOO_LARGE = _TOO_LARGE  # drain_columns: a column's text passed 2 GiB in one chunk

#: Largest text of one column in one chunk (Arrow string offsets are 32-bit).
DEF _MAX_COLUMN_BYTES = 2147483647


cdef struct Column:
    char* data
    Py_ssize_t size
    Py_ssize_t cap
    int32_t* offsets  # rows + 1 entries
    uint8_t* validity  # one bit per row, 1 = not NULL
    Py_ssize_t nulls


cdef inline int _append(Column* col, const char* src, Py_ssize_t n) noexcept nogil:
    """Append ``n`` bytes to ``col``'s text; 0, or the status that stops the split."""
    cdef Py_ssize_t cap
    cdef char* grown
    if col.size + n > col.cap:
        if col.size + n > _MAX_COLUMN_BYTES:
            return _TOO_LARGE
        cap = (col.size + n) * 2
        if cap > _MAX_COLUMN_BYTES:
            cap = _MAX_COLUMN_BYTES
        grown = <char*>realloc(col.data, cap)
        if grown == NULL:
            return _NO_MEMORY
        col.data = grown
        col.cap = cap
    memcpy(col.data + col.size, src, n)
    col.size += n
    return 0


cdef class _Rows:
    """Where :meth:`CopyDrain._fill` puts the rows it takes."""

    cdef int add_row(self, const char* p, Py_ssize_t n) noexcept nogil:
        """Take one row of ``n`` bytes; 0, or the status that stops the drain."""
        return 0


cdef class _Joined(_Rows):
    """The rows of a chunk joined into one buffer, as the COPY sent them."""

    cdef char* out
    cdef Py_ssize_t size
    cdef Py_ssize_t cap

    def __cinit__(self, Py_ssize_t cap):
        self.cap = cap
        self.size = 0
        self.out = <char*>malloc(cap)
        if self.out == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.out)

    cdef int add_row(self, const char* p, Py_ssize_t n) noexcept nogil:
        cdef char* grown
        if self.size + n > self.cap:
            grown = <char*>realloc(self.out, (self.size + n) * 2)
            if grown == NULL:
                return _NO_MEMORY
            self.out = grown
            self.cap = (self.size + n) * 2
        memcpy(self.out + self.size, p, n)
        self.size += n
        return 0

    def joined(self):
        return PyBytes_FromStringAndSize(self.out, self.size)


cdef class _Columns(_Rows):
    """The string columns a chunk of CSV rows is split into (one Arrow StringArray each)."""

    cdef Column* cols
    cdef Py_ssize_t ncols
    cdef Py_ssize_t rows
    cdef Py_ssize_t row_cap
    cdef Py_ssize_t bad_row  # the row that stopped the split, for the error message

    def __cinit__(self, Py_ssize_t ncols):
        if ncols < 1:
            raise ValueError("a CSV row has at least one column")
        self.ncols = ncols
        self.cols = <Column*>calloc(ncols, sizeof(Column))
        if self.cols == NULL:
            raise MemoryError()
        self.rows = 0
        self.row_cap = 0
        self.bad_row = -1
        if self._grow_rows(1024) != 0:
            raise MemoryError()

    def __dealloc__(self):
        cdef Py_ssize_t c
        if self.cols != NULL:
            for c in range(self.ncols):
                free(self.cols[c].data)
                free(self.cols[c].offsets)
                free(self.cols[c].validity)
            free(self.cols)

    cdef int _grow_rows(self, Py_ssize_t want) noexcept nogil:
        """Room for ``want`` rows in every column's offsets and validity; 0 on success."""
        cdef Py_ssize_t c
        cdef Py_ssize_t cap = self.row_cap
        cdef int32_t* offsets
        cdef uint8_t* validity
        if want <= cap:
            return 0
        while cap < want:
            cap = cap * 2 if cap else 1024
        for c in range(self.ncols):
            offsets = <int32_t*>realloc(self.cols[c].offsets, (cap + 1) * sizeof(int32_t))
            if offsets == NULL:
                return -1
            if self.cols[c].offsets == NULL:
                offsets[0] = 0
            self.cols[c].offsets = offsets
            validity = <uint8_t*>realloc(self.cols[c].validity, (cap + 7) // 8)
            if validity == NULL:
                return -1
            memset(validity + (self.row_cap + 7) // 8, 0, (cap + 7) // 8 - (self.row_cap + 7) // 8)
            self.cols[c].validity = validity
        self.row_cap = cap
        return 0

    cdef int add_row(self, const char* p, Py_ssize_t n) noexcept nogil:
        """Split one COPY CSV row (``n`` bytes, its ``\\n`` included) into the columns.

        PostgreSQL writes each row of COPY ... CSV as one message: fields separated by
        ``,``, a NULL as nothing at all, and a field in double quotes (a quote doubled
        inside) when it is empty or holds a comma, quote, CR or LF. The same reading as
        pyarrow.csv's with the options of ``snapshot._parse_chunk``. Returns 0, or the
        status that stops the split (the row is then ``bad_row``).
        """
        cdef Py_ssize_t end
        cdef Py_ssize_t i = 0
        cdef Py_ssize_t c = 0
        cdef Py_ssize_t row = self.rows
        cdef const char* hit
        cdef Py_ssize_t stop
        cdef int status
        cdef Column* col
        if n < 1 or p[n - 1] != b"\n":
            self.bad_row = row
            return _MALFORMED
        end = n - 1
        if row >= self.row_cap and self._grow_rows(row + 1) != 0:
            return _NO_MEMORY
        while True:
            if c >= self.ncols:
                self.bad_row = row
                return _MALFORMED  # more fields than columns
            col = &self.cols[c]
            if i < end and p[i] == b'"':
                i += 1
                while True:
                    hit = <const char*>memchr(p + i, b'"', end - i)
                    if hit == NULL:
                        self.bad_row = row
                        return _MALFORMED  # no closing quote
                    stop = hit - p
                    status = _append(col, p + i, stop - i)
                    if status:
                        self.bad_row = row
                        return status
                    if stop + 1 < end and p[stop + 1] == b'"':  # a doubled quote
                        status = _append(col, p + stop, 1)
                        if status:
                            self.bad_row = row
                            return status
                        i = stop + 2
                        continue
                    i = stop + 1
                    break
                if i < end and p[i] != b",":
                    self.bad_row = row
                    return _MALFORMED  # text after the closing quote
                col.validity[row >> 3] |= <uint8_t>(1 << (row & 7))
            else:
                hit = <const char*>memchr(p + i, b",", end - i)
                stop = (hit - p) if hit != NULL else end
                if stop == i:
                    col.nulls += 1  # unquoted and empty: NULL
                else:
                    status = _append(col, p + i, stop - i)
                    if status:
                        self.bad_row = row
                        return status
                    col.validity[row >> 3] |= <uint8_t>(1 << (row & 7))
                i = stop
            col.offsets[row + 1] = <int32_t>col.size
            c += 1
            if i >= end:
                break
            i += 1  # the comma; a comma last starts one more (NULL) field
        if c != self.ncols:
            self.bad_row = row
            return _MALFORMED  # fewer fields than columns
        self.rows = row + 1
        return 0

    def buffers(self):
        """``(rows, [(offsets, data, validity or None, nulls), ...])``, as bytes."""
        cdef Py_ssize_t c
        cdef Column* col
        out = []
        for c in range(self.ncols):
            col = &self.cols[c]
            out.append(
                (
                    PyBytes_FromStringAndSize(<char*>col.offsets, (self.rows + 1) * sizeof(int32_t)),
                    PyBytes_FromStringAndSize(col.data, col.size),
                    PyBytes_FromStringAndSize(<char*>col.validity, (self.rows + 7) // 8)
                    if col.nulls
                    else None,
                    col.nulls,
                )
            )
        return self.rows, out


def split_rows(rows, Py_ssize_t ncols):
    """``(status, bad_row, rows, columns)``: :meth:`CopyDrain.drain_columns`'s split of
    ``rows`` (a list of bytes, one COPY CSV row each), without a connection. For tests, and
    for rows taken some other way."""
    cdef _Columns cols = _Columns(ncols)
    cdef int status = 0
    cdef bytes row
    for row in rows:
        status = cols.add_row(PyBytes_AS_STRING(row), PyBytes_GET_SIZE(row))
        if status:
            return status, cols.bad_row, 0, None
    n, columns = cols.buffers()
    return _MORE, -1, n, columns


cdef class CopyDrain:
    """Drains the COPY OUT in progress on one libpq connection.

    ``conn`` is the ``PGconn*`` (psycopg: ``pgconn.pgconn_ptr``); the others are the
    addresses of ``PQgetCopyData``, ``PQconsumeInput``, ``PQfreemem`` and ``PQsocket`` in
    the libpq that made it. The caller keeps the connection alive, and uses it from no other
    thread, while :meth:`drain` runs.
    """

    cdef void* conn
    cdef get_copy_data_t get_copy_data
    cdef consume_input_t consume_input
    cdef freemem_t freemem
    cdef socket_t socket_fn

    def __cinit__(
        self,
        uintptr_t conn,
        uintptr_t get_copy_data,
        uintptr_t consume_input,
        uintptr_t freemem,
        uintptr_t socket_fn,
    ):
        if not (conn and get_copy_data and consume_input and freemem and socket_fn):
            raise ValueError("CopyDrain needs a connection and four libpq functions")
        self.conn = <void*>conn
        self.get_copy_data = <get_copy_data_t>get_copy_data
        self.consume_input = <consume_input_t>consume_input
        self.freemem = <freemem_t>freemem
        self.socket_fn = <socket_t>socket_fn

    cdef int _take(self, char** row, int timeout_ms) noexcept nogil:
        """The next row into ``row``: its size (> 0; the caller frees it with PQfreemem),
        0 when none came for ``timeout_ms``, -1 when the COPY is over, -2 when libpq failed
        (PQgetCopyData -2, or PQconsumeInput 0). Waits for the socket with ``poll`` when
        libpq has no whole row buffered."""
        cdef int n
        cdef int ready
        cdef pollfd pfd
        while True:
            row[0] = NULL
            n = self.get_copy_data(self.conn, row, 1)  # 1: never block
            if n > 0 or n == -1:
                return n
            if n < -1:
                return -2
            pfd.fd = self.socket_fn(self.conn)
            pfd.events = POLLIN
            pfd.revents = 0
            ready = poll(&pfd, 1, timeout_ms)
            if ready > 0:
                if self.consume_input(self.conn) == 0:
                    return -2
            elif ready == 0:
                return 0  # the caller looks whether it is still wanted
            # ready < 0: interrupted by a signal; poll again

    cdef int _fill(self, _Rows rows, Py_ssize_t block_bytes, int timeout_ms) noexcept nogil:
        """Hand rows to ``rows`` until they pass ``block_bytes`` in all: the status."""
        cdef Py_ssize_t size = 0
        cdef char* row
        cdef int n
        cdef int status
        while True:
            n = self._take(&row, timeout_ms)
            if n > 0:
                status = rows.add_row(row, n)
                self.freemem(row)
                if status:
                    return status
                size += n
                if size >= block_bytes:
                    return _MORE
            elif n == 0:
                return _MORE  # the caller looks whether it is still wanted
            else:
                return _END if n == -1 else _FAILED

    def drain(self, Py_ssize_t block_bytes, int timeout_ms):
        """``(status, rows)``: whole rows joined, from the first that passes ``block_bytes``
        back; fewer when the COPY ended, libpq failed or no row came for ``timeout_ms``."""
        cdef _Joined joined = _Joined(block_bytes + 65536)
        cdef int status
        with nogil:
            status = self._fill(joined, block_bytes, timeout_ms)
        if status == _NO_MEMORY:
            raise MemoryError()
        return status, joined.joined()

    def drain_columns(self, Py_ssize_t ncols, Py_ssize_t block_bytes, int timeout_ms):
        """``(status, bad_row, rows, columns)``: :meth:`drain`, with each row of a COPY
        ... CSV split into ``ncols`` string columns as it is taken (see ``_Columns``).

        ``columns`` is a list of ``(offsets, data, validity or None, nulls)``, the buffers
        of one Arrow StringArray per column, over the ``rows`` rows taken. On
        ``MALFORMED`` or ``TOO_LARGE``, ``bad_row`` is the row (counted in this chunk)
        that stopped the split, and nothing else is returned.
        """
        cdef _Columns cols = _Columns(ncols)
        cdef int status
        with nogil:
            status = self._fill(cols, block_bytes, timeout_ms)
        if status == _NO_MEMORY:
            raise MemoryError()
        if status == _MALFORMED or status == _TOO_LARGE:
            return status, cols.bad_row, 0, None
        rows, columns = cols.buffers()
        return status, -1, rows, columns
