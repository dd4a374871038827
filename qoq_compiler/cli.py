"""The ``qoqc`` command line: ``compile`` and ``chat``.

Every ``QoqcError`` (bad model, target, artifact, prompt) is printed as one line
``qoqc: error: ...`` with exit status 2; no traceback for input the user can fix.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
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
                   help="cuda: sm_80, sm_89 or sm_90 (default sm_80); llvm: an LLVM CPU name (default: this CPU)")
    c.add_argument("--quant", default="fp16", help="quantization scheme: fp16 or fp32 (default: fp16)")
    c.add_argument("-o", "--output", default=None, help="artifact directory (default: dist/NAME-QUANT-TARGET)")
    c.add_argument("--dump-ir", action="store_true", help="write the Relax IR before/after the pipeline to OUT/ir/")
    c.add_argument("--quiet", action="store_true", help="no progress bars")

    ch = sub.add_parser("chat", help="chat with a compiled artifact")
    ch.add_argument("artifact", help="artifact directory written by 'qoqc compile'")
    ch.add_argument("--device", default=None, help="cpu or cuda (default: the artifact's target)")
    ch.add_argument("--prompt", default=None, help="answer this one message and exit")
    ch.add_argument("--system", default=None, help="system message")
    ch.add_argument("--temperature", type=float, default=0.7)
    ch.add_argument("--top-p", type=float, default=0.95)
    ch.add_argument("--max-new-tokens", type=int, default=512)
    ch.add_argument("--seed", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "compile":
            from .compiler import compile as compile_model

            out = compile_model(args.model, target=args.target, quant=args.quant, output=args.output,
                                arch=args.arch, dump_ir=args.dump_ir, progress=not args.quiet)
            print(out)
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
