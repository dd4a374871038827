"""Offline weight quantization for a scheme: fused float weight -> the parameters the model declares.

    w8a8:  W [N, K] -> weight int8 [N, K] = round(W / sw) (symmetric, per output channel),
                       weight_scale fp16 [N] = max_k |W[n, k]| / 127          (``reference.quantize_per_token``)
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..config import QuantScheme
from .reference import quantize_per_token


def _w8(name: str, w: torch.Tensor) -> dict[str, np.ndarray]:
    q, s = quantize_per_token(w.double().numpy())
    return {name: q, name.replace(".weight", ".weight_scale"): s[:, 0]}


def quantizer(scheme: QuantScheme) -> Callable[[str, torch.Tensor], dict[str, np.ndarray]] | None:
    """The weight quantizer of a scheme, or None when its weights stay in floating point."""
    return {"int8": _w8}.get(scheme.weights)
