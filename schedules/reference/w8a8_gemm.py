"""Reference of ``schedules.w8a8_gemm``: the same integer math in NumPy (int32 exact, fp32 epilogue)."""

from __future__ import annotations

import numpy as np


def reference(x: np.ndarray, qw: np.ndarray, sw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy (psum int32, y fp32) of the same math, activations quantized as the kernel's producer does."""
    xf = np.asarray(x, dtype=np.float32)
    sx = (np.maximum(np.abs(xf).max(axis=-1, keepdims=True), np.float32(1e-4)) / np.float32(127)).astype(np.float16)
    qx = np.clip(np.round(xf / sx.astype(np.float32)), -127, 127).astype(np.int64)
    psum = qx @ qw.astype(np.int64).T
    y = psum.astype(np.float32) * sx.astype(np.float32) * sw.astype(np.float32)
    return psum.astype(np.int32), y
