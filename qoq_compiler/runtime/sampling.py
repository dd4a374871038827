"""Sampling: a request's parameters, and the next token from a row of logits as a free function.

    greedy       argmax (the first index on ties), as the device's ``argmax`` entry point chooses
    temperature  softmax(logits / T) in float64; ``top_p`` < 1 keeps the smallest set of the most
                 likely tokens whose probabilities reach top_p (nucleus sampling), renormalised;
                 drawn from the request's own generator, so a seed reproduces a request
    logprobs     the chosen token's log-probability under the model and the top alternatives
                 (needs the logits on the host: a step with such a request skips the device argmax)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..errors import QoqcError


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates: validated once, when it is made (``make``)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # the chosen token's log-probability and this many top alternatives

    @classmethod
    def make(cls, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             stop: str | Iterable[str] | None = None, seed: int | None = None,
             logprobs: int | None = None) -> "SamplingParams":
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 1:
            raise QoqcError(f"max_new_tokens must be a whole number of at least 1 (got {max_new_tokens!r})")
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(value):
                raise QoqcError(f"invalid sampling parameters: {name}={value!r} is not a finite number")
        if temperature < 0 or not 0 < top_p <= 1:
            raise QoqcError(f"invalid sampling parameters temperature={temperature}, top_p={top_p} "
                            "(temperature >= 0, 0 < top_p <= 1)")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise QoqcError(f"stop must be a non-empty string or a list of them (got {stop!r})")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise QoqcError(f"seed must be a whole number (got {seed!r})")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, (int, np.integer))
                                     or not 0 <= logprobs <= MAX_LOGPROBS):
            raise QoqcError(f"logprobs must be a whole number from 0 to {MAX_LOGPROBS} (got {logprobs!r})")
        return cls(int(max_new_tokens), float(temperature), float(top_p), stops, seed,
                   None if logprobs is None else int(logprobs))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


MAX_LOGPROBS = 20


def logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log softmax(logits)[token] and the ``top`` most likely (token, log-probability) pairs, of the
    model's distribution (before temperature and top-p)."""
    z = logits.astype(np.float64)
    z = z - z.max()
    z = z - np.log(np.exp(z).sum())
    best = np.argpartition(-z, top)[:top] if 0 < top < len(z) else np.arange(len(z) if top else 0)
    best = best[np.argsort(-z[best], kind="stable")]
    return float(z[token]), [(int(i), float(z[i])) for i in best]


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The next token of a row of logits under ``params``."""
    if params.greedy:
        return greedy(logits)
    z = logits.astype(np.float64) / params.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), params.top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))
