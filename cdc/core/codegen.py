"""Compiling generated per-table functions so that tracebacks and debuggers show their source.

Several hot paths (the assembler's row converter, the Kafka encoder's row encoder, the sink's
row decoder) generate one function per table shape: one call per row instead of a loop step
per value. :func:`compile_function` is the one place that compiles them. It gives each
function a readable file name, such as ``<generated cdc row converter public.orders>``, and
registers the source with :mod:`linecache` (as attrs does), so a traceback through generated
code shows the generated line and ``pdb`` can list it.

Hazard: the source must be built from column positions and constants only. Names coming
from the database belong in ``namespace`` (as values), never in the source text: a column
called ``x); import os; (`` must stay a string. The label may hold such names: it only names
the file.
"""

from __future__ import annotations

import linecache
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["compile_function", "generated_filename"]

_lock = threading.Lock()


def generated_filename(kind: str, label: str, source: str) -> str:
    """The file name generated code of ``kind`` for ``label`` is compiled under.

    ``<generated cdc {kind} {label}>``, with a ``#2``, ``#3``... suffix when that name is
    already registered with different source (a table whose shape changed keeps both
    versions readable). The same source reuses its name, so rebuilding a table's function
    does not grow :mod:`linecache`.

    >>> generated_filename("row converter", "public.orders", "def f(): pass\\n")
    '<generated cdc row converter public.orders>'
    """
    shown = "".join(c if c.isprintable() else "?" for c in label)
    base = f"<generated cdc {kind} {shown}"
    lines = source.splitlines(True)
    n = 1
    while True:
        filename = f"{base}>" if n == 1 else f"{base} #{n}>"
        entry = linecache.cache.get(filename)
        if entry is None or (len(entry) == 4 and entry[2] == lines):
            return filename
        n += 1


def compile_function(
    source: str, *, name: str, kind: str, label: str, namespace: dict[str, Any]
) -> Callable[..., Any]:
    """Compile ``source`` (which defines the function ``name``) with ``namespace`` as its
    globals, register the source with :mod:`linecache` and return the function.

    Args:
        source: Python source defining ``name``; built from positions and constants only.
        name: the function the source defines.
        kind: what the function is, for the file name (``"row converter"``).
        label: which table it serves, for the file name (``"public.orders"``).
        namespace: the function's globals: the values the source refers to by name.

    Example:
        >>> f = compile_function("def f(x):\\n    return x + k\\n", name="f",
        ...                      kind="example", label="t", namespace={"k": 1})
        >>> f(1), f.__code__.co_filename
        (2, '<generated cdc example t>')
    """
    with _lock:  # the name check and the registration must not interleave
        filename = generated_filename(kind, label, source)
        code = compile(source, filename, "exec")
        # mtime None: linecache.checkcache() keeps the entry (there is no file to check).
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(code, namespace)  # the source is generated from positions and constants only
    function: Callable[..., Any] = namespace[name]
    return function
