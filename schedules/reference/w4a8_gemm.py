"""Reference of ``schedules.w4a8_gemm`` and ``schedules.w4a8_gemm_tc``: the W4A8 integer math in
NumPy (int32 accumulators exact, fp32 epilogue rounded to fp16), arguments in the kernels' layouts
(``qoq_compiler.layout``), and random valid arguments to test them on."""

from __future__ import annotations

import numpy as np

from qoq_compiler.formats import ceildiv
from qoq_compiler.layout import mma_channel_position, pack_uint4_mma, to_mma_channel_order, unpack_uint4_mma


def reference(qx, sx, qw, s1, *extra, group: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """NumPy (psum int32 [M, N], y fp16 [M, N]) of the same integer math and fp32 epilogue,
    arguments in the PrimFunc's order and layouts."""
    k, n = qx.shape[1], s1.shape[0]
    # integer products summed in float64 (BLAS) are exact: every partial sum stays below 2^53
    codes = unpack_uint4_mma(qw, n, k).astype(np.float64)
    x = qx.astype(np.float64)
    sxf, s1f = sx.astype(np.float32).reshape(-1, 1), s1.astype(np.float32)[None, :]
    if group is None:
        z, xsum = extra
        psum = (x @ codes.T).astype(np.int64)
        y = psum.astype(np.float32) * sxf * s1f \
            - z.astype(np.float32)[None, :] * sxf * xsum.astype(np.float32).reshape(-1, 1)
    else:
        pos = mma_channel_position(np.arange(n))
        s2, z2 = (np.repeat(a[:, pos].T.astype(np.float64), group, axis=1)[:, :k] for a in extra)
        psum = (x @ (codes * s2 - z2).T).astype(np.int64)
        y = psum.astype(np.float32) * sxf * s1f
    return psum.astype(np.int32), y.astype(np.float16)


def random_weights(n: int, k: int, group: int | None, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Random valid weights in the kernels' layout: (qw, s1, e0) with e0 = z [N] per channel or
    (s2, z2) per group: codes 0..15, fp16 scales, group scales 1..16 and zeros that keep
    q * s2 - z2 in int8 (as the progressive quantizer guarantees)."""
    qw = pack_uint4_mma(rng.integers(0, 16, size=(n, k), dtype=np.uint8))
    s1 = rng.uniform(0.0005, 0.005, size=n).astype(np.float16)
    if group is None:
        return qw, s1, rng.uniform(0, 0.05, size=n).astype(np.float16)
    s2 = rng.integers(1, 17, size=(n, ceildiv(k, group)))
    z2 = rng.integers(np.maximum(15 * s2 - 127, -128), 128)
    return (qw, s1, *(np.ascontiguousarray(to_mma_channel_order(a.astype(np.int8)).T) for a in (s2, z2)))


def random_activations(m: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(qx int8 [M, K], sx fp16 [M, 1]): every row uses the full int8 range."""
    qx = rng.integers(-127, 128, size=(m, k), dtype=np.int8)
    qx[:, 0] = 127
    return qx, rng.uniform(0.001, 0.05, size=(m, 1)).astype(np.float16)


def kernel_args(qx: np.ndarray, sx: np.ndarray, weights: tuple[np.ndarray, ...], group: int | None) -> tuple:
    """The kernels' inputs (qx, sx, qw, s1, *extra): per channel extra = (z, xsum), xsum from qx."""
    qw, s1, *rest = weights
    if group is None:
        return qx, sx, qw, s1, rest[0], qx.sum(axis=1, keepdims=True, dtype=np.int32)
    return (qx, sx, qw, s1, *rest)


def mma_parameters(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One W4A8 linear's parameters from the quantizers' layout into the MMA layout (others pass),
    as the W4A8 kernels' layout PrimFuncs (``w4a8_gemm.mma_pack_codes``, ``mma_channel_columns``) do:
        name                    uint8 codes [N, K]  ->  uint32 [N/32, K/32, 32, 4]   (``layout.pack_uint4_mma``)
        *.weight_group_scale    int8 s2 [N, G]      ->  int8 [G, N/32 * 32]           MMA channel order
        *.weight_group_zero     int8 z2 [N, G]      ->  int8 [G, N/32 * 32]           MMA channel order
        *.weight_scale, *.weight_zero, *.bias       unchanged (the epilogue reads them by channel)
    N and K are zero-padded to multiples of 32 (zero codes, zero scales): padded channels are never
    stored and padded inputs never reduced by the portable kernel; the tensor-core kernel needs
    K % 32 == 0 and computes, then drops, padded channels. Every GPU thread then loads its weights
    with one 16-byte load per 32 x 32 tile and its group scales and zeros with one 4-byte load each."""
    out = {}
    for key, value in params.items():
        if key.endswith(".weight") and value.dtype == np.uint8:
            out[key] = pack_uint4_mma(value)
        elif key.endswith((".weight_group_scale", ".weight_group_zero")):
            out[key] = np.ascontiguousarray(to_mma_channel_order(value).T)
        else:
            out[key] = value
    return out


def mma_shapes(n: int, k: int, group: int | None) -> dict[str, tuple[int, ...]]:
    """Shapes of the parameters ``mma_parameters`` reorders (suffix -> shape)."""
    n32, k32 = ceildiv(n, 32), ceildiv(k, 32)
    shapes = {"weight": (n32, k32, 32, 4)}
    if group is not None:
        shapes["weight_group_scale"] = shapes["weight_group_zero"] = (ceildiv(k, group), n32 * 32)
    return shapes


def cpu_layout(codes: np.ndarray, groups: tuple[np.ndarray, ...], lanes: int) -> tuple[np.ndarray, ...]:
    """The CPU dot-product kernels' layout (``w4a8_gemm_cpu``) in NumPy: codes uint8 [N, K] ->
    uint32 [N/L, K/8, L], byte r of word w holding input 8w + r in its low nibble and 8w + 4 + r
    in its high one; each per-group int8 [N, G] -> [N/L, G, L]."""
    n, k = codes.shape
    c = codes.astype(np.uint32).reshape(n // lanes, lanes, k // 8, 2, 4).transpose(0, 2, 1, 4, 3)
    nib = c[..., 0] | c[..., 1] << 4                                      # [N/L, K/8, L, 4] bytes
    words = nib[..., 0] | nib[..., 1] << 8 | nib[..., 2] << 16 | nib[..., 3] << 24
    return (words.astype(np.uint32),
            *(np.ascontiguousarray(g.reshape(n // lanes, lanes, -1).transpose(0, 2, 1)) for g in groups))
