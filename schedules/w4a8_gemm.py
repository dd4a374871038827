"""W4A8 GEMM of QoQ: int8 activations x packed UINT4 weights -> int32 accumulators -> fp16.

Inputs: per-token int8 activations ``qx`` [M, K] with fp16 scales ``sx`` [M]; weights packed
eight 4-bit codes per uint32 along K (``qoq_compiler.layout``), ``qw`` [N, K/8].

Per-channel (QoQ gchn; W_hat[n, k] = qw[n, k] * s1[n] - z[n], the zero in weight units):
    psum[m, n] = sum_k qx[m, k] * qw[n, k]                     int8 x uint4 -> int32
    xsum[m]    = sum_k qx[m, k]                                int32
    y[m, n]    = fp16(psum * sx[m] * s1[n] - z[n] * sx[m] * xsum[m])
the zero point leaves the main loop and costs one multiply-add per output (QServe's epilogue).

Per-group g (progressive; level-2 int8 weight W1_hat = qw * s2 - z2, W_hat = s1 * W1_hat):
    psum[m, n] = sum_k qx[m, k] * (qw[n, k] * s2[n, k / g] - z2[n, k / g])    int8 x int8 -> int32
    y[m, n]    = fp16(psum * sx[m] * s1[n])
qw * s2 <= 240 fits a byte and the difference lies in int8 (``quant.reference``), so the inner
product is an exact int8 dot product: what the tensor-core kernel feeds ``mma.sync`` s8.

This file holds the portable computation (TE, any target) and its NumPy reference; the
accumulators are integers, so compiled and reference results must be equal bit for bit.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from qoq_compiler.layout import nibble_shift, unpack_uint4, word_index


def _code(qw, n, k):
    """uint4 code of weight (n, k) from the packed words, as int32."""
    word = qw[n, word_index(k)]
    return ((word >> nibble_shift(k).astype("uint32")) & tirx.const(0xF, "uint32")).astype("int32")


def w4a8_gemm(k: int, n: int, group: int | None) -> tirx.PrimFunc:
    """PrimFunc (qx, sx, qw, s1, [z | s2, z2], psum, y) for a symbolic token count M.

    ``group=None`` is the per-channel form; otherwise the per-group form with that group size.
    ``psum`` (int32 [M, N]) is an output too, so tests can check the integer math exactly.
    """
    if k % 8:
        raise ValueError(f"K={k} is not a multiple of 8 (packed uint4 words)")
    if group is not None and k % group:
        raise ValueError(f"K={k} is not a multiple of the group size {group}")
    m = tirx.Var("m", "int64")
    qx = te.placeholder((m, k), "int8", name="qx")
    sx = te.placeholder((m,), "float16", name="sx")
    qw = te.placeholder((n, k // 8), "uint32", name="qw")
    s1 = te.placeholder((n,), "float16", name="s1")
    r = te.reduce_axis((0, k), name="k")
    if group is None:
        z = te.placeholder((n,), "float16", name="z")
        psum = te.compute((m, n), lambda i, j: te.sum(qx[i, r].astype("int32") * _code(qw, j, r), axis=r),
                          name="psum")
        r2 = te.reduce_axis((0, k), name="k2")
        xsum = te.compute((m,), lambda i: te.sum(qx[i, r2].astype("int32"), axis=r2), name="xsum")
        y = te.compute((m, n), lambda i, j: (
            psum[i, j].astype("float32") * sx[i].astype("float32") * s1[j].astype("float32")
            - z[j].astype("float32") * sx[i].astype("float32") * xsum[i].astype("float32")).astype("float16"),
            name="y")
        return te.create_prim_func([qx, sx, qw, s1, z, psum, y])
    s2 = te.placeholder((n, k // group), "int8", name="s2")
    z2 = te.placeholder((n, k // group), "int8", name="z2")

    def w1(j, kk):
        return _code(qw, j, kk) * s2[j, kk // group].astype("int32") - z2[j, kk // group].astype("int32")

    psum = te.compute((m, n), lambda i, j: te.sum(qx[i, r].astype("int32") * w1(j, r), axis=r), name="psum")
    y = te.compute((m, n), lambda i, j: (
        psum[i, j].astype("float32") * sx[i].astype("float32") * s1[j].astype("float32")).astype("float16"),
        name="y")
    return te.create_prim_func([qx, sx, qw, s1, s2, z2, psum, y])


def reference(qx, sx, qw, s1, *zeros) -> tuple[np.ndarray, np.ndarray]:
    """NumPy (psum int32 [M, N], y fp16 [M, N]) of the same integer math and fp32 epilogue.

    Arguments in the PrimFunc's order: ``zeros`` is (z,) per channel or (s2, z2) per group.
    """
    codes = unpack_uint4(qw).astype(np.int64)
    x = qx.astype(np.int64)
    sxf, s1f = sx.astype(np.float32)[:, None], s1.astype(np.float32)[None, :]
    if len(zeros) == 1:
        (z,) = zeros
        psum = x @ codes.T
        xsum = x.sum(axis=1, keepdims=True).astype(np.float32)
        y = psum.astype(np.float32) * sxf * s1f - z.astype(np.float32)[None, :] * sxf * xsum
    else:
        s2, z2 = zeros
        group = codes.shape[1] // s2.shape[1]
        w1 = codes * np.repeat(s2.astype(np.int64), group, axis=1) - np.repeat(z2.astype(np.int64), group, axis=1)
        psum = x @ w1.T
        y = psum.astype(np.float32) * sxf * s1f
    return psum.astype(np.int32), y.astype(np.float16)
