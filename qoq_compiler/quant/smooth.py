"""Smoothing scales folded into the weights (QoQ's SmoothAttention and SmoothLinear on down_proj).

Row-vector convention: y = x W^T + b with W [out, in].

SmoothAttention. Keys have outlier channels (after RoPE) that 4-bit KV quantization handles badly.
With a positive scale lambda [Hkv, D] per KV-head channel, store k / lambda and use q * lambda:
    (q * lambda)(k / lambda)^T = q k^T,
so attention is unchanged. RoPE rotates channel pairs (i, i + D/2) (transformers' rotate_half
layout), so lambda must be equal within each pair to commute with it; then the scaling folds into
the projections before RoPE:
    W_k[h] <- diag(1 / lambda_h) W_k[h],   W_q[h'] <- diag(lambda_h) W_q[h']   for each query head h' of group h
(biases alike). The scale is lambda = max|K|^alpha over calibration tokens, taken per pair.

SmoothLinear (down_proj). Its input x = silu(gate) * up; with s [I] > 0,
    x W_down^T = (x / s)(W_down diag(s))^T,   and x / s comes free from W_up[j] <- W_up[j] / s_j
(the division commutes with the elementwise product), so activations lose outliers and the
weight absorbs them:  s_j = max|x_j|^alpha / max_n |W_down[n, j]|^beta.
``search_linear_scales`` picks (alpha, beta) per layer from a grid (identity included) by the
layer's output error with both quantizers applied to the smoothed operands x' = x / s,
W' = W diag(s):  tr(E' H' E'^T) + 2/T ||(Q8(X') - X') Q4(W')^T||^2,  E' = W' - Q4(W'),
H' = H / (s s^T), the first term over all calibration tokens (the Hessian), the second over a
sample X [T, I] of them (the cross term is dropped).
"""

from __future__ import annotations

from typing import Callable

import torch


def pair_max(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D] with channels i and i + D/2 both set to the larger of the two."""
    d = x.shape[-1] // 2
    m = torch.maximum(x[..., :d], x[..., d:])
    return torch.cat([m, m], dim=-1)


def attention_scales(k_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """lambda [Hkv, D] from the calibration max |K| after RoPE."""
    return pair_max(k_absmax.double()).clamp(min=1e-5) ** alpha


def linear_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """s [I] from the calibration max |x_j| and the weight's max_n |W[n, j]|."""
    return (x_absmax.double().clamp(min=1e-5) ** alpha / w_absmax.double().clamp(min=1e-5) ** beta).clamp(min=1e-5)


def _scale_rows(lin: torch.nn.Linear, scale: torch.Tensor) -> None:
    lin.weight.copy_((lin.weight.double() * scale[:, None]).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() * scale).to(lin.bias.dtype))


@torch.no_grad()
def smooth_attention(layer, lam: torch.Tensor) -> None:
    """Fold lambda [Hkv, D] (pair-equal, positive) into one decoder layer's q_proj and k_proj."""
    if not torch.equal(pair_max(lam), lam) or (lam <= 0).any():
        raise ValueError("SmoothAttention scales must be positive and equal within each RoPE pair")
    attn = layer.self_attn
    hkv, d = lam.shape
    group = attn.q_proj.weight.shape[0] // (hkv * d)
    _scale_rows(attn.k_proj, (1.0 / lam.double()).reshape(-1))
    _scale_rows(attn.q_proj, lam.double().repeat_interleave(group, dim=0).reshape(-1))


@torch.no_grad()
def smooth_down_proj(layer, s: torch.Tensor) -> None:
    """Fold s [I] into one decoder layer's up_proj rows (divide) and down_proj columns (multiply)."""
    if (s <= 0).any():
        raise ValueError("SmoothLinear scales must be positive")
    mlp = layer.mlp
    _scale_rows(mlp.up_proj, 1.0 / s.double())
    mlp.down_proj.weight.copy_((mlp.down_proj.weight.double() * s.double()[None, :]).to(mlp.down_proj.weight.dtype))


#: (alpha, beta) tried by ``search_linear_scales``: no smoothing, then beta = 1 - alpha
LINEAR_GRID = ((0.0, 0.0),) + tuple((a / 20, 1 - a / 20) for a in range(1, 20))


def search_linear_scales(w: torch.Tensor, x_absmax: torch.Tensor, h: torch.Tensor, x_sample: torch.Tensor,
                         quantize: Callable[[torch.Tensor], torch.Tensor],
                         fake_quantize_act: Callable[[torch.Tensor], torch.Tensor],
                         grid=LINEAR_GRID) -> tuple[tuple[float, float], torch.Tensor]:
    """The (alpha, beta) of ``grid`` whose scales s [I] give down_proj (W [N, I], input Hessian
    ``h``, sample inputs ``x_sample`` [T, I]) the least output error; ``quantize`` returns a
    weight's dequantized 4-bit value, ``fake_quantize_act`` an activation's 8-bit one."""
    w = w.double()
    h = h.double()
    x = x_sample.double()
    w_absmax = w.abs().amax(dim=0)
    best = (float("inf"), grid[0], torch.ones(w.shape[1], dtype=torch.float64))
    for alpha, beta in grid:
        s = linear_scales(x_absmax, w_absmax, alpha, beta) if alpha or beta else torch.ones_like(w_absmax)
        ws = w * s[None, :]
        wq = quantize(ws).double()
        e = ws - wq
        err = float(((e @ (h / (s[:, None] * s[None, :]))) * e).sum())
        xs = x / s[None, :]
        err += float(2.0 / len(x) * (((fake_quantize_act(xs).double() - xs) @ wq.T) ** 2).sum())
        if err < best[0]:
            best = (err, (alpha, beta), s)
    return best[1], best[2]
