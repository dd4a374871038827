"""Fake quantization: a transformers model that computes what a quantized artifact computes.

The accuracy table needs perplexities over hundreds of thousands of tokens; the compiled CPU
module is too slow for that, so the same numbers are simulated in torch and the compiled module
is checked against the simulation on a subset (``tests/test_qoq_model.py``):
    weights       replaced by their dequantized values (``quant.convert`` formats)
    activations   the input of every decoder linear fake-quantized per token:
                  x -> clamp(round(x / s), -127, 127) * s,  s = fp16(max|x| / 127)
    KV cache      K (after RoPE) and V fake-quantized per (token, kv head) to UINT4 with an fp16
                  scale and minimum (``reference.kv4_quantize``), through the attention function
                  ``qoqc_kv4`` (transformers' SDPA on the dequantized K/V); with ``kv_rotation``
                  q and k are first multiplied by the head dimension's orthonormal Hadamard matrix
Everything else (embedding, norms, lm_head, softmax) runs in the model's dtype.
"""

from __future__ import annotations

import torch

from ..config import QuantScheme
from ..formats import INT8_MAX, RANGE_FLOOR, UINT4_MAX
from .convert import QuantizedWeight
from .linears import linear_names, set_fused_weights

ATTENTION = "qoqc_kv4"


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    s = (x.float().abs().amax(dim=-1, keepdim=True).clamp(min=RANGE_FLOOR) / INT8_MAX).half().float()
    return (torch.clamp(torch.round(x.float() / s), -INT8_MAX, INT8_MAX) * s).to(x.dtype)


def fake_quantize_kv4(x: torch.Tensor) -> torch.Tensor:
    """x [..., D]: UINT4 per row with fp16 scale and fp16 minimum, dequantized."""
    xf = x.float()
    lo = xf.amin(dim=-1, keepdim=True).half().float()
    s = ((xf.amax(dim=-1, keepdim=True) - lo).clamp(min=RANGE_FLOOR) / UINT4_MAX).half().float()
    return (torch.clamp(torch.round((xf - lo) / s), 0, UINT4_MAX) * s + lo).to(x.dtype)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] times the orthonormal Hadamard matrix H_D / sqrt(D), in fp32 by the butterflies of a
    fast Walsh-Hadamard transform in ``kv4_attention.fwht``'s order, so K's 4-bit codes round as the
    CPU kernel's do (CUDA kernels sum each row directly: equal but for rounding)."""
    d = x.shape[-1]
    y = x.float()
    h = 1
    while h < d:
        y = y.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2).reshape(*x.shape[:-1], d)
        h *= 2
    return (y * d ** -0.5).to(x.dtype)


def _kv4_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if getattr(module, "qoqc_kv_rotation", False):  # the scheme rotates q and k after RoPE
        query, key = hadamard_rotate(query), hadamard_rotate(key)
    return sdpa_attention_forward(module, query, fake_quantize_kv4(key), fake_quantize_kv4(value), attention_mask,
                                  **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _kv4_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@torch.no_grad()
def simulate(model, scheme: QuantScheme, weights: dict[str, QuantizedWeight] | None,
             activations: bool = True) -> None:
    """Turn ``model`` (after the scheme's passes) into its fake-quantized twin, in place.

    To measure one quantizer's share of the error: ``weights=None`` leaves the weights in float,
    ``activations=False`` the linears' inputs, ``scheme.kv == "float"`` the KV cache."""
    for i, layer in enumerate(model.model.layers):
        if weights is not None:
            set_fused_weights(model, {name: weights[name] for name in linear_names(i).values()})
        if not activations:
            continue
        for mod in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            mod.register_forward_pre_hook(lambda _m, inp: (fake_quantize_per_token(inp[0]), *inp[1:]))
    if scheme.kv == "int4":
        _register_attention()
        model.set_attn_implementation(ATTENTION)
        for layer in model.model.layers:
            layer.self_attn.qoqc_kv_rotation = scheme.kv_rotation
