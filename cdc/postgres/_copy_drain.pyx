# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled draining of a COPY OUT through libpq, without the GIL (see ``copy_drain.py``).

PostgreSQL sends one CopyData message per row, and ``PQgetCopyData`` hands over one row per
call. Taken from Python that is a method call, a buffer object and a bytearray append per
row (about a third of a microsecond each, a third of a second per million rows, holding the
GIL). :class:`CopyDrain` makes the same calls in C and joins the rows into one buffer of
whole rows, waiting for the socket with ``poll`` when libpq has no whole row buffered.

libpq is called through function pointers taken from the libpq the connection was made
with (psycopg may bring its own copy): this module links against no libpq of its own.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uintptr_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy


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

#: What :meth:`CopyDrain.drain` returns beside the rows.
MORE = _MORE  # the buffer is full, or the wait timed out: call again
END = _END  # the COPY is over; its result is still to be read
FAILED = _FAILED  # libpq failed (PQgetCopyData -2, or PQconsumeInput 0): see PQerrorMessage


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

    def drain(self, Py_ssize_t block_bytes, int timeout_ms):
        """``(status, rows)``: whole rows joined, from the first that passes ``block_bytes``
        back; fewer when the COPY ended, libpq failed or no row came for ``timeout_ms``."""
        cdef Py_ssize_t cap = block_bytes + 65536
        cdef Py_ssize_t size = 0
        cdef char* out = <char*>malloc(cap)
        cdef char* row
        cdef char* grown
        cdef int n
        cdef int ready
        cdef int status = _MORE
        cdef pollfd pfd
        if out == NULL:
            raise MemoryError()
        try:
            with nogil:
                while True:
                    row = NULL
                    n = self.get_copy_data(self.conn, &row, 1)  # 1: never block
                    if n > 0:
                        if size + n > cap:
                            cap = (size + n) * 2
                            grown = <char*>realloc(out, cap)
                            if grown == NULL:
                                self.freemem(row)
                                status = _NO_MEMORY
                                break
                            out = grown
                        memcpy(out + size, row, n)
                        size += n
                        self.freemem(row)
                        if size >= block_bytes:
                            break
                    elif n == 0:  # no whole row buffered: wait for the socket
                        pfd.fd = self.socket_fn(self.conn)
                        pfd.events = POLLIN
                        pfd.revents = 0
                        ready = poll(&pfd, 1, timeout_ms)
                        if ready > 0:
                            if self.consume_input(self.conn) == 0:
                                status = _FAILED
                                break
                        elif ready == 0:
                            break  # the caller looks whether it is still wanted
                        # ready < 0: interrupted by a signal; poll again
                    elif n == -1:
                        status = _END
                        break
                    else:
                        status = _FAILED
                        break
            if status == _NO_MEMORY:
                raise MemoryError()
            return status, PyBytes_FromStringAndSize(out, size)
        finally:
            free(out)
