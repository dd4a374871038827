"""KV4 attention: qoqc's paged 4-bit kernels vs torch SDPA on an fp16 cache (decode: bandwidth too).

    python bench/attention.py [--arch sm_90] [--batch 1,16,64,256] [--context 512,2048,8192,32768]
                              [--prefill 512,2048,8192] [--repeats 20] [--out FILE]     (GPU machine)
    python bench/attention.py --cpu-check                                          (any machine)

GPU mode: 32 query heads / 8 KV heads, head_dim 128, one new token per sequence (decode), every
sequence ``context`` tokens long in 16-token pages handed out in shuffled order. Random codes and
(scale, min) (never zeros), correctness of the output against a torch float64 evaluation of the
dequantized cache, then median times of ours and of ``scaled_dot_product_attention`` over fp16 K/V
of the same shape, and our achieved bandwidth (K/V codes + scales read / time) next to a
device-to-device copy measured in the same run. Combinations whose fp16 K/V would not fit in
``--max-gib`` are skipped. Prefill (the tensor-core kernel ``kv4_prefill``): one sequence of
``--prefill`` tokens, all new, causal, vs SDPA causal on fp16 q/K/V, checked against float64 the same way.

``--cpu-check`` needs no GPU: the kernel tests on CPU (tests/test_kv4_attention.py: head_dim 64 and
128, GQA 1, 3, 4, 8, page boundaries, one batch mixing lengths 1 to 2049, against float64;
tests/test_kv4_prefill.py: the tensor-core prefill's emulation) and nvcc compiles of the CUDA
append, split attention, merge and prefill kernels for sm_80 and sm_90 at the head shapes of
``MODELS``, none of which may spill registers. Non-zero exit on any failure.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qoq_compiler.tvm_env import tvm  # noqa: E402
from schedules import pipeline  # noqa: E402
from schedules import kv4_attention as ka  # noqa: E402
from schedules import kv4_prefill as kp  # noqa: E402
from schedules import nvcc  # noqa: E402
from bench.common import Checks, cuda_median_us, emit_table  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
MODELS = {"Llama-3-8B": (HQ, HKV, D), "Llama-2-7B": (32, 32, 128), "Qwen2.5-7B": (28, 4, 128),
          "Qwen2.5-0.5B": (14, 2, 64), "SmolLM2-135M": (9, 3, 64)}  # (query heads, kv heads, head_dim)


def _cuda_kernels(arch: str, hq: int = HQ, hkv: int = HKV, d: int = D, layers: int = 1):
    """The KV4 append (RoPE + quantize + write), split attention and merge kernels for CUDA as one module."""
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    funcs = {"append": ka.kv4_append(layers, hq, hkv, d, 10000.0, {}, "float16", gpu=True),
             "attention": ka.kv4_attention(layers, hq, hkv, d, PAGE, d ** -0.5, "float16", gpu=True),
             "merge": ka.kv4_merge(hq, hkv, d, "float16", gpu=True),
             "prefill": kp.kv4_prefill(layers, hq, hkv, d, PAGE, d ** -0.5)}
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    with target:
        mod = pipeline.schedule(target)(mod)  # the model pipeline's rules
    return tvm.compile(mod, target=target, tir_pipeline=pipeline.TIR_PIPELINE)


def cpu_check() -> int:
    check = Checks()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_kv4_attention.py"),
                           str(ROOT / "tests" / "test_kv4_prefill.py")], cwd=ROOT, capture_output=True, text=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    check(proc.returncode == 0, f"KV4 kernel tests on CPU: {summary}")
    if nvcc.nvcc_path() is None:
        check(False, "nvcc on PATH")
        return check.exit_status()
    for arch in ("sm_80", "sm_90"):
        for model, heads in MODELS.items():
            where = f"{arch} {model} {heads[0]}/{heads[1]} heads, head_dim {heads[2]}"
            try:
                report = nvcc.ptxas_report(nvcc.cuda_source(_cuda_kernels(arch, *heads)), arch)
            except Exception as e:  # noqa: BLE001  (any failure to build is a failed check)
                check(False, f"{where}: {e}")
                continue
            spilling = [r.name for r in report if r.spill_stores or r.spill_loads]
            check(not spilling, f"{where}: {len(report)} kernels compile with nvcc, "
                                + ("no spills" if not spilling else f"spilling: {', '.join(spilling)}")
                                + f" ({', '.join(f'{r.name} {r.registers} regs, {r.shared_bytes} B smem' for r in report)})")
    return check.exit_status()


def gpu_bench(args) -> int:
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("bench/attention.py: no CUDA GPU (use --cpu-check on a machine without one)", file=sys.stderr)
        return 2
    dev = tvm.cuda(0)
    kernels = _cuda_kernels(args.arch)
    workspace = tvm.runtime.tensor(np.zeros(ka.workspace_shape(ka.split_plan(HQ, HKV, D, gpu=True)), np.float32),
                                   device=dev)

    def attention(q, data, param, pos, seq, table, out):  # what one layer of the model runs
        kernels["attention"](q, data, param, pos, seq, table, 0, out, workspace)
        kernels["merge"](out, workspace, pos)
    rng = np.random.default_rng(0)

    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / cuda_median_us(lambda: dst.copy_(src), args.repeats) / 1e3  # read + write, GB/s
    rows, failures = [], []
    for b in [int(v) for v in args.batch.split(",")]:
        for ctx in [int(v) for v in args.context.split(",")]:
            if b * ctx * HKV * D * 2 * 2 > args.max_gib * 2 ** 30:
                print(f"skip batch {b} x context {ctx}: fp16 K/V over {args.max_gib} GiB")
                continue
            pages_per_seq = -(-ctx // PAGE)
            slots = b * pages_per_seq * PAGE
            table = rng.permutation(b * pages_per_seq).reshape(b, pages_per_seq).astype("int32")
            data = rng.integers(0, 256, size=(1, 2, slots, HKV, D // 2), dtype=np.uint8)
            param = np.stack([rng.uniform(0.01, 0.1, size=(1, 2, slots, HKV)),
                              rng.uniform(-0.8, -0.1, size=(1, 2, slots, HKV))], axis=-1).astype(np.float16)
            q = rng.standard_normal((b, HQ, D)).astype(np.float16)
            pos = np.full(b, ctx - 1, "int32")
            seq = np.arange(b, dtype="int32")
            args_tvm = [tvm.runtime.tensor(a, device=dev) for a in (q, data, param, pos, seq, table)]
            out = tvm.runtime.tensor(np.zeros((b, HQ, D), np.float16), device=dev)
            attention(*args_tvm, out)
            dev.sync()
            # float64 reference over the dequantized cache, in sequence order
            codes = torch.from_numpy(data[0]).cuda()
            deq = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(2, slots, HKV, D).double()
            pm = torch.from_numpy(param[0]).cuda().double()
            deq = deq * pm[..., 0:1] + pm[..., 1:2]
            order = torch.from_numpy((table[:, :, None] * PAGE + np.arange(PAGE)).reshape(b, -1)[:, :ctx]).cuda()
            kk, vv = deq[0][order.long()], deq[1][order.long()]             # [b, ctx, Hkv, D]
            kk, vv = (x.repeat_interleave(HQ // HKV, dim=2).permute(0, 2, 1, 3) for x in (kk, vv))
            ref = F.scaled_dot_product_attention(torch.from_numpy(q).cuda().double()[:, :, None], kk, vv)[:, :, 0]
            got = torch.from_numpy(out.numpy()).cuda().double()
            rel = float((got - ref).norm() / ref.norm())
            if not rel < 2e-2:
                failures.append(f"batch {b} context {ctx}: rel err {rel:.2e}")
            ours = cuda_median_us(lambda: attention(*args_tvm, out), args.repeats)
            k16 = torch.randn(b, HKV, ctx, D, device="cuda", dtype=torch.float16)
            v16 = torch.randn_like(k16)
            q16 = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.float16)
            sdpa = cuda_median_us(lambda: F.scaled_dot_product_attention(q16, k16, v16, enable_gqa=True),
                                  args.repeats)
            nbytes = b * ctx * HKV * 2 * (D // 2 + 4)
            rows.append((b, ctx, rel, ours, sdpa, nbytes / ours / 1e3))
            print(f"batch {b:4d} context {ctx:6d} rel {rel:.1e} ours {ours:10.1f} us  SDPA fp16 {sdpa:10.1f} us  "
                  f"{nbytes / ours / 1e3:7.1f} GB/s", flush=True)
            k16 = v16 = None  # free the fp16 cache before the next shape
    prefill_rows = []
    for n in [int(v) for v in args.prefill.split(",") if v]:
        table = rng.permutation(-(-n // PAGE)).reshape(1, -1).astype("int32")
        slots = table.size * PAGE
        data = rng.integers(0, 256, size=(1, 2, slots, HKV, D // 2), dtype=np.uint8)
        param = np.stack([rng.uniform(0.01, 0.1, size=(1, 2, slots, HKV)),
                          rng.uniform(-0.8, -0.1, size=(1, 2, slots, HKV))], axis=-1).astype(np.float16)
        q = rng.standard_normal((n, HQ, D)).astype(np.float16)
        pos, seq = np.arange(n, dtype="int32"), np.zeros(n, "int32")
        args_tvm = [tvm.runtime.tensor(a, device=dev) for a in (q, data, param, pos, seq, table)]
        out = tvm.runtime.tensor(np.zeros((n, HQ, D), np.float16), device=dev)
        kernels["prefill"](*args_tvm, 0, out)
        dev.sync()
        codes = torch.from_numpy(data[0]).cuda()
        deq = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(2, slots, HKV, D).double()
        pm = torch.from_numpy(param[0]).cuda().double()
        deq = deq * pm[..., 0:1] + pm[..., 1:2]
        order = torch.from_numpy((table[:, :, None] * PAGE + np.arange(PAGE)).reshape(-1)[:n]).cuda().long()
        kk, vv = (deq[i][order].repeat_interleave(HQ // HKV, dim=1).permute(1, 0, 2)[None] for i in (0, 1))
        ref = F.scaled_dot_product_attention(torch.from_numpy(q).cuda().double().permute(1, 0, 2)[None], kk, vv,
                                             is_causal=True)[0].permute(1, 0, 2)
        rel = float((torch.from_numpy(out.numpy()).cuda().double() - ref).norm() / ref.norm())
        if not rel < 2e-2:
            failures.append(f"prefill {n}: rel err {rel:.2e}")
        ours = cuda_median_us(lambda: kernels["prefill"](*args_tvm, 0, out), args.repeats)
        q16 = torch.randn(1, HQ, n, D, device="cuda", dtype=torch.float16)
        k16, v16 = (torch.randn(1, HKV, n, D, device="cuda", dtype=torch.float16) for _ in range(2))
        sdpa = cuda_median_us(lambda: F.scaled_dot_product_attention(q16, k16, v16, is_causal=True, enable_gqa=True),
                              args.repeats)
        tflops = 4 * n * n / 2 * HQ * D / ours / 1e6  # causal: half of the QK^T and PV products
        prefill_rows.append((n, rel, ours, sdpa, tflops))
        print(f"prefill {n:6d} rel {rel:.1e} ours {ours:10.1f} us  SDPA fp16 {sdpa:10.1f} us  {tflops:6.1f} TFLOP/s",
              flush=True)
    lines = [f"Device: {torch.cuda.get_device_name()}; {date.today().isoformat()}; torch {torch.__version__}, "
             f"TVM {tvm.__version__}, arch {args.arch}, {platform.node()}. Copy bandwidth (same run): "
             f"{copy_gbs:.0f} GB/s.",
             "Command: `python bench/attention.py " + " ".join(sys.argv[1:]) + "`", "",
             "| batch | context | rel err | qoqc KV4 µs | SDPA fp16 µs | speed-up | KV4 GB/s | % of copy |",
             "|---|---|---|---|---|---|---|---|"]
    for b, ctx, rel, ours, sdpa, gbs in rows:
        lines.append(f"| {b} | {ctx} | {rel:.1e} | {ours:.1f} | {sdpa:.1f} | {sdpa / ours:.2f} | {gbs:.0f} | "
                     f"{100 * gbs / copy_gbs:.0f}% |")
    if prefill_rows:
        lines += ["", "| prefill tokens | rel err | qoqc KV4 tensor-core µs | SDPA fp16 causal µs | speed-up | TFLOP/s |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {rel:.1e} | {ours:.1f} | {sdpa:.1f} | {sdpa / ours:.2f} | {tf:.1f} |"
                  for n, rel, ours, sdpa, tf in prefill_rows]
    emit_table(lines, args.out)
    if failures:
        print("correctness failures:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-check", action="store_true", help="checks that need no GPU; non-zero exit on failure")
    p.add_argument("--arch", default="sm_90", help="CUDA arch of the GPU (sm_80, sm_90)")
    p.add_argument("--batch", default="1,16,64,256")
    p.add_argument("--context", default="512,2048,8192,32768")
    p.add_argument("--prefill", default="512,2048,8192", help="prompt lengths of the prefill rows ('' for none)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (median reported)")
    p.add_argument("--max-gib", type=float, default=40, help="skip combinations whose fp16 K/V exceed this")
    p.add_argument("--out", default=None, help="also write the Markdown table to this file")
    args = p.parse_args()
    return cpu_check() if args.cpu_check else gpu_bench(args)


if __name__ == "__main__":
    sys.exit(main())
