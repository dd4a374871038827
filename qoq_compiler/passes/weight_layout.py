"""Weight layout reordering: the quantizers' W4A8 parameters -> the tensor-core GEMM's layout.

Applied by ``qoqc compile`` to every parameter set on its way from the quantizer to the artifact
(the declared shapes are ``passes.quantize_linears.W4A8Linear``'s). For a linear ``name``:

    name                    uint8 codes [N, K]  ->  uint32 [N/32, K/32, 32, 4]   (``layout.pack_uint4_mma``)
    *.weight_group_scale    int8 s2 [N, G]      ->  int8 [G, N/32 * 32]           MMA channel order
    *.weight_group_zero     int8 z2 [N, G]      ->  int8 [G, N/32 * 32]           MMA channel order
    *.weight_scale, *.weight_zero, *.bias       unchanged (the epilogue reads them by channel)

N and K are zero-padded to multiples of 32 (zero codes, zero scales): padded channels are never
stored and padded inputs never reduced by the portable kernel; the tensor-core kernel needs
K % 32 == 0 and computes, then drops, padded channels. Every GPU thread then loads its weights
with one 16-byte load per 32 x 32 tile and its group scales and zeros with one 4-byte load each.
"""

from __future__ import annotations

import numpy as np

from ..formats import ceildiv
from ..layout import pack_uint4_mma, to_mma_channel_order


def to_kernel_layout(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reorder the W4A8 parameters of one linear (others pass through unchanged)."""
    out = {}
    for key, value in params.items():
        if key.endswith(".weight") and value.dtype == np.uint8:
            out[key] = pack_uint4_mma(value)
        elif key.endswith((".weight_group_scale", ".weight_group_zero")):
            out[key] = np.ascontiguousarray(to_mma_channel_order(value).T)
        else:
            out[key] = value
    return out


def mma_shapes(n: int, k: int, group: int | None) -> dict[str, tuple[int, ...]]:
    """Declared shapes of the reordered parameters (suffix -> shape)."""
    n32, k32 = ceildiv(n, 32), ceildiv(k, 32)
    shapes = {"weight": (n32, k32, 32, 4)}
    if group is not None:
        shapes["weight_group_scale"] = shapes["weight_group_zero"] = (ceildiv(k, group), n32 * 32)
    return shapes
