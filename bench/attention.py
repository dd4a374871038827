"""KV4 attention: qoqc's paged 4-bit kernels vs torch SDPA on an fp16 cache (decode: bandwidth too).

    python bench/attention.py [--arch sm_90] [--batch 1,16,64,256] [--context 512,2048,8192,32768]
                              [--prefill 512,2048,8192] [--out FILE]       (GPU machine, TVM's compiler)
    python bench/attention.py --cpu-check                                  (any machine)
    (``bench/gpu_check.py run`` measures the same way with kernels built on a CPU machine)

Decode (``measure_decode``): 32 query heads / 8 KV heads, head_dim 128, one new token per sequence,
every sequence ``context`` tokens long in 16-token pages handed out in shuffled order. Random
codes and (scale, min) drawn on the device (never zeros); the output, poisoned with NaN first,
is checked against float64 attention over the dequantized cache for a few sequences of each
launch (the first, middle and last: a float64 copy of a whole 256 x 32k batch would not fit);
then ours (split attention + merge, one layer) and ``scaled_dot_product_attention`` over fp16 K/V
of the same shape are timed in the same run (``common.Timer``: a CUDA graph, L2 flushed, caches in
enough copies to be read from HBM), with our achieved bandwidth (codes + scales read / time) next
to a device-to-device copy measured in the same run. Shapes whose fp16 K/V exceed ``--max-gib`` are
skipped. Prefill (``measure_prefill``, the tensor-core kernel ``kv4_prefill``): one sequence of
``--prefill`` tokens, all new, causal, vs SDPA causal on fp16 q/K/V, checked on 64 query rows.
Each row is reported as it is measured.

``--cpu-check`` needs no GPU: the kernel tests on CPU (tests/test_kv4_attention.py: head_dim 64 and
128, GQA 1, 3, 4, 8, page boundaries, one batch mixing lengths 1 to 2049, against float64;
tests/test_kv4_prefill.py: the tensor-core prefill's emulation) and nvcc compiles of the CUDA
append, split attention, merge and prefill kernels for sm_80 and sm_90 at the head shapes of
``MODELS``, none of which may spill registers. Non-zero exit on any failure.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Checks, Timer, copies_for_l2, emit_table, gpu_arch  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
THETA = 500000.0
MODELS = {"Llama-3-8B": (HQ, HKV, D), "Llama-2-7B": (32, 32, 128), "Qwen2.5-7B": (28, 4, 128),
          "Qwen2.5-0.5B": (14, 2, 64), "SmolLM2-135M": (9, 3, 64)}  # (query heads, kv heads, head_dim)
TOLERANCE = 2e-2  # relative error against float64 over the same dequantized cache (fp16 output, exp2)


def kv4_funcs(hq: int, hkv: int, d: int, page: int, layers: int, theta: float, gpu: bool, rotate: bool = True
              ) -> dict:
    """The KV4 kernels one layer of a model runs, as PrimFuncs: q's RoPE (and Hadamard rotation,
    as the *-w4a8kv4 schemes do), append (RoPE [+ rotation] + quantize + write), split attention,
    merge, and on GPUs the tensor-core prefill."""
    from schedules import kv4_attention as ka
    from schedules import kv4_prefill as kp

    funcs = {"kv4_append": ka.kv4_append(layers, hq, hkv, d, theta, {}, "float16", gpu=gpu, rotate=rotate),
             "kv4_attention": ka.kv4_attention(layers, hq, hkv, d, page, d ** -0.5, "float16", gpu=gpu),
             "kv4_merge": ka.kv4_merge(hq, hkv, d, "float16", gpu=gpu)}
    if rotate:
        funcs["rope_q_rotated"] = ka.rope_q_rotated(hq, hkv, d, theta, {}, "float16", gpu=gpu)
    if gpu:
        funcs["kv4_prefill"] = kp.kv4_prefill(layers, hq, hkv, d, page, d ** -0.5)
    return funcs


def workspace_shape(hq: int, hkv: int, d: int, gpu: bool) -> list[int]:
    from schedules import kv4_attention as ka

    return list(ka.workspace_shape(ka.split_plan(hq, hkv, d, gpu=gpu)))


def _random_cache(slots: int, hkv: int, d: int, device: str):
    """(data uint8 [1, 2, slots, Hkv, D/2], param fp16 [1, 2, slots, Hkv, 2]) drawn on the device."""
    import torch

    data = torch.randint(0, 256, (1, 2, slots, hkv, d // 2), dtype=torch.uint8, device=device)
    scale = torch.rand(1, 2, slots, hkv, 1, device=device) * 0.09 + 0.01
    low = -(torch.rand(1, 2, slots, hkv, 1, device=device) * 0.7 + 0.1)
    return data, torch.cat([scale, low], dim=-1).half()


def _dequantized(data, param, slots):
    """float64 [len(slots), Hkv, D] of K (index 0) and V (1) at ``slots``."""
    import torch

    codes = data[0][:, slots]
    codes = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(*codes.shape[:-1], -1).double()
    p = param[0][:, slots].double()
    deq = codes * p[..., :1] + p[..., 1:]
    return deq[0], deq[1]


def _attention64(q, k, v):
    """float64 attention of q [Hq, D] over k, v [J, Hkv, D] (GQA by repetition)."""
    group = q.shape[0] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1).permute(1, 0, 2) for x in (k, v))  # [Hq, J, D]
    s = (q.double()[:, None] @ k.transpose(1, 2))[:, 0] * q.shape[-1] ** -0.5  # [Hq, J]
    return (s.softmax(dim=-1)[:, None] @ v)[:, 0]


def copy_bandwidth(timer: Timer, device: str) -> float:
    """GB/s of a device-to-device copy (bytes read + written)."""
    import torch

    size = (1 << 30) if device == "cuda" else (64 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / timer(lambda: dst.copy_(src), launches=3) / 1e3


def measure_decode(attend, b: int, ctx: int, timer: Timer, device: str, gen, heads=(HQ, HKV, D), page=PAGE):
    """(rel err, ours µs, SDPA µs, KV4 GB/s) of one decode launch over ``b`` sequences of ``ctx``.
    ``attend(q, data, param, positions, token_seq, table, out)`` runs ours on torch tensors."""
    import torch
    import torch.nn.functional as F

    hq, hkv, d = heads
    pages_per_seq = -(-ctx // page)
    slots = b * pages_per_seq * page
    table = torch.randperm(b * pages_per_seq, generator=gen).reshape(b, pages_per_seq).int().to(device)
    caches = [_random_cache(slots, hkv, d, device)]
    nbytes = b * ctx * hkv * 2 * (d // 2 + 4)
    caches += [(x.clone(), y.clone()) for x, y in caches * (copies_for_l2(nbytes, timer) - 1)]
    q = torch.randn(b, hq, d, generator=gen).half().to(device)
    pos = torch.full((b,), ctx - 1, dtype=torch.int32, device=device)
    seq = torch.arange(b, dtype=torch.int32, device=device)
    out = torch.full((b, hq, d), float("nan"), dtype=torch.float16, device=device)
    attend(q, *caches[0], pos, seq, table, out)
    timer.sync()
    err = ref = 0.0
    for i in sorted({0, b // 2, b - 1}):
        j = torch.arange(ctx, device=device)
        k, v = _dequantized(*caches[0], table[i, j // page].long() * page + j % page)
        expected = _attention64(q[i], k, v)
        err += float((out[i].double() - expected).norm() ** 2)
        ref += float(expected.norm() ** 2)
    rel = (err / ref) ** 0.5 if err == err else float("inf")
    cycle = itertools.cycle(caches)
    ours = timer(lambda: attend(q, *next(cycle), pos, seq, table, out), launches=len(caches))
    caches = None
    # one fp16 tensor serves as both K and V (the same bytes read twice as SDPA reads two), so a
    # 256 x 32k batch fits an 80 GB GPU beside the 4-bit caches
    kv16 = [torch.randn(b, hkv, ctx, d, dtype=torch.float16, device=device)
            for _ in range(copies_for_l2(4 * b * ctx * hkv * d, timer))]
    q16 = torch.randn(b, hq, 1, d, dtype=torch.float16, device=device)
    c16 = itertools.cycle(kv16)

    def sdpa_call():
        kv = next(c16)
        F.scaled_dot_product_attention(q16, kv, kv, enable_gqa=True)
    sdpa = timer(sdpa_call, launches=len(kv16))
    return rel, ours, sdpa, nbytes / ours / 1e3


def measure_prefill(prefill, n: int, timer: Timer, device: str, gen, heads=(HQ, HKV, D), page=PAGE):
    """(rel err, ours µs, SDPA causal µs, TFLOP/s) of one causal prefill of ``n`` new tokens.
    ``prefill(q, data, param, positions, token_seq, table, out)`` runs ours on torch tensors."""
    import torch
    import torch.nn.functional as F

    hq, hkv, d = heads
    pages = -(-n // page)
    table = torch.randperm(pages, generator=gen).reshape(1, pages).int().to(device)
    data, param = _random_cache(pages * page, hkv, d, device)
    q = (torch.randn(n, hq, d, generator=gen) * 0.5).half().to(device)
    pos = torch.arange(n, dtype=torch.int32, device=device)
    seq = torch.zeros(n, dtype=torch.int32, device=device)
    out = torch.full((n, hq, d), float("nan"), dtype=torch.float16, device=device)
    prefill(q, data, param, pos, seq, table, out)
    timer.sync()
    rows = sorted({0, n - 1, *torch.randint(0, n, (62,), generator=gen).tolist()})
    j = torch.arange(n, device=device)
    k, v = _dequantized(data, param, table[0, j // page].long() * page + j % page)
    err = ref = 0.0
    for t in rows:
        expected = _attention64(q[t], k[:t + 1], v[:t + 1])
        err += float((out[t].double() - expected).norm() ** 2)
        ref += float(expected.norm() ** 2)
    rel = (err / ref) ** 0.5 if err == err else float("inf")
    ours = timer(lambda: prefill(q, data, param, pos, seq, table, out))
    q16 = torch.randn(1, hq, n, d, dtype=torch.float16, device=device)
    k16, v16 = (torch.randn(1, hkv, n, d, dtype=torch.float16, device=device) for _ in range(2))
    sdpa = timer(lambda: F.scaled_dot_product_attention(q16, k16, v16, is_causal=True, enable_gqa=True))
    return rel, ours, sdpa, 4 * n * n / 2 * hq * d / ours / 1e6  # causal: half of QK^T and PV


def decode_table(rows, copy_gbs: float, header: list[str]) -> list[str]:
    lines = header + [f"Copy bandwidth (same run): {copy_gbs:.0f} GB/s.", "",
                      "| batch | context | rel err | qoqc KV4 µs | SDPA fp16 µs | speed-up | KV4 GB/s | % of copy |",
                      "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {b} | {ctx} | {rel:.1e} | {ours:.1f} | {sdpa:.1f} | {sdpa / ours:.2f} | {gbs:.1f} | "
              f"{100 * gbs / copy_gbs:.0f}% |" for b, ctx, rel, ours, sdpa, gbs in rows]
    return lines


def prefill_table(rows) -> list[str]:
    lines = ["| prefill tokens | rel err | qoqc KV4 tensor-core µs | SDPA fp16 causal µs | speed-up | TFLOP/s |",
             "|---|---|---|---|---|---|"]
    return lines + [f"| {n} | {rel:.1e} | {ours:.1f} | {sdpa:.1f} | {sdpa / ours:.2f} | {tf:.1f} |"
                    for n, rel, ours, sdpa, tf in rows]


def cpu_check() -> int:
    from qoq_compiler.tvm_env import tvm
    from schedules import nvcc, pipeline

    check = Checks()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_kv4_attention.py"),
                           str(ROOT / "tests" / "test_kv4_prefill.py")], cwd=ROOT, capture_output=True, text=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    check(proc.returncode == 0, f"KV4 kernel tests on CPU: {summary}")
    if nvcc.nvcc_path() is None:
        check(False, "nvcc on PATH")
        return check.exit_status()
    for arch in ("sm_80", "sm_90"):
        target = tvm.target.Target({"kind": "cuda", "arch": arch})
        for model, (hq, hkv, d) in MODELS.items():
            where = f"{arch} {model} {hq}/{hkv} heads, head_dim {d}"
            try:
                mod = tvm.IRModule({name: f.with_attr("global_symbol", name)
                                    for name, f in kv4_funcs(hq, hkv, d, PAGE, 1, THETA, gpu=True).items()})
                with target:
                    mod = pipeline.schedule(target)(mod)
                ex = tvm.compile(mod, target=target, tir_pipeline=pipeline.TIR_PIPELINE)
                report = nvcc.ptxas_report(nvcc.cuda_source(ex), arch)
            except Exception as e:  # noqa: BLE001  (any failure to build is a failed check)
                check(False, f"{where}: {e}")
                continue
            spilling = [r.name for r in report if r.spill_stores or r.spill_loads]
            used = ", ".join(f"{r.name} {r.registers} regs, {r.shared_bytes} B smem" for r in report)
            check(not spilling, f"{where}: {len(report)} kernels compile with nvcc, "
                                + ("no spills" if not spilling else f"spilling: {', '.join(spilling)}") + f" ({used})")
    return check.exit_status()


def gpu_bench(args) -> int:
    import torch

    from bench.common import load_kernels
    from qoq_compiler.tvm_env import tvm

    if not torch.cuda.is_available():
        print("bench/attention.py: no CUDA GPU (use --cpu-check on a machine without one)", file=sys.stderr)
        return 2
    target = tvm.target.Target({"kind": "cuda", "arch": args.arch}, host="llvm")
    kernels = load_kernels(kv4_funcs(HQ, HKV, D, PAGE, 1, THETA, gpu=True), target)
    workspace = torch.zeros(workspace_shape(HQ, HKV, D, gpu=True), dtype=torch.float32, device="cuda")

    def attend(q, data, param, pos, seq, table, out):  # what one layer of the model runs
        kernels["kv4_attention"](q, data, param, pos, seq, table, 0, out, workspace)
        kernels["kv4_merge"](out, workspace, pos)

    def prefill(q, data, param, pos, seq, table, out):
        kernels["kv4_prefill"](q, data, param, pos, seq, table, 0, out)

    timer, gen = Timer("cuda"), torch.Generator().manual_seed(0)
    copy_gbs = copy_bandwidth(timer, "cuda")
    rows, prefill_rows = [], []
    header = [f"Device: {torch.cuda.get_device_name()}; {date.today().isoformat()}; torch {torch.__version__}, "
              f"TVM {tvm.__version__}, arch {args.arch}, timing {timer.mode}, {platform.node()}.",
              "Command: `python bench/attention.py " + " ".join(sys.argv[1:]) + "`"]

    def lines():
        return decode_table(rows, copy_gbs, header) + ([""] + prefill_table(prefill_rows) if prefill_rows else [])

    def write():  # --out holds every row measured so far
        if args.out:
            Path(args.out).write_text("\n".join(lines()) + "\n")
    for b in [int(v) for v in args.batch.split(",")]:
        for ctx in [int(v) for v in args.context.split(",")]:
            if b * ctx * HKV * D * 2 * 2 > args.max_gib * 2 ** 30:
                print(f"skip batch {b} x context {ctx}: fp16 K/V over {args.max_gib} GiB")
                continue
            rows.append((b, ctx, *measure_decode(attend, b, ctx, timer, "cuda", gen)))
            write()
            print(f"batch {b:4d} context {ctx:6d} rel {rows[-1][2]:.1e} ours {rows[-1][3]:10.1f} us  "
                  f"SDPA fp16 {rows[-1][4]:10.1f} us  {rows[-1][5]:7.1f} GB/s", flush=True)
    for n in [int(v) for v in args.prefill.split(",") if v]:
        prefill_rows.append((n, *measure_prefill(prefill, n, timer, "cuda", gen)))
        write()
        print(f"prefill {n:6d} rel {prefill_rows[-1][1]:.1e} ours {prefill_rows[-1][2]:10.1f} us  "
              f"SDPA fp16 {prefill_rows[-1][3]:10.1f} us", flush=True)
    emit_table(lines(), args.out)
    bad = [f"batch {r[0]} context {r[1]}: rel err {r[2]:.2e}" for r in rows if not r[2] < TOLERANCE]
    bad += [f"prefill {r[0]}: rel err {r[1]:.2e}" for r in prefill_rows if not r[1] < TOLERANCE]
    if bad:
        print("correctness failures:\n" + "\n".join(bad), file=sys.stderr)
        return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-check", action="store_true", help="checks that need no GPU; non-zero exit on failure")
    p.add_argument("--arch", default=None, help="CUDA arch to build for (default: this machine's GPU)")
    p.add_argument("--batch", default="1,16,64,256")
    p.add_argument("--context", default="512,2048,8192,32768")
    p.add_argument("--prefill", default="512,2048,8192", help="prompt lengths of the prefill rows ('' for none)")
    p.add_argument("--max-gib", type=float, default=40, help="skip combinations whose fp16 K/V exceed this")
    p.add_argument("--out", default=None, help="also write the Markdown table to this file")
    args = p.parse_args()
    if args.cpu_check:
        return cpu_check()
    args.arch = args.arch or gpu_arch()
    return gpu_bench(args)


if __name__ == "__main__":
    sys.exit(main())
