"""``Engine``: a loaded model (``model.Model``: the serving primitives) with one ``Scheduler`` that
serves every ``generate``, ``stream`` and ``generate_batch`` call.

Callers submit requests to the shared scheduler and step it, under the model's lock, until their
own requests have ended; requests of concurrent callers (threads) decode in the same batches. A
caller's requests never outlive the call: on any exception or interrupt, and when a stream is
closed or dropped before its end, they are aborted and their pages freed. A failure in a step is
raised to the callers whose requests it ended; the others go on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..errors import QoqcError
from .model import Model
from .request import GenerationResult, Request, RequestState
from .scheduler import Scheduler

__all__ = ["Engine", "GenerationResult", "TextStream", "load"]


def load(path: str | Path, device: str = "cpu", **kwargs) -> "Engine":
    """The engine for an artifact: ``Engine``, or ``tp.TPEngine`` for one compiled with
    ``--tensor-parallel N`` (its manifest says so). Options as ``Engine``'s. Close it (or use it as
    a context manager) to release its devices: a tensor-parallel engine's workers end then."""
    from .artifact import read_manifest

    if read_manifest(Path(path), verify=False).get("tensor_parallel", 1) > 1:
        from .tp import TPEngine

        return TPEngine(path, device, **kwargs)
    return Engine(path, device, **kwargs)


class TextStream:
    """Iterates over text pieces as they are generated; ``result`` is set once exhausted. Closing it
    (or dropping it) early aborts the request."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._pieces

    def close(self) -> None:
        self._pieces.close()


class Engine(Model):
    """A compiled model on one device that generates text (see ``Model`` for the options)."""

    def __init__(self, path: str | Path, device: str = "cpu", max_total_tokens: int | None = None,
                 max_batch_size: int = 8, prefill_chunk_size: int = 2048, verify: bool = True,
                 kv_memory: int | float | str | None = None):
        super().__init__(path, device, max_total_tokens, max_batch_size, prefill_chunk_size, verify, kv_memory)
        self.scheduler = Scheduler(self)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, stop: str | Iterable[str] | None = None, seed: int | None = None
                 ) -> GenerationResult:
        return self.generate_batch([prompt], max_new_tokens, temperature, top_p, stop, seed)[0]

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 256,
                       temperature: float = 0.0, top_p: float = 1.0, stop: str | Iterable[str] | None = None,
                       seed: int | None = None) -> list[GenerationResult]:
        """Generate for several prompts, any number of them, by in-flight batching: up to
        ``max_batch_size`` decode together and the others join as they finish; results in prompt
        order (prompt i sampled with seed + i). Every prompt is validated before any runs."""
        if isinstance(prompts, str) or not prompts:
            raise QoqcError("generate_batch needs a list of at least one prompt")
        reqs = [self.scheduler.make_request(p, max_new_tokens, temperature, top_p, stop,
                                            None if seed is None else seed + i) for i, p in enumerate(prompts)]
        try:
            for r in reqs:
                self.scheduler.enqueue(r)
            self._serve(reqs, until=lambda: all(r.ended for r in reqs))
            return [self._collect(r) for r in reqs]
        finally:
            self._drop(reqs)

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, stop: str | Iterable[str] | None = None, seed: int | None = None,
               sequence: int | None = None) -> TextStream:
        """Like ``generate``, but iterating yields text pieces as they are decoded. The request is
        validated now and queued when iteration starts.

        With ``sequence`` (an open sequence id) the prompt continues what that sequence already
        holds in the KV cache, and the sequence stays open afterwards: multi-turn chat re-uses
        the conversation so far instead of computing it again.
        """
        req = self.scheduler.make_request(prompt, max_new_tokens, temperature, top_p, stop, seed, sequence)
        return TextStream(self._pieces(req))

    def _pieces(self, req: Request):
        try:
            self.scheduler.enqueue(req)
            while True:
                self._serve([req], until=lambda: bool(req.pieces) or req.ended)
                while req.pieces:
                    yield req.pieces.pop(0)
                if req.ended:
                    return self._collect(req)
        finally:
            self._drop([req])

    def _serve(self, reqs: list[Request], until) -> None:
        """Step the shared scheduler until ``until()``; a failure that ended none of ``reqs``
        (another caller's) is that caller's to see."""
        while True:
            with self.lock:
                if until():
                    return
                before = set(self.scheduler.requests)
                try:
                    self.scheduler.step()
                except Exception:
                    mine = any(r.ended and r.state is not RequestState.FINISHED for r in reqs)
                    if mine or set(self.scheduler.requests) >= before:  # ours, or nobody's: raise it
                        raise

    def _collect(self, req: Request) -> GenerationResult:
        result = self.scheduler.results.pop(req.rid)
        if req.state is RequestState.FAILED:
            raise QoqcError(f"generation failed: {req.reason}")
        return result

    def _drop(self, reqs: list[Request]) -> None:
        """Abort what is still live of ``reqs``; forget their results."""
        with self.lock:
            for r in reqs:
                self.scheduler.abort(r.rid, "the caller stopped waiting for it")
                self.scheduler.results.pop(r.rid, None)
