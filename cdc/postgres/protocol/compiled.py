"""Whether the compiled pgoutput decoder is in use (chosen at import time).

The extension ``cdc.postgres.protocol._columns`` is built from ``_columns.pyx`` when the
package is installed with a C compiler (see ``setup.py``); without one the package is pure
Python and works the same, only slower. ``CDC_PURE_PYTHON=1`` in the environment forces the
pure path even when the extension is there (for comparison, or to rule it out).

Example:
    >>> from cdc.postgres.protocol import compiled
    >>> compiled.enabled() in (True, False)
    True
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__all__ = [
    "AVAILABLE",
    "NOT_TAKEN",
    "RELATION_FULL",
    "UNKNOWN_RELATION",
    "ColumnBuilder",
    "enabled",
    "load_extension",
    "pure_python_forced",
]

#: What ColumnBuilder.feed returns when it did not append the row (see _columns.pyx).
NOT_TAKEN = 0
UNKNOWN_RELATION = -1
RELATION_FULL = -2


def load_extension(module: str, attribute: str) -> Any:
    """``attribute`` of the optional compiled extension ``module``, or None when it is not
    built (no compiler, or no Cython, at install time)."""
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError:
        return None


def pure_python_forced() -> bool:
    """``CDC_PURE_PYTHON`` asks for the pure-Python paths (any value but empty or ``0``)."""
    return os.environ.get("CDC_PURE_PYTHON", "") not in ("", "0")


#: The compiled builder class, or None when the extension is not built.
ColumnBuilder: Any = load_extension("cdc.postgres.protocol._columns", "ColumnBuilder")

#: The extension was built and imports.
AVAILABLE: bool = ColumnBuilder is not None


def enabled() -> bool:
    """The extension is available and ``CDC_PURE_PYTHON`` does not switch it off.

    Read when a stream starts, so tests and tools can flip the variable in-process.
    """
    return AVAILABLE and not pure_python_forced()
