"""Weight quantizers of each scheme, and the parameters the compiled model declares for them.

``quantize_weight(scheme, W [N, K], H)`` -> the quantized weight (``quant.reference`` formats):
    w8a8                 Int8Weight:  symmetric INT8 per output channel
    int4, group g        ProgressiveWeight:  level 1 INT8 per channel (P = 119), level 2 UINT4 with
                         INT8 scales/zeros per g inputs;  GPTQ codes when a Hessian H is given
    int4, per channel    ChannelWeight:  UINT4 with fp16 scale and zero per output channel;
                         clipping ratios searched first when ``clip``, then GPTQ when H is given

``weight_params(name, qw)`` -> the linear's parameters in the quantizers' layout (the compiler
then reorders W4A8 ones into their kernels' layout: ``layout.mma_parameters``):
    Int8Weight         name int8 [N, K],  *.weight_scale fp16 [N]
    ProgressiveWeight  name uint8 codes [N, K],  *.weight_scale fp16 [N] (s1),
                       *.weight_group_scale int8 [N, G] (s2),  *.weight_group_zero int8 [N, G] (z2)
    ChannelWeight      name uint8 codes [N, K],  *.weight_scale fp16 [N] (s),  *.weight_zero fp16 [N] (z)
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..config import QuantScheme
from ..errors import QoqcError
from .clipping import search_channel_ratios
from .gptq import gptq_per_channel, gptq_progressive, grid_importance
from .reference import ChannelWeight, Int8Weight, ProgressiveWeight, per_channel_quantize, progressive_quantize, \
    quantize_per_token

#: the quantized form of one linear's weight
QuantizedWeight = Int8Weight | ProgressiveWeight | ChannelWeight


def quantize_weight(scheme: QuantScheme, w: torch.Tensor, h: torch.Tensor | None = None, clip: bool = False,
                    gptq: bool = True, search: str | None = None) -> QuantizedWeight:
    """Round-to-nearest without ``h``; with the input Hessian ``h``: clipping search (``clip``,
    per-channel only) and GPTQ (``gptq``). ``search`` ("diag", "hessian" or None): progressive
    groups choose their level-2 grid by that error (``gptq.gptq_progressive``)."""
    if scheme.weights == "int8":
        q, s = quantize_per_token(w.double().numpy())
        return Int8Weight(q, s[:, 0])
    if scheme.weights != "int4":
        raise ValueError(f"scheme {scheme.name} keeps its weights in {scheme.weights}")
    if scheme.group is not None:
        if gptq and h is not None:
            return gptq_progressive(w, h, group=scheme.group, search=search)
        return progressive_quantize(w.double().numpy(), group=scheme.group, search=search is not None,
                                    importance=grid_importance(h, search))
    ratio = search_channel_ratios(w.double().numpy(), h.numpy()) if clip and h is not None else 1.0
    if gptq and h is not None:
        return gptq_per_channel(w, h, ratio)
    return per_channel_quantize(w.double().numpy(), ratio)


def weight_params(name: str, qw: QuantizedWeight) -> dict[str, np.ndarray]:
    base = name.removesuffix(".weight")
    if isinstance(qw, Int8Weight):
        return {name: qw.q, f"{base}.weight_scale": qw.s}
    if isinstance(qw, ProgressiveWeight):
        return {name: qw.q, f"{base}.weight_scale": qw.s1, f"{base}.weight_group_scale": qw.s2,
                f"{base}.weight_group_zero": qw.z2}
    return {name: qw.q, f"{base}.weight_scale": qw.s, f"{base}.weight_zero": qw.z}


def quantizer(scheme: QuantScheme, weights: dict[str, QuantizedWeight] | None = None,
              layout: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
              ) -> Callable[[str, torch.Tensor], dict[str, np.ndarray]] | None:
    """``(name, fused float W) -> parameters`` for the loader, or None when weights stay float.

    ``weights`` holds already quantized weights by parameter name (the QoQ passes' output); without
    it every weight is quantized by round-to-nearest. ``layout`` maps each linear's parameters into
    the layout its kernels read (the registry's ``weight_layout`` of the op).
    """
    if scheme.weights == "float":
        return None

    def quantize(name: str, w: torch.Tensor) -> dict[str, np.ndarray]:
        if weights is not None:
            if name not in weights:
                raise QoqcError(f"the QoQ passes produced no quantized weight for {name}")
            params = weight_params(name, weights[name])
        else:
            params = weight_params(name, quantize_weight(scheme, w))
        return layout(params) if layout is not None else params

    return quantize
