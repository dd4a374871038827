"""Serving throughput by QServe's protocol: qoqc W4A8KV4 (g128, per-channel) vs qoqc FP16 vs transformers.

    python bench/serving.py [--config bench/configs/llama-3-8b.json] [--num-layers N] [--arch sm_90]
                            [--input-len 1024] [--output-len 512] [--kv-memory 0.9] [--schemes A,B,...] [--out FILE]
    python bench/serving.py --cpu-check

One random-weight checkpoint of CONFIG (``frontend.synthetic``: speed does not depend on weight
values; QServe benchmarks config-only folders too). Each scheme is compiled for cuda with its
calibration passes skipped (they change values, not shapes or kernels) and served by
``runtime.bench.throughput``: the largest batch whose KV cache fits the same memory budget
(``--kv-memory``, a fraction of the memory left beside the weights), every sequence ``--input-len``
random tokens in and ``--output-len`` out, time including the batched prefill, 2 warm-up rounds.
The baseline, in the same run: transformers ``generate`` (fp16, SDPA, its dynamic cache) on the same
checkpoint at the FP16 build's batch, halved until it fits in memory, greedy with EOS ignored, one
warm-up. The table gives tokens/s and each row's ratio to the FP16 build (issue target: W4A8KV4 at
least 2x). ``--num-layers`` keeps the config's layer shapes but fewer of them, to fit a session's
GPU time: every engine's step time scales with the layers, its KV bytes per token too.

``--cpu-check`` runs every row on llvm with ``bench/configs/tiny-llama.json`` and short sequences
(a pipeline check, not a measurement) and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Checks, emit_table  # noqa: E402
from qoq_compiler import compile  # noqa: E402
from qoq_compiler.config import QUANT_SCHEMES  # noqa: E402
from qoq_compiler.frontend.synthetic import write_random_checkpoint  # noqa: E402
from qoq_compiler.runtime import bench  # noqa: E402

SCHEMES = ("qoq-w4a8kv4-g128", "qoq-w4a8kv4-chn", "fp16")


def hf_throughput(model_dir: Path, batch: int, input_len: int, output_len: int, device: str) -> tuple[int, float]:
    """(batch run, tokens/s) of transformers ``generate``; the batch is halved on out-of-memory."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    vocab = model.config.vocab_size
    gen = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    while True:
        ids = torch.randint(0, vocab, (batch, input_len), generator=torch.Generator().manual_seed(0)).to(device)
        try:
            with torch.no_grad():
                model.generate(ids, max_new_tokens=2, min_new_tokens=2, **gen)
                sync()
                t0 = time.perf_counter()
                out = model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **gen)
                sync()
            assert out.shape == (batch, input_len + output_len)
            return batch, batch * output_len / (time.perf_counter() - t0)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            torch.cuda.empty_cache()


def run(args) -> list[tuple[str, int, float]]:
    rows = []
    device = "cuda" if args.target == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(prefix="qoqc-serving-") as tmp:
        config = Path(args.config)
        if args.num_layers:
            raw = json.loads(config.read_text())
            config = Path(tmp) / "config.json"
            config.write_text(json.dumps({**raw, "num_hidden_layers": args.num_layers}))
        model = write_random_checkpoint(config, Path(tmp) / "model", progress=not args.quiet)
        fp16_batch = None
        for name in args.schemes:
            scheme = replace(QUANT_SCHEMES[name], passes=None)
            art = compile(model, target=args.target, arch=args.arch, quant=scheme, output=Path(tmp) / name,
                          progress=not args.quiet)
            r = bench.throughput(art, device, args.input_len, args.output_len, kv_memory=args.kv_memory,
                                 warmup=args.warmup, progress=not args.quiet)
            print(f"{name}: batch {r.batch}, {r.tokens_per_s:.1f} tokens/s (prefill {r.prefill_seconds:.2f} s, "
                  f"decode {r.decode_seconds:.2f} s)", flush=True)
            rows.append((f"qoqc {name}", r.batch, r.tokens_per_s))
            if name == "fp16":
                fp16_batch = r.batch
        batch, tps = hf_throughput(model, fp16_batch or 1, args.input_len, args.output_len, device)
        rows.append(("transformers fp16 generate (SDPA)" if device == "cuda" else "transformers fp32 generate",
                     batch, tps))
    return rows


def table(args, rows) -> list[str]:
    dev = torch.cuda.get_device_name() if args.target == "cuda" and torch.cuda.is_available() else "CPU"
    base = next((t for n, _, t in rows if n == "qoqc fp16"), None)
    layers = f", {args.num_layers} layers" if args.num_layers else ""
    lines = [f"Serving throughput, {Path(args.config).name}{layers} (random weights), {args.input_len} tokens in / "
             f"{args.output_len} out, KV budget {args.kv_memory or 'default'}, {dev}, {date.today()}",
             "", "| engine | batch | tokens/s | vs qoqc fp16 |", "|---|---|---|---|"]
    for name, batch, tps in rows:
        ratio = f"{tps / base:.2f}x" if base else "-"
        lines.append(f"| {name} | {batch} | {tps:.1f} | {ratio} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "bench" / "configs" / "llama-3-8b.json"))
    ap.add_argument("--num-layers", type=int, default=None, help="keep only this many decoder layers")
    ap.add_argument("--target", default="cuda")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--kv-memory", default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--cpu-check", action="store_true")
    args = ap.parse_args()
    args.schemes = args.schemes.split(",")
    unknown = [s for s in args.schemes if s not in QUANT_SCHEMES]
    if unknown:
        ap.error(f"unknown scheme {unknown[0]} (choose from {', '.join(QUANT_SCHEMES)})")
    if not args.cpu_check:
        emit_table(table(args, run(args)), args.out)
        return 0
    check = Checks()
    args.config = str(ROOT / "bench" / "configs" / "tiny-llama.json")
    args.target, args.input_len, args.output_len, args.kv_memory, args.warmup = "llvm", 32, 8, "512KiB", 1
    args.quiet = True
    rows = run(args)
    check(len(rows) == len(args.schemes) + 1 and all(t > 0 and b > 0 for _, b, t in rows),
          f"{len(rows)} rows served: " + ", ".join(f"{n} batch {b}" for n, b, _ in rows))
    batches = {n: b for n, b, _ in rows}
    fp16, kv4 = batches.get("qoqc fp16"), batches.get("qoqc qoq-w4a8kv4-g128")
    if fp16 and kv4:  # the same budget holds more sequences at 4 bits
        check(kv4 > 2 * fp16, f"KV4 batch {kv4} > 2 x fp16 batch {fp16} in the same KV budget")
    emit_table(table(args, rows), None)
    return check.exit_status()


if __name__ == "__main__":
    sys.exit(main())
