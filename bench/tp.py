"""Tensor parallelism on one machine: the same model at 1 and N shards, side by side in one run.

    python bench/tp.py [--shards 2] [--target llvm|cuda] [--quant rtn-w4a8kv4] [--threads T]
                       [--config bench/configs/tp-llama-150m.json] [--out dist/bench-tp]

The model is compiled from its config with random weights (speed does not depend on them) at 1
shard (the baseline: ``Engine``) and at ``--shards`` (``TPEngine`` on Disco workers), reused from
``--out``. Each engine runs in a child process, batch 1, greedy over random prompt ids:
    prefill 128    128 prompt tokens / time to the first token (median of 3)
    decode         127 tokens after a 128-token prompt / their time (median of 3)
    batch 8        8 prompts of 128 tokens, 64 tokens each, generated tokens / time
On CPUs (``--target llvm``) all shards share the machine: each of N workers gets T / N threads
(``TVM_NUM_THREADS``) and the collectives are qoqc's shared-memory ones, so the TP rows measure
what Disco and the collectives cost, not a speed-up. On GPUs (``--target cuda``, N GPUs, NCCL)
they measure tensor parallelism itself. Prints Markdown for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import child_result  # noqa: E402

ROOT = Path(__file__).resolve().parent


def child(path: str, device: str) -> dict:
    from qoq_compiler.runtime.engine import load

    prompts = [[int(t) for t in np.random.default_rng(s).integers(3, 30000, 128)] for s in range(8)]
    with load(path, device=device, max_total_tokens=4096, max_batch_size=8) as engine:
        def prefill() -> float:
            sid = engine.add_sequence()
            t0 = time.perf_counter()
            engine.prefill([(sid, prompts[0])])
            dt = time.perf_counter() - t0
            engine.remove_sequence(sid)
            return 128 / dt

        def decode() -> float:
            return engine.generate(prompts[0], max_new_tokens=128).decode_tokens_per_s

        def batch() -> float:
            t0 = time.perf_counter()
            results = engine.generate_batch(prompts, max_new_tokens=64)
            return sum(len(r.token_ids) for r in results) / (time.perf_counter() - t0)

        decode()  # warm-up
        return {"prefill": statistics.median(prefill() for _ in range(3)),
                "decode": statistics.median(decode() for _ in range(3)), "batch": batch()}


def measure(path: Path, device: str, threads: int) -> dict:
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    return child_result([sys.executable, __file__, "--child", str(path), "--device", device], env, str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--target", default="llvm", choices=("llvm", "cuda"))
    ap.add_argument("--quant", default="rtn-w4a8kv4")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads in all (llvm)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "tp-llama-150m.json"))
    ap.add_argument("--out", default="dist/bench-tp")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--device", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.device)))
        return

    from qoq_compiler import compile

    device = "cuda" if args.target == "cuda" else "cpu"
    rows = []
    for shards in (1, args.shards):
        out = Path(args.out) / f"{Path(args.config).stem}-{args.quant}-{args.target}-tp{shards}"
        if not (out / "manifest.json").is_file():
            compile(args.config, target=args.target, quant=args.quant, output=out, random_weights=True,
                    tensor_parallel=shards)
        threads = max(1, args.threads // shards) if device == "cpu" else args.threads
        rows.append((shards, threads, measure(out, device, threads)))
    print(f"\n{Path(args.config).stem}, {args.quant}, --target {args.target}, "
          f"`python bench/tp.py --shards {args.shards} --target {args.target} --threads {args.threads}`, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| shards | threads per shard | prefill 128 tok/s | decode tok/s | batch 8 tok/s |")
    print("|---|---|---|---|---|")
    for shards, threads, r in rows:
        print(f"| {shards} | {threads} | {r['prefill']:.0f} | {r['decode']:.1f} | {r['batch']:.1f} |")


if __name__ == "__main__":
    main()
