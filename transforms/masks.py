"""Column masks: ``hash``, ``keep_last:N``, ``redact``, ``null``, ``truncate:N``.

Each mask works on the value's text: the string itself for text columns, DuckDB's
``CAST(value AS VARCHAR)`` for other types. NULL stays NULL under every mask. The SQL
forms (:func:`mask_sql`) run vectorized in DuckDB, except ``hash`` on a text column, which
:class:`transforms.Transforms` computes with OpenSSL's SHA-256 (about three times faster
than DuckDB's ``sha256``, and the hash is most of a masked row's cost; the result is the
same): over a whole Arrow column with :func:`hash_array` (compiled, transforms/_hmac.pyx),
or through hashlib value by value (events, or no extension). :func:`mask_text` is the same function in Python, used only for the
rare values that reach capture as text because their typed form cannot hold them
(``numeric`` NaN...), and by the tests as the reference.

``hash`` is HMAC-SHA256 (RFC 2104) with the configured ``hash_key``, as lowercase hex, so
anyone holding the key reproduces it (``hmac.new(key, text.encode(), "sha256").hexdigest()``,
or ``encode(hmac(...), 'hex')`` in PostgreSQL with pgcrypto), and equal inputs give equal
outputs: joins on a hashed column still work. The key is passed to DuckDB as session
variables (``getvariable('cdc_hmac_ipad')``), never as SQL text, so it cannot appear in an
error message or a log line.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import importlib
import os
import re
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import pyarrow as pa

MaskKind = Literal["hash", "keep_last", "redact", "null", "truncate"]

#: What ``redact`` writes.
REDACTED = "***"

_WITH_N = re.compile(r"^(keep_last|truncate):(\d{1,9})$")

#: DuckDB session variables holding the HMAC key's inner and outer pads.
IPAD_VARIABLE = "cdc_hmac_ipad"
OPAD_VARIABLE = "cdc_hmac_opad"


@dataclass(frozen=True, slots=True)
class Mask:
    """A parsed mask. ``n`` is the N of ``keep_last:N`` and ``truncate:N``."""

    kind: MaskKind
    n: int = 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.n}" if self.kind in ("keep_last", "truncate") else self.kind

    @property
    def keeps_identity(self) -> bool:
        """Whether distinct values stay distinct (so the mask may apply to a key column)."""
        return self.kind == "hash"


def parse_mask(text: str) -> Mask:
    """``"keep_last:4"`` into a :class:`Mask`; ValueError naming the valid forms.

    Example:
        >>> parse_mask("keep_last:4")
        Mask(kind='keep_last', n=4)
    """
    spec = text.strip()
    if spec in ("hash", "redact", "null"):
        return Mask(spec)  # type: ignore[arg-type]
    match = _WITH_N.match(spec)
    if match:
        return Mask(match.group(1), int(match.group(2)))  # type: ignore[arg-type]
    raise ValueError(
        f"unknown mask {text!r}: expected hash, keep_last:N, redact, null or truncate:N"
    )


def hmac_pads(key: bytes) -> tuple[bytes, bytes]:
    """RFC 2104's inner and outer padded keys for SHA-256 (block size 64)."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def mask_sql(mask: Mask, column_sql: str) -> str:
    """The DuckDB expression masking ``column_sql`` (a quoted identifier); NULL stays NULL.

    ``null`` is not handled here: it needs no SQL (the caller writes NULL of the column's
    type).
    """
    text = f"CAST({column_sql} AS VARCHAR)"
    if mask.kind == "hash":
        inner = f"unhex(sha256(getvariable('{IPAD_VARIABLE}') || encode({text})))"
        body = f"sha256(getvariable('{OPAD_VARIABLE}') || {inner})"
    elif mask.kind == "keep_last":
        n = mask.n
        body = f"repeat('*', greatest(length({text}) - {n}, 0)) || " + (
            f"right({text}, {n})" if n else "''"
        )
    elif mask.kind == "redact":
        body = f"'{REDACTED}'"
    elif mask.kind == "truncate":
        body = f"left({text}, {mask.n})"
    else:
        raise ValueError(f"mask {mask} has no SQL form")
    return f"CASE WHEN {column_sql} IS NULL THEN NULL ELSE {body} END"


def mask_text(mask: Mask, text: str | None, key: bytes) -> str | None:
    """``mask`` applied to one text in Python (the reference form of :func:`mask_sql`).

    Example:
        >>> mask_text(parse_mask("keep_last:4"), "4111111111111111", b"")
        '************1111'
    """
    if text is None or mask.kind == "null":
        return None
    if mask.kind == "hash":
        return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()
    if mask.kind == "keep_last":
        n = mask.n
        return "*" * max(len(text) - n, 0) + (text[-n:] if n else "")
    if mask.kind == "redact":
        return REDACTED
    return text[: mask.n]


def _compiled() -> Any:
    try:
        return importlib.import_module("transforms._hmac")
    except ImportError:  # not built: no compiler (or no Cython) at install time
        return None


_HMAC = _compiled()


@cache
def openssl_sha256() -> tuple[int, int, int] | None:
    """The addresses of ``SHA256_Init``, ``SHA256_Update`` and ``SHA256_Final`` in the
    OpenSSL that hashlib runs (None: hashlib is built without it)."""
    try:
        import _hashlib  # hashlib's OpenSSL binding: its library is loaded already

        lib = ctypes.CDLL(_hashlib.__file__)
        names = ("SHA256_Init", "SHA256_Update", "SHA256_Final")
        found = tuple(ctypes.cast(getattr(lib, n), ctypes.c_void_p).value for n in names)
    except (ImportError, OSError, AttributeError):
        return None
    if any(f is None for f in found):
        return None
    return found  # type: ignore[return-value]


def hash_array(values: pa.Array, pads: tuple[bytes, bytes]) -> pa.Array | None:
    """The ``hash`` mask of a ``string`` array (``pads``: :func:`hmac_pads` of the key),
    computed without a Python object per value; None when the compiled form is not
    available or ``CDC_PURE_PYTHON=1`` (the caller hashes value by value).

    Example:
        >>> hash_array(pa.array(["a", None]), hmac_pads(b"k")).to_pylist()[1] is None  # doctest: +SKIP
        True
    """
    if _HMAC is None or os.environ.get("CDC_PURE_PYTHON", "") not in ("", "0"):
        return None  # as the compiled decoder, CDC_PURE_PYTHON=1 switches it off
    functions = openssl_sha256()
    if functions is None or values.type != pa.string():
        return None
    validity, offsets, data = values.buffers()
    n, offset = len(values), values.offset
    offsets = offsets.slice(0, 4 * (offset + n + 1))
    valid, out_offsets, out = _HMAC.hmac_sha256_hex(
        functions,
        pads[0],
        pads[1],
        validity if values.null_count else None,
        offsets,
        data if data is not None else b"",
        offset,
        n,
    )
    buffers = [None if valid is None else pa.py_buffer(valid), pa.py_buffer(out_offsets)]
    return pa.Array.from_buffers(pa.string(), n, [*buffers, pa.py_buffer(out)])
