"""Packed layouts of 4-bit data, as integer index functions and NumPy pack/unpack.

UINT4 weight codes [N, K] of the W4A8 GEMM are stored in QServe's compute-aware reordering (the
"MMA layout"): N and K are zero-padded to multiples of 32 and every 32 (n) x 32 (k) tile is 512
contiguous bytes, 16 per lane of a warp, so that one 16-byte load gives a lane its operands of four
m16n8k32 ``mma.sync`` B fragments (channels l, 8 + l, 16 + l, 24 + l) without ldmatrix:

    packed uint32 [N/32, K/32, 32, 4]
    n = 32 nt + 16 h + 8 s + l,  k = 32 kt + 16 p + 4 c + r       (h, s, p in 0..1; l < 8; c, r < 4)
    lane = 4 l + c,  word = 2 p + s,  bits = 8 r + 4 h
i.e. byte r of word (p, s) holds channel 8s + l in its low nibble and 16 + 8s + l in its high one,
for k = 16p + 4c + r: exactly the s8 B fragment of lane 4l + c (PTX ISA, mma.m16n8k32: col
groupID = l, rows 4c + r and 16 + 4c + r in registers 0 and 1). ``x & 0x0F0F0F0F`` and
``(x >> 4) & 0x0F0F0F0F`` of the four words are the eight fragment registers. Per-group scales and
zeros go with it as [G, N/32 * 32] in the channel order ``mma_channel_order`` (lane group l reads
one uint32: the bytes of channels l, 8 + l, 16 + l, 24 + l).

Index functions use only ``//``, ``%``, ``*``, ``>>`` and ``&`` so they work on Python ints, NumPy
arrays and TIR expressions alike.
"""

from __future__ import annotations

import numpy as np

from .formats import round_up

MMA_TILE = 32


def pad32(x: int) -> int:
    """x rounded up to a multiple of 32 (the MMA layout's tile)."""
    return round_up(x, MMA_TILE)


def mma_index(n, k):
    """(nt, kt, lane, word, bit shift) of weight (n, k) in the MMA layout."""
    r, c = n % 32, k % 32
    return (n // 32, k // 32, (r % 8) * 4 + (c % 16) // 4, (c // 16) * 2 + (r % 16) // 8,
            (c % 4) * 8 + (r // 16) * 4)


def mma_channel_order(n: int) -> np.ndarray:
    """Channel stored at each position of an MMA-ordered per-channel vector of length pad32(n)."""
    pos = np.arange(pad32(n))
    return pos // 32 * 32 + (pos % 4) * 8 + (pos % 32) // 4


def mma_channel_position(n):
    """Position of channel n in an MMA-ordered vector (inverse of ``mma_channel_order``)."""
    return n // 32 * 32 + (n % 8) * 4 + (n % 32) // 8


def pack_uint4_mma(codes: np.ndarray) -> np.ndarray:
    """uint4 codes [N, K] -> uint32 [N/32, K/32, 32, 4] (padded with zero codes; see the module docstring)."""
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() > 15):
        raise ValueError("4-bit codes must lie in [0, 15]")
    n, k = codes.shape
    c = np.zeros((pad32(n), pad32(k)), np.uint32)
    c[:n, :k] = codes
    # [nt, h, s, l, kt, p, c, r] -> [nt, kt, l, c, p, s, r, h]
    t = c.reshape(-1, 2, 2, 8, c.shape[1] // 32, 2, 4, 4).transpose(0, 4, 3, 6, 5, 2, 7, 1)
    nib = t[..., 0] | (t[..., 1] << 4)                                 # bytes [nt, kt, l, c, p, s, r]
    words = np.bitwise_or.reduce(nib << (np.arange(4, dtype=np.uint32) * 8), axis=-1)
    return words.reshape(c.shape[0] // 32, c.shape[1] // 32, 32, 4).astype(np.uint32)


def unpack_uint4_mma(packed: np.ndarray, n: int, k: int) -> np.ndarray:
    """uint32 [N/32, K/32, 32, 4] -> uint8 codes [n, k] (inverse of ``pack_uint4_mma``, its steps
    reversed: bytes of each word, nibbles of each byte, the inverse transpose)."""
    packed = np.asarray(packed, dtype=np.uint32)
    nt, kt = packed.shape[:2]
    words = packed.reshape(nt, kt, 8, 4, 2, 2)                                 # [nt, kt, l, c, p, s]
    nib = (words[..., None] >> (np.arange(4, dtype=np.uint32) * 8)) & np.uint32(0xFF)  # [..., r]
    t = np.stack([nib & np.uint32(0xF), nib >> np.uint32(4)], axis=-1).astype(np.uint8)  # [..., r, h]
    c = t.transpose(0, 7, 5, 2, 1, 4, 3, 6).reshape(nt * 32, kt * 32)          # [nt, h, s, l, kt, p, c, r]
    return np.ascontiguousarray(c[:n, :k])


def to_mma_channel_order(x: np.ndarray) -> np.ndarray:
    """Per-channel values [N, ...] -> [pad32(N), ...] in MMA channel order (padding zero)."""
    x = np.asarray(x)
    out = np.zeros((pad32(x.shape[0]), *x.shape[1:]), x.dtype)
    out[:x.shape[0]] = x
    return out[mma_channel_order(x.shape[0])]
