# cython: boundscheck=False, wraparound=False, cdivision=True
"""HMAC-SHA256 of every value of an Arrow string array, as lowercase hex: the ``hash``
mask of a text column (see transforms/masks.py) without a Python object per value.

Optional, like cdc/postgres/protocol/_columns.pyx (see setup.py). The SHA-256 is the one
hashlib runs: OpenSSL's ``SHA256_Init/Update/Final``, whose addresses the caller looks up
in the library hashlib loaded (:func:`transforms.masks.openssl_sha256`), so nothing links
against OpenSSL at build time. The key's pads are hashed once; each value then costs its
own blocks and one block of the outer hash.
"""

from libc.stdint cimport int32_t, uint8_t
from libc.string cimport memcpy, memset

ctypedef int (*sha_init_t)(void *ctx) noexcept nogil
ctypedef int (*sha_update_t)(void *ctx, const void *data, size_t length) noexcept nogil
ctypedef int (*sha_final_t)(unsigned char *md, void *ctx) noexcept nogil

# OpenSSL's SHA256_CTX: 8 + 2 + 16 + 2 four-byte fields, 112 bytes in every version (it is
# public ABI). Contexts live in buffers of twice that, of which the first 112 bytes are
# copied.
DEF CTX_BUFFER = 224
DEF CTX_BYTES = 112

cdef const char *_HEX = b"0123456789abcdef"


def hmac_sha256_hex(tuple functions, bytes ipad, bytes opad, object validity, object offsets,
                    object data, Py_ssize_t offset, Py_ssize_t n):
    """The hex HMAC of the ``n`` values of a ``string`` array given by its buffers from row
    ``offset`` (``validity`` None: no nulls). ``functions``: the addresses of
    SHA256_Init, SHA256_Update and SHA256_Final. Returns the result's buffers (validity
    or None, offsets, data): null where the input is null."""
    if len(ipad) != 64 or len(opad) != 64:
        raise ValueError("the pads are 64 bytes (see transforms.masks.hmac_pads)")
    if 64 * n > 2**31 - 1:
        raise ValueError("too many values for one string array")
    cdef sha_init_t sha_init = <sha_init_t><size_t>functions[0]
    cdef sha_update_t sha_update = <sha_update_t><size_t>functions[1]
    cdef sha_final_t sha_final = <sha_final_t><size_t>functions[2]
    cdef unsigned char inner0[CTX_BUFFER]
    cdef unsigned char outer0[CTX_BUFFER]
    cdef unsigned char ctx[CTX_BUFFER]
    cdef unsigned char digest[32]
    memset(inner0, 0, CTX_BUFFER)
    memset(outer0, 0, CTX_BUFFER)
    memset(ctx, 0, CTX_BUFFER)
    cdef const unsigned char[:] ipad_view = ipad
    cdef const unsigned char[:] opad_view = opad
    sha_init(inner0)
    sha_update(inner0, &ipad_view[0], 64)
    sha_init(outer0)
    sha_update(outer0, &opad_view[0], 64)

    cdef bint has_nulls = validity is not None
    cdef const uint8_t[:] valid_in
    if has_nulls:
        valid_in = memoryview(validity).cast("B")
    cdef const int32_t[:] offs = memoryview(offsets).cast("B").cast("i")
    cdef const uint8_t[:] chars
    cdef bint has_chars = len(data) > 0
    if has_chars:
        chars = memoryview(data).cast("B")

    out = bytearray(64 * n)
    out_offsets = bytearray(4 * (n + 1))
    out_valid = bytearray((n + 7) // 8) if has_nulls else None
    cdef unsigned char[:] hexes
    if n:
        hexes = out
    cdef int32_t[:] out_offs = memoryview(out_offsets).cast("i")
    cdef unsigned char[:] valid_out
    if has_nulls:
        valid_out = out_valid

    cdef Py_ssize_t i, j, row
    cdef int32_t start, end
    cdef unsigned char *dest
    with nogil:
        for i in range(n):
            out_offs[i] = <int32_t>(64 * i)
            dest = &hexes[64 * i]
            row = offset + i
            if has_nulls:
                if not ((valid_in[row >> 3] >> (row & 7)) & 1):
                    memset(dest, 48, 64)  # a null row's value: never read
                    continue
                valid_out[i >> 3] |= <unsigned char>(1 << (i & 7))
            start = offs[row]
            end = offs[row + 1]
            memcpy(ctx, inner0, CTX_BYTES)
            if end > start and has_chars:
                sha_update(ctx, &chars[start], <size_t>(end - start))
            sha_final(digest, ctx)
            memcpy(ctx, outer0, CTX_BYTES)
            sha_update(ctx, digest, 32)
            sha_final(digest, ctx)
            for j in range(32):
                dest[2 * j] = _HEX[digest[j] >> 4]
                dest[2 * j + 1] = _HEX[digest[j] & 15]
        out_offs[n] = <int32_t>(64 * n)
    return out_valid, out_offsets, out
