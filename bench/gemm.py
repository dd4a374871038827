"""W4A8 GEMM: qoqc's tensor-core kernel vs cuBLAS fp16 and cuBLASLt int8, on Llama-3-8B's linears.

    python bench/gemm.py [--arch sm_90] [--m 1,16,...] [--out FILE]   (GPU machine, TVM's compiler)
    python bench/gemm.py --cpu-check                                   (any machine)
    (``bench/gpu_check.py run`` times the same way with kernels built on a CPU machine)

GPU mode (``measure``), per shape (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down
4096x14336) and weight format: random valid weights (never zeros: UINT4 codes, group scales 1..16,
zeros that keep q * s2 - z2 in int8) drawn and packed once per shape, then for every M fresh int8
activations; ours is checked against a float64 torch evaluation of the same integer math on the
device (psum exact, fp16 output within rounding), its output poisoned with NaN first; then ours,
torch fp16 ``F.linear`` (cuBLAS) and ``torch._int_mm`` (cuBLASLt int8, M > 16) are timed in the
same run by ``common.Timer`` (a CUDA graph of back-to-back launches, L2 flushed per sample, each
operand in enough copies that the launches read it from HBM). Prints a Markdown table and the
issue's summary ratios (ours / cuBLAS fp16 summed over the four shapes, at M <= 64 and M >= 1024).

``--cpu-check`` needs no GPU: each CUDA variant (per channel, g128; sm_80, sm_90; the four shapes)
must compile with nvcc, contain s8 ``mma.sync.aligned.m16n8k32``, and spill no registers; the
kernel's NumPy emulation must equal the reference exactly; the portable llvm kernel's int32
accumulators must equal NumPy. Exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Checks, Timer, copies_for_l2, emit_table, gpu_arch  # noqa: E402
from bench.prebuilt import GROUPS, gemm_symbol  # noqa: E402
from qoq_compiler.layout import mma_channel_position, unpack_uint4_mma  # noqa: E402
from schedules.reference import w4a8_gemm as ref  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
M_VALUES = (1, 16, 64, 256, 1024, 4096)
TOLERANCE = 2e-3  # relative error of the fp16 output against float64


def _effective_weight(weights, n: int, k: int, group: int | None, device: str):
    """float64 [N, K] torch tensor of the integer weights the kernel multiplies: q (per channel)
    or q * s2 - z2 (per group)."""
    import torch

    qw, _, *extra = weights
    w = torch.from_numpy(unpack_uint4_mma(qw, n, k).astype(np.float64)).to(device)
    if group is not None:
        pos = mma_channel_position(np.arange(n))
        s2, z2 = (torch.from_numpy(np.repeat(a[:, pos].T.astype(np.float64), group, axis=1)[:, :k]).to(device)
                  for a in extra)
        w = w * s2 - z2
    return w


def measure(call, n: int, k: int, group: int | None, ms, timer: Timer, device: str, rng, report=None) -> list:
    """Rows (M, rel err, ours µs, cuBLAS fp16 µs, cuBLASLt int8 µs or None) of one shape and format.
    ``call(qx, sx, qw, s1, e0, e1, y)`` runs our kernel on torch tensors; ``report(row)`` is
    called after each M."""
    import torch
    import torch.nn.functional as F

    weights = ref.random_weights(n, k, group, rng)
    w_eff = _effective_weight(weights, n, k, group, device)
    nbytes = sum(a.nbytes for a in weights)
    copies = [[torch.from_numpy(a).to(device) for a in weights] for _ in range(copies_for_l2(nbytes, timer))]
    w16 = [torch.randn(n, k, dtype=torch.float16, device=device) * 0.02
           for _ in range(copies_for_l2(2 * n * k, timer))]
    w8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
          for _ in range(copies_for_l2(n * k, timer))]
    rows = []
    for m in ms:
        qx_np, sx_np = ref.random_activations(m, k, rng)
        qx, sx = torch.from_numpy(qx_np).to(device), torch.from_numpy(sx_np).to(device)
        xsum = qx.sum(dim=1, keepdim=True, dtype=torch.int32)
        y = torch.full((m, n), float("nan"), dtype=torch.float16, device=device)

        def args(w):
            qw, s1, *extra = w
            return (qx, sx, qw, s1, extra[0], xsum) if group is None else (qx, sx, qw, s1, *extra)

        call(*args(copies[0]), y)
        y_ref = (qx.double() @ w_eff.T) * sx.double() * torch.from_numpy(weights[1]).to(device).double()
        if group is None:
            y_ref = y_ref - torch.from_numpy(weights[2]).to(device).double() * sx.double() * xsum.double()
        rel = float((y.double() - y_ref).norm() / y_ref.norm())
        rel = rel if rel == rel else float("inf")  # a NaN left in y is a failure, not a comparison
        cycle = itertools.cycle(copies)
        ours = timer(lambda: call(*args(next(cycle)), y), launches=len(copies))
        x16 = torch.randn(m, k, dtype=torch.float16, device=device)
        c16 = itertools.cycle(w16)
        fp16 = timer(lambda: F.linear(x16, next(c16)), launches=len(w16))
        int8 = None
        if m > 16 and m % 8 == 0:
            x8 = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
            c8 = itertools.cycle(w8)
            int8 = timer(lambda: torch._int_mm(x8, next(c8).t()), launches=len(w8))
        rows.append((m, rel, ours, fp16, int8))
        if report:
            report(rows[-1])
    return rows


def table(rows, header: list[str]) -> list[str]:
    """Markdown of rows (format, shape, M, rel, ours, fp16, int8) and the summary ratios."""
    lines = header + ["| weights | shape | M | rel err | qoqc W4A8 µs | cuBLAS fp16 µs | cuBLASLt int8 µs "
                      "| ours / fp16 |", "|---|---|---|---|---|---|---|---|"]
    for gname, sname, m, rel, ours, fp16, int8 in rows:
        lines.append(f"| {gname} | {sname} | {m} | {rel:.1e} | {ours:.1f} | {fp16:.1f} | "
                     f"{f'{int8:.1f}' if int8 else '-'} | {ours / fp16:.2f} |")
    lines.append("")
    shapes = {r[1] for r in rows}
    for gname in dict.fromkeys(r[0] for r in rows):
        for label, sel in (("M <= 64", lambda m: m <= 64), ("M >= 1024", lambda m: m >= 1024)):
            for m in sorted({r[2] for r in rows if r[0] == gname and sel(r[2])}):
                sel_rows = [r for r in rows if r[0] == gname and r[2] == m]
                if {r[1] for r in sel_rows} != shapes:
                    continue  # a shape cut short: no sum
                ratio = sum(r[4] for r in sel_rows) / sum(r[5] for r in sel_rows)
                lines.append(f"- {gname}, {label}, M={m}: ours / cuBLAS fp16 summed over the {len(shapes)} shapes "
                             f"= {ratio:.2f}")
    return lines


def failures(rows) -> list[str]:
    return [f"{g} {s} M={m}: rel err {rel:.2e}" for g, s, m, rel, *_ in rows if not rel < TOLERANCE]


def cpu_check() -> int:
    from qoq_compiler.tvm_env import tvm
    from schedules import nvcc, w4a8_gemm, w4a8_gemm_tc

    check = Checks()
    if nvcc.nvcc_path() is None:
        check(False, "nvcc on PATH")
    else:
        for arch in ("sm_80", "sm_90"):
            for gname, group in GROUPS.items():
                for sname, (n, k) in SHAPES.items():
                    what = f"{arch} {gname} {sname} {n}x{k}"
                    try:
                        src = nvcc.cuda_source(w4a8_gemm_tc.build(n, k, group, arch))
                        report = nvcc.ptxas_report(src, arch)
                    except Exception as e:  # noqa: BLE001  (any failure to build is a failed check)
                        check(False, f"{what}: {e}")
                        continue
                    check("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in src, f"{what}: s8 mma.sync m16n8k32")
                    spills = [r for r in report if r.spill_stores or r.spill_loads]
                    check(len(report) == len(w4a8_gemm_tc.DEFAULT_TILES) and not spills,
                          f"{what}: {len(report)} kernels, registers "
                          f"{'/'.join(str(r.registers) for r in report)}, no spills")
    rng = np.random.default_rng(0)
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    for m, n, k, group in ((5, 96, 256, 128), (40, 64, 576, 128), (70, 64, 128, None), (130, 128, 256, None)):
        args = ref.kernel_args(*ref.random_activations(m, k, rng), ref.random_weights(n, k, group, rng), group)
        psum_ref, y_ref = ref.reference(*args, group=group)
        for _, maps in w4a8_gemm_tc.tile_maps(n, k, group):
            psum, y = w4a8_gemm_tc.emulate(maps, *args)
            check((psum == psum_ref).all() and (y == y_ref).all(),
                  f"emulated kernel == reference: M={m} N={n} K={k} group={group} tile={maps.cfg}")
        lib = tvm.compile(tvm.IRModule({"main": w4a8_gemm.w4a8_gemm(k, n, group)}), target=target)
        outs = [tvm.runtime.tensor(np.zeros((m, n), d)) for d in ("int32", "float16")]
        lib["main"](*[tvm.runtime.tensor(a) for a in args], *outs)
        check((outs[0].numpy() == psum_ref).all(),
              f"portable llvm kernel psum == NumPy: M={m} N={n} K={k} group={group}")
    return check.exit_status()


def gpu_bench(args) -> int:
    import torch

    from bench.common import load_kernels
    from qoq_compiler.tvm_env import tvm
    from schedules import w4a8_gemm_tc

    if not torch.cuda.is_available():
        print("bench/gemm.py: no CUDA GPU (use --cpu-check on a machine without one)", file=sys.stderr)
        return 2
    target = tvm.target.Target({"kind": "cuda", "arch": args.arch}, host="llvm")
    kernels = load_kernels({gemm_symbol(s, g): w4a8_gemm_tc.tensor_core_gemm(n, k, group)
                            for s, (n, k) in SHAPES.items() for g, group in GROUPS.items()}, target)
    timer, rng, rows = Timer("cuda"), np.random.default_rng(0), []
    header = [f"Device: {torch.cuda.get_device_name()}; {date.today().isoformat()}; torch {torch.__version__}, "
              f"TVM {tvm.__version__}, arch {args.arch}, timing {timer.mode}, {platform.node()}.",
              "Command: `python bench/gemm.py " + " ".join(sys.argv[1:]) + "`", ""]
    for gname, group in GROUPS.items():
        for sname, (n, k) in SHAPES.items():
            def report(row, gname=gname, sname=sname):
                rows.append((gname, sname, *row))
                print(f"{gname:4s} {sname:7s} M={row[0]:5d} rel {row[1]:.1e} ours {row[2]:9.1f} us  "
                      f"fp16 {row[3]:9.1f} us" + (f"  int8 {row[4]:9.1f} us" if row[4] else ""), flush=True)
                if args.out:  # every row measured so far
                    Path(args.out).write_text("\n".join(table(rows, header)) + "\n")
            measure(kernels[gemm_symbol(sname, gname)], n, k, group, [int(v) for v in args.m.split(",")], timer,
                    "cuda", rng, report)
    emit_table(table(rows, header), args.out)
    bad = failures(rows)
    if bad:
        print("correctness failures:\n" + "\n".join(bad), file=sys.stderr)
        return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-check", action="store_true", help="checks that need no GPU; non-zero exit on failure")
    p.add_argument("--arch", default=None, help="CUDA arch to build for (default: this machine's GPU)")
    p.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma-separated token counts")
    p.add_argument("--out", default=None, help="also write the Markdown table to this file")
    args = p.parse_args()
    if args.cpu_check:
        return cpu_check()
    args.arch = args.arch or gpu_arch()
    return gpu_bench(args)


if __name__ == "__main__":
    sys.exit(main())
