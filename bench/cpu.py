"""qoqc's CPU builds against llama.cpp and transformers, side by side in one run.

    python bench/cpu.py [--threads 2] [--quants fp16,w8a8,qoq-w4a8kv4-g128] [--out dist/bench-cpu]

Model: the embedded SmolLM2-135M-Instruct (its Q4_1 GGUF). Engines, each in a child process of its
own (so its peak RSS is its own), all with ``--threads`` threads (``TVM_NUM_THREADS``,
``torch.set_num_threads``, llama.cpp ``n_threads`` and ``n_threads_batch``):
    qoqc-<quant>   artifacts compiled here for ``--target llvm`` (this CPU), reused from ``--out``
    llama.cpp      the same GGUF through ``llama-cpp-python`` (optional: ``pip install -e .[bench]``
                   builds the pinned release from PyPI for this CPU); its row is left out without it
    transformers   the GGUF expanded to fp32, eager attention (torch's CPU matmuls are fp32)
Every engine sees the same random prompt ids (fixed seed, never all one token), batch 1, greedy:
    prefill 128 / 512   prompt tokens / time to the first token (median of 3)
    decode              127 tokens after a 128-token prompt / their time (median of 3)
    batch 8             8 prompts of 128 tokens, 128 greedy tokens each, generated tokens / time
                        (llama-cpp-python's high-level API runs one sequence: not measured)
    peak RSS            the child's peak resident set (``VmHWM``) after all of the above
The EOS token is not honoured: every run generates all its tokens. Then the decode step of the
W4A8KV4 build by kernel kind, timed through the Relax VM's instrument hook (each call timed from
Python: calls under ~10 us read a few us high). Prints Markdown for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import child_result  # noqa: E402

NEW = 128
BATCH = 8


def prompt(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(100, 40000, n)]


def _median(fn, repeats: int = 3) -> float:
    return statistics.median(fn() for _ in range(repeats))


# ---------------------------------------------------------------------------------------- engines
def run_qoqc(artifact: str, profile: bool) -> dict:
    from qoq_compiler.runtime.engine import Engine

    engine = Engine(artifact, max_total_tokens=4096, max_batch_size=BATCH)
    argmax = lambda logits: int(np.argmax(logits))  # noqa: E731

    def prefill(n):
        sid = engine.add_sequence()
        t0 = time.perf_counter()
        engine.prefill([(sid, prompt(n))])
        dt = time.perf_counter() - t0
        engine.remove_sequence(sid)
        return n / dt

    def decode():
        sid = engine.add_sequence()
        tok = argmax(engine.prefill([(sid, prompt(128))])[0])
        t0 = time.perf_counter()
        for _ in range(NEW - 1):
            tok = engine.decode_greedy([sid], [tok])[0]
        dt = time.perf_counter() - t0
        engine.remove_sequence(sid)
        return (NEW - 1) / dt

    def batch():
        sids = [engine.add_sequence() for _ in range(BATCH)]
        t0 = time.perf_counter()
        toks = [argmax(row) for row in engine.prefill([(s, prompt(128, i)) for i, s in enumerate(sids)])]
        for _ in range(NEW - 1):
            toks = engine.decode_greedy(sids, toks)
        dt = time.perf_counter() - t0
        for s in sids:
            engine.remove_sequence(s)
        return BATCH * NEW / dt

    prefill(16)  # warm-up
    out = {"prefill128": _median(lambda: prefill(128)), "prefill512": _median(lambda: prefill(512)),
           "decode": _median(decode), "batch8": batch()}
    spec = engine.manifest["params"]
    out["params_bytes"] = sum((Path(artifact) / f).stat().st_size for f in spec.get("files", []))
    if profile:
        out["profile"] = decode_profile(engine)
    return out


def decode_profile(engine) -> dict:
    """Microseconds per decode step by kernel kind (function name without its numeric suffix), over
    16 steps after a 128-token prompt."""
    sid = engine.add_sequence()
    tok = int(np.argmax(engine.prefill([(sid, prompt(128))])[0]))
    total, calls, start = Counter(), Counter(), {}

    def instrument(_func, symbol, before, _ret, *_args):
        if before:
            start[symbol] = time.perf_counter()
        else:
            kind = re.sub(r"\d+$", "", symbol)
            total[kind] += (time.perf_counter() - start[symbol]) * 1e6
            calls[kind] += 1
        return 0

    steps = 16
    engine.rt.vm.set_instrument(instrument)
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = engine.decode_greedy([sid], [tok])[0]
        wall = (time.perf_counter() - t0) * 1e6 / steps
    finally:
        engine.rt.vm.set_instrument(None)
    return {"wall_us": wall, "kinds": {k: (calls[k] / steps, total[k] / steps) for k in total}}


def run_llama_cpp(gguf: str, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(gguf, n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)

    def prefill(n):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt(n))
        return n / (time.perf_counter() - t0)

    def decode():
        llm.reset()
        llm.eval(prompt(128))
        t0 = time.perf_counter()
        for _ in range(NEW - 1):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return (NEW - 1) / (time.perf_counter() - t0)

    prefill(16)
    return {"prefill128": _median(lambda: prefill(128)), "prefill512": _median(lambda: prefill(512)),
            "decode": _median(decode), "batch8": None, "params_bytes": Path(gguf).stat().st_size}


def run_transformers(gguf: str, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(Path(gguf).parent), gguf_file=Path(gguf).name,
                                                 dtype=torch.float32, attn_implementation="eager").eval()
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def prefill(n):
        x = torch.tensor([prompt(n)])
        t0 = time.perf_counter()
        with torch.no_grad():
            model(x)
        return n / (time.perf_counter() - t0)

    def decode():
        x = torch.tensor([prompt(128)])
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=1, min_new_tokens=1, **gen)
            t1 = time.perf_counter()
            model.generate(x, max_new_tokens=NEW, min_new_tokens=NEW, **gen)
            t2 = time.perf_counter()
        return (NEW - 1) / ((t2 - t1) - (t1 - t0))

    def batch():
        x = torch.tensor([prompt(128, i) for i in range(BATCH)])
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(x, max_new_tokens=NEW, min_new_tokens=NEW, **gen)
        return BATCH * NEW / (time.perf_counter() - t0)

    prefill(16)
    return {"prefill128": _median(lambda: prefill(128)), "prefill512": _median(lambda: prefill(512)),
            "decode": _median(decode), "batch8": batch(),
            "params_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


# ----------------------------------------------------------------------------------------- driver
def peak_rss() -> int:
    """This process's peak resident set in bytes (``VmHWM``: its own address space's high-water
    mark; ``ru_maxrss`` would report the parent's peak, which Linux carries across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args) -> None:
    if args.engine == "qoqc":
        out = run_qoqc(args.path, args.profile)
    elif args.engine == "llama.cpp":
        out = run_llama_cpp(args.path, args.threads)
    else:
        out = run_transformers(args.path, args.threads)
    out["peak_rss"] = peak_rss()
    print("RESULT " + json.dumps(out))


def measure(engine: str, path: Path, threads: int, profile: bool = False) -> dict:
    env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", engine, "--path", str(path), "--threads", str(threads)]
    return child_result(cmd + (["--profile"] if profile else []), env, engine)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quants", default="fp16,w8a8,qoq-w4a8kv4-g128")
    ap.add_argument("--out", default="dist/bench-cpu", help="where the artifacts are compiled (and reused)")
    ap.add_argument("--child", dest="engine", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        return child(args)

    import importlib.util

    from qoq_compiler import compile
    from qoq_compiler.frontend.checkpoint import default_model_path
    from qoq_compiler.runtime.artifact import read_manifest

    gguf = default_model_path()
    rows, profile = [], None
    quants = args.quants.split(",")
    for quant in quants:
        out = Path(args.out) / quant
        if not (out / "manifest.json").is_file():
            t0 = time.perf_counter()
            compile(None, target="llvm", quant=quant, output=out)
            print(f"compiled {quant} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        cpu = read_manifest(out, verify=False)["target"].get("mcpu", "?")
        res = measure("qoqc", out, args.threads, profile=quant == quants[-1])
        profile = res.pop("profile", profile)
        rows.append((f"qoqc {quant} (llvm, {cpu})", res))
    if importlib.util.find_spec("llama_cpp") is not None:
        rows.append(("llama.cpp Q4_1 (llama-cpp-python)", measure("llama.cpp", gguf, args.threads)))
    else:
        print("llama-cpp-python is not installed: no llama.cpp row", file=sys.stderr)
    rows.append(("transformers fp32 eager", measure("transformers", gguf, args.threads)))

    print(f"\nSmolLM2-135M-Instruct, {args.threads} threads, `python bench/cpu.py --threads {args.threads}`, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| engine | prefill 128 tok/s | prefill 512 tok/s | decode tok/s | batch 8 tok/s | weights MB "
          "| peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        b8 = f"{r['batch8']:.1f}" if r["batch8"] is not None else "—"
        print(f"| {name} | {r['prefill128']:.1f} | {r['prefill512']:.1f} | {r['decode']:.1f} | {b8} | "
              f"{r['params_bytes'] / 1e6:.1f} | {r['peak_rss'] / 1e6:.0f} |")
    if profile:
        print(f"\nDecode step of qoqc {quants[-1]}, by kernel kind ({profile['wall_us']:.0f} us a step, "
              "instrumented):\n")
        print("| kind | calls / step | us / step | share |")
        print("|---|---|---|---|")
        kinds = sorted(profile["kinds"].items(), key=lambda kv: -kv[1][1])
        timed = sum(us for _, (_, us) in kinds)
        for kind, (calls, us) in kinds:
            if us >= 0.005 * timed:
                print(f"| {kind} | {calls:.0f} | {us:.0f} | {100 * us / timed:.1f}% |")


if __name__ == "__main__":
    main()
