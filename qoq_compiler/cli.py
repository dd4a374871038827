"""The ``qoqc`` command line: ``compile``, ``chat``, ``eval``, ``bench`` and ``serve``.

Every ``QoqcError`` (bad model, target, artifact, prompt) is printed as one line
``qoqc: error: ...`` with exit status 2; no traceback for input the user can fix.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from dataclasses import replace

from . import __version__
from .config import DEFAULT_SCHEME, QUANT_SCHEMES, QuantScheme
from .errors import QoqcError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qoqc", description="Compile and serve quantized LLMs with TVM.")
    p.add_argument("--version", action="version", version=f"qoqc {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a Hugging Face model into a deployable artifact")
    c.add_argument("model", nargs="?", default=None,
                   help="HF model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    c.add_argument("--target", default="llvm", help="llvm or cuda (default: llvm)")
    c.add_argument("--arch", default=None,
                   help="cuda: GPU archs to compile device code for, comma-separated (default sm_80,sm_89,sm_90; "
                        "PTX of the newest is added for later GPUs); llvm: an LLVM CPU name (default: this CPU)")
    c.add_argument("--quant", default=DEFAULT_SCHEME,
                   help=f"quantization scheme: {', '.join(QUANT_SCHEMES)} (default: {DEFAULT_SCHEME})")
    c.add_argument("-o", "--output", default=None, help="artifact directory (default: dist/NAME-QUANT-TARGET)")
    c.add_argument("--dump-ir", action="store_true", help="write the IR after each phase to OUT/ir/NN-PHASE.py")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--verbose", action="store_true", help="print the kernel chosen for each QoQ op")
    c.add_argument("--allow-portable-kernels", action="store_true",
                   help="cuda: run W4A8 linears of shapes the tensor-core GEMM does not take on the portable "
                        "kernel (an order of magnitude slower) instead of failing")
    c.add_argument("--kv-page-size", type=int, default=None,
                   help="tokens per page of the 4-bit KV cache (*-w4a8kv4 schemes; default 16)")
    c.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="shard the model over N devices: each one's weights in its own files, served by N "
                        "Disco workers (default: 1)")
    _pass_options(c)

    ch = sub.add_parser("chat", help="chat with a compiled artifact")
    ch.add_argument("artifact", help="artifact directory written by 'qoqc compile'")
    ch.add_argument("--device", default=None, help="cpu or cuda (default: the artifact's target)")
    ch.add_argument("--prompt", default=None, help="answer this one message and exit")
    ch.add_argument("--system", default=None, help="system message")
    ch.add_argument("--temperature", type=float, default=0.7)
    ch.add_argument("--top-p", type=float, default=0.95)
    ch.add_argument("--max-new-tokens", type=int, default=512)
    ch.add_argument("--seed", type=int, default=None)
    ch.add_argument("--kv-memory", default=None,
                    help="KV-cache size: bytes (4GiB, 512MB) or a fraction of free device memory (0.5); "
                         "default: the model's context window, at most 8192 tokens")
    ev = sub.add_parser("eval", help="perplexity of an artifact (or a model, compiled first) on a text")
    ev.add_argument("model", help="artifact directory, or a model directory / .gguf to compile first")
    ev.add_argument("--text", required=True, help="UTF-8 text file to score")
    ev.add_argument("--wikitext", action="store_true",
                    help="the file is wiki.test.raw: score the standard \"\\n\\n\".join(rows) string")
    ev.add_argument("--seq-len", type=int, default=2048, help="window length in tokens (default: 2048)")
    ev.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: the artifact's target)")
    ev.add_argument("--target", default="llvm", help="when compiling a model first: llvm or cuda")
    ev.add_argument("--quant", default=DEFAULT_SCHEME,
                    help=f"when compiling a model first: the quantization scheme (default: {DEFAULT_SCHEME})")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    _pass_options(ev)

    b = sub.add_parser("bench", help="serving throughput (QServe's protocol) or batch-1 latency of an artifact",
                       description="Throughput: BATCH sequences of --input-len random tokens each generate "
                       "--output-len tokens, prefill included in the time, after warm-up rounds; BATCH is the "
                       "largest that fits the KV memory (at most 256) unless --batch is given. The last line "
                       "states tokens/s.")
    b.add_argument("artifact", nargs="?", default=None, help="artifact directory written by 'qoqc compile'")
    b.add_argument("--config-only", metavar="CONFIG.json", default=None,
                   help="instead of an artifact: compile this Hugging Face config with random weights, drawn "
                        "at load (speed does not depend on the weights; no quantization or calibration runs)")
    b.add_argument("--target", default="llvm", help="--config-only: llvm or cuda (default: llvm)")
    b.add_argument("--arch", default=None, help="--config-only: the target's arch, as for compile")
    b.add_argument("--quant", default=DEFAULT_SCHEME,
                   help=f"--config-only: {', '.join(QUANT_SCHEMES)} (default: {DEFAULT_SCHEME})")
    b.add_argument("--device", default=None, help="cpu or cuda (default: the artifact's target)")
    b.add_argument("--input-len", type=int, default=1024, help="prompt tokens per sequence (default: 1024)")
    b.add_argument("--output-len", type=int, default=512, help="generated tokens per sequence (default: 512)")
    b.add_argument("--batch", type=int, default=None, help="sequences served together (default: the most that fit)")
    b.add_argument("--kv-memory", default=None,
                   help="KV-cache budget: bytes (40GiB) or a fraction of the free memory beside the weights "
                        "(default: 0.9 on cuda, 4GiB on cpu)")
    b.add_argument("--latency", action="store_true", help="batch 1: time to first token and decode tokens/s")
    b.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 2; latency: 1)")
    b.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 1; latency: 3)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    s = sub.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API (needs qoqc[serve])")
    s.add_argument("artifact", help="artifact directory written by 'qoqc compile'")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: the artifact's target)")
    s.add_argument("--kv-memory", default=None,
                   help="KV-cache size: bytes (40GiB) or a fraction of free device memory (0.9); default: the "
                        "model's context window, at most 8192 tokens")
    s.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together (default: 32)")
    s.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a place in the batch; more get HTTP 429 (default: 256)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $QOQC_API_KEY, else none)")
    s.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the directory's)")
    s.add_argument("--log-level", default="info", help="uvicorn's log level (default: info)")
    return p


def _pass_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("QoQ passes (qoq-* schemes)")
    g.add_argument("--kv-rotation", choices=("auto", "on", "off"), default=None,
                   help="the 4-bit K cache: q/k Hadamard-rotated after RoPE without SmoothAttention (on), "
                        "not rotated with SmoothAttention (off), or whichever gives the lower calibration "
                        "loss (auto, the default)")
    g.add_argument("--smooth-attn-alpha", type=float, default=None,
                   help="SmoothAttention exponent, lambda = max|K|^alpha, when K is not rotated (default 0.5)")
    g.add_argument("--no-rotation", action="store_true", help="skip the Hadamard rotations")
    g.add_argument("--no-gptq", action="store_true", help="round-to-nearest 4-bit codes instead of GPTQ")
    g.add_argument("--calib-text", default=None,
                   help="calibration text file or directory of *.txt (default: the packaged public-domain novel)")
    g.add_argument("--calib-samples", type=int, default=None, help="calibration samples (default 64)")
    g.add_argument("--calib-seq-len", type=int, default=None, help="tokens per calibration sample (default 512)")


def _scheme(args) -> QuantScheme:
    """The --quant scheme with the pass options applied; pass options on other schemes are an error."""
    if args.quant not in QUANT_SCHEMES:
        raise QoqcError(f"invalid quant scheme {args.quant!r} (choose from {', '.join(QUANT_SCHEMES)})")
    scheme = QUANT_SCHEMES[args.quant]
    changes, flags = {}, []
    if args.smooth_attn_alpha is not None:
        if not 0 <= args.smooth_attn_alpha <= 1:
            raise QoqcError(f"--smooth-attn-alpha {args.smooth_attn_alpha} must lie in [0, 1]")
        changes["smooth_attn_alpha"] = args.smooth_attn_alpha
        flags.append("--smooth-attn-alpha")
    if args.kv_rotation in ("on", "off"):
        changes["choose_kv_rotation"] = False
        flags.append("--kv-rotation")
        if args.kv_rotation == "on" and args.smooth_attn_alpha is None:
            changes["smooth_attn_alpha"] = None
        scheme = replace(scheme, kv_rotation=args.kv_rotation == "on")
    for flag, field, value in (("no_rotation", "rotation", False),
                               ("no_gptq", "gptq", False)):
        if getattr(args, flag):
            changes[field] = value
            flags.append("--" + flag.replace("_", "-"))
    for name in ("calib_text", "calib_samples", "calib_seq_len"):
        value = getattr(args, name)
        if value is not None:
            if name != "calib_text" and value < 1:
                raise QoqcError(f"--{name.replace('_', '-')} must be at least 1")
            changes[name] = value
            flags.append("--" + name.replace("_", "-"))
    if not changes:
        return scheme
    if scheme.passes is None:
        raise QoqcError(f"{', '.join(flags)}: options of the qoq-* schemes; --quant {scheme.name} runs no "
                        "calibration passes")
    return replace(scheme, passes=replace(scheme.passes, **changes))


def _evaluate(args) -> None:
    import tempfile
    from pathlib import Path

    from .runtime.artifact import MANIFEST, read_manifest
    from .runtime.engine import load
    from .runtime.evaluate import perplexity, wikitext_text

    text_file = Path(args.text)
    if not text_file.is_file():
        raise QoqcError(f"text file does not exist: {text_file}")
    text = wikitext_text(text_file) if args.wikitext else text_file.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="qoqc-eval-") as tmp:
        art = Path(args.model)
        if not (art / MANIFEST).is_file():
            from .compiler import compile as compile_model

            art = compile_model(art, target=args.target, quant=_scheme(args), output=Path(tmp) / "artifact",
                                progress=not args.quiet)
        kind = read_manifest(art, verify=False)["target"]["kind"]
        with load(art, device=args.device or ("cuda" if kind == "cuda" else "cpu"), max_total_tokens=args.seq_len,
                  prefill_chunk_size=args.seq_len) as engine:
            r = perplexity(engine, text, args.seq_len, args.max_tokens, progress=not args.quiet)
    print(f"windows: {r.windows} x {args.seq_len} tokens ({r.scored_tokens} scored of {r.total_tokens})")
    print(f"perplexity: {r.perplexity:.4f}")


def _bench(args) -> None:
    import tempfile
    from pathlib import Path

    from .runtime import bench
    from .runtime.artifact import read_manifest

    if (args.artifact is None) == (args.config_only is None):
        raise QoqcError("give either an ARTIFACT or --config-only CONFIG.json")
    for name in ("warmup", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < (0 if name == "warmup" else 1):
            raise QoqcError(f"--{name} must be at least {0 if name == 'warmup' else 1}")
    with tempfile.TemporaryDirectory(prefix="qoqc-bench-") as tmp:
        if args.config_only is not None:
            from .compiler import compile as compile_model

            if args.quant not in QUANT_SCHEMES:
                raise QoqcError(f"invalid quant scheme {args.quant!r} (choose from {', '.join(QUANT_SCHEMES)})")
            scheme = replace(QUANT_SCHEMES[args.quant], passes=None)
            art = compile_model(args.config_only, target=args.target, quant=scheme, output=Path(tmp) / "artifact",
                                arch=args.arch, progress=not args.quiet, random_weights=True)
        else:
            art = Path(args.artifact)
        manifest = read_manifest(art, verify=False)
        device = args.device or ("cuda" if manifest["target"]["kind"] == "cuda" else "cpu")
        source = f"{args.config_only} (random weights)" if args.config_only else manifest.get("source", art)
        what = f"{source} {manifest.get('quant', '')} on {device}"
        if args.latency:
            r = bench.latency(art, device, args.input_len, args.output_len,
                              1 if args.warmup is None else args.warmup, args.repeats or 3, args.seed,
                              not args.quiet)
            print(f"{what}: batch 1, {r.input_len} tokens in, {r.output_len} out")
            print(f"time to first token: {r.ttft_seconds * 1e3:.1f} ms")
            print(f"decode: {r.decode_tokens_per_s:.1f} tokens/s")
        else:
            r = bench.throughput(art, device, args.input_len, args.output_len, args.batch, args.kv_memory,
                                 2 if args.warmup is None else args.warmup, args.repeats or 1, args.seed,
                                 not args.quiet)
            print(f"{what}: batch {r.batch}, {r.input_len} tokens in, {r.output_len} out, "
                  f"KV cache {r.cache_tokens} tokens")
            print(f"prefill {r.prefill_seconds:.3f} s, decode {r.decode_seconds:.3f} s")
            print(f"throughput: {r.tokens_per_s:.1f} tokens/s")


def _terminate(signum, frame):
    from .runtime.artifact import stop_requested

    stop_requested.set()
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: partial artifacts and KV pages are cleaned up


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return _run(args)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _run(args) -> int:
    try:
        if args.command == "compile":
            from .compiler import compile as compile_model

            out = compile_model(args.model, target=args.target, quant=_scheme(args), output=args.output,
                                arch=args.arch, dump_ir=args.dump_ir, progress=not args.quiet,
                                kv_page_size=args.kv_page_size, verbose=args.verbose,
                                allow_portable_kernels=args.allow_portable_kernels,
                                tensor_parallel=args.tensor_parallel)
            print(out)
        elif args.command == "eval":
            _evaluate(args)
        elif args.command == "bench":
            _bench(args)
        elif args.command == "serve":
            import os

            from .runtime.server import serve

            serve(args.artifact, args.host, args.port, args.device, args.kv_memory, args.max_batch_size,
                  args.max_queue, args.api_key or os.environ.get("QOQC_API_KEY"), args.served_model_name,
                  args.log_level)
        else:
            from .runtime.chat import run_chat

            run_chat(args)
    except QoqcError as e:
        print(f"qoqc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qoqc: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
