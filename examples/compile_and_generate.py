"""Compile a Hugging Face model with qoqc and generate from it, step by step.

    python examples/compile_and_generate.py [MODEL] [--target llvm|cuda] [--prompt TEXT]

MODEL defaults to the embedded SmolLM2-135M-Instruct. The script walks the same path as
``qoqc compile`` + ``qoqc chat``, but through the Python API, and shows the serving primitives
(sequences in the paged KV cache, prefill, batched decode) that ``Engine.generate`` is built on.
"""

import argparse

import numpy as np

import qoq_compiler


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--quant", default=qoq_compiler.DEFAULT_SCHEME)
    ap.add_argument("--output", default="dist/example")
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()

    # 1. Compile: checkpoint -> Relax IR -> compiled module + weights + manifest, in one directory.
    path = qoq_compiler.compile(args.model, target=args.target, quant=args.quant, output=args.output)

    # 2. Load: the runtime checks every file against the manifest's sha256 before using it.
    engine = qoq_compiler.load(path, device="cuda" if args.target == "cuda" else "cpu")

    # 3. Generate greedily from text.
    result = engine.generate(args.prompt, max_new_tokens=args.max_new_tokens)
    print(f"{args.prompt!r} -> {result.text!r} ({result.finish_reason})")

    # 4. The same by hand: open two sequences, prefill both in one call, then decode them together.
    ids = engine.encode(args.prompt)
    seqs = [engine.add_sequence(), engine.add_sequence()]
    last = engine.prefill([(seqs[0], ids), (seqs[1], ids[:2])])  # next-token logits of each
    tokens = [int(np.argmax(row)) for row in last]
    out = [[t] for t in tokens]
    for _ in range(args.max_new_tokens - 1):
        logits = engine.decode(seqs, tokens)  # [2, vocab]: one step for both sequences
        tokens = [int(np.argmax(row)) for row in logits]
        for o, t in zip(out, tokens):
            o.append(t)
    for s in seqs:
        engine.remove_sequence(s)
    assert out[0][: len(result.token_ids)] == result.token_ids  # generate() stops at EOS; this loop does not
    print("by hand, full prompt :", repr(engine.decode_text(out[0])))
    print("by hand, first 2 toks:", repr(engine.decode_text(out[1])))


if __name__ == "__main__":
    main()
