"""W4A8 GEMM of QoQ: int8 activations x packed UINT4 weights -> int32 accumulators -> float.

Inputs: per-token int8 activations ``qx`` [M, K] with fp16 scales ``sx`` [M, 1]; weights packed
eight 4-bit codes per uint32 along K (``qoq_compiler.layout``), ``qw`` [N, ceil(K/8)] (the last
word's padding is never read: the reduction runs over K).

Per-channel (QoQ gchn; W_hat[n, k] = qw[n, k] * s1[n] - z[n], the zero in weight units):
    psum[m, n] = sum_k qx[m, k] * qw[n, k]                     int8 x uint4 -> int32
    xsum[m]    = sum_k qx[m, k]                                int32
    y[m, n]    = psum * sx[m] * s1[n] - z[n] * sx[m] * xsum[m]
the zero point leaves the main loop and costs one multiply-add per output (QServe's epilogue).

Per-group g (progressive; level-2 int8 weight W1_hat = qw * s2 - z2, W_hat = s1 * W1_hat):
    psum[m, n] = sum_k qx[m, k] * (qw[n, k] * s2[n, k / g] - z2[n, k / g])    int8 x int8 -> int32
    y[m, n]    = psum * sx[m] * s1[n]
qw * s2 <= 240 fits a byte and the difference lies in int8 (``quant.reference``), so the inner
product is an exact int8 dot product: what the tensor-core kernel feeds ``mma.sync`` s8. A K that
the group size does not divide (SmolLM2: 576 = 4.5 x 128) has a shorter last group, G = ceil(K/g).

``w4a8_matmul`` is the TE compute the model emits (token axes of any rank, fp32 output, scheduled
by the target's rules); ``w4a8_gemm`` wraps it as a PrimFunc that also returns ``psum`` so tests
check the integer math exactly against ``reference``.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from qoq_compiler.layout import nibble_shift, unpack_uint4, word_index


def _code(qw, n, k):
    """uint4 code of weight (n, k) from the packed words, as int32."""
    word = qw[n, word_index(k)]
    return ((word >> nibble_shift(k).astype("uint32")) & tirx.const(0xF, "uint32")).astype("int32")


def _psum(qx: te.Tensor, qw: te.Tensor, zeros, group: int | None) -> te.Tensor:
    *lead, k = qx.shape
    n = qw.shape[0]
    r = te.reduce_axis((0, k), name="k")
    if group is None:
        def weight(j, kk):
            return _code(qw, j, kk)
    else:
        s2, z2 = zeros

        def weight(j, kk):
            return _code(qw, j, kk) * s2[j, kk // group].astype("int32") - z2[j, kk // group].astype("int32")
    return te.compute((*lead, n), lambda *i: te.sum(qx[(*i[:-1], r)].astype("int32") * weight(i[-1], r), axis=r),
                      name="psum")


def _epilogue(psum, qx, sx, s1, zeros, group, out_dtype):
    *lead, k = qx.shape

    def scaled(*i):
        return psum[i].astype("float32") * sx[(*i[:-1], 0)].astype("float32") * s1[i[-1]].astype("float32")

    if group is not None:
        return te.compute(psum.shape, lambda *i: scaled(*i).astype(out_dtype), name="y")
    (z,) = zeros
    r = te.reduce_axis((0, k), name="k2")
    xsum = te.compute((*lead, 1), lambda *i: te.sum(qx[(*i[:-1], r)].astype("int32"), axis=r), name="xsum")
    return te.compute(psum.shape, lambda *i: (
        scaled(*i) - z[i[-1]].astype("float32") * sx[(*i[:-1], 0)].astype("float32")
        * xsum[(*i[:-1], 0)].astype("float32")).astype(out_dtype), name="y")


def w4a8_matmul(qx: te.Tensor, sx: te.Tensor, qw: te.Tensor, s1: te.Tensor, *zeros: te.Tensor,
                group: int | None = None, out_dtype: str = "float32") -> te.Tensor:
    """qx [..., K] int8, sx [..., 1] fp16, qw [N, ceil(K/8)] uint32, s1 [N] fp16, zeros = (z [N] fp16,) per
    channel or (s2 [N, G] int8, z2 [N, G] int8) per group -> y [..., N] in ``out_dtype``."""
    return _epilogue(_psum(qx, qw, zeros, group), qx, sx, s1, zeros, group, out_dtype)


def w4a8_gemm(k: int, n: int, group: int | None) -> tirx.PrimFunc:
    """PrimFunc (qx, sx, qw, s1, [z | s2, z2], psum, y fp16) for a symbolic token count M."""
    m = tirx.Var("m", "int64")
    qx = te.placeholder((m, k), "int8", name="qx")
    sx = te.placeholder((m, 1), "float16", name="sx")
    qw = te.placeholder((n, -(-k // 8)), "uint32", name="qw")
    s1 = te.placeholder((n,), "float16", name="s1")
    if group is None:
        zeros = (te.placeholder((n,), "float16", name="z"),)
    else:
        g = -(-k // group)
        zeros = (te.placeholder((n, g), "int8", name="s2"), te.placeholder((n, g), "int8", name="z2"))
    psum = _psum(qx, qw, zeros, group)
    y = _epilogue(psum, qx, sx, s1, zeros, group, "float16")
    return te.create_prim_func([qx, sx, qw, s1, *zeros, psum, y])


def reference(qx, sx, qw, s1, *zeros, group: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """NumPy (psum int32 [M, N], y fp16 [M, N]) of the same integer math and fp32 epilogue.

    Arguments in the PrimFunc's order (``sx`` [M, 1]); ``zeros`` is (z,) per channel or (s2, z2)
    with ``group`` per group.
    """
    k = qx.shape[1]
    codes = unpack_uint4(qw).astype(np.int64)[:, :k]
    x = qx.astype(np.int64)
    sxf, s1f = sx.astype(np.float32).reshape(-1, 1), s1.astype(np.float32)[None, :]
    if group is None:
        (z,) = zeros
        psum = x @ codes.T
        xsum = x.sum(axis=1, keepdims=True).astype(np.float32)
        y = psum.astype(np.float32) * sxf * s1f - z.astype(np.float32)[None, :] * sxf * xsum
    else:
        s2, z2 = zeros
        w1 = codes * np.repeat(s2.astype(np.int64), group, axis=1)[:, :k] \
            - np.repeat(z2.astype(np.int64), group, axis=1)[:, :k]
        psum = x @ w1.T
        y = psum.astype(np.float32) * sxf * s1f
    return psum.astype(np.int32), y.astype(np.float16)
