"""``qoqc chat``: multi-turn chat over an artifact, with the model's chat template and streaming.

Commands typed at the prompt: ``/reset`` forgets the conversation, ``/exit`` (or EOF) quits.
After each answer a line reports prefill and decode tokens/s.
"""

from __future__ import annotations

import sys

from ..errors import QoqcError
from .artifact import read_manifest
from .engine import Engine, load
from .sampling import SamplingParams


class Conversation:
    """Messages so far, rendered with the tokenizer's chat template, and their KV cache.

    The conversation lives in one KV-cache sequence. Each turn renders the whole conversation,
    keeps the cached tokens it shares with the new prompt and prefills only the rest, so a turn
    costs its own tokens, not the conversation's.
    """

    def __init__(self, engine: Engine, system: str | None = None):
        self.engine, self.system = engine, system
        if not getattr(engine.tokenizer, "chat_template", None):
            raise QoqcError(f"artifact {engine.path} has no chat template; use the Python API for raw prompts")
        self.seq = engine.add_sequence()
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.engine.truncate_sequence(self.seq, 0)
        self.cached: list[int] = []  # the tokens the sequence holds

    def stream(self, user: str, **sampling):
        """Add a user message and return the engine's text stream of the answer."""
        self.messages.append({"role": "user", "content": user})
        text = self.engine.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)
        ids = self.engine.encode(text, add_special_tokens=False)
        keep = 0
        while keep < min(len(self.cached), len(ids) - 1) and self.cached[keep] == ids[keep]:
            keep += 1
        self.engine.truncate_sequence(self.seq, keep)
        self.cached = ids[:keep]
        try:
            stream = self.engine.stream(ids[keep:], sequence=self.seq, **sampling)
        except QoqcError:
            self.messages.pop()
            raise
        self._prompt = ids
        return stream

    def answered(self, stream) -> None:
        r = stream.result
        self.messages.append({"role": "assistant", "content": r.text})
        self.cached = (self._prompt + r.token_ids)[: self.engine.sequence_length(self.seq)]


def _utf8(text: str) -> str:
    """``text`` if it is valid UTF-8 (argv and stdin bytes that are not arrive as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise QoqcError("the prompt is not valid UTF-8") from None
    return text


def _answer(conv: Conversation, user: str, args) -> None:
    user = _utf8(user)
    stream = conv.stream(user, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    conv.answered(stream)
    r = stream.result
    note = "" if r.finish_reason != "length" else " (stopped at the token limit)"
    sys.stdout.write(f"\n[prefill {r.prompt_tokens} tok, {r.prefill_tokens_per_s:.1f} tok/s | "
                     f"decode {len(r.token_ids)} tok, {r.decode_tokens_per_s:.1f} tok/s]{note}\n")
    sys.stdout.flush()


def run_chat(args) -> None:
    SamplingParams.make(args.max_new_tokens, args.temperature, args.top_p, None, args.seed)  # refused before loading
    device = args.device or ("cuda" if read_manifest(args.artifact, verify=False)["target"]["kind"] == "cuda"
                             else "cpu")
    with load(args.artifact, device=device, kv_memory=args.kv_memory) as engine:
        _session(engine, device, args)


def _session(engine: Engine, device: str, args) -> None:
    conv = Conversation(engine, args.system)
    if args.prompt is not None:
        _answer(conv, args.prompt, args)
        return
    shards = f" x {engine.shards} (tensor parallel)" if engine.shards > 1 else ""
    print(f"qoqc chat: {engine.path} on {device}{shards}, KV cache of {engine.cache_tokens} tokens "
          f"({engine.cache_tokens * engine.kv_bytes_per_token / 2 ** 20:.1f} MiB). "
          "/reset clears the conversation, /exit quits.")
    while True:
        try:
            user = input(">>> ")
        except EOFError:
            print()
            return
        except UnicodeDecodeError:
            print("qoqc: error: the prompt is not valid UTF-8", file=sys.stderr)
            continue
        cmd = user.strip()
        if cmd == "/exit":
            return
        if cmd == "/reset":
            conv.reset()
            print("(conversation cleared)")
            continue
        if not cmd:
            continue
        try:
            _answer(conv, user, args)
        except QoqcError as e:  # e.g. the conversation outgrew the context: say so and keep the session
            hint = "; /reset to start over" if "context window" in str(e) else ""
            print(f"qoqc: error: {e}{hint}", file=sys.stderr)
