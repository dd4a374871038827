"""Serving throughput by QServe's protocol: qoqc W4A8KV4 (g128, per-channel) vs qoqc FP16 vs transformers.

    python bench/serving.py [--config bench/configs/llama-3-8b.json] [--num-layers N] [--arch sm_90]
                            [--input-len 1024] [--output-len 512] [--kv-memory 0.9] [--schemes A,B,...] [--out FILE]
    python bench/serving.py --cpu-check
    (``bench/gpu_check.py run`` serves artifacts built on a CPU machine the same way: ``serve``)

Each scheme is compiled for cuda from CONFIG alone (``compile(..., random_weights=True)``: speed does
not depend on weight values, QServe benchmarks config-only folders too; nothing of the model's size
is written or quantized, the weights are drawn when the engine loads) and served by
``runtime.bench.throughput``: the largest batch whose KV cache fits the same memory budget
(``--kv-memory``, a fraction of the memory left beside the weights), every sequence ``--input-len``
random tokens in and ``--output-len`` out, time including the batched prefill, 2 warm-up rounds.
The baseline, in the same run: transformers ``generate`` (fp16, SDPA, its dynamic cache) on a model
of the same config initialised on the device, at the FP16 build's batch, halved until it fits in
memory, greedy with EOS ignored, one warm-up. The table gives tokens/s and each row's ratio to the
FP16 build (issue target: W4A8KV4 at least 2x). ``--num-layers`` keeps the config's layer shapes
but fewer of them, to fit a session's GPU time: every engine's step time scales with the layers,
its KV bytes per token too, and so does the batch that fits (with few layers every build may reach
the cap of 256, and the ratio then measures kernels, not memory).

``--cpu-check`` runs every row on llvm with ``bench/configs/tiny-llama.json`` and short sequences
(a pipeline check, not a measurement) and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Checks, emit_table  # noqa: E402
from qoq_compiler.runtime import bench  # noqa: E402

SCHEMES = ("qoq-w4a8kv4-g128", "qoq-w4a8kv4-chn", "fp16")


def config_with_layers(config: Path, num_layers: int | None) -> dict:
    raw = json.loads(Path(config).read_text())
    return {**raw, "num_hidden_layers": num_layers} if num_layers else raw


def hf_throughput(config: dict, batch: int, input_len: int, output_len: int, device: str) -> tuple[int, float]:
    """(batch run, tokens/s) of transformers ``generate`` on a model of ``config`` with random
    weights (initialised on the device); the batch is halved on out-of-memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.float16 if device == "cuda" else torch.float32
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "torch_dtype", "dtype")}
    hf_config = AutoConfig.for_model(config["model_type"], **fields)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa").eval()
    gen = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    while True:
        ids = torch.randint(0, hf_config.vocab_size, (batch, input_len),
                            generator=torch.Generator().manual_seed(0)).to(device)
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


def serve(artifacts: dict, config: dict, device: str, input_len: int, output_len: int, kv_memory, warmup: int,
          progress: bool, report=None) -> list[tuple[str, int, float]]:
    """Rows (engine, batch, tokens/s): every artifact (scheme -> path), then transformers at the FP16
    build's batch. ``report(row)`` is called after each."""
    rows, fp16_batch = [], None
    for name, art in artifacts.items():
        gc.collect()  # the previous engine's weights and KV cache go back before this one sizes its cache
        r = bench.throughput(art, device, input_len, output_len, kv_memory=kv_memory, warmup=warmup,
                             progress=progress)
        rows.append((f"qoqc {name}", r.batch, r.tokens_per_s))
        if report:
            report(rows[-1])
        if name == "fp16":
            fp16_batch = r.batch
    gc.collect()
    batch, tps = hf_throughput(config, fp16_batch or 1, input_len, output_len, device)
    rows.append(("transformers fp16 generate (SDPA)" if device == "cuda" else "transformers fp32 generate",
                 batch, tps))
    if report:
        report(rows[-1])
    return rows


def table(rows, title: str) -> list[str]:
    base = next((t for n, _, t in rows if n == "qoqc fp16"), None)
    lines = [title, "", "| engine | batch | tokens/s | vs qoqc fp16 |", "|---|---|---|---|"]
    for name, batch, tps in rows:
        lines.append(f"| {name} | {batch} | {tps:.1f} | {f'{tps / base:.2f}x' if base else '-'} |")
    return lines


def run(args) -> list[tuple[str, int, float]]:
    from qoq_compiler import compile
    from qoq_compiler.config import QUANT_SCHEMES

    device = "cuda" if args.target == "cuda" else "cpu"
    config = config_with_layers(Path(args.config), args.num_layers)
    with tempfile.TemporaryDirectory(prefix="qoqc-serving-") as tmp:
        config_file = Path(tmp) / "config.json"
        config_file.write_text(json.dumps(config))
        artifacts = {name: compile(config_file, target=args.target, arch=args.arch,
                                   quant=replace(QUANT_SCHEMES[name], passes=None), output=Path(tmp) / name,
                                   progress=not args.quiet, random_weights=True)
                     for name in args.schemes}
        return serve(artifacts, config, device, args.input_len, args.output_len, args.kv_memory, args.warmup,
                     not args.quiet, report=lambda r: print(f"{r[0]}: batch {r[1]}, {r[2]:.1f} tokens/s", flush=True))


def title(args, device_name: str) -> str:
    layers = f", {args.num_layers} layers" if args.num_layers else ""
    return (f"Serving throughput, {Path(args.config).name}{layers} (random weights), {args.input_len} tokens in / "
            f"{args.output_len} out, KV budget {args.kv_memory or 'default'}, {device_name}, {date.today()}")


def main() -> int:
    from qoq_compiler.config import QUANT_SCHEMES

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
        import torch

        emit_table(table(run(args), title(args, torch.cuda.get_device_name())), args.out)
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
    emit_table(table(rows, title(args, "CPU")), None)
    return check.exit_status()


if __name__ == "__main__":
    sys.exit(main())
