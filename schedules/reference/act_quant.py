"""Reference of ``schedules.act_quant``: the fused activation quantizations in float64 NumPy,
rounded to the model dtype where the kernels round, so a correct kernel equals it exactly."""

from __future__ import annotations

import numpy as np

from qoq_compiler.formats import INT8_MAX, RANGE_FLOOR

KINDS = ("quantize", "rmsnorm", "add_rmsnorm", "silu_mul")


def reference(kind: str, *inputs: np.ndarray, dtype: str = "float32", eps: float = 1e-6):
    """NumPy outputs of ``act_quant(kind)`` for its inputs, computed in float64 between the same
    rounding points: (x_out,)? + (qx, sx, xsum)."""
    rnd = (lambda v: v.astype(dtype).astype(np.float64))
    f = [np.asarray(a, dtype=np.float64) for a in inputs]
    out = ()
    if kind == "quantize":
        v = f[0]
    elif kind == "silu_mul":
        k = f[0].shape[-1] // 2
        g, u = f[0][..., :k], f[0][..., k:]
        v = rnd(g / (1 + np.exp(-g)) * u)
    else:
        x, w = (rnd(f[0] + f[1]), f[2]) if kind == "add_rmsnorm" else (f[0], f[1])
        out = (x.astype(dtype),) if kind == "add_rmsnorm" else ()
        v = rnd(x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w)
    sx = (np.maximum(np.abs(v).max(axis=-1, keepdims=True), RANGE_FLOOR) / INT8_MAX).astype(np.float16)
    qx = np.clip(np.round(v / sx.astype(np.float64)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return (*out, qx, sx, qx.astype(np.int32).sum(axis=-1, keepdims=True, dtype=np.int32))


def random_inputs(kind: str, b: int, t: int, k: int, dtype: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Inputs of ``kind`` for [b, t] rows of k values, each row with its own range (never zeros)."""
    rows = rng.standard_normal((b, t, k)) * rng.uniform(0.05, 4, (b, t, 1))
    w = rng.uniform(0.5, 1.5, k).astype(dtype)
    return {"quantize": [rows.astype(dtype)],
            "rmsnorm": [rows.astype(dtype), w],
            "add_rmsnorm": [rows.astype(dtype), rng.standard_normal((b, t, k)).astype(dtype), w],
            "silu_mul": [(rng.standard_normal((b, t, 2 * k)) * 2).astype(dtype)]}[kind]
