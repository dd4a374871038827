"""In-flight batching over a ``Model``: the one generation loop. Requests join and leave while
others decode; ``Engine.generate`` / ``stream`` / ``generate_batch`` are this loop's clients.

Each ``step`` is one iteration:
  1. admit waiting requests (first come, first served) while fewer than ``max_batch_size`` run and
     the block manager has pages for their tokens with a page of headroom per running request;
  2. decode: one token for every DECODING request, in one batch (greedy batches choose tokens on
     the device); when the cache cannot hold that step, the most recently admitted request is
     preempted (its pages freed, back to the front of the queue keeping the tokens it generated;
     re-admitted, its prompt plus those tokens are prefilled again: recompute);
  3. chunked prefill: up to ``prefill_chunk_size`` tokens of the PREFILLING requests, in admission
     order, as many as their pages allow; a request whose last token is fed samples its first new
     token from that chunk's logits and starts DECODING.
Decode and prefill are separate calls, so a decoding request runs the same kernels as when it is
served alone. Requests keep their own sampling parameters, stop strings and random generator.

Nothing is lost (``request.py``'s states): every submitted request ends FINISHED, ABORTED or
FAILED with a reason and its result in ``results``, and its pages are released on every path:
``abort``; an exception in a device call fails the requests of that call (KeyboardInterrupt
aborts them) and propagates; an exception anywhere else in a step aborts the requests that were
running (their records may lag their caches); ``run`` interrupted aborts everything left. Every
step holds the model's lock.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Sequence

from ..errors import QoqcError
from .model import Model
from .request import GenerationResult, Request, RequestState
from .sampling import SamplingParams, logprobs, sample


class Scheduler:
    def __init__(self, model: Model, max_batch_size: int | None = None, prefill_chunk_size: int | None = None):
        self.model = model
        self.max_batch_size = min(max_batch_size or model.max_batch_size, model.max_batch_size)
        self.prefill_chunk_size = min(prefill_chunk_size or model.prefill_chunk_size, model.prefill_chunk_size)
        if self.max_batch_size < 1 or self.prefill_chunk_size < 1:
            raise QoqcError("max_batch_size and prefill_chunk_size must be at least 1")
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []        # admission order: the last is preempted first
        self.requests: dict[int, Request] = {}  # every request not yet ended
        self.results: dict[int, GenerationResult] = {}
        self._next_id = 0
        self._call_failed = False  # the exception leaving this step came from a device call

    # ---------------------------------------------------------------- requests in
    def make_request(self, prompt: str | Sequence[int], max_new_tokens: int = 256, temperature: float = 0.0,
                     top_p: float = 1.0, stop: str | Iterable[str] | None = None, seed: int | None = None,
                     sequence: int | None = None, logprobs: int | None = None) -> Request:
        """A validated request, not yet queued (``enqueue``). ``sequence``: an open sequence whose
        tokens the prompt continues; it stays open, holding what the request added to it.
        ``logprobs``: keep each new token's log-probability and this many top alternatives."""
        params = SamplingParams.make(max_new_tokens, temperature, top_p, stop, seed, logprobs)
        with self.model.lock:
            held = 0 if sequence is None else self.model.sequence_length(sequence)
            ids = self.model.prompt_ids(prompt, room=1 + held)
            rid, self._next_id = self._next_id, self._next_id + 1
        room = self.model.context_window - held - len(ids)
        return Request(rid, ids, params, min(params.max_new_tokens, room), sequence)

    def enqueue(self, req: Request) -> int:
        with self.model.lock:
            if req.sequence is not None and any(r.sequence == req.sequence for r in self.requests.values()):
                raise QoqcError(f"sequence {req.sequence} is already being continued by another request")
            self.requests[req.rid] = req
            self.waiting.append(req)
        return req.rid

    def submit(self, prompt: str | Sequence[int], max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, stop: str | Iterable[str] | None = None, seed: int | None = None,
               sequence: int | None = None) -> int:
        """Queue a request (validated now: prompt, sampling parameters); return its id."""
        return self.enqueue(self.make_request(prompt, max_new_tokens, temperature, top_p, stop, seed, sequence))

    def abort(self, rid: int, reason: str = "aborted") -> bool:
        """End a waiting or running request now, its pages freed; False if it already ended."""
        with self.model.lock:
            req = self.requests.get(rid)
            if req is None:
                return False
            self._end(req, RequestState.ABORTED, reason)
            return True

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def run(self) -> dict[int, GenerationResult]:
        """Step until every submitted request has ended; results by request id. Interrupted or
        failing, it aborts every request still waiting or running before the exception propagates."""
        try:
            while not self.done:
                self.step()
        except BaseException:
            with self.model.lock:
                for rid in list(self.requests):
                    self.abort(rid, "the serving loop stopped")
            raise
        return self.results

    # ---------------------------------------------------------------- one iteration
    def step(self) -> list[int]:
        """One iteration (admit, decode, prefill chunk); returns the ids of requests that ended in it."""
        with self.model.lock:
            ended: list[int] = []
            live, self._call_failed = list(self.running), False
            try:
                while not self._advance(ended):
                    if len(self.running) < 2:  # a request alone always fits unless others hold the cache
                        lone = self.running[0]
                        self._end(lone, RequestState.FAILED,
                                  f"the KV cache cannot hold request {lone.rid}: {self.model.blocks.used} of "
                                  f"{self.model.blocks.total} pages are held")
                        ended.append(lone.rid)
                        raise QoqcError(lone.reason)
                    self._preempt(self.running[-1])
            except BaseException:
                if not self._call_failed:  # raised outside a device call: bookkeeping may be half done
                    self._settle(live, ended)
                raise
            return ended

    def _advance(self, ended: list[int]) -> bool:
        """Admit, decode, feed a prefill chunk; False when nothing could run."""
        self._admit()
        blocks = self.model.blocks
        decoders = [r for r in self.running if r.state is RequestState.DECODING]
        while decoders and not blocks.can_append({r.seq_id: 1 for r in decoders}):
            victim = self.running[-1]
            self._preempt(victim)
            decoders = [r for r in decoders if r is not victim]
        if decoders:
            tokens = self._device(decoders, lambda: self._decode(decoders))
            for r, (token, row) in zip(decoders, tokens):
                r.fed += 1
                self._take(r, token, ended, row)
        feeding, budget, pages = [], self.prefill_chunk_size, len(blocks.free)
        for r in self.running:
            if budget == 0 or r.state is not RequestState.PREFILLING:
                continue
            take = min(r.pending, budget, blocks.room(r.seq_id, pages))
            if take > 0:
                pages -= blocks.pages_for(blocks.lengths[r.seq_id] + take) - len(blocks.tables[r.seq_id])
                feeding.append((r, take))
                budget -= take
        if feeding:
            rows = self._device([r for r, _ in feeding], lambda: self.model.prefill(
                [(r.seq_id, r.tokens[r.fed:r.fed + n]) for r, n in feeding]))
            for (r, n), row in zip(feeding, rows):
                r.fed += n
                if r.pending == 0:
                    r.move(RequestState.DECODING)
                    self._take(r, sample(row, r.params, r.rng), ended, row)
        return bool(decoders or feeding or not self.running)

    def _decode(self, reqs: list[Request]) -> list[tuple[int, object]]:
        """(token, logits row or None) of each request's next token: chosen on the device when every
        request is greedy and none wants log-probabilities."""
        seq_ids, last = [r.seq_id for r in reqs], [r.out[-1] for r in reqs]
        if all(r.params.greedy and r.params.logprobs is None for r in reqs):
            return [(t, None) for t in self.model.decode_greedy(seq_ids, last)]
        return [(sample(row, r.params, r.rng), row) for r, row in zip(reqs, self.model.decode(seq_ids, last))]

    def _device(self, reqs: list[Request], call: Callable):
        """A device call for ``reqs``: when it raises, they end (FAILED; ABORTED on an interrupt)."""
        try:
            return call()
        except BaseException as e:
            interrupt = isinstance(e, KeyboardInterrupt)
            reason = ("interrupted" if interrupt else str(e) if isinstance(e, QoqcError)
                      else f"{type(e).__name__}: {e}")
            for r in reqs:
                if not r.ended:
                    self._end(r, RequestState.ABORTED if interrupt else RequestState.FAILED, reason)
            self._call_failed = True
            raise

    def _settle(self, live: list[Request], ended: list[int]) -> None:
        """After an exception raised inside a step but outside a device call (an interrupt between
        a call and its bookkeeping): the requests that were running may hold tokens their records
        do not, so they end, aborted; waiting ones are untouched."""
        for r in live + [r for r in self.running if r not in live]:
            if r.live:
                self._end(r, RequestState.ABORTED, "interrupted mid-step")
                ended.append(r.rid)

    # ---------------------------------------------------------------- pages and states
    def _admit(self) -> None:
        blocks = self.model.blocks
        while self.waiting and len(self.running) < self.max_batch_size:
            r = self.waiting[0]
            headroom = len(self.running)  # a page for the next tokens of each running request
            if r.sequence is None:
                fits = blocks.can_allocate(len(r.tokens), headroom)
            else:
                fits = blocks.can_append({r.sequence: len(r.tokens)}, headroom)
            if self.running and not fits:
                return
            self.waiting.popleft()
            if r.sequence is None:
                r.seq_id, r.base = self.model.add_sequence(), 0
            else:
                r.seq_id, r.base = r.sequence, self.model.sequence_length(r.sequence)
            r.fed = 0
            r.move(RequestState.PREFILLING)
            self.running.append(r)

    def _release(self, r: Request, finished: bool = False) -> None:
        """Give back r's pages: its own sequence closed; a continued one cut back to its base,
        unless r finished (the conversation keeps what it added)."""
        if r.sequence is None:
            self.model.remove_sequence(r.seq_id)
            r.seq_id = None
        elif not finished:
            self.model.truncate_sequence(r.sequence, r.base)
        self.running.remove(r)

    def _preempt(self, r: Request) -> None:
        self._release(r)
        r.fed, r.preemptions = 0, r.preemptions + 1
        r.move(RequestState.WAITING)
        self.waiting.appendleft(r)

    def _end(self, r: Request, state: RequestState, reason: str) -> None:
        if r.live:
            self._release(r)
        elif r in self.waiting:
            self.waiting.remove(r)
        r.move(state, reason)
        self._record(r)

    def _record(self, r: Request) -> None:
        del self.requests[r.rid]
        self.results[r.rid] = r.result(self.model.has_tokenizer)

    def _take(self, r: Request, token: int, ended: list[int], row=None) -> None:
        """Accept r's next token (``row``: its logits, for log-probabilities); retire r when it finished."""
        model = self.model
        try:
            lp = None if r.params.logprobs is None or row is None else logprobs(row, token, r.params.logprobs)
            piece = r.accept(token, model.config.eos_token_ids, model.decode_text if model.has_tokenizer else None, lp)
        except Exception as e:  # noqa: BLE001  (a tokenizer failing on this request's tokens ends it alone)
            self._end(r, RequestState.FAILED, f"{type(e).__name__}: {e}")
            ended.append(r.rid)
            return
        if piece:
            r.pieces.append(piece)
        if r.ended:
            self._release(r, finished=True)
            self._record(r)
            ended.append(r.rid)
