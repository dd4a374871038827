"""Packed layouts of 4-bit data, as integer index functions and NumPy pack/unpack.

Row-major nibble packing along the reduction axis (the portable layout; the tensor-core GEMM's
compute-aware reordering is a permutation applied on top of it):

    codes  uint4 [N, K]        (values 0..15)
    packed uint32 [N, K / 8]   word(n, k) = packed[n, k // 8],  nibble = (word >> 4 * (k % 8)) & 0xF

Index functions use only ``//``, ``%``, ``*``, ``>>`` and ``&`` so they work on Python ints, NumPy
arrays and TIR expressions alike.
"""

from __future__ import annotations

import numpy as np

NIBBLES_PER_WORD = 8


def word_index(k):
    """Which uint32 word along K holds element k."""
    return k // NIBBLES_PER_WORD


def nibble_shift(k):
    """Bit offset of element k inside its word."""
    return (k % NIBBLES_PER_WORD) * 4


def pack_uint4(codes: np.ndarray) -> np.ndarray:
    """uint4 codes [..., K] (K a multiple of 8) -> uint32 [..., K / 8]."""
    codes = np.asarray(codes)
    if codes.shape[-1] % NIBBLES_PER_WORD:
        raise ValueError(f"K={codes.shape[-1]} is not a multiple of {NIBBLES_PER_WORD}")
    if codes.size and (codes.min() < 0 or codes.max() > 15):
        raise ValueError("4-bit codes must lie in [0, 15]")
    c = codes.astype(np.uint32).reshape(*codes.shape[:-1], -1, NIBBLES_PER_WORD)
    shifts = (np.arange(NIBBLES_PER_WORD, dtype=np.uint32) * 4)
    return np.bitwise_or.reduce(c << shifts, axis=-1).astype(np.uint32)


def unpack_uint4(packed: np.ndarray) -> np.ndarray:
    """uint32 [..., K / 8] -> uint8 codes [..., K]."""
    packed = np.asarray(packed, dtype=np.uint32)
    shifts = (np.arange(NIBBLES_PER_WORD, dtype=np.uint32) * 4)
    codes = (packed[..., None] >> shifts) & np.uint32(0xF)
    return codes.reshape(*packed.shape[:-1], -1).astype(np.uint8)
