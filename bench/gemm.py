"""W4A8 GEMM: qoqc's tensor-core kernel vs cuBLAS fp16 and cuBLASLt int8, on Llama-3-8B's linears.

    python bench/gemm.py [--arch sm_90] [--m 1,16,...] [--repeats 50] [--out FILE]   (GPU machine)
    python bench/gemm.py --cpu-check                                                  (any machine)

GPU mode, per shape (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336) and M:
fresh random data (never zeros: int8 activations, UINT4 codes, group scales 1..16, zeros that keep
q * s2 - z2 in int8), correctness of ours against a torch float64 evaluation of the same integer
math (psum exact, fp16 output within rounding), then median time of ours, torch fp16 matmul
(cuBLAS) and torch._int_mm (cuBLASLt int8, M > 16) in the same run. Prints a Markdown table and the
issue's summary ratios (ours / cuBLAS fp16 summed over the four shapes, at M <= 64 and M >= 1024).

``--cpu-check`` needs no GPU: each CUDA variant (per channel, g128; sm_80, sm_90; the four shapes)
must compile with nvcc, contain s8 ``mma.sync.aligned.m16n8k32``, and spill no registers; the
kernel's NumPy emulation must equal the reference exactly; the portable llvm kernel's int32
accumulators must equal NumPy. Exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qoq_compiler.layout import mma_channel_position, pack_uint4_mma, to_mma_channel_order  # noqa: E402
from qoq_compiler.tvm_env import tvm  # noqa: E402
from schedules import nvcc, w4a8_gemm, w4a8_gemm_tc  # noqa: E402
from bench.common import Checks, cuda_median_us, emit_table  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
M_VALUES = (1, 16, 32, 64, 128, 256, 512, 1024, 4096, 8192)
GROUPS = {"g128": 128, "per-channel": None}


def random_case(m: int, n: int, k: int, group: int | None, rng: np.random.Generator, codes=None):
    """Kernel arguments (qx, sx, qw, s1, *extra) of random, valid quantized data, and the UINT4 codes."""
    qx = rng.integers(-127, 128, size=(m, k), dtype=np.int8)
    sx = rng.uniform(0.001, 0.05, size=(m, 1)).astype(np.float16)
    codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8) if codes is None else codes
    qw = pack_uint4_mma(codes)
    s1 = rng.uniform(0.0005, 0.005, size=n).astype(np.float16)
    if group is None:
        z = rng.uniform(0, 0.05, size=n).astype(np.float16)
        return (qx, sx, qw, s1, z, qx.sum(axis=1, keepdims=True, dtype=np.int32)), codes
    g = -(-k // group)
    s2 = rng.integers(1, 17, size=(n, g))
    z2 = rng.integers(np.maximum(15 * s2 - 127, -128), 128)         # q * s2 - z2 stays in int8
    s2, z2 = (np.ascontiguousarray(to_mma_channel_order(a.astype(np.int8)).T) for a in (s2, z2))
    return (qx, sx, qw, s1, s2, z2), codes


def cpu_check() -> int:
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
    for m, n, k, group in ((5, 96, 256, 128), (40, 64, 576, 128), (70, 64, 128, None), (130, 128, 256, None)):
        args, _ = random_case(m, n, k, group, rng)
        psum_ref, y_ref = w4a8_gemm.reference(*args, group=group)
        for _, maps in w4a8_gemm_tc.tile_maps(n, k, group):
            psum, y = w4a8_gemm_tc.emulate(maps, *args)
            check((psum == psum_ref).all() and (y == y_ref).all(),
                  f"emulated kernel == reference: M={m} N={n} K={k} group={group} tile={maps.cfg}")
        target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
        lib = tvm.compile(tvm.IRModule({"main": w4a8_gemm.w4a8_gemm(k, n, group)}), target=target)
        outs = [tvm.runtime.tensor(np.zeros((m, n), d)) for d in ("int32", "float16")]
        lib["main"](*[tvm.runtime.tensor(a) for a in args], *outs)
        check((outs[0].numpy() == psum_ref).all(),
              f"portable llvm kernel psum == NumPy: M={m} N={n} K={k} group={group}")
    return check.exit_status()


def gpu_bench(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench/gemm.py: no CUDA GPU (use --cpu-check on a machine without one)", file=sys.stderr)
        return 2
    dev = tvm.cuda(0)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ms = [int(v) for v in args.m.split(",")]
    gpu = torch.cuda.get_device_name()

    rows, failures = [], []
    for gname, group in GROUPS.items():
        for sname, (n, k) in SHAPES.items():
            func = w4a8_gemm_tc.build(n, k, group, args.arch)["w4a8_gemm"]
            w16 = torch.randn(k, n, device="cuda", dtype=torch.float16)
            w8 = torch.randint(-127, 128, (k, n), device="cuda", dtype=torch.int8)
            codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
            for m in ms:
                host, _ = random_case(m, n, k, group, rng, codes)
                tvm_args = [tvm.runtime.tensor(a, device=dev) for a in host]
                y = tvm.runtime.tensor(np.zeros((m, n), np.float16), device=dev)
                func(*tvm_args, y)
                dev.sync()
                y_ref = reference_torch(host, codes, group)
                got = y.numpy().astype(np.float32)
                rel = float(np.linalg.norm(got - y_ref) / np.linalg.norm(y_ref))
                if not rel < 2e-3:
                    failures.append(f"{gname} {sname} M={m}: rel err {rel:.2e}")
                ours = cuda_median_us(lambda: func(*tvm_args, y), args.repeats)
                x16 = torch.randn(m, k, device="cuda", dtype=torch.float16)
                fp16 = cuda_median_us(lambda: torch.matmul(x16, w16), args.repeats)
                int8 = None
                if m > 16 and m % 8 == 0:
                    x8 = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
                    int8 = cuda_median_us(lambda: torch._int_mm(x8, w8), args.repeats)
                rows.append((gname, sname, m, rel, ours, fp16, int8))
                print(f"{gname:11s} {sname:7s} M={m:5d} rel {rel:.1e} ours {ours:9.1f} us  cuBLAS fp16 {fp16:9.1f} us"
                      + (f"  int8 {int8:9.1f} us" if int8 else ""), flush=True)
    lines = [f"Device: {gpu}; {date.today().isoformat()}; torch {torch.__version__}, TVM {tvm.__version__}, "
             f"arch {args.arch}, {platform.node()}.",
             "Command: `python bench/gemm.py " + " ".join(sys.argv[1:]) + "`", "",
             "| weights | shape | M | rel err | qoqc W4A8 µs | cuBLAS fp16 µs | cuBLASLt int8 µs | ours / fp16 |",
             "|---|---|---|---|---|---|---|---|"]
    for gname, sname, m, rel, ours, fp16, int8 in rows:
        lines.append(f"| {gname} | {sname} | {m} | {rel:.1e} | {ours:.1f} | {fp16:.1f} | "
                     f"{f'{int8:.1f}' if int8 else '-'} | {ours / fp16:.2f} |")
    lines.append("")
    for gname in GROUPS:
        for label, sel in (("M <= 64", lambda m: m <= 64), ("M >= 1024", lambda m: m >= 1024)):
            for m in [v for v in ms if sel(v)]:
                ours = sum(r[4] for r in rows if r[0] == gname and r[2] == m)
                fp16 = sum(r[5] for r in rows if r[0] == gname and r[2] == m)
                lines.append(f"- {gname}, {label}, M={m}: ours / cuBLAS fp16 summed over the four shapes = "
                             f"{ours / fp16:.2f}")
    emit_table(lines, args.out)
    if failures:
        print("correctness failures:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


def reference_torch(host, codes, group):
    """float64 evaluation of the kernel's math on the GPU (exact integer products at these sizes)."""
    import torch

    def cuda(a):
        return torch.from_numpy(np.asarray(a, np.float64)).cuda()

    qx, sx, _, s1, *extra = host
    k, n = qx.shape[1], s1.shape[0]
    w = cuda(codes)
    if group is not None:
        pos = mma_channel_position(np.arange(n))
        s2, z2 = (np.repeat(a[:, pos].T, group, axis=1)[:, :k] for a in extra)
        w = w * cuda(s2) - cuda(z2)
    y = (cuda(qx) @ w.T) * cuda(sx) * cuda(s1)
    if group is None:
        z, xsum = extra
        y = y - cuda(z) * cuda(sx) * cuda(xsum)
    return y.float().cpu().numpy()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-check", action="store_true", help="checks that need no GPU; non-zero exit on failure")
    p.add_argument("--arch", default="sm_90", help="CUDA arch of the GPU (sm_80, sm_90)")
    p.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma-separated token counts")
    p.add_argument("--repeats", type=int, default=50, help="timed runs per measurement (median reported)")
    p.add_argument("--out", default=None, help="also write the Markdown table to this file")
    args = p.parse_args()
    return cpu_check() if args.cpu_check else gpu_bench(args)


if __name__ == "__main__":
    sys.exit(main())
