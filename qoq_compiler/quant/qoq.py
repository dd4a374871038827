"""QoQ's calibration passes on a transformers model, producing the 4-bit weights of every linear.

Order (deepcompressor ``ptq``: rotate -> reorder -> smooth -> quantize weights):
    1. whole model: fold RMSNorm gamma, Hadamard-rotate the residual stream, rotate V/O per head
                                                                             (``quant.rotation``)
    2. per decoder layer, from the statistics of its float inputs (``quant.calibrate``; with
       ``sequential``, of the outputs of the earlier layers as quantized):
       a. reorder down_proj's input channels by ascending max|x|   (g128 only, ``quant.reorder``)
       b. SmoothAttention  lambda = max|K after RoPE|^alpha into q/k             (``quant.smooth``)
          (off in the shipped schemes: the kernels' q/k rotation serves the 4-bit K cache better)
       c. SmoothLinear     s = max|x|^alpha / max|W_down[:, j]|^beta into up/down (``quant.smooth``),
          (alpha, beta) fixed or searched per layer on down_proj's quantized output error
       d. quantize qkv, o, gate_up, down: clipping search (per-channel weights) or each group's
          level-2 grid search (g128), then GPTQ, or round-to-nearest without GPTQ
                                                                   (``quant.convert.quantize_weight``)
Reordering and smoothing change down_proj's input x to x' = x[pi] / s, so its Hessian becomes
H' = H[pi][:, pi] / (s s^T); q/k smoothing changes no linear's input. Every transform of 1-2c is
exact: the model's float outputs are unchanged (their tests show it), only easier to quantize.

Deviation from deepcompressor: clipping ratios are judged on each linear's own output error
(deepcompressor judges q/k on the attention block's output); q_proj/k_proj are not clipped
anyway in the g128 recipe, and per-channel clipping of them is a small share of the weights.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..config import QuantScheme
from ..errors import QoqcError
from .calibrate import calibration_tokens, iter_layer_stats, read_text
from .convert import QuantizedWeight, quantize_weight
from .linears import fused_weight, linear_names, set_fused_weights
from .reorder import reorder_down_proj
from .rotation import rotate
from .simulate import fake_quantize_per_token
from .smooth import attention_scales, linear_scales, search_linear_scales, smooth_attention, smooth_down_proj


@torch.no_grad()
def quantize_model(model, tokenizer, scheme: QuantScheme, batch_size: int = 8, progress: bool = True,
                   quantize: Callable[..., QuantizedWeight] = quantize_weight) -> dict[str, QuantizedWeight]:
    """Run ``scheme.passes`` on ``model`` (changed in place) and quantize its decoder linears.

    Returns the quantized weights by qoqc parameter name; the model keeps the transformed float
    weights (embedding, norms, lm_head and biases are read from it afterwards). ``quantize`` has
    ``convert.quantize_weight``'s signature (``bench/accuracy.py`` substitutes an unconstrained 4-bit
    grid to measure what the format costs).
    """
    passes = scheme.passes
    n_layers = len(model.model.layers)
    if passes is None:
        return {name: quantize(scheme, fused_weight(model, name))
                for i in range(n_layers) for name in linear_names(i).values()}
    if tokenizer is None:
        raise QoqcError(f"scheme {scheme.name} calibrates on text, but the model has no tokenizer "
                        "(--quant rtn-w4a8kv4 quantizes without calibration)")
    bar = tqdm(total=n_layers, desc=scheme.name, unit="layer", disable=not progress)
    if passes.rotation:
        bar.set_postfix_str("Hadamard rotation")
        rotate(model)
    tokens = calibration_tokens(tokenizer, read_text(passes.calib_text), passes.calib_samples, passes.calib_seq_len)
    need_h = passes.gptq or (passes.clip and scheme.group is None) or passes.smooth_down_search
    out: dict[str, QuantizedWeight] = {}
    stats = iter_layer_stats(model, tokens, batch_size, hessians=need_h, down_sample=passes.smooth_down_search,
                             sequential=passes.sequential)
    for _ in range(n_layers):
        bar.set_postfix_str("activation statistics" + (" and Hessians" if need_h else ""))
        i, st = next(stats)
        layer, hs, down_absmax, down_sample = model.model.layers[i], st.hessians, st.down_absmax, st.down_sample
        if passes.reorder and scheme.group is not None:
            bar.set_postfix_str("reorder")
            pi = reorder_down_proj(layer, down_absmax)
            down_absmax = down_absmax[pi]
            if hs:
                hs["down"] = hs["down"][pi][:, pi]
            if down_sample is not None:
                down_sample = down_sample[:, pi]
        if passes.smooth_attn_alpha is not None:
            bar.set_postfix_str("SmoothAttention")
            smooth_attention(layer, attention_scales(st.k_absmax, passes.smooth_attn_alpha))
        if passes.smooth_down_search:
            bar.set_postfix_str("SmoothLinear search")
            _, s = search_linear_scales(
                layer.mlp.down_proj.weight.detach(), down_absmax, hs["down"], down_sample,
                lambda w: torch.from_numpy(quantize_weight(scheme, w).dequantize()), fake_quantize_per_token)
            smooth_down_proj(layer, s)
            hs["down"] = hs["down"] / (s[:, None] * s[None, :])
        elif passes.smooth_down is not None:
            bar.set_postfix_str("SmoothLinear")
            alpha, beta = passes.smooth_down
            w_absmax = layer.mlp.down_proj.weight.detach().abs().amax(dim=0)
            s = linear_scales(down_absmax, w_absmax, alpha, beta)
            smooth_down_proj(layer, s)
            if hs:
                hs["down"] = hs["down"] / (s[:, None] * s[None, :])
        for key, name in linear_names(i).items():
            bar.set_postfix_str(("GPTQ " if passes.gptq else "round ") + key)
            out[name] = quantize(scheme, fused_weight(model, name), hs.get(key), clip=passes.clip, gptq=passes.gptq,
                                 search=passes.grid_search)
        if passes.sequential:
            set_fused_weights(model, {name: out[name] for name in linear_names(i).values()})
        bar.update()
    bar.close()
    return out
