"""Whether the 4-bit K cache is Hadamard-rotated or smoothed, chosen per model on calibration text.

Two ways keep K's outlier channels from ruining its per-(token, head) 4-bit quantization:
    rotated    q, k <- q H, k H after RoPE (H the orthonormal Hadamard of the head dimension, in
               the kernels), no SmoothAttention: outliers spread over every channel;
    smoothed   no rotation, SmoothAttention k <- k / lambda, q <- q * lambda with
               lambda = max|K|^alpha per RoPE pair (folded into the weights).
Neither wins everywhere. On SmolLM2-135M rotation halves KV4's cost; on Qwen2.5-0.5B, whose q and
k share a few massive channels (k_proj biases up to 145), it multiplies perplexity by 3: unrotated,
those channels sit at the ends of each token's range, which asymmetric 4-bit quantization keeps
exact, while rotated, q's large entries meet K's rounding error in every channel (docs/accuracy.md).

``choose_kv_rotation`` scores each candidate by the calibration text's negative log-likelihood
under the float model with only its KV cache fake-quantized to 4 bits that way (SmoothAttention's
lambda from a first float pass over the same samples, applied inside attention, where it is
exact), and keeps the lower. A per-layer attention-output error was tried first and misjudged
Qwen2.5: the loss is what the choice is for.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import QuantScheme
from .calibrate import calibration_tokens, read_text
from .simulate import fake_quantize_kv4, hadamard_rotate
from .smooth import pair_max

PROBE = "qoqc_kv4_probe"


@torch.no_grad()
def kv4_losses(model, tokens: torch.Tensor, alpha: float, batch_size: int = 4) -> dict[str, float]:
    """Mean next-token NLL of ``tokens`` [S, L] with the KV cache "smoothed" or "rotated" (KV4)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    k_absmax: dict[int, torch.Tensor] = {}
    mode = {"now": "record"}

    def probe(module, query, key, value, attention_mask, **kwargs):
        i = module.layer_idx
        if mode["now"] == "record":
            m = key.float().abs().amax(dim=(0, 2))  # [Hkv, D]
            k_absmax[i] = torch.maximum(k_absmax[i], m) if i in k_absmax else m
        elif mode["now"] == "smoothed":
            lam = pair_max(k_absmax[i]).clamp(min=1e-5) ** alpha
            lam_q = lam.repeat_interleave(query.shape[1] // key.shape[1], dim=0)
            query = query * lam_q[None, :, None, :].to(query.dtype)
            key, value = fake_quantize_kv4(key / lam[None, :, None, :].to(key.dtype)), fake_quantize_kv4(value)
        else:
            query, key = hadamard_rotate(query), fake_quantize_kv4(hadamard_rotate(key))
            value = fake_quantize_kv4(value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(PROBE, probe)
    AttentionMaskInterface.register(PROBE, sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(PROBE)
    losses = {}
    try:
        for now in ("record", "smoothed", "rotated"):
            mode["now"], total = now, 0.0
            for s in range(0, len(tokens), batch_size):
                x = tokens[s:s + batch_size]
                logits = model(x).logits[:, :-1].float()
                total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                 x[:, 1:].reshape(-1), reduction="sum"))
            losses[now] = total / (tokens.shape[0] * (tokens.shape[1] - 1))
    finally:
        model.set_attn_implementation(before)
    return {k: losses[k] for k in ("smoothed", "rotated")}


def choose_kv_rotation(model, tokenizer, scheme: QuantScheme, samples: int = 4
                       ) -> tuple[QuantScheme, dict[str, float] | None]:
    """``scheme`` with ``kv_rotation`` and ``passes.smooth_attn_alpha`` set to the better candidate
    for ``model``, and the candidates' calibration losses (None when nothing was chosen: the
    passes do not ask for the choice, or K is not 4-bit, or the model has no tokenizer)."""
    passes = scheme.passes
    if passes is None or not passes.choose_kv_rotation or scheme.kv != "int4" or tokenizer is None:
        return scheme, None
    smoothed = replace(scheme, kv_rotation=False, passes=replace(passes, choose_kv_rotation=False))
    if not scheme.kv_rotation:  # the head dimension has no fast Hadamard transform
        return smoothed, None
    tokens = calibration_tokens(tokenizer, read_text(passes.calib_text), samples, passes.calib_seq_len)
    loss = kv4_losses(model, tokens, passes.smooth_attn_alpha or 0.0)
    if loss["rotated"] <= loss["smoothed"]:
        return replace(scheme, passes=replace(passes, smooth_attn_alpha=None, choose_kv_rotation=False)), loss
    return smoothed, loss
