"""Reference of ``schedules.w8a8_gemm``: the same integer math in NumPy (int32 exact, fp32 epilogue)."""

from __future__ import annotations

import numpy as np

from qoq_compiler.formats import INT8_MAX, RANGE_FLOOR


def reference(x: np.ndarray, qw: np.ndarray, sw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy (psum int32, y fp32) of the same math, activations quantized as the kernel's producer does."""
    xf = np.asarray(x, dtype=np.float32)
    amax = np.maximum(np.abs(xf).max(axis=-1, keepdims=True), np.float32(RANGE_FLOOR))
    sx = (amax / np.float32(INT8_MAX)).astype(np.float16)
    qx = np.clip(np.round(xf / sx.astype(np.float32)), -INT8_MAX, INT8_MAX).astype(np.int64)
    psum = qx @ qw.astype(np.int64).T
    y = psum.astype(np.float32) * sx.astype(np.float32) * sw.astype(np.float32)
    return psum.astype(np.int32), y
