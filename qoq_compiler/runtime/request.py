"""A request's life, owned by the ``Scheduler``: an explicit state machine, and its text.

    WAITING ──admit──▶ PREFILLING ──last prompt token fed, first token sampled──▶ DECODING
       ▲                   │                                                        │
       └──── preempted ────┴────────────────────────────────────────────────────────┘
    any live state ──▶ FINISHED (eos, stop, length) | ABORTED (abort, interrupt) | FAILED (error)

A request holds KV-cache pages exactly while PREFILLING or DECODING; entering an end state or
WAITING (preemption by recompute: its tokens so far are fed again on re-admission) gives them
back. ``fed`` counts the tokens of ``prompt + out`` in its sequence after the ``base`` tokens the
sequence held before (a conversation continued in place, ``sequence``); a DECODING request always
has exactly one token to feed: its last.

Text: ``accept`` appends a token, ends the request on EOS, ``max_new_tokens`` or a stop string,
and returns the newly final text. Tokens are decoded incrementally (``_decode``, vLLM's window
scheme): text is added once it does not end in an undecodable byte (an incomplete UTF-8
character), and a tail that may begin a stop string is held back until it resolves, so the pieces
of a stream joined always equal the text of the same request not streamed.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .sampling import SamplingParams


class RequestState(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


CONTEXT_TOKENS = 5  # prompt tokens the incremental decoding window starts with
LIVE = (RequestState.PREFILLING, RequestState.DECODING)
ENDED = (RequestState.FINISHED, RequestState.ABORTED, RequestState.FAILED)
_MOVES = {
    RequestState.WAITING: {RequestState.PREFILLING, *ENDED},
    RequestState.PREFILLING: {RequestState.DECODING, RequestState.WAITING, *ENDED},
    RequestState.DECODING: {RequestState.WAITING, *ENDED},
}


@dataclass
class GenerationResult:
    """One request's output: ``token_ids`` and ``text`` hold the new tokens only.

    ``finish_reason``: "eos", "stop" (a stop string), "length" (max_new_tokens or the context),
    "abort" (aborted or interrupted) or "error" (``error`` says what failed).
    ``prefill_seconds``: from submission to the first token (queueing included);
    ``decode_seconds``: from the first token to the end; ``preemptions``: times recomputed."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    preemptions: int = 0
    error: str | None = None
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # per token, when asked for

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.token_ids) - 1  # the first new token comes from prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds else 0.0


@dataclass(eq=False)
class Request:
    rid: int
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int               # params' limit, capped by the room left in the context
    sequence: int | None = None       # an open sequence to continue (kept afterwards), else a new one
    state: RequestState = RequestState.WAITING
    reason: str | None = None         # why it ended
    out: list[int] = field(default_factory=list)
    text: str = ""
    pieces: list[str] = field(default_factory=list)  # final text not yet read by a stream
    _decoded: str = ""                # text of out so far (``text`` is its final part)
    _window: tuple[int, int] | None = None  # (start, read) of the incremental decoding window
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)  # per out token
    seq_id: int | None = None         # its KV-cache sequence while live
    base: int = 0                     # tokens that sequence held before this request
    fed: int = 0
    preemptions: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    ended_at: float = 0.0
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.params.seed)

    # ---------------------------------------------------------------- state
    def move(self, to: RequestState, reason: str | None = None) -> None:
        if to not in _MOVES.get(self.state, ()):
            raise RuntimeError(f"request {self.rid}: no transition {self.state.value} -> {to.value}")
        self.state = to
        if to in ENDED:
            self.reason, self.ended_at = reason, time.perf_counter()

    @property
    def live(self) -> bool:
        return self.state in LIVE

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out

    @property
    def pending(self) -> int:
        """Tokens of prompt + out not yet in the KV cache."""
        return len(self.prompt) + len(self.out) - self.fed

    # ---------------------------------------------------------------- tokens and text
    def accept(self, token: int, eos_ids, detokenize: Callable[[list[int]], str] | None,
               logprob: tuple[float, list[tuple[int, float]]] | None = None) -> str:
        """Append a token (FINISHED on EOS, length or a stop string); return the newly final text.
        ``detokenize`` is None for an artifact without a tokenizer (token ids only); ``logprob``
        (``sampling.logprobs``) is kept beside the token when the request asked for it."""
        if not self.first_token_at:
            self.first_token_at = time.perf_counter()
        self.out.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        finish = None
        if token in eos_ids:
            self.out.pop()
            if logprob is not None:
                self.logprobs.pop()
            finish = "eos"
        elif len(self.out) >= self.max_new_tokens:
            finish = "length"
        piece = ""
        if detokenize is not None:
            decoded = self._decode(detokenize, final=finish is not None)
            for s in self.params.stop:
                cut = decoded.find(s)
                if cut >= 0:
                    decoded, finish = decoded[:cut], "stop"
            self._decoded = decoded
            safe = len(decoded) if finish is not None else self._safe(decoded)
            piece, self.text = decoded[len(self.text):safe], decoded[:safe]
        if finish is not None:
            self.move(RequestState.FINISHED, finish)
        return piece

    def _decode(self, detokenize: Callable[[list[int]], str], final: bool) -> str:
        """The text of ``out`` decoded incrementally: a window of tokens from ``_window[0]`` (which
        starts with the prompt's last tokens, so a leading space is decoded as a continuation) is
        decoded with and without its newest tokens; the difference is added to the text once it
        does not end in an undecodable byte, and the window moves on. Joining these differences is
        the text, streamed or not (a whole-output decode can differ where byte-fallback tokens
        re-split)."""
        context = self.prompt[-CONTEXT_TOKENS:]
        if self._window is None:
            self._window = (0, len(context))
        start, read = self._window  # positions in context + out, without building that list each token
        end = len(context) + len(self.out)

        def tokens(i: int, j: int) -> list[int]:
            return context[i:j] + self.out[max(i - len(context), 0):max(j - len(context), 0)]

        if end > read:
            before, after = detokenize(tokens(start, read)), detokenize(tokens(start, end))
            if len(after) > len(before) and (final or not after.endswith("\ufffd")):
                self._decoded += after[len(before):]
                self._window = (read, end)
        return self._decoded

    def _safe(self, text: str) -> int:
        """Length of ``text`` that is final: no tail that may begin a stop string."""
        safe = len(text)
        for s in self.params.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return safe

    def result(self, with_text: bool) -> GenerationResult:
        """The ended request's result."""
        reason = {RequestState.ABORTED: "abort", RequestState.FAILED: "error"}.get(self.state, self.reason)
        first = self.first_token_at or self.ended_at
        return GenerationResult(list(self.out), self.text if with_text else "", len(self.prompt), reason,
                                first - self.submitted, self.ended_at - first, self.preemptions,
                                self.reason if self.state is RequestState.FAILED else None,
                                None if self.params.logprobs is None else list(self.logprobs))
