"""``qoqc chat``: multi-turn chat over an artifact, with the model's chat template and streaming.

Commands typed at the prompt: ``/reset`` forgets the conversation, ``/exit`` (or EOF) quits.
After each answer a line reports prefill and decode tokens/s.
"""

from __future__ import annotations

import sys

from ..errors import QoqcError
from .artifact import read_manifest
from .engine import Engine


class Conversation:
    """Messages so far, rendered with the tokenizer's chat template into prompt token ids."""

    def __init__(self, engine: Engine, system: str | None = None):
        self.engine, self.system = engine, system
        if not getattr(engine.tokenizer, "chat_template", None):
            raise QoqcError(f"artifact {engine.path} has no chat template; use the Python API for raw prompts")
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self, user: str) -> list[int]:
        self.messages.append({"role": "user", "content": user})
        text = self.engine.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)
        return self.engine.encode(text, add_special_tokens=False)

    def answered(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


def _answer(engine: Engine, conv: Conversation, user: str, args) -> None:
    try:
        ids = conv.prompt_ids(user)
        stream = engine.stream(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_p=args.top_p, seed=args.seed)
    except QoqcError:
        conv.messages.pop()
        raise
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    r = stream.result
    conv.answered(r.text)
    note = "" if r.finish_reason != "length" else " (stopped at the token limit)"
    sys.stdout.write(f"\n[prefill {r.prompt_tokens} tok, {r.prefill_tokens_per_s:.1f} tok/s | "
                     f"decode {len(r.token_ids)} tok, {r.decode_tokens_per_s:.1f} tok/s]{note}\n")
    sys.stdout.flush()


def run_chat(args) -> None:
    device = args.device or ("cuda" if read_manifest(args.artifact, verify=False)["target"]["kind"] == "cuda"
                             else "cpu")
    engine = Engine(args.artifact, device=device)
    conv = Conversation(engine, args.system)
    if args.prompt is not None:
        _answer(engine, conv, args.prompt, args)
        return
    print(f"qoqc chat: {engine.path} on {device}. /reset clears the conversation, /exit quits.")
    while True:
        try:
            user = input(">>> ")
        except EOFError:
            print()
            return
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
            _answer(engine, conv, user, args)
        except QoqcError as e:  # e.g. the conversation outgrew the context: say so and keep the session
            print(f"qoqc: {e}; /reset to start over", file=sys.stderr)
