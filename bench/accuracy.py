"""Accuracy of the quantization schemes: perplexity of the fake-quantized model (``quant.simulate``).

    python bench/accuracy.py [--model MODEL] [--wikitext-windows N] [--persuasion-windows N]
                             [--calib-samples N] [--rows fp16,w8a8,...] [--out FILE]

Every row is computed on the same tokens: WikiText-2 raw test (the standard "\\n\\n" join of its
rows) and Jane Austen's Persuasion, cut into non-overlapping 2048-token windows as GPTQ/QoQ do
(``runtime.evaluate``), the first N windows of each (all of them by default). Calibration uses
the packaged default text (Pride and Prejudice), never an evaluation text. The simulation equals
the compiled llvm module to ~3e-7 relative logit error with fp32 activations
(``tests/test_qoq_model.py``); the table runs it in fp32 because the compiled CPU module is too
slow for hundreds of thousands of tokens. Prints a Markdown table with the command that made it
(docs/accuracy.md quotes it).
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import time
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qoq_compiler.config import QUANT_SCHEMES  # noqa: E402
from qoq_compiler.formats import RANGE_FLOOR, UINT4_MAX  # noqa: E402
from qoq_compiler.frontend.checkpoint import default_model_path, load_torch_model, open_checkpoint  # noqa: E402
from qoq_compiler.quant.convert import quantize_weight  # noqa: E402
from qoq_compiler.quant.gptq import gptq_codes  # noqa: E402
from qoq_compiler.quant.kv_choice import choose_kv_rotation  # noqa: E402
from qoq_compiler.quant.qoq import quantize_model  # noqa: E402
from qoq_compiler.quant.simulate import simulate  # noqa: E402
from qoq_compiler.runtime.evaluate import log_softmax_nll, wikitext_text  # noqa: E402
from bench.common import emit_table  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SEQ_LEN = 2048


def _g128(**passes):
    s = QUANT_SCHEMES["qoq-w4a8kv4-g128"]
    return replace(s, passes=replace(s.passes, **passes))


@dataclass
class GridWeight:
    """Dequantized values of a weight on an unconstrained grid (a reference point, no kernel reads it)."""

    w: np.ndarray

    def dequantize(self) -> np.ndarray:
        return self.w


def textbook_quantizer(group: int):
    """``quantize_weight`` for 4-bit codes on a textbook asymmetric grid: an fp16 scale and minimum per
    group of ``group`` inputs (GGUF's Q4_1 at 32), min/max ranges, codes by GPTQ. Finer than the
    progressive format (an integer level-2 scale and zero in units of s1) that the W4A8 GEMM reads:
    it measures what that format and the group size cost on a model."""

    def quantize(scheme, w: torch.Tensor, h: torch.Tensor | None = None, **_):
        wd = w.double()
        cols = torch.arange(wd.shape[1]) // group
        groups = [wd[:, j * group:(j + 1) * group] for j in range(int(cols[-1]) + 1)]
        lo = torch.stack([g.amin(1) for g in groups], 1).half().double()
        hi = torch.stack([g.amax(1) for g in groups], 1)
        s = ((hi - lo).clamp(min=RANGE_FLOOR) / UINT4_MAX).half().double()

        def column(values, k):
            j = int(cols[k])
            q = torch.clamp(torch.round((values - lo[:, j]) / s[:, j]), 0, UINT4_MAX)
            return q.to(torch.uint8), q * s[:, j] + lo[:, j]

        codes = torch.from_numpy(gptq_codes(w, h, column)).double()
        return GridWeight((codes * s[:, cols] + lo[:, cols]).numpy())

    return quantize


#: row key -> (label, scheme (None: the float model), quantize activations)
ROWS = {
    "fp16": ("FP16 (float weights)", None, False),
    "w8a8": ("W8A8", QUANT_SCHEMES["w8a8"], True),
    "rtn": ("RTN W4A8KV4 g128", QUANT_SCHEMES["rtn-w4a8kv4"], True),
    "qoq-g128": ("QoQ W4A8KV4 g128", QUANT_SCHEMES["qoq-w4a8kv4-g128"], True),
    "qoq-chn": ("QoQ W4A8KV4 per-channel", QUANT_SCHEMES["qoq-w4a8kv4-chn"], True),
    # the K cache's treatment forced instead of chosen per model (quant.kv_choice)
    "kv-rotated": ("QoQ g128, q/k rotated, no SmoothAttention", _g128(smooth_attn_alpha=None, choose_kv_rotation=False),
                   True),
    "smooth-attn": ("QoQ g128, q/k rotated and SmoothAttention alpha 0.5",
                    _g128(smooth_attn_alpha=0.5, choose_kv_rotation=False), True),
    "smooth-attn-0.25": ("QoQ g128, q/k rotated and SmoothAttention alpha 0.25",
                         _g128(smooth_attn_alpha=0.25, choose_kv_rotation=False), True),
    "no-smooth-down": ("QoQ g128, no SmoothLinear on down_proj", _g128(smooth_down=None), True),
    "no-rotation": ("QoQ g128, no residual/V-O rotation", _g128(rotation=False), True),
    "no-gptq": ("QoQ g128, no GPTQ", _g128(gptq=False), True),
    "no-grid-search": ("QoQ g128, level-2 grid by rounding (no search)", _g128(grid_search=None), True),
    "grid-hessian": ("QoQ g128, level-2 grid by the Hessian's diagonal block", _g128(grid_search="hessian"), True),
    "smooth-search": ("QoQ g128, SmoothLinear (alpha, beta) searched per layer", _g128(smooth_down_search=True),
                      True),
    "sequential": ("QoQ g128, sequential calibration", _g128(sequential=True), True),
    "calib-1024": ("QoQ g128, calibration samples of 1024 tokens", _g128(calib_seq_len=1024), True),
    # the error's parts: 4-bit weights alone, then with 8-bit activations (KV cache in float)
    "g128-w4": ("QoQ g128 weights only (W4A16, float KV)", replace(QUANT_SCHEMES["qoq-w4a8kv4-g128"], kv="float"),
                False),
    "g128-w4a8": ("QoQ g128 W4A8, float KV", replace(QUANT_SCHEMES["qoq-w4a8kv4-g128"], kv="float"), True),
    "kv4": ("KV4 only (float weights and activations), q/k rotated",
            replace(QUANT_SCHEMES["fp16"], kv="int4", kv_rotation=True), False),
    "kv4-no-rot": ("KV4 only, no q/k rotation", replace(QUANT_SCHEMES["fp16"], kv="int4"), False),
    "no-kv-rotation": ("QoQ g128, no q/k rotation, SmoothAttention alpha 0.5",
                       replace(_g128(smooth_attn_alpha=0.5, choose_kv_rotation=False), kv_rotation=False), True),
    "rtn-w4": ("RTN g128 weights only (W4A16, float KV)", replace(QUANT_SCHEMES["rtn-w4a8kv4"], kv="float"), False),
    # SmolLM2's GGUF weights already sit on a 4-bit g32 grid: RTN on that grid shows what the g128 grid costs
    "rtn-g32-w4": ("RTN g32 weights only (W4A16, float KV)",
                   replace(QUANT_SCHEMES["rtn-w4a8kv4"], group=32, kv="float"), False),
    # what the progressive format costs: g128-w4's recipe with GPTQ onto a textbook grid (``QUANTIZERS``)
    "textbook-g128-w4": ("weights only, textbook g128 grid (fp16 scale and minimum; no kernel reads it)",
                         replace(QUANT_SCHEMES["qoq-w4a8kv4-g128"], kv="float"), False),
    "textbook-g32-w4": ("weights only, textbook g32 grid (fp16 scale and minimum; no kernel reads it)",
                        replace(QUANT_SCHEMES["qoq-w4a8kv4-g128"], kv="float"), False),
}
#: rows whose weights another quantizer than their scheme's produces
QUANTIZERS = {"textbook-g128-w4": textbook_quantizer(128), "textbook-g32-w4": textbook_quantizer(32)}
DEFAULT_ROWS = ("fp16,w8a8,rtn,qoq-g128,qoq-chn,kv-rotated,no-kv-rotation,smooth-attn,no-smooth-down,no-rotation,"
                "no-gptq,no-grid-search,g128-w4,g128-w4a8,kv4,kv4-no-rot")


def windows(tokenizer, text: str, limit: int | None) -> list[np.ndarray]:
    ids = np.asarray(tokenizer(text, add_special_tokens=False).input_ids, dtype=np.int64)
    n = len(ids) // SEQ_LEN if limit is None else min(limit, len(ids) // SEQ_LEN)
    return [ids[i * SEQ_LEN:(i + 1) * SEQ_LEN] for i in range(n)]


@torch.no_grad()
def perplexity(model, wins: list[np.ndarray], desc: str) -> float:
    nll = 0.0
    for w in tqdm(wins, desc=desc, unit="window", leave=False):
        logits = model(torch.from_numpy(w)[None]).logits[0].float().numpy()
        nll += float(log_softmax_nll(logits[:-1], w[1:]).sum())
    return math.exp(nll / (len(wins) * (SEQ_LEN - 1)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--wikitext-windows", type=int, default=None, help="first N windows (default: all)")
    p.add_argument("--persuasion-windows", type=int, default=None, help="first N windows (default: all)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration samples of 512 tokens (default 64)")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, from {', '.join(ROWS)}")
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args()

    torch.manual_seed(0)
    path = Path(args.model) if args.model else default_model_path()
    tokenizer = open_checkpoint(path).tokenizer
    texts = {
        "WikiText-2": windows(tokenizer, wikitext_text(DATA / "wikitext-2-raw-v1" / "wiki.test.raw"),
                              args.wikitext_windows),
        "Persuasion": windows(tokenizer, (DATA / "text" / "austen_persuasion.txt").read_text(encoding="utf-8"),
                              args.persuasion_windows),
    }
    base = load_torch_model(path)
    results = []
    for key in args.rows.split(","):
        label, scheme, activations = ROWS[key]
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        if scheme is not None:
            if scheme.passes is not None and args.calib_samples:
                scheme = replace(scheme, passes=replace(scheme.passes, calib_samples=args.calib_samples))
            # the K cache's treatment changes the weights too (SmoothAttention): rows that keep KV in float
            # take the choice their scheme makes with a 4-bit cache
            chosen, _ = choose_kv_rotation(model, tokenizer, replace(scheme, kv="int4") if scheme.passes else scheme)
            scheme = replace(chosen, kv=scheme.kv)
            weights = quantize_model(model, tokenizer, scheme, quantize=QUANTIZERS.get(key, quantize_weight)) \
                if scheme.weights != "float" else None
            simulate(model, scheme, weights, activations=activations)
        t1 = time.perf_counter()
        ppl = {name: perplexity(model, wins, f"{key} {name}") for name, wins in texts.items()}
        results.append((label, ppl, t1 - t0))
        print(f"{label}: " + ", ".join(f"{n} {v:.3f}" for n, v in ppl.items())
              + f"  (quantize {t1 - t0:.0f} s, eval {time.perf_counter() - t1:.0f} s)", flush=True)

    ref = dict(results[0][1]) if results and ROWS[args.rows.split(",")[0]][1] is None else None
    lines = [f"Model: `{path.name}`. Device: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{date.today().isoformat()}.",
             "Command: `python bench/accuracy.py " + " ".join(sys.argv[1:]) + "`",
             "Tokens: " + ", ".join(f"{n} {len(w)} x {SEQ_LEN}" for n, w in texts.items()) + ".", "",
             "| scheme | " + " | ".join(f"{n} ppl" for n in texts) + (" | Δ vs FP16 (WikiText-2)" if ref else "")
             + " | quantize s |",
             "|---|" + "---|" * len(texts) + ("---|" if ref else "") + "---|"]
    for label, ppl, secs in results:
        delta = f" | {100 * (ppl['WikiText-2'] / ref['WikiText-2'] - 1):+.1f}%" if ref else ""
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in ppl.values()) + f"{delta} | {secs:.0f} |")
    emit_table(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
