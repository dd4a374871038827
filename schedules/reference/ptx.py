"""NumPy emulation of the PTX warp instructions qoqc's tensor-core kernels use, by lane registers.

The tensor-core kernels (``w4a8_gemm_tc``, ``kv4_prefill``) are emulated in NumPy on CPUs: every
lane's registers go through these functions, which implement the PTX ISA's fragment layouts
(lane = 4 g + t: groupID g = lane // 4, threadID_in_group t = lane % 4):

    ldmatrix.x4 (8-bit data)    register i of lane l: bytes 4t..4t+3 of row g of matrix i, whose 8
                                rows are the 16-byte rows addressed by lanes 8i..8i+7
    mma.m16n8k32 s8.s8.s32      A 16x32, four registers of 4 bytes: (g, 4t..), (g + 8, 4t..),
                                (g, 16 + 4t..), (g + 8, 16 + 4t..);  B 32x8, two registers: rows
                                4t.., 16 + 4t.. of column g
    mma.m16n8k16 f16.f16.f32    A 16x16, four registers of 2 halves: (g, 2t..), (g + 8, 2t..),
                                (g, 8 + 2t..), (g + 8, 8 + 2t..);  B 16x8, two registers: rows
                                2t.., 8 + 2t.. of column g
    accumulators (both mma)     c0 (g, 2t), c1 (g, 2t + 1), c2 (g + 8, 2t), c3 (g + 8, 2t + 1)

Registers are held as arrays [32 lanes, registers, elements] (s8: 4 bytes per register) or as
uint32 words holding two fp16 halves (low half first). ``tests/test_ptx_emulation.py`` checks each
against a plain matrix product, with the layouts restated element by element as the ISA tables
give them.
"""

from __future__ import annotations

import numpy as np

LANES = np.arange(32)
G, T = LANES // 4, LANES % 4


def ldmatrix_x4(rows: np.ndarray) -> np.ndarray:
    """``rows`` [32, 16] int8: the 16-byte row each lane addresses -> registers [32, 4, 4] int8."""
    return np.stack([rows[8 * i + G][:, None, :].reshape(32, 4, 4)[LANES, T] for i in range(4)], axis=1)


def acc_positions() -> tuple[np.ndarray, np.ndarray]:
    """(row, col) [32, 4] of each lane's accumulators c0..c3 in the 16 x 8 output."""
    c = np.arange(4)
    return G[:, None] + c[None, :] // 2 * 8, 2 * T[:, None] + c[None, :] % 2


def _accumulate(acc: np.ndarray, d: np.ndarray) -> np.ndarray:
    rows, cols = acc_positions()
    return acc + d[rows, cols]


def mma_m16n8k32_s8(acc: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """acc [32, 4] int64 + A . B from a [32, 4, 4] and b [32, 2, 4] int8 registers -> new acc [32, 4]
    (int64: the caller wraps to int32 where the hardware would)."""
    A, B = np.zeros((16, 32), np.int64), np.zeros((32, 8), np.int64)
    for r in range(4):
        A[G[:, None] + r % 2 * 8, r // 2 * 16 + 4 * T[:, None] + np.arange(4)] = a[:, r]
    for r in range(2):
        B[r * 16 + 4 * T[:, None] + np.arange(4), G[:, None]] = b[:, r]
    return _accumulate(acc, A @ B)


def f16_bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16).view(np.uint16).astype(np.uint32)


def pack_halves(lo, hi) -> np.ndarray:
    """uint32 words holding fp16(lo) in the low and fp16(hi) in the high half."""
    return f16_bits(lo) | (f16_bits(hi) << np.uint32(16))


def halves(u32: np.ndarray) -> np.ndarray:
    """[..., 2] fp32 of the (low, high) fp16 halves of u32 registers."""
    h = np.stack([u32 & np.uint32(0xFFFF), u32 >> np.uint32(16)], axis=-1).astype(np.uint16)
    return h.view(np.float16).astype(np.float32)


def mma_m16n8k16_f16(acc: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """acc [32, 4] fp32 + A . B from a [32, 4] and b [32, 2] uint32 registers (fp16 pairs) -> new acc."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    ah, bh = halves(a), halves(b)
    for r in range(4):
        A[G[:, None] + r % 2 * 8, r // 2 * 8 + 2 * T[:, None] + np.arange(2)] = ah[:, r]
    for r in range(2):
        B[r * 8 + 2 * T[:, None] + np.arange(2), G[:, None]] = bh[:, r]
    return _accumulate(acc, A @ B).astype(np.float32)
