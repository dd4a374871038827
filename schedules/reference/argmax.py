"""Reference of ``schedules.argmax``: NumPy's argmax (the first index on ties)."""

from __future__ import annotations

import numpy as np


def reference(logits: np.ndarray) -> np.ndarray:
    """NumPy tokens [B] of logits [B, 1, V]."""
    return np.argmax(logits[:, 0], axis=-1).astype(np.int32)


def random_logits(b: int, vocab: int, rng: np.random.Generator) -> np.ndarray:
    """fp32 logits [b, 1, vocab] with the hard rows: all tied, a tie between distant maxima, one
    finite value at the end, nothing finite (index 0), then plain random rows."""
    logits = rng.standard_normal((b, 1, vocab)).astype("float32")
    hard = [np.full(vocab, 0.5, "float32"), np.where(np.arange(vocab) >= vocab // 2, 7.0, logits[1, 0]),
            np.where(np.arange(vocab) == vocab - 1, -1.0, -np.inf), np.full(vocab, -np.inf)]
    for i, row in enumerate(hard[:max(b - 1, 0)]):
        logits[i + 1, 0] = row
    return logits
