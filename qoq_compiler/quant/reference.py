"""NumPy specification of the QoQ W4A8KV4 number formats (QServe, arXiv 2405.04532).

This is the math every later stage (offline conversion, Relax passes, TensorIR kernels) is
checked against. Names follow QServe: ``s1`` per-output-channel fp16 scales, ``s2``/``z2``
per-group int8 scales and zeros.

Progressive group quantization, W [N, K] float -> g128 (``progressive_quantize``):
    level 1, per output channel n:   s1[n] = fp16(max_k |W[n, k]| / P)       P = 119 (protective range)
                                     W1    = clamp(W / s1, -P, P)            (not rounded)
    level 2, per group of g inputs:  s2 = clamp(round((max W1 - min W1) / 15), 1, 127)     int8
                                     z2 = round(-min W1)                                    int8
                                     q  = clamp(round((W1 + z2) / s2), 0, 15)              uint4
    dequantize:                      W1_hat = q * s2 - z2  in [-128, 127] (int8),  W_hat = s1 * W1_hat
Because max - min <= 2P = 238, s2 <= 16 and q * s2 <= 240: the product of a 4-bit weight and its
group scale fits one unsigned byte, which is what lets the GEMM scale four weights with one 32-bit
multiply. P = 119 is the paper's and lmquant's bound; deepcompressor's search finds 120 for a
post-scale zero, and 119 is the conservative choice that keeps W1_hat inside int8 for every group.

Per-channel variant (``per_channel_quantize``):  s = fp16((max - min) / 15), z = fp16(-min)
    (max and min optionally shrunk by a clipping ratio found by ``quant.clipping``),
    q = clamp(round((W + z) / s), 0, 15),  W_hat = q * s - z.
Activations (``quantize_per_token``): symmetric INT8 per token, s_a = fp16(max |x| / 127),
    q = clamp(round(x / s_a), -127, 127).
KV cache (``kv4_quantize``): asymmetric UINT4 per (token, kv head), K after RoPE, with an fp16
    scale and an fp16 zero kept in value units (the minimum):
    s = fp16((max - min) / 15),  q = clamp(round((x - min) / s), 0, 15),  x_hat = q * s + min.

Every range (max |x|, max - min) is floored at RANGE_FLOOR = 1e-4 before it is divided into a scale, so each fp16
scale is positive (a floor of 1e-8 rounds to 0 in fp16 and turns an all-zero row into NaN); the
kernels use the same floor.

A group that does not divide K (SmolLM2: K = 576, g = 128) is handled as a shorter last group:
its statistics come from its own elements only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..formats import INT8_MAX, PROTECTIVE_RANGE, RANGE_FLOOR, UINT4_MAX, ceildiv


def _groups(w: np.ndarray, group: int) -> np.ndarray:
    """[N, K] -> [N, ceil(K/g), g], the ragged tail padded with NaN (ignored by nan-reductions)."""
    n, k = w.shape
    ng = ceildiv(k, group)
    out = np.full((n, ng * group), np.nan, dtype=np.float64)
    out[:, :k] = w
    return out.reshape(n, ng, group)


@dataclass
class ProgressiveWeight:
    q: np.ndarray  # uint8 [N, K], values 0..15
    s1: np.ndarray  # float16 [N]
    s2: np.ndarray  # int8 [N, G], values 1..16
    z2: np.ndarray  # int8 [N, G]
    group: int

    def level1(self) -> np.ndarray:
        """W1_hat = q * s2 - z2 as int8 [N, K] (what the GEMM feeds the int8 tensor cores)."""
        k = self.q.shape[1]
        s2 = np.repeat(self.s2.astype(np.int32), self.group, axis=1)[:, :k]
        z2 = np.repeat(self.z2.astype(np.int32), self.group, axis=1)[:, :k]
        w1 = self.q.astype(np.int32) * s2 - z2
        assert w1.min() >= -128 and w1.max() <= 127, "level-1 weight left int8"
        return w1.astype(np.int8)

    def dequantize(self) -> np.ndarray:
        return self.level1().astype(np.float32) * self.s1.astype(np.float32)[:, None]


#: level-2 grids tried per group by ``progressive_quantize(search=True)``: the range shrunk by each
#: ratio (clipping), the integer scale s2 rounded down, to nearest and up
GRID_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)
GRID_ROUNDINGS = (np.floor, np.round, np.ceil)


def _group_error(importance: np.ndarray | None, k: int, group: int):
    """residual [N, G, g] (NaN-padded) -> error [N, G] under the weighting ``importance`` (None, [K] or [K, K])."""
    imp = np.ones(k) if importance is None else np.asarray(importance, np.float64)
    if imp.ndim == 1:
        diag = np.nan_to_num(_groups(np.maximum(imp, 0)[None, :], group)[0], nan=0.0)  # [G, g]
        return lambda e: np.nansum(diag[None] * e ** 2, axis=2)
    ng = ceildiv(k, group)
    blocks = np.zeros((ng, group, group))
    for j in range(ng):
        b = imp[j * group:(j + 1) * group, j * group:(j + 1) * group]
        blocks[j, :len(b), :len(b)] = b

    def error(e):
        e = np.nan_to_num(e, nan=0.0).transpose(1, 0, 2)  # [G, N, g]
        return (np.matmul(e, blocks) * e).sum(axis=2).T
    return error


def progressive_quantize(w: np.ndarray, group: int = 128, protect: int = PROTECTIVE_RANGE, search: bool = False,
                         importance: np.ndarray | None = None) -> ProgressiveWeight:
    """Level 1: s1 = fp16(max|w| / protect) per output channel, w1 = w / s1. Level 2 per group of
    ``group`` inputs: the integer scale s2 and zero z2 of UINT4 codes, q = round((w1 + z2) / s2).

    ``search``: instead of s2 = round(range / 15), each group takes the grid of ``GRID_RATIOS`` x
    ``GRID_ROUNDINGS`` that minimises its error among the grids whose level-1 values q * s2 - z2
    stay in int8. The error of a group's residual e [g] is e^T H_gg e with ``importance`` the
    layer's input Hessian H [K, K] (H_gg its diagonal block: the layer-output error the group
    causes alone), or sum_i h_i e_i^2 with ``importance`` a vector h [K] (its diagonal), or the
    plain squared error without it. Integer s2 makes round(range / 15) miss the range by up to half
    a unit (the median s2 is ~9), a few percent of a group; the search picks the rounding and
    clipping that cost least."""
    w = np.asarray(w, dtype=np.float64)
    amax = np.abs(w).max(axis=1)
    s1 = (np.maximum(amax, RANGE_FLOOR) / protect).astype(np.float16)
    w1 = np.clip(w / s1.astype(np.float64)[:, None], -protect, protect)
    g = _groups(w1, group)
    vmin, vmax = np.nanmin(g, axis=2), np.nanmax(g, axis=2)
    candidates = [(1.0, np.round)]
    if search:
        candidates = [(r, f) for r in GRID_RATIOS for f in GRID_ROUNDINGS]
        group_error = _group_error(importance, w.shape[1], group)
    best = None
    for ratio, rounding in candidates:
        lo, hi = vmin * ratio, vmax * ratio
        s2 = np.clip(rounding((hi - lo) / UINT4_MAX), 1, UINT4_MAX + 1)
        z2 = np.round(-lo)
        q = np.clip(np.round((g + z2[..., None]) / s2[..., None]), 0, UINT4_MAX)
        if not search:
            best = (s2, z2, q)
            break
        valid = (UINT4_MAX * s2 - z2 <= INT8_MAX) & (z2 <= INT8_MAX) & (z2 >= -INT8_MAX - 1)
        err = group_error(g - (q * s2[..., None] - z2[..., None]))
        err = np.where(valid, err, np.inf)
        if best is None:
            best = (s2, z2, q, err)
            continue
        take = err < best[3]
        best = (np.where(take, s2, best[0]), np.where(take, z2, best[1]), np.where(take[..., None], q, best[2]),
                np.where(take, err, best[3]))
    s2, z2, q = best[:3]
    q = q.reshape(w.shape[0], -1)[:, : w.shape[1]]
    assert s2.max() <= 16 and (q * np.repeat(s2, group, axis=1)[:, : w.shape[1]]).max() <= 240
    return ProgressiveWeight(q.astype(np.uint8), s1, s2.astype(np.int8), z2.astype(np.int8), group)


@dataclass
class Int8Weight:
    """W8A8's weights: symmetric INT8 per output channel (``quantize_per_token`` on W's rows)."""

    q: np.ndarray  # int8 [N, K]
    s: np.ndarray  # float16 [N]

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.s.astype(np.float32)[:, None]


@dataclass
class ChannelWeight:
    q: np.ndarray  # uint8 [N, K], values 0..15
    s: np.ndarray  # float16 [N]
    z: np.ndarray  # float16 [N], in weight units ("scaled zero")

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.s.astype(np.float32)[:, None] - self.z.astype(np.float32)[:, None]


def per_channel_quantize(w: np.ndarray, ratio: np.ndarray | float = 1.0) -> ChannelWeight:
    """``ratio`` [N] (or scalar) in (0, 1] shrinks each channel's range before quantizing (clipping)."""
    w = np.asarray(w, dtype=np.float64)
    r = np.broadcast_to(np.asarray(ratio, dtype=np.float64), (w.shape[0],))
    vmin, vmax = w.min(axis=1) * r, w.max(axis=1) * r
    s = (np.maximum(vmax - vmin, RANGE_FLOOR) / UINT4_MAX).astype(np.float16)
    z = (-vmin).astype(np.float16)
    q = np.clip(np.round((w + z.astype(np.float64)[:, None]) / s.astype(np.float64)[:, None]), 0, UINT4_MAX)
    return ChannelWeight(q.astype(np.uint8), s, z)


def quantize_per_token(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [..., K] -> (int8 [..., K], fp16 scale [..., 1]), symmetric, per row."""
    x = np.asarray(x, dtype=np.float64)
    s = (np.maximum(np.abs(x).max(axis=-1, keepdims=True), RANGE_FLOOR) / INT8_MAX).astype(np.float16)
    q = np.clip(np.round(x / s.astype(np.float64)), -INT8_MAX, INT8_MAX)
    return q.astype(np.int8), s


def kv4_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [T, H, D] -> (uint8 codes 0..15 [T, H, D], fp16 scale [T, H], fp16 min [T, H])."""
    x = np.asarray(x, dtype=np.float64)
    lo = x.min(axis=-1).astype(np.float16)
    s = (np.maximum(x.max(axis=-1) - lo.astype(np.float64), RANGE_FLOOR) / UINT4_MAX).astype(np.float16)
    q = np.clip(np.round((x - lo.astype(np.float64)[..., None]) / s.astype(np.float64)[..., None]), 0, UINT4_MAX)
    return q.astype(np.uint8), s, lo


def kv4_dequantize(q: np.ndarray, s: np.ndarray, lo: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * s.astype(np.float32)[..., None] + lo.astype(np.float32)[..., None]
