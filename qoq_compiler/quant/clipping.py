"""Weight-clipping search for the per-channel 4-bit quantizer (QoQ gchn: GridSearch, OutputsError).

For each output channel n, shrink its range [min, max] by a ratio r before quantizing and keep
the r that minimises the squared error of that channel's output on calibration inputs X [T, K],
computed from the Hessian H = 2/T X^T X that GPTQ uses too (d = w_n - w_hat_n(r)):
    r_n = argmin_r  || X d^T ||^2 = argmin_r  d H d^T,   r in {1.0, 0.99, ..., 1 - 0.8 * g / grids}
(deepcompressor's candidates: 1.0, then ``grids`` steps down to ``1 - max_shrink``). Output
channels are independent, so all channels are searched together, one candidate ratio at a time.
Clipping trades a larger error on the few extreme weights for a finer step on all the others.
"""

from __future__ import annotations

import numpy as np

from .reference import per_channel_quantize


def candidate_ratios(grids: int = 80, max_shrink: float = 0.2) -> np.ndarray:
    return np.array([1.0] + [1 - g / grids * (1 - max_shrink) for g in range(1, grids + 1)])


def search_channel_ratios(w: np.ndarray, h: np.ndarray, grids: int = 80, max_shrink: float = 0.2
                          ) -> np.ndarray:
    """Best clipping ratio per output channel of ``w`` [N, K] given the input Hessian ``h`` [K, K]."""
    w = np.asarray(w, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    best_err = np.full(w.shape[0], np.inf)
    best = np.ones(w.shape[0])
    for r in candidate_ratios(grids, max_shrink):
        d = w - per_channel_quantize(w, r).dequantize()
        err = ((d @ h) * d).sum(axis=1)  # [N]
        better = err < best_err
        best_err[better], best[better] = err[better], r
    return best
