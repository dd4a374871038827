"""Batch-1 latency of a qoqc artifact vs Hugging Face transformers, measured in the same run.

    python bench/e2e.py --model MODEL [--target cuda] [--quant fp16] [--prompt-len 128] [--new-tokens 128]

Compiles MODEL (a Hugging Face directory, or a .gguf where the ``gguf`` package is installed: the
GPU machine has none, so there is no default), then for each engine: one warm-up request, then
``--repeats`` timed requests of a random ``--prompt-len``-token prompt (fixed seed, never all
zeros) with ``--new-tokens`` greedy tokens forced (EOS ignored by generating token ids).
Reports prefill tokens/s (prompt tokens / time to first token) and decode tokens/s (median).
The baseline is transformers ``generate`` (SDPA attention, the artifact's activation dtype, same
device), and the greedy tokens of both are compared (a quantized scheme may diverge after a
while). Prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qoq_compiler  # noqa: E402


def bench_qoqc(engine, ids, new_tokens, repeats):
    engine.generate(ids, max_new_tokens=4)
    pre, dec = [], []
    for _ in range(repeats):
        sid = engine.add_sequence()
        t0 = time.perf_counter()
        tok = int(np.argmax(engine.prefill([(sid, ids)])[0]))
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(new_tokens - 1):
            tok = int(np.argmax(engine.decode([sid], [tok])[0]))
            out.append(tok)
        t2 = time.perf_counter()
        engine.remove_sequence(sid)
        pre.append(len(ids) / (t1 - t0))
        dec.append((new_tokens - 1) / (t2 - t1))
    return statistics.median(pre), statistics.median(dec), out


def bench_hf(model_path, ids, new_tokens, repeats, device, dtype):
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": model_path.name} if model_path.suffix == ".gguf" else {}
    src = model_path.parent if model_path.suffix == ".gguf" else model_path
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype, attn_implementation="sdpa", **kw)
    model = model.to(device).eval()
    x = torch.tensor([ids], device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(x, max_new_tokens=4, min_new_tokens=4, **gen)
        pre, dec = [], []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=1, min_new_tokens=1, **gen)
            sync()
            t1 = time.perf_counter()
            out = model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **gen)
            sync()
            t2 = time.perf_counter()
            pre.append(len(ids) / (t1 - t0))
            dec.append((new_tokens - 1) / ((t2 - t1) - (t1 - t0)))
    return statistics.median(pre), statistics.median(dec), out[0, len(ids):].tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory or .gguf file")
    ap.add_argument("--target", default="cuda")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--quant", default="fp16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output", default="dist/bench-e2e")
    args = ap.parse_args()

    device = "cuda" if args.target == "cuda" else "cpu"
    model_path = Path(args.model)
    art = qoq_compiler.compile(model_path, target=args.target, arch=args.arch, quant=args.quant,
                               output=args.output, progress=False)
    engine = qoq_compiler.load(art, device=device)
    ids = [int(t) for t in np.random.default_rng(0).integers(100, engine.config.vocab_size, size=args.prompt_len)]

    rows = [("qoqc " + args.quant, *bench_qoqc(engine, ids, args.new_tokens, args.repeats))]
    dtype = getattr(torch, engine.manifest["dtype"])  # the baseline runs in the artifact's activation dtype
    rows.append((f"transformers {engine.manifest['dtype']} (SDPA)", *bench_hf(model_path, ids, args.new_tokens,
                                                                 args.repeats, device, dtype)))
    same = rows[0][3] == rows[1][3]
    agree = next((i for i, (a, b) in enumerate(zip(rows[0][3], rows[1][3])) if a != b), len(rows[0][3]))
    dev = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\nmodel {model_path.name}, device {dev}, prompt {args.prompt_len}, new tokens {args.new_tokens}, "
          f"median of {args.repeats}; greedy tokens identical: {same} (first {agree} agree)\n")
    print("| engine | prefill tok/s | decode tok/s |\n|---|---|---|")
    for name, pre, dec, _ in rows:
        print(f"| {name} | {pre:.0f} | {dec:.1f} |")


if __name__ == "__main__":
    main()
