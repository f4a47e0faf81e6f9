"""PostgreSQL log sequence numbers (LSNs) in their text form.

An LSN is a 64-bit byte position in the write-ahead log. PostgreSQL prints it as two
upper-case hexadecimal numbers, the high and low 32 bits, separated by a slash and
without zero padding: ``16/B374D848``. Inside this package LSNs are plain ``int``.

Example:
    >>> parse_lsn("16/B374D848")
    97500059720
    >>> format_lsn(97500059720)
    '16/B374D848'
"""

from __future__ import annotations

import re

from cdc.core.errors import DecodeError

__all__ = ["MAX_LSN", "format_lsn", "parse_lsn"]

#: The largest value an LSN can take (``FFFFFFFF/FFFFFFFF``).
MAX_LSN = 0xFFFF_FFFF_FFFF_FFFF

# Mirrors pg_lsn_in: 1 to 8 hex digits per half and nothing else. int(x, 16) alone would
# also accept signs, "0x", underscores and surrounding whitespace, which PostgreSQL rejects.
_LSN_RE = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def parse_lsn(text: str) -> int:
    """Parse PostgreSQL's ``X/Y`` text form of an LSN into an integer.

    Accepts exactly what the ``pg_lsn`` type accepts: one to eight hex digits (either
    case) on each side of a single slash.

    Raises:
        DecodeError: ``text`` is not a valid LSN.
    """
    if not isinstance(text, str):
        raise DecodeError(f"LSN must be a str like '16/B374D848', got {type(text).__name__}")
    match = _LSN_RE.fullmatch(text)
    if match is None:
        raise DecodeError(
            f"invalid LSN {text!r}: expected two hex numbers of 1 to 8 digits separated by "
            "'/', like '16/B374D848'"
        )
    high, low = match.groups()
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(value: int) -> str:
    """Format an LSN the way PostgreSQL prints it: ``X/Y``, upper-case hex, no padding.

    Raises:
        ValueError: ``value`` is not an integer in ``0..MAX_LSN`` (a caller bug, not bad
            input from the server).
    """
    # bool is an int subclass; format_lsn(True) is certainly a mistake.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"LSN must be an int, got {type(value).__name__}")
    if not 0 <= value <= MAX_LSN:
        raise ValueError(f"LSN {value} is outside the 64-bit range 0..{MAX_LSN}")
    return f"{value >> 32:X}/{value & 0xFFFF_FFFF:X}"
