"""In-flight batching over an ``Engine``: requests join and leave while others decode.

Each ``step`` is one iteration of the serving loop:
  1. admit waiting requests (first come, first served) while fewer than ``max_batch_size`` run and
     the KV cache has pages for their prompts beyond what the running requests hold;
  2. decode: one token for every running request whose tokens are all in the cache, in one batch;
     when the cache cannot hold that step, the most recently admitted request is preempted
     (its pages freed, it goes back to the front of the queue keeping the tokens it generated,
     and on re-admission its prompt plus those tokens are prefilled again: recompute);
  3. chunked prefill: up to ``prefill_chunk_size`` tokens of the requests still being fed, in
     admission order, a long prompt spread over several steps; a request whose last token is fed
     samples its next token from that chunk's logits.
Decode and prefill run as separate calls, so a decoding request sees the same kernels (and the same
numbers) as when it is served alone. Each request keeps its own sampling parameters, stop strings
and random generator; greedy outputs equal those of the request served alone.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..errors import QoqcError
from .engine import Engine, GenerationResult, _Request


@dataclass(eq=False)
class _Live:
    """A request in the scheduler: ``fed`` of prompt + out tokens are in its KV-cache sequence."""

    rid: int
    req: _Request
    submitted: float
    fed: int = 0
    first_token_at: float = 0.0
    preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.req.prompt + self.req.out

    @property
    def pending(self) -> int:
        return len(self.req.prompt) + len(self.req.out) - self.fed


@dataclass
class ServedResult(GenerationResult):
    """A ``GenerationResult`` with the request's queueing: seconds from submission to its first
    token (``prefill_seconds``) and times it was preempted."""

    preemptions: int = 0


@dataclass
class Scheduler:
    engine: Engine
    max_batch_size: int | None = None     # default: the engine's
    prefill_chunk_size: int | None = None  # tokens fed per step; default: the engine's
    waiting: deque = field(default_factory=deque, init=False)
    running: list = field(default_factory=list, init=False)
    results: dict = field(default_factory=dict, init=False)
    _next_id: int = field(default=0, init=False)

    def __post_init__(self):
        self.max_batch_size = min(self.max_batch_size or self.engine.max_batch_size, self.engine.max_batch_size)
        self.prefill_chunk_size = min(self.prefill_chunk_size or self.engine.prefill_chunk_size,
                                      self.engine.prefill_chunk_size)
        if self.max_batch_size < 1 or self.prefill_chunk_size < 1:
            raise QoqcError("max_batch_size and prefill_chunk_size must be at least 1")
        self._pages = -(-self.engine.cache_tokens // self.engine.page_size)

    def submit(self, prompt: str | Sequence[int], max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, stop: str | Iterable[str] | None = None, seed: int | None = None) -> int:
        """Queue a request (validated now: prompt length, sampling parameters); return its id."""
        req = self.engine._request(prompt, max_new_tokens, temperature, top_p, stop, seed)
        rid = self._next_id
        self._next_id += 1
        self.waiting.append(_Live(rid, req, time.perf_counter()))
        return rid

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def run(self) -> dict[int, ServedResult]:
        """Step until every submitted request has finished; results by request id."""
        while not self.done:
            self.step()
        return self.results

    # ---------------------------------------------------------------- one iteration
    def step(self) -> list[int]:
        """One iteration (admit, decode, prefill chunk); returns the ids of requests finished by it."""
        finished: list[int] = []
        while not self._advance(finished):
            if len(self.running) < 2:  # a request alone always fits (its context is capped by the cache)
                raise QoqcError(f"scheduler stalled: {len(self.running)} running request(s) cannot advance "
                                f"in a KV cache of {self.engine.cache_tokens} tokens")
            self._preempt(self.running[-1])  # partly fed prompts fill the cache: make room
        return finished

    def _advance(self, finished: list[int]) -> bool:
        """Admit, decode, feed a prefill chunk; False when nothing could run."""
        self._admit()
        decoders = [x for x in self.running if x.fed > 0 and x.pending == 1]
        while decoders and not self._fits({id(x): 1 for x in decoders}):
            victim = self.running[-1]
            self._preempt(victim)
            decoders = [x for x in decoders if x is not victim]
        if decoders:
            tokens = self.engine._decode_next([x.req for x in decoders])
            for x, token in zip(decoders, tokens):
                x.fed += 1
                self._take(x, token, finished)
        feeding, budget, grow = [], self.prefill_chunk_size, {}
        for x in self.running:
            if budget == 0 or x in decoders:
                continue
            take = min(x.pending, budget)
            if take and self._fits({**grow, id(x): take}):
                grow[id(x)] = take
                feeding.append((x, take))
                budget -= take
        if feeding:
            rows = self.engine.prefill([(x.req.seq_id, x.tokens[x.fed:x.fed + n]) for x, n in feeding])
            for (x, n), row in zip(feeding, rows):
                x.fed += n
                if x.pending == 0:
                    self._take(x, self.engine._sample(row, x.req), finished)
        return bool(decoders or feeding or not self.running)

    # ---------------------------------------------------------------- helpers
    def _fits(self, grow: dict[int, int]) -> bool:
        """Whether the cache has the pages for the running requests after growing some by tokens."""
        size = self.engine.page_size
        need = sum(-(-(self.engine.sequence_length(x.req.seq_id) + grow.get(id(x), 0)) // size)
                   for x in self.running)
        return need <= self._pages

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch_size:
            x = self.waiting[0]
            size = self.engine.page_size
            held = sum(-(-self.engine.sequence_length(r.req.seq_id) // size) for r in self.running)
            reserve = len(self.running)  # a page of headroom per running request for its next tokens
            if self.running and held + reserve + -(-len(x.tokens) // size) > self._pages:
                return
            self.waiting.popleft()
            x.req.seq_id = self.engine.add_sequence()
            x.fed = 0
            self.running.append(x)

    def _preempt(self, x: _Live) -> None:
        self.engine.remove_sequence(x.req.seq_id)
        self.running.remove(x)
        x.fed, x.preemptions = 0, x.preemptions + 1
        self.waiting.appendleft(x)

    def _take(self, x: _Live, token: int, finished: list[int]) -> None:
        """Accept x's next token; retire it when finished."""
        eng = self.engine
        eng._accept(x.req, token)
        if not x.first_token_at:
            x.first_token_at = time.perf_counter()
        if x.req.finish is None:
            return
        eng.remove_sequence(x.req.seq_id)
        self.running.remove(x)
        r = x.req
        self.results[x.rid] = ServedResult(r.out, r.text if eng.manifest.get("tokenizer") else "", len(r.prompt),
                                           r.finish, x.first_token_at - x.submitted,
                                           time.perf_counter() - x.first_token_at, x.preemptions)
        finished.append(x.rid)
