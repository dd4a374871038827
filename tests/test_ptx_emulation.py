"""The PTX instruction emulation the tensor-core kernels' CPU tests stand on
(``schedules.reference.ptx``): each instruction against a plain matrix product, with the lanes'
registers filled from the PTX ISA's fragment tables restated element by element (a_i, b_i, c_i of
lane 4 g + t), independently of the register-wise code under test."""

from __future__ import annotations

import numpy as np

from schedules.reference import ptx


def _s8_a(i, g, t):   # mma.m16n8k32 .s8 A element a_i (i < 16) of lane 4g + t: (row, col)
    return g + 8 * (i // 4 % 2), 4 * t + i % 4 + 16 * (i // 8)


def _s8_b(i, g, t):   # B element b_i (i < 8)
    return 4 * t + i % 4 + 16 * (i // 4), g


def _f16_a(i, g, t):  # mma.m16n8k16 .f16 A element a_i (i < 8)
    return g + 8 * (i // 2 % 2), 2 * t + i % 2 + 8 * (i // 4)


def _f16_b(i, g, t):  # B element b_i (i < 4)
    return 2 * t + i % 2 + 8 * (i // 2), g


def _c(i, g, t):      # accumulator c_i (i < 4), both shapes
    return g + 8 * (i // 2), 2 * t + i % 2


def test_mma_m16n8k32_s8_is_a_matrix_product():
    rng = np.random.default_rng(0)
    a, b = rng.integers(-128, 128, (16, 32)), rng.integers(-128, 128, (32, 8))
    acc0 = rng.integers(-1000, 1000, (16, 8))
    ra, rb, rc = np.zeros((32, 16), np.int8), np.zeros((32, 8), np.int8), np.zeros((32, 4), np.int64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        ra[lane] = [a[_s8_a(i, g, t)] for i in range(16)]
        rb[lane] = [b[_s8_b(i, g, t)] for i in range(8)]
        rc[lane] = [acc0[_c(i, g, t)] for i in range(4)]
    out = ptx.mma_m16n8k32_s8(rc, ra.reshape(32, 4, 4), rb.reshape(32, 2, 4))
    got = np.full((16, 8), np.iinfo(np.int64).min)
    for lane in range(32):
        for i in range(4):
            got[_c(i, *divmod(lane, 4))] = out[lane, i]
    np.testing.assert_array_equal(got, a @ b + acc0)


def test_mma_m16n8k16_f16_is_a_matrix_product():
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal(s).astype(np.float16) for s in ((16, 16), (16, 8)))
    acc0 = rng.standard_normal((16, 8)).astype(np.float32)
    ra, rb, rc = np.zeros((32, 4), np.uint32), np.zeros((32, 2), np.uint32), np.zeros((32, 4), np.float32)
    for lane in range(32):
        g, t = divmod(lane, 4)
        av, bv = [a[_f16_a(i, g, t)] for i in range(8)], [b[_f16_b(i, g, t)] for i in range(4)]
        ra[lane] = ptx.pack_halves(av[0::2], av[1::2])   # register r holds elements 2r (low), 2r + 1
        rb[lane] = ptx.pack_halves(bv[0::2], bv[1::2])
        rc[lane] = [acc0[_c(i, g, t)] for i in range(4)]
    out = ptx.mma_m16n8k16_f16(rc, ra, rb)
    got = np.full((16, 8), np.nan, np.float32)
    for lane in range(32):
        for i in range(4):
            got[_c(i, *divmod(lane, 4))] = out[lane, i]
    np.testing.assert_allclose(got, a.astype(np.float64) @ b.astype(np.float64) + acc0, rtol=1e-6, atol=1e-5)


def test_ldmatrix_x4_then_mma_reads_a_row_major_tile():
    """A 16 x 32 int8 tile in memory, its rows addressed as the kernels do (matrix i = rows 8 (i % 2)..
    and bytes 16 (i // 2)..: lane l addresses row l % 16, bytes 16 (l // 16)), goes through
    ldmatrix.x4 into exactly the A fragment of mma.m16n8k32."""
    rng = np.random.default_rng(2)
    tile = rng.integers(-128, 128, (16, 32)).astype(np.int8)
    addressed = np.stack([tile[lane % 16, 16 * (lane // 16):16 * (lane // 16) + 16] for lane in range(32)])
    regs = ptx.ldmatrix_x4(addressed).reshape(32, 16)
    for lane in range(32):
        g, t = divmod(lane, 4)
        np.testing.assert_array_equal(regs[lane], [tile[_s8_a(i, g, t)] for i in range(16)])
