"""Perplexity of a loaded model on a text, windowed the way GPTQ/QoQ papers evaluate.

The text is tokenized once and cut into non-overlapping windows of ``seq_len`` tokens (a short
tail is dropped). In each window every token after the first is scored from its prefix inside
the window:
    ppl = exp( sum over windows and positions t >= 1 of -log p(x_t | x_<t) / (windows * (seq_len - 1)) )

``wikitext_text`` rebuilds the standard evaluation string from ``wiki.test.raw``:
``"\\n\\n".join(rows)`` where the rows are the file's lines, each non-blank one keeping its
newline and each blank one (" \\n") becoming "" (the Hugging Face wikitext-2-raw-v1 test rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import QoqcError


@dataclass
class Perplexity:
    perplexity: float
    windows: int
    scored_tokens: int
    total_tokens: int


def wikitext_text(path: str | Path) -> str:
    rows = ["" if line.strip() == "" else line
            for line in Path(path).read_text(encoding="utf-8").splitlines(keepends=True)]
    return "\n\n".join(rows)


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, computed stably in float64 one row block at a time."""
    out = np.empty(len(targets), dtype=np.float64)
    for s in range(0, len(targets), 256):
        z = logits[s:s + 256].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        out[s:s + 256] = lse - z[np.arange(len(z)), targets[s:s + 256]]
    return out


def perplexity(engine, text: str, seq_len: int = 2048, max_tokens: int | None = None,
               progress: bool = True) -> Perplexity:
    if seq_len < 2:
        raise QoqcError("--seq-len must be at least 2")
    if seq_len > engine.context_window:
        raise QoqcError(f"--seq-len {seq_len} exceeds the engine's context window of {engine.context_window}")
    ids = np.asarray(engine.encode(text), dtype=np.int64)
    total = len(ids)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = len(ids) // seq_len
    if windows == 0:
        raise QoqcError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    nll = 0.0
    for w in tqdm(range(windows), desc="eval", unit="window", disable=not progress):
        chunk = ids[w * seq_len:(w + 1) * seq_len]
        logits = engine.logits(chunk.tolist())
        nll += float(log_softmax_nll(logits[:-1], chunk[1:]).sum())
    scored = windows * (seq_len - 1)
    return Perplexity(math.exp(nll / scored), windows, scored, total)
