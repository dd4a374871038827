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
and returns the newly final text: an incomplete UTF-8 character and any tail that may begin a stop
string are held back until they resolve.
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
    streaming: bool = False           # text wanted at every token (a stream, or stop strings)
    state: RequestState = RequestState.WAITING
    reason: str | None = None         # why it ended
    out: list[int] = field(default_factory=list)
    text: str = ""
    pieces: list[str] = field(default_factory=list)  # final text not yet read by a stream
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
    def accept(self, token: int, eos_ids, detokenize: Callable[[list[int]], str] | None) -> str:
        """Append a token (FINISHED on EOS, length or a stop string); return the newly final text.
        ``detokenize`` is None for an artifact without a tokenizer (token ids only)."""
        if not self.first_token_at:
            self.first_token_at = time.perf_counter()
        self.out.append(token)
        finish = None
        if token in eos_ids:
            self.out.pop()
            finish = "eos"
        elif len(self.out) >= self.max_new_tokens:
            finish = "length"
        piece = ""
        if detokenize is not None and (finish is not None or self.streaming or self.params.stop):
            # detokenizing every step costs O(n): only done when someone reads the text
            text = detokenize(self.out)
            for s in self.params.stop:
                cut = text.find(s)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
            if finish is None:
                text = text[:self._safe(text)]
            if text.startswith(self.text):
                piece, self.text = text[len(self.text):], text
            elif finish is not None:  # the tokenizer re-merged earlier text: the final text stands
                self.text = text
        if finish is not None:
            self.move(RequestState.FINISHED, finish)
        return piece

    def _safe(self, text: str) -> int:
        """Length of ``text`` that is final: no incomplete character, no tail that may begin a stop string."""
        safe = len(text.rstrip("\ufffd"))
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
                                self.reason if self.state is RequestState.FAILED else None)
