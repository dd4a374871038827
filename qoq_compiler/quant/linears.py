"""A decoder layer's four fused linears, as the QoQ passes see them (q/k/v and gate/up concatenated
by rows, ``frontend.loader.hf_sources`` naming the Hugging Face projections of each)."""

from __future__ import annotations

import torch

from ..frontend.loader import hf_sources
from .convert import QuantizedWeight

#: Hessian key (``calibrate``) -> qoqc fused linear of a decoder layer
LINEARS = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
           "down": "mlp.down_proj"}


def fused_weight(model, name: str) -> torch.Tensor:
    """The float weight [N, K] of qoqc parameter ``name``: its HF projections' rows concatenated."""
    params = dict(model.named_parameters())
    return torch.cat([params[s].detach() for s in hf_sources(name)], dim=0)


def linear_names(layer: int) -> dict[str, str]:
    return {key: f"model.layers.{layer}.{mod}.weight" for key, mod in LINEARS.items()}


@torch.no_grad()
def set_fused_weights(model, weights: dict[str, QuantizedWeight]) -> None:
    """Write each quantized weight's dequantized value into the HF projections it was fused from."""
    params = dict(model.named_parameters())
    for name, qw in weights.items():
        w = torch.from_numpy(qw.dequantize())
        row = 0
        for src in hf_sources(name):
            p = params[src]
            p.copy_(w[row:row + p.shape[0]].to(p.dtype))
            row += p.shape[0]
