"""GPTQ with static groups for QoQ's 4-bit weights (deepcompressor's ``gptq_quantize`` settings).

Quantize W [N, K] column by column, pushing each column's rounding error onto the columns not yet
quantized so that the layer's output on calibration inputs X [T, K] changes as little as possible:
    H    = 2/T X^T X + damp * mean(diag H) * I           (dead columns, H_ii = 0: weight zeroed, H_ii = 1)
    perm = argsort(diag H, descending)                  (act-order)
    U    = upper Cholesky factor of H^-1
    for each column i (in perm order, blocks of 128):
        q_i   = Q(w_i)                                   (the static quantizer of column i)
        e_i   = (w_i - q_i) / U_ii
        w_j  -= e_i U_ij   for the later columns j
Quantization parameters are computed once from the original weights ("static groups"), so a
column's group keeps its scale and zero whatever order GPTQ visits it in; only the codes change.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import QoqcError
from ..formats import PROTECTIVE_RANGE, UINT4_MAX
from .reference import ChannelWeight, ProgressiveWeight, per_channel_quantize, progressive_quantize


def hessian(x: torch.Tensor) -> torch.Tensor:
    """2/T X^T X in float64 from inputs [..., K]."""
    x = x.reshape(-1, x.shape[-1]).double()
    return 2.0 / x.shape[0] * x.T @ x


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    mean = torch.diag(h).mean()
    for attempt in range(250):
        try:
            hd = h + (damp + 0.001 * attempt) * mean * torch.eye(len(h), dtype=h.dtype)
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise QoqcError("GPTQ: the Hessian stays singular after 250 damping tries")


def gptq_codes(w: torch.Tensor, h: torch.Tensor, quantize_column, block: int = 128, damp: float = 0.01) -> np.ndarray:
    """Run GPTQ; ``quantize_column(values [N], k) -> (codes [N], dequantized [N])`` is the static
    quantizer of input column k; returns codes [N, K]."""
    w = w.double().clone()
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, perm], h[perm][:, perm]
    u = _inverse_cholesky(h, damp)
    codes = torch.zeros(w.shape, dtype=torch.uint8)
    n_cols = w.shape[1]
    for b0 in range(0, n_cols, block):
        b1 = min(b0 + block, n_cols)
        err = torch.zeros(w.shape[0], b1 - b0, dtype=w.dtype)
        for i in range(b0, b1):
            c, deq = quantize_column(w[:, i], int(perm[i]))
            codes[:, i] = c
            e = (w[:, i] - deq) / u[i, i]
            w[:, i + 1:b1] -= e[:, None] * u[i, i + 1:b1][None, :]
            err[:, i - b0] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out.numpy()


def grid_importance(h: torch.Tensor | None, search: str | None) -> np.ndarray | None:
    """What ``progressive_quantize`` weighs a group's error by, for a ``QoQPasses.grid_search`` mode."""
    if search is None or h is None:
        return None
    if search == "diag":
        return torch.diag(h).numpy()
    if search == "hessian":
        return h.numpy()
    raise ValueError(f"unknown grid search objective {search!r}")


def gptq_progressive(w: torch.Tensor, h: torch.Tensor, group: int = 128, block: int = 128,
                     damp: float = 0.01, protect: int = PROTECTIVE_RANGE, search: str | None = None
                     ) -> ProgressiveWeight:
    """Progressive g128 codes by GPTQ, with s1/s2/z2 fixed from the original W: round-to-nearest, or
    each group's grid chosen by its error weighted by diag(H) (``search="diag"``) or by H's
    diagonal block (``search="hessian"``)."""
    static = progressive_quantize(w.double().numpy(), group=group, protect=protect, search=search is not None,
                                  importance=grid_importance(h, search))
    s1 = torch.from_numpy(static.s1.astype(np.float64))
    s2 = torch.from_numpy(static.s2.astype(np.float64))
    z2 = torch.from_numpy(static.z2.astype(np.float64))

    def quantize_column(values, k):
        g = k // group
        w1 = torch.clamp(values / s1, -protect, protect)
        q = torch.clamp(torch.round((w1 + z2[:, g]) / s2[:, g]), 0, UINT4_MAX)
        return q.to(torch.uint8), (q * s2[:, g] - z2[:, g]) * s1

    codes = gptq_codes(w, h, quantize_column, block, damp)
    return ProgressiveWeight(codes, static.s1, static.s2, static.z2, group)


def gptq_per_channel(w: torch.Tensor, h: torch.Tensor, ratio: np.ndarray | float = 1.0, block: int = 128,
                     damp: float = 0.01) -> ChannelWeight:
    """Per-channel UINT4 codes by GPTQ, with scale/zero fixed from the (clipped) original W."""
    static = per_channel_quantize(w.double().numpy(), ratio)
    s = torch.from_numpy(static.s.astype(np.float64))
    z = torch.from_numpy(static.z.astype(np.float64))

    def quantize_column(values, _k):
        q = torch.clamp(torch.round((values + z) / s), 0, UINT4_MAX)
        return q.to(torch.uint8), q * s - z

    return ChannelWeight(gptq_codes(w, h, quantize_column, block, damp), static.s, static.z)
