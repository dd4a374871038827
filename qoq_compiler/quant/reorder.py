"""Activation-aware reordering of down_proj input channels (QoQ, g128 only).

Group quantization shares one scale per 128 consecutive input channels; sorting the channels by
their calibration magnitude puts channels of similar size into the same group. With a
permutation pi of the intermediate channels (pi = argsort(max |x|), ascending):
    W_gate <- W_gate[pi, :],  W_up <- W_up[pi, :],  W_down <- W_down[:, pi]
x = silu(gate) * up is computed channel by channel, so its channels come out permuted too and
down_proj sees exactly the same dot products: the model's outputs are unchanged, and no
permutation is needed at inference time.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def reorder_down_proj(layer, down_absmax: torch.Tensor) -> torch.Tensor:
    """Permute one decoder layer's intermediate channels by ascending ``down_absmax``; return pi."""
    pi = torch.argsort(down_absmax, stable=True)
    mlp = layer.mlp
    for lin in (mlp.gate_proj, mlp.up_proj):
        lin.weight.copy_(lin.weight[pi, :])
    mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, pi])
    return pi
