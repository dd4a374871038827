"""The GPU check in one command: everything built on a CPU machine, run on a GPU machine in one call.

    python bench/gpu_check.py prepare DIR [--tiny] [--arch sm_80,sm_89,sm_90] [--layers 4]
                                          [--stories PATH] [--no-runtime]           (CPU machine)
    python bench/gpu_check.py run DIR [--out OUT] [--budget 420] [--stages lane,gemm,attention,serving]
                                      [--dry-run]                                   (GPU machine)

``prepare`` (needs TVM's compiler and nvcc, no GPU) writes DIR (``bench/prebuilt.py`` describes
it): every CUDA kernel at Llama-3-8B shapes in one module of device code; the e2e models (a random
tiny Llama whose every linear and prefill take the tensor-core kernels, in W4A8KV4; stories260K in
fp16 and W4A8KV4 when ``--stories`` or the shared data has it) as CUDA artifacts, with the greedy
tokens of their llvm builds; Llama-3-8B-shaped serving artifacts of ``--layers`` layers for
W4A8KV4 g128 / per-channel and FP16 whose weights are drawn at load rather than carried; TVM's
runtime without its compiler library and the apache-tvm-ffi cp312 wheel. It reports DIR's size
(a device call carries 64 MiB at most). ``--tiny`` builds the same at toy shapes, plus llvm
stand-ins of every kernel and artifact, and packs no runtime unless asked: a pipeline check.

``run`` needs only DIR, the project tree, Python 3.12 with torch, numpy and safetensors: without an
importable TVM it installs the runtime from DIR into ``$TMPDIR/qoqc-site`` and restarts itself with
``TVM_USE_RUNTIME_LIB=1``. Stages, each a subprocess under its own time limit inside ``--budget``
seconds, each writing OUT/STAGE.md as it goes (a stage cut short keeps what it measured):
    lane       pytest tests/gpu: every kernel against its NumPy reference on fresh random data, and
               the e2e artifacts' greedy tokens against their llvm builds' (correctness first)
    gemm       ``bench/gemm.py``'s measurement: 4 shapes x M in {1, 16, 64, 256, 1024, 4096}, g128
               and per channel, vs torch fp16 ``F.linear`` and ``torch._int_mm``
    attention  ``bench/attention.py``'s: decode at batch {1, 16, 64, 256} x context {512, 2048,
               8192, 32768} vs SDPA fp16 and a device copy's bandwidth; prefill at 512/2048/8192
    serving    ``bench/serving.py``'s: QServe's protocol (1024 in / 512 out, the largest batch in
               90% of the memory beside the weights), W4A8KV4 g128 and per channel vs the FP16
               build vs transformers ``generate``
OUT/summary.md then holds every table with the device, date and command, for bench/RESULTS.md.
``--dry-run`` runs every stage on a CPU against the llvm stand-ins of a ``--tiny`` DIR: the GPU
command is known to parse, import and produce its tables before a GPU sees it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.prebuilt import GROUPS, PREPARED, Prebuilt, act_symbol, gemm_symbol  # noqa: E402

STAGES = ("lane", "gemm", "attention", "serving")
#: seconds each stage may take at most (scaled down to fit the budget)
STAGE_LIMITS = {"lane": 120, "gemm": 90, "attention": 90, "serving": 150}
FFI_VERSION = "0.1.14.post1"
#: parts of the apache-tvm package a runtime-only install leaves out (the compiler library is 92% of it)
RUNTIME_EXCLUDE = ("lib/libtvm_compiler.so", "3rdparty", "web", "src", "include", "lib64")

FULL = {
    "gemm": {"shapes": {"qkv": [6144, 4096], "o": [4096, 4096], "gate_up": [28672, 4096], "down": [4096, 14336]},
             "m": [1, 16, 64, 256, 1024, 4096], "lane_m": [1, 37, 200, 300]},
    "attention": {"heads": [32, 8, 128], "page": 16, "layers": 1, "theta": 500000.0, "kv_rotation": True,
                  "batch": [1, 16, 64, 256], "context": [512, 2048, 8192, 32768], "prefill": [512, 2048, 8192]},
    "act_quant": {"k": 4096, "silu_k": 14336, "eps": 1e-5},
    "argmax": {"vocab": 128256},
    "serving": {"config": "llama-3-8b.json", "input_len": 1024, "output_len": 512, "kv_memory": 0.9, "warmup": 1},
}
TINY = {
    "gemm": {"shapes": {"qkv": [192, 128], "o": [128, 128], "gate_up": [512, 128], "down": [128, 256]},
             "m": [1, 16, 64], "lane_m": [1, 37, 200, 300]},
    "attention": {"heads": [8, 2, 64], "page": 16, "layers": 1, "theta": 10000.0, "kv_rotation": True,
                  "batch": [1, 4], "context": [64, 300], "prefill": [64, 200]},
    "act_quant": {"k": 256, "silu_k": 512, "eps": 1e-5},
    "argmax": {"vocab": 1000},
    "serving": {"config": "tiny-llama.json", "input_len": 32, "output_len": 8, "kv_memory": "512KiB", "warmup": 1},
}
#: the e2e model whose every linear (K % 32 == 0, groups of 128) and prefill (head_dim 64) take the
#: tensor-core kernels on CUDA
TC_LLAMA = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
                eos_token_id=2, tie_word_embeddings=False, rope_theta=10000.0)
E2E_PROMPT = [1, 45, 300, 17, 99, 260, 4, 511, 128, 77, 300, 12, 5, 6, 400, 33]
E2E_NEW_TOKENS = 24
DATA = Path(os.environ.get("QOQC_SHARED_DATA", ROOT.parent / "shared" / "data"))


# ---------------------------------------------------------------------------------------------- prepare
def _kernel_funcs(spec: dict, gpu: bool) -> dict:
    """Every kernel of the check as PrimFuncs, under the symbols ``bench.prebuilt`` names."""
    from bench.attention import kv4_funcs
    from schedules import act_quant, argmax, w4a8_gemm, w4a8_gemm_tc

    funcs = {}
    for shape, (n, k) in spec["gemm"]["shapes"].items():
        for gname, group in GROUPS.items():
            funcs[gemm_symbol(shape, gname)] = (w4a8_gemm_tc.tensor_core_gemm(n, k, group) if gpu
                                                else w4a8_gemm.w4a8_gemm(k, n, group))
    hq, hkv, d = spec["attention"]["heads"]
    attn = spec["attention"]
    funcs.update(kv4_funcs(hq, hkv, d, attn["page"], attn["layers"], attn["theta"], gpu, attn["kv_rotation"]))
    act = spec["act_quant"]
    for kind in ("quantize", "rmsnorm", "add_rmsnorm", "silu_mul"):
        k = act["silu_k"] if kind == "silu_mul" else act["k"]
        funcs[act_symbol(kind)] = act_quant.act_quant(kind, k, "float16", gpu=gpu, eps=act["eps"])
    funcs["argmax"] = argmax.argmax(spec["argmax"]["vocab"], gpu=gpu)
    return funcs


def _tc_llama(path: Path) -> Path:
    """A random Llama (weights N(0, 0.15), norms 1 + N(0, 0.1)) of ``TC_LLAMA``, saved to ``path``."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TC_LLAMA)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def _greedy_reference(art: Path, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of an llvm artifact and, per step, the gap between its two largest logits."""
    import numpy as np

    from qoq_compiler.runtime.engine import Engine

    engine = Engine(art, device="cpu")
    sid = engine.add_sequence()
    logits = engine.prefill([(sid, prompt)])[0]
    tokens, margins = [], []
    for _ in range(n):
        top = np.sort(logits)[-2:]
        tokens.append(int(np.argmax(logits)))
        margins.append(float(top[1] - top[0]))
        if tokens[-1] in engine.config.eos_token_ids:
            break
        logits = engine.decode([sid], [tokens[-1]])[0]
    return tokens, margins


def _pack_runtime(dest: Path, wheel: bool) -> dict:
    """TVM's runtime-only files (the installed package without ``RUNTIME_EXCLUDE``) as tvm_rt.tar.xz
    and, with ``wheel``, the apache-tvm-ffi cp312 wheel and typing_extensions (``pip download``:
    PyPI must be reachable)."""
    import tvm

    dest.mkdir(parents=True, exist_ok=True)
    site = Path(tvm.__file__).parent.parent
    skip = {f"tvm/{p}" for p in RUNTIME_EXCLUDE}

    def keep(info: tarfile.TarInfo):
        return None if info.name in skip or "__pycache__" in info.name else info

    with tarfile.open(dest / "tvm_rt.tar.xz", "w:xz", preset=6) as tar:
        tar.add(site / "tvm", arcname="tvm", filter=keep)
        for dist in site.glob("apache_tvm-*.dist-info"):
            tar.add(dist, arcname=dist.name)
    out = {"tar": "rt/tvm_rt.tar.xz"}
    if wheel:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
               "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64", "-d", str(dest),
               f"apache-tvm-ffi=={FFI_VERSION}", "typing_extensions"]  # the one module tvm_ffi needs beyond Python
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(dest.glob("*.whl"))
        if proc.returncode or len(wheels) != 2:
            raise SystemExit(f"gpu_check: cannot download apache-tvm-ffi {FFI_VERSION} for cp312: "
                             f"{proc.stderr.strip()[-500:]}")
        out["wheels"] = [f"rt/{w.name}" for w in wheels]
    return out


def prepare(args) -> int:
    from qoq_compiler import compile
    from qoq_compiler.compiler import DEFAULT_CUDA_ARCHS, cuda_archs, make_target
    from qoq_compiler.config import QUANT_SCHEMES

    from bench.attention import workspace_shape
    from bench.common import export_kernels
    from schedules import nvcc

    root = Path(args.dir)
    if root.exists() and any(root.iterdir()) and not (root / PREPARED).is_file():
        raise SystemExit(f"gpu_check: {root} exists and was not written by prepare: refusing to replace it")
    shutil.rmtree(root, ignore_errors=True)
    (root / "kernels").mkdir(parents=True)
    t0 = time.perf_counter()
    spec = json.loads(json.dumps(TINY if args.tiny else FULL))
    archs = cuda_archs(args.arch or ("sm_90" if args.tiny else DEFAULT_CUDA_ARCHS))
    cuda, llvm = make_target("cuda", ",".join(archs)), make_target("llvm")
    devices = {"cuda": "cuda", "cpu": "llvm"} if args.tiny else {"cuda": "cuda"}
    say = (lambda msg: print(f"gpu_check: {msg} ({time.perf_counter() - t0:.0f} s)", flush=True))

    kernels, images = {}, None
    for device, target in devices.items():
        path = root / "kernels" / f"{target}.so"
        export_kernels(_kernel_funcs(spec, device == "cuda"), cuda if device == "cuda" else llvm, path, archs)
        kernels[device] = str(path.relative_to(root))
        if device == "cuda":
            images = nvcc.fatbin_images(nvcc.library_fatbin(path))
        say(f"kernels for {device} -> {path.name}")
    hq, hkv, d = spec["attention"]["heads"]
    spec["attention"]["workspace"] = {dev: workspace_shape(hq, hkv, d, dev == "cuda") for dev in devices}

    e2e = []
    with tempfile.TemporaryDirectory(prefix="qoqc-gpu-check-") as tmp:
        models = [("tc-llama", _tc_llama(Path(tmp) / "tc-llama"), ["rtn-w4a8kv4"])]
        stories = Path(args.stories) if args.stories else DATA / "stories260K" / "hf"
        if not args.tiny and stories.is_dir():
            models.append(("stories260k", stories, ["fp16", "rtn-w4a8kv4"]))
        elif not args.tiny:
            say(f"no stories260K at {stories}: its e2e rows are left out")
        for name, model, quants in models:
            for quant in quants:
                entry = {"name": name, "quant": quant, "prompt": E2E_PROMPT}
                for device, target in (("cpu", "llvm"), ("cuda", "cuda")):
                    keep = device in devices
                    out = (root / "e2e" if keep else Path(tmp)) / f"{name}-{quant}-{target}"
                    # stories260K's FFN (172) is no multiple of 32: its CUDA W4A8 build runs the portable GEMM
                    compile(model, target=target, arch=",".join(archs) if target == "cuda" else None,
                            quant=quant, output=out, progress=False, allow_portable_kernels=name == "stories260k")
                    if device == "cpu":
                        entry["tokens"], entry["margins"] = _greedy_reference(out, E2E_PROMPT, E2E_NEW_TOKENS)
                    if keep:
                        entry[device] = str(out.relative_to(root))
                e2e.append(entry)
                say(f"e2e {name} {quant}: {len(entry['tokens'])} greedy tokens of the llvm build")

        serving = spec["serving"]
        config = json.loads((ROOT / "bench" / "configs" / serving["config"]).read_text())
        if not args.tiny:
            config["num_hidden_layers"] = args.layers
        serving["config"] = config
        config_file = Path(tmp) / "serving-config.json"
        config_file.write_text(json.dumps(config))
        serving["schemes"] = {}
        for scheme in ("qoq-w4a8kv4-g128", "qoq-w4a8kv4-chn", "fp16"):
            # llvm stand-ins in tiny mode (CI runs them); CUDA builds for the GPU in full mode
            target = "llvm" if args.tiny else "cuda"
            out = root / "serving" / f"{scheme}-{target}"
            compile(config_file, target=target, arch=",".join(archs) if target == "cuda" else None,
                    quant=replace(QUANT_SCHEMES[scheme], passes=None), output=out, progress=False,
                    random_weights=True)
            serving["schemes"][scheme] = {"cpu" if args.tiny else "cuda": str(out.relative_to(root))}
            say(f"serving artifact {scheme} ({target}, random weights drawn at load)")

    runtime = None
    if not args.no_runtime and (not args.tiny or args.runtime):
        runtime = _pack_runtime(root / "rt", wheel=True)
        say("runtime-only TVM and the apache-tvm-ffi cp312 wheel packed")
    import tvm

    spec.update(mode="tiny" if args.tiny else "full", created=date.today().isoformat(), tvm=tvm.__version__,
                archs=archs, fatbin=images, kernels=kernels, e2e=e2e, runtime=runtime)
    (root / PREPARED).write_text(json.dumps(spec, indent=2) + "\n")
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in root.iterdir() if p.is_dir()}
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(f"gpu_check: {root} prepared in {time.perf_counter() - t0:.0f} s: {total / 2 ** 20:.1f} MiB ("
          + ", ".join(f"{k} {v / 2 ** 20:.1f}" for k, v in sorted(sizes.items())) + ")")
    print(f"gpu_check: fatbin images {', '.join(f'{kind} {arch}' for kind, arch in images)}")
    if total > 40 * 2 ** 20:
        print("gpu_check: warning: over 40 MiB; a device call carries 64 MiB with the project tree")
    return 0


# ---------------------------------------------------------------------------------------------- run
def _runtime_env(root: Path) -> dict | None:
    """Environment that makes TVM's runtime from DIR importable, installed once into
    ``$TMPDIR/qoqc-site``; None when this Python already imports TVM."""
    if subprocess.run([sys.executable, "-c", "import tvm"], capture_output=True).returncode == 0:
        return None
    spec = json.loads((root / PREPARED).read_text())
    if not spec.get("runtime"):
        raise SystemExit(f"gpu_check: no TVM here, and {root} carries no runtime (prepare without --no-runtime)")
    site = Path(os.environ.get("TMPDIR", "/tmp")) / "qoqc-site"
    if not (site / "tvm").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *(str(root / w) for w in spec["runtime"]["wheels"])], check=True)
        with tarfile.open(root / spec["runtime"]["tar"]) as tar:
            tar.extractall(site, filter="data")
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run(args) -> int:
    root, out = Path(args.dir).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run:
        env = _runtime_env(root)
        if env is not None and os.environ.get("TVM_USE_RUNTIME_LIB") != "1":
            os.execve(sys.executable, [sys.executable, *sys.argv], env)
    device = "cpu" if args.dry_run else "cuda"
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"gpu_check: unknown stage {unknown[0]} (choose from {', '.join(STAGES)})")
    planned = sum(STAGE_LIMITS[s] for s in stages)
    scale = min(1.0, args.budget / planned)
    start, status = time.monotonic(), []
    for stage in stages:
        left = args.budget - (time.monotonic() - start)
        limit = min(STAGE_LIMITS[stage] * scale, left)
        if limit < 10:
            status.append((stage, "skipped: budget spent", 0.0))
            continue
        t0 = time.monotonic()
        cmd = [sys.executable, str(Path(__file__).resolve()), "stage", stage, str(root), "--out", str(out),
               "--device", device]
        print(f"gpu_check: stage {stage} (limit {limit:.0f} s)", flush=True)
        try:
            with open(out / f"{stage}.log", "w") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
            state = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            state = f"cut at its {limit:.0f} s limit"
        status.append((stage, state, time.monotonic() - t0))
        print(f"gpu_check: stage {stage}: {state} in {status[-1][2]:.0f} s", flush=True)
    summary = _summary(root, out, device, status, args)
    (out / "summary.md").write_text(summary)
    print(summary)
    return 0 if all(state == "ok" for _, state, _ in status) else 1


def _summary(root: Path, out: Path, device: str, status, args) -> str:
    spec = json.loads((root / PREPARED).read_text())
    lines = [f"# GPU check, {date.today().isoformat()}", "",
             f"Device: {_device_name(device)}; prepared {spec['created']} ({spec['mode']} mode, archs "
             f"{', '.join(spec['archs'])}, TVM {spec['tvm']}); {platform.node()}.",
             "Command: `python bench/gpu_check.py " + " ".join(sys.argv[1:]) + "`", "",
             "| stage | result | seconds |", "|---|---|---|"]
    lines += [f"| {stage} | {state} | {seconds:.0f} |" for stage, state, seconds in status]
    for stage, _, _ in status:
        md = out / f"{stage}.md"
        if md.is_file():
            lines += ["", f"## {stage}", "", md.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def _device_name(device: str) -> str:
    if device != "cuda":
        return "CPU (dry run: llvm stand-ins)"
    import torch

    return torch.cuda.get_device_name()


# ---------------------------------------------------------------------------------------------- stages
class Report:
    """OUT/STAGE.md rewritten after every row, so a stage cut short keeps what it measured."""

    def __init__(self, out: Path, stage: str):
        self.path, self.lines = out / f"{stage}.md", []

    def write(self, lines: list[str]) -> None:
        self.lines = lines
        self.path.write_text("\n".join(lines) + "\n")


def stage_lane(pre: Prebuilt, out: Path) -> int:
    env = dict(os.environ, QOQC_GPU_PREBUILT=str(pre.root), QOQC_GPU_DEVICE=pre.device)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-m", "gpu",
                           str(ROOT / "tests" / "gpu")], cwd=ROOT, env=env, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    print(text)
    tail = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
    failed = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    Report(out, "lane").write([f"pytest tests/gpu on {pre.device}: {tail[0].strip('= ')}", ""]
                              + [f"- {line}" for line in failed])
    return proc.returncode


def stage_gemm(pre: Prebuilt, out: Path, timer) -> int:
    import numpy as np

    from bench import gemm

    kernels, rng, rows, report = pre.kernels(), np.random.default_rng(), [], Report(out, "gemm")
    header = [f"`bench/gemm.py` measurement, timing {timer.mode}", ""]
    for gname, group in GROUPS.items():
        for shape, (n, k) in pre.spec["gemm"]["shapes"].items():
            def add(row, gname=gname, shape=shape):
                rows.append((gname, shape, *row))
                report.write(gemm.table(rows, header))
            gemm.measure(kernels.gemm(shape, gname), n, k, group, pre.spec["gemm"]["m"], timer, pre.device, rng, add)
    bad = gemm.failures(rows)
    print("\n".join(bad) or "all GEMM outputs within tolerance")
    return 1 if bad else 0


def stage_attention(pre: Prebuilt, out: Path, timer) -> int:
    import torch

    from bench import attention

    kernels, attn, report = pre.kernels(), pre.spec["attention"], Report(out, "attention")
    heads, page, gen = tuple(attn["heads"]), attn["page"], torch.Generator().manual_seed(int(time.time()))
    copy_gbs = attention.copy_bandwidth(timer, pre.device)
    header = [f"`bench/attention.py` measurement, {heads[0]}/{heads[1]} heads of {heads[2]}, timing {timer.mode}"]
    rows, prefill_rows = [], []

    def write():
        report.write(attention.decode_table(rows, copy_gbs, header)
                     + ([""] + attention.prefill_table(prefill_rows) if prefill_rows else []))

    def attend(q, data, param, pos, seq, table, out_):
        kernels.attention(q, data, param, pos, seq, table, 0, out_)

    def prefill(q, data, param, pos, seq, table, out_):
        kernels.prefill(q, data, param, pos, seq, table, 0, out_)
    for b in attn["batch"]:
        for ctx in attn["context"]:
            rows.append((b, ctx, *attention.measure_decode(attend, b, ctx, timer, pre.device, gen, heads, page)))
            write()
    for n in attn["prefill"]:
        prefill_rows.append((n, *attention.measure_prefill(prefill, n, timer, pre.device, gen, heads, page)))
        write()
    bad = [r for r in rows if not r[2] < attention.TOLERANCE] + [r for r in prefill_rows
                                                                  if not r[1] < attention.TOLERANCE]
    print(bad or "all attention outputs within tolerance")
    return 1 if bad else 0


def stage_serving(pre: Prebuilt, out: Path) -> int:
    from bench import serving

    spec, report, rows = pre.spec["serving"], Report(out, "serving"), []
    artifacts = {name: pre.artifact(entry) for name, entry in spec["schemes"].items() if pre.device in entry}
    title = (f"QServe protocol, {spec['config'].get('num_hidden_layers')}-layer {spec['config']['model_type']} "
             f"(hidden {spec['config']['hidden_size']}, random weights), {spec['input_len']} in / "
             f"{spec['output_len']} out, KV budget {spec['kv_memory']}")

    def add(row):
        rows.append(row)
        report.write(serving.table(rows, title))
    serving.serve(artifacts, spec["config"], pre.device, spec["input_len"], spec["output_len"], spec["kv_memory"],
                  spec["warmup"], progress=False, report=add)
    return 0


def stage(args) -> int:
    from bench.common import Timer

    pre = Prebuilt.open(args.dir, args.device)
    out = Path(args.out)
    timer = Timer(args.device) if args.device == "cuda" else Timer("cpu", samples=2, launches=2)
    if args.stage == "lane":
        return stage_lane(pre, out)
    if args.stage == "serving":
        return stage_serving(pre, out)
    return {"gemm": stage_gemm, "attention": stage_attention}[args.stage](pre, out, timer)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build everything the check needs into DIR (CPU machine)")
    p.add_argument("dir")
    p.add_argument("--tiny", action="store_true", help="toy shapes and llvm stand-ins: a pipeline check")
    p.add_argument("--arch", default=None, help="CUDA archs (default: qoqc's default list; --tiny: sm_90)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the Llama-3-8B-shaped serving model")
    p.add_argument("--stories", default=None, help="stories260K HF directory (default: the shared data)")
    p.add_argument("--no-runtime", action="store_true", help="do not pack TVM's runtime (the GPU has TVM)")
    p.add_argument("--runtime", action="store_true", help="--tiny: pack TVM's runtime too")
    r = sub.add_parser("run", help="run the checks and benchmarks from DIR (GPU machine)")
    r.add_argument("dir")
    r.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"), help="results folder (default: $OUT)")
    r.add_argument("--budget", type=float, default=420, help="seconds for all stages together (default 420)")
    r.add_argument("--stages", default=",".join(STAGES))
    r.add_argument("--dry-run", action="store_true", help="on a CPU, against the llvm stand-ins of a --tiny DIR")
    s = sub.add_parser("stage", help=argparse.SUPPRESS)
    s.add_argument("stage", choices=STAGES)
    s.add_argument("dir")
    s.add_argument("--out", required=True)
    s.add_argument("--device", required=True)
    args = ap.parse_args()
    return {"prepare": prepare, "run": run, "stage": stage}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
