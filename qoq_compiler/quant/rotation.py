"""Exact rotations of a Llama-family transformers model, folded into its weights (QoQ / QuaRot).

Row-vector convention: a linear layer computes y = x W^T + b with W [out, in].

1. ``fold_norms``: RMSNorm(x) * gamma feeding W equals RMSNorm(x) feeding W diag(gamma), so every
   gamma moves into the next linears' input columns (q/k/v, gate/up, lm_head) and becomes 1. A tied
   lm_head is untied first (the embedding must not be scaled).
2. ``rotate_residual``: with orthogonal Q [H, H] the residual stream is carried as h Q. Since
   RMSNorm without gamma commutes with Q (||h Q|| = ||h||):
       readers  (q, k, v, gate, up, lm_head):  W <- W Q
       writers  (o, down; embedding rows):     W <- Q^T W,  b <- b Q,  E <- E Q
   QoQ uses the Hadamard matrix H_H / sqrt(H), which spreads outlier channels over all channels.
3. ``rotate_heads``: per attention head, v is carried as v H_d and o_proj's input columns of that
   head as W_o,h H_d (H_d the head_dim Hadamard); under GQA every query head of a group reads the
   same rotated v, so the same H_d serves all of them:
       W_v,h <- H_d^T W_v,h,  b_v,h <- b_v,h H_d,   W_o[:, h] <- W_o[:, h] H_d
   Attention weights are untouched (they depend on q and k only).

Each transform leaves the model's outputs unchanged up to floating-point rounding (computed in
float64, stored back in the weights' dtype). None needs an online transform at inference time.
"""

from __future__ import annotations

import torch

from .hadamard import orthogonal_hadamard


def _layers(model):
    return model.model.layers


@torch.no_grad()
def _set(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def untie_lm_head(model) -> None:
    """Give lm_head its own copy of the embedding (needed before anything changes one of them)."""
    if model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr() or \
            getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False


@torch.no_grad()
def fold_norms(model) -> None:
    untie_lm_head(model)

    def fold(norm, linears):
        gamma = norm.weight.double()
        for lin in linears:
            _set(lin.weight, lin.weight.double() * gamma[None, :])
        norm.weight.fill_(1.0)

    for layer in _layers(model):
        a, m = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj])
        fold(layer.post_attention_layernorm, [m.gate_proj, m.up_proj])
    fold(model.model.norm, [model.lm_head])


@torch.no_grad()
def rotate_residual(model, q: torch.Tensor) -> None:
    """Carry the residual stream as h Q (Q orthogonal, float64 [H, H]); norms must be folded first."""
    untie_lm_head(model)
    emb = model.model.embed_tokens.weight
    _set(emb, emb.double() @ q)
    for layer in _layers(model):
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            _set(lin.weight, lin.weight.double() @ q)
        for lin in (a.o_proj, m.down_proj):
            _set(lin.weight, q.T @ lin.weight.double())
            if lin.bias is not None:
                _set(lin.bias, lin.bias.double() @ q)
    _set(model.lm_head.weight, model.lm_head.weight.double() @ q)


@torch.no_grad()
def rotate_heads(model) -> None:
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    h = torch.from_numpy(orthogonal_hadamard(d))
    for layer in _layers(model):
        v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
        wv = v.weight.double().reshape(-1, d, v.weight.shape[1])  # [Hkv, d, H]
        _set(v.weight, (h.T @ wv).reshape(v.weight.shape))
        if v.bias is not None:
            _set(v.bias, (v.bias.double().reshape(-1, d) @ h).reshape(-1))
        wo = o.weight.double().reshape(o.weight.shape[0], -1, d)  # [H, Hq, d]
        _set(o.weight, (wo @ h).reshape(o.weight.shape))


def rotate(model, heads: bool = True) -> None:
    """QoQ's rotation: fold norms, Hadamard-rotate the residual stream, and (optionally) V/O per head."""
    fold_norms(model)
    rotate_residual(model, torch.from_numpy(orthogonal_hadamard(model.config.hidden_size)))
    if heads:
        rotate_heads(model)
