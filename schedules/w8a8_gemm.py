"""W8A8 linear layer: per-token INT8 activations x per-channel INT8 weights -> int32 -> float.

    sx[t]      = fp16(max_k |x[t, k]| / 127)                   per-token symmetric scale
    qx[t, k]   = clamp(round(x[t, k] / sx[t]), -127, 127)      int8
    psum[t, n] = sum_k qx[t, k] * qw[n, k]                     int8 x int8 -> int32 (exact)
    y[t, n]    = psum[t, n] * sx[t] * sw[n]                    fp32 epilogue (sw: fp16 per output channel)

Weights are quantized offline (``quant.reference.quantize_per_token`` on W's rows gives qw, sw),
activations by the kernel that produces them (``act_quant``). The GEMM is written in TE over a
token axis of any rank, so the model emits it as is and the target's schedule rules pick it up
(on CPU, ``cpu_matmul``'s k-innermost reduction rule). Reference: ``schedules/reference/w8a8_gemm.py``.
"""

from __future__ import annotations

from tvm import te


def w8a8_matmul(qx: te.Tensor, sx: te.Tensor, qw: te.Tensor, sw: te.Tensor) -> te.Tensor:
    """qx [..., K] int8, sx [..., 1] fp16, qw [N, K] int8, sw [N] fp16 -> y [..., N] fp32."""
    *lead, k = qx.shape
    n = qw.shape[0]
    r = te.reduce_axis((0, k), name="k")
    psum = te.compute((*lead, n), lambda *i: te.sum(qx[(*i[:-1], r)].astype("int32") * qw[i[-1], r].astype("int32"),
                                                     axis=r), name="psum")
    return te.compute((*lead, n), lambda *i: psum[i].astype("float32") * sx[(*i[:-1], 0)].astype("float32")
                      * sw[i[-1]].astype("float32"), name="y")
