"""Whether the snapshot drains its COPY in C (chosen per connection, at run time).

The extension ``cdc.postgres._copy_drain`` (built from ``_copy_drain.pyx`` when the package
is installed with a C compiler, like the compiled pgoutput decoder) calls libpq itself,
through the functions of the libpq that psycopg loaded. Which one that is (psycopg's
binary wheel brings its own) is read from the process's memory map, so the compiled drain
is taken on Linux when exactly one libpq is loaded and it reports psycopg's libpq
version; anywhere else, or with ``CDC_PURE_PYTHON=1``, the snapshot drains the COPY with
psycopg's ``PGconn.get_copy_data``, which works the same, only slower.

The compiled drain also splits the CSV rows into Arrow string columns as it takes them
(``CopyDrain.drain_columns``, :func:`string_columns`), where the Python path parses the
joined rows with ``pyarrow.csv``: the same columns either way, the split without the GIL.

Example:
    >>> from cdc.postgres import copy_drain
    >>> copy_drain.AVAILABLE in (True, False)
    True
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
from psycopg import pq

from cdc.postgres.protocol import compiled

__all__ = [
    "AVAILABLE",
    "END",
    "FAILED",
    "MALFORMED",
    "MORE",
    "TOO_LARGE",
    "compiled_drain",
    "split_rows",
    "string_columns",
]

#: What ``CopyDrain.drain`` returns beside the rows (see _copy_drain.pyx).
MORE = 0
END = 1
FAILED = 2
MALFORMED = 4
TOO_LARGE = 5

#: The libpq functions the drain calls.
_FUNCTIONS = ("PQgetCopyData", "PQconsumeInput", "PQfreemem", "PQsocket")

_CopyDrain: Any = compiled.load_extension("cdc.postgres._copy_drain", "CopyDrain")

#: The extension's row splitter without a connection (tests), or None.
split_rows: Any = compiled.load_extension("cdc.postgres._copy_drain", "split_rows")

#: The extension was built and imports.
AVAILABLE: bool = _CopyDrain is not None


def string_columns(
    rows: int, buffers: list[tuple[bytes, bytes, bytes | None, int]]
) -> list[pa.Array]:
    """The Arrow string arrays of ``drain_columns``' or ``split_rows``' buffers: one
    ``(offsets, data, validity or None, null count)`` per column, over ``rows`` rows.
    Zero-copy: each array keeps its bytes alive."""
    return [
        pa.StringArray.from_buffers(
            rows,
            pa.py_buffer(offsets),
            pa.py_buffer(data),
            None if validity is None else pa.py_buffer(validity),
            nulls,
        )
        for offsets, data, validity, nulls in buffers
    ]


def _mapped_libpqs(maps: Path = Path("/proc/self/maps")) -> set[str]:
    """The files named ``libpq*.so*`` mapped into this process (Linux; empty elsewhere)."""
    try:
        text = maps.read_text()
    except OSError:
        return set()
    paths = set()
    for line in text.splitlines():
        fields = line.split(maxsplit=5)  # address, perms, offset, device, inode, path
        if len(fields) == 6:
            path = fields[5].strip()
            name = os.path.basename(path)
            if name.startswith("libpq") and ".so" in name:
                paths.add(path)
    return paths


@functools.lru_cache(maxsize=1)
def _libpq_functions() -> tuple[int, ...] | None:
    """The addresses of :data:`_FUNCTIONS` in the libpq psycopg uses, or None when that
    libpq cannot be told for certain (none or several mapped, or another version)."""
    paths = _mapped_libpqs()
    if len(paths) != 1:
        return None
    try:
        # RTLD_NOLOAD: the library already loaded, never a second copy of it.
        lib = ctypes.CDLL(paths.pop(), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        lib.PQlibVersion.restype = ctypes.c_int
        if lib.PQlibVersion() != pq.version():
            return None
        addresses = [ctypes.cast(getattr(lib, f), ctypes.c_void_p).value for f in _FUNCTIONS]
    except (OSError, AttributeError):  # not loadable that way, or a function is missing
        return None
    if not all(addresses):
        return None
    return tuple(a for a in addresses if a is not None)


def compiled_drain(pgconn: pq.abc.PGconn) -> Any | None:
    """A ``CopyDrain`` for ``pgconn``, or None when the Python drain must be used: the
    extension is not built, ``CDC_PURE_PYTHON`` is set, psycopg's libpq is not found, or
    the connection is closed.

    Read per call, so tests and tools can flip ``CDC_PURE_PYTHON`` in-process.
    """
    if not AVAILABLE or compiled.pure_python_forced():
        return None
    # Documented on both of psycopg's PGconn classes, though not on their protocol class.
    pointer = getattr(pgconn, "pgconn_ptr", None)
    functions = _libpq_functions()
    if not pointer or functions is None:
        return None
    return _CopyDrain(pointer, *functions)
