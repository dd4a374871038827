"""W4A8 GEMM of QoQ: int8 activations x packed UINT4 weights -> int32 accumulators -> float.

Inputs: per-token int8 activations ``qx`` [M, K] with fp16 scales ``sx`` [M, 1]; UINT4 weight codes
in the MMA layout (``qoq_compiler.layout``), ``qw`` uint32 [N/32, K/32, 32, 4], N and K padded to
multiples of 32; per-channel vectors (``s1``, ``z``) in natural order, per-group ones (``s2``,
``z2``) as [G, N/32 * 32] in MMA channel order. Padded channels and inputs are never read here:
the reduction runs over K and the output over N.

Per-channel (QoQ gchn; W_hat[n, k] = q[n, k] * s1[n] - z[n], the zero in weight units):
    psum[m, n] = sum_k qx[m, k] * q[n, k]                      int8 x uint4 -> int32
    xsum[m]    = sum_k qx[m, k]                                int32 (an input, from ``act_quant``)
    y[m, n]    = psum * sx[m] * s1[n] - z[n] * sx[m] * xsum[m]
the zero point leaves the main loop and costs one multiply-add per output (QServe's epilogue).

Per-group g (progressive; level-2 int8 weight W1_hat = q * s2 - z2, W_hat = s1 * W1_hat):
    psum[m, n] = sum_k qx[m, k] * (q[n, k] * s2[k / g, n] - z2[k / g, n])    int8 x int8 -> int32
    y[m, n]    = psum * sx[m] * s1[n]
q * s2 <= 240 fits a byte and the difference lies in int8 (``quant.reference``), so the inner
product is an exact int8 dot product: what the tensor-core kernel feeds ``mma.sync`` s8 after
computing four bytes q * s2 - z2 with one 32-bit multiply and one bytewise subtraction
(``bytes_mul_sub``). A K that the group size does not divide (SmolLM2: 576 = 4.5 x 128) has a
shorter last group, G = ceil(K/g).

``w4a8_matmul`` is the TE compute the model emits (token axes of any rank, output dtype of the
caller's choice, scheduled by the target's rules); ``w4a8_gemm`` wraps it as a PrimFunc that also
returns ``psum`` so tests check the integer math exactly against ``schedules/reference/w4a8_gemm.py``.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from qoq_compiler.formats import ceildiv
from qoq_compiler.layout import mma_channel_position, mma_index

def bytes_mul_sub(q4, s, z, u32=np.uint32):
    """Four bytes (q_i * s - z) mod 256 from u8x4 codes ``q4`` (each <= 15), a scale s <= 16 and a
    zero byte z: one 32-bit multiply (no byte carries: q * s <= 240), then a bytewise subtraction
    of z replicated to four bytes, as SWAR. ``u32`` makes the constants: ``np.uint32`` for NumPy
    arrays, ``u32_const`` for TIR expressions (the tensor-core kernel runs the same code)."""
    high, low7, ones = u32(0x80808080), u32(0x7F7F7F7F), u32(0x01010101)
    a, b = q4 * s, z * ones
    return ((a | high) - (b & low7)) ^ ((a ^ ~b) & high)


def u32_const(v) -> tirx.PrimExpr:
    """uint32 TIR value of an int or an integer expression."""
    return tirx.const(v, "uint32") if isinstance(v, int) else v.astype("uint32")


def _code(qw, n, k):
    """UINT4 code of weight (n, k) from the MMA layout, as int32."""
    nt, kt, lane, word, shift = mma_index(n, k)
    return ((qw[nt, kt, lane, word] >> shift.astype("uint32")) & tirx.const(0xF, "uint32")).astype("int32")


def _psum(qx: te.Tensor, qw: te.Tensor, extra, n: int, group: int | None) -> te.Tensor:
    *lead, k = qx.shape
    r = te.reduce_axis((0, k), name="k")
    if group is None:
        def weight(j, kk):
            return _code(qw, j, kk)
    else:
        s2, z2 = extra

        def weight(j, kk):
            g, pos = kk // group, mma_channel_position(j)
            return _code(qw, j, kk) * s2[g, pos].astype("int32") - z2[g, pos].astype("int32")
    return te.compute((*lead, n), lambda *i: te.sum(qx[(*i[:-1], r)].astype("int32") * weight(i[-1], r), axis=r),
                      name="psum")


def _epilogue(psum, sx, s1, extra, group, out_dtype):
    def scaled(*i):
        return psum[i].astype("float32") * sx[(*i[:-1], 0)].astype("float32") * s1[i[-1]].astype("float32")

    if group is not None:
        return te.compute(psum.shape, lambda *i: scaled(*i).astype(out_dtype), name="y")
    z, xsum = extra
    return te.compute(psum.shape, lambda *i: (
        scaled(*i) - z[i[-1]].astype("float32") * sx[(*i[:-1], 0)].astype("float32")
        * xsum[(*i[:-1], 0)].astype("float32")).astype(out_dtype), name="y")


def w4a8_matmul(qx: te.Tensor, sx: te.Tensor, qw: te.Tensor, s1: te.Tensor, *extra: te.Tensor,
                group: int | None = None, out_dtype: str = "float32") -> te.Tensor:
    """qx [..., K] int8, sx [..., 1] fp16, qw [N/32, K/32, 32, 4] uint32, s1 [N] fp16, ``extra`` =
    (z [N] fp16, xsum [..., 1] int32) per channel or (s2, z2 int8 [G, N/32 * 32]) per group g
    -> y [..., N] in ``out_dtype``."""
    return _epilogue(_psum(qx, qw, extra, s1.shape[0], group), sx, s1, extra, group, out_dtype)


def _placeholders(m, k: int, n: int, group: int | None):
    n32, k32 = ceildiv(n, 32), ceildiv(k, 32)
    qx = te.placeholder((m, k), "int8", name="qx")
    sx = te.placeholder((m, 1), "float16", name="sx")
    qw = te.placeholder((n32, k32, 32, 4), "uint32", name="qw")
    s1 = te.placeholder((n,), "float16", name="s1")
    if group is None:
        extra = (te.placeholder((n,), "float16", name="z"), te.placeholder((m, 1), "int32", name="xsum"))
    else:
        g = ceildiv(k, group)
        extra = (te.placeholder((g, n32 * 32), "int8", name="s2"), te.placeholder((g, n32 * 32), "int8", name="z2"))
    return qx, sx, qw, s1, extra


def w4a8_gemm(k: int, n: int, group: int | None) -> tirx.PrimFunc:
    """Portable PrimFunc (qx, sx, qw, s1, *extra, psum, y fp16) for a symbolic token count M."""
    qx, sx, qw, s1, extra = _placeholders(tirx.Var("m", "int64"), k, n, group)
    psum = _psum(qx, qw, extra, n, group)
    y = _epilogue(psum, sx, s1, extra, group, "float16")
    return te.create_prim_func([qx, sx, qw, s1, *extra, psum, y])


def _logical_weight(q, extra, group):
    """Level-2 int8 weight (n, k) from the quantizers' layout: q uint8 [N, K]; per group
    (s2, z2) int8 [N, G]."""
    if group is None:
        return lambda j, kk: q[j, kk].astype("int32")
    s2, z2 = extra
    return lambda j, kk: q[j, kk].astype("int32") * s2[j, kk // group].astype("int32") \
        - z2[j, kk // group].astype("int32")


def w4a8_matmul_definition(qx: te.Tensor, sx: te.Tensor, q: te.Tensor, s1: te.Tensor, *extra: te.Tensor,
                           group: int | None = None) -> te.Tensor:
    """``w4a8_matmul`` on the weights as the quantizers write them (codes uint8 [N, K]; per group
    s2, z2 int8 [N, G]; per channel z, xsum as there): the op's definition, which names no kernel
    layout. -> y [..., N] fp32."""
    *lead, k = qx.shape
    n = q.shape[0]
    r = te.reduce_axis((0, k), name="k")
    weight = _logical_weight(q, extra, group)
    psum = te.compute((*lead, n), lambda *i: te.sum(qx[(*i[:-1], r)].astype("int32") * weight(i[-1], r), axis=r),
                      name="psum")
    return _epilogue(psum, sx, s1, extra, group, "float32")


def mma_pack_codes(q: te.Tensor) -> te.Tensor:
    """Codes uint8 [N, K] -> the MMA layout uint32 [N/32, K/32, 32, 4] (``layout.pack_uint4_mma``, in
    TE): word (nt, kt, lane, w) holds, in byte r and nibble h, the code of channel
    32 nt + 16 h + 8 (w % 2) + lane // 4 at input 32 kt + 16 (w // 2) + 4 (lane % 4) + r; zero past N, K."""
    n, k = (int(d) for d in q.shape)
    rh = te.reduce_axis((0, 8), name="rh")

    def word(nt, kt, lane, w):
        ch = nt * 32 + rh % 2 * 16 + w % 2 * 8 + lane // 4
        kk = kt * 32 + w // 2 * 16 + lane % 4 * 4 + rh // 2
        code = tirx.if_then_else(tirx.all(ch < n, kk < k), q[tirx.min(ch, n - 1), tirx.min(kk, k - 1)],
                                 tirx.const(0, "uint8")).astype("uint32")
        return te.sum(code << (rh // 2 * 8 + rh % 2 * 4).astype("uint32"), axis=rh)

    return te.compute((ceildiv(n, 32), ceildiv(k, 32), 32, 4), word, name="mma_codes")


def mma_channel_columns(v: te.Tensor) -> te.Tensor:
    """Per-channel rows int8 [N, G] -> [G, N/32 * 32] in MMA channel order (``layout.to_mma_channel_order``
    then transposed, in TE), zero past N."""
    n, g = (int(d) for d in v.shape)

    def value(gi, pos):
        ch = pos // 32 * 32 + pos % 4 * 8 + pos % 32 // 4
        return tirx.if_then_else(ch < n, v[tirx.min(ch, n - 1), gi], tirx.const(0, v.dtype))

    return te.compute((g, ceildiv(n, 32) * 32), value, name="mma_columns")
