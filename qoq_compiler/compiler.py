"""``qoqc compile``: Hugging Face checkpoint -> Relax IR -> compiled module + weights -> artifact.

The only module that imports every stage. The model is exported as Relax IR that names no target
(its QoQ ops are tagged definitions, ``schedules.registry.OPS``); then one ordered list of phases:

    1. graph       Relax-level rewrites on the operator graph (X @ W^T without a transposed copy)
    2. dispatch    each QoQ op replaced by the target's kernel (``passes.dispatch_kernels``), TVM's
                   float KV cache built for the target (``passes.dispatch_kv_cache``), the kernels'
                   weight layouts taken out of the functions (``passes.lift_weight_layouts``): the
                   compiler applies them as it writes the weights
    3. lower       legalize operators to TensorIR, fuse elementwise chains into their producers
    4. schedule    TensorIR schedule rules for the target (``schedules.pipeline.default_rules``)
    5. vm          memory planning and lowering to the Relax VM

``--dump-ir`` writes the IR after each step into ``OUT/ir/``: ``01-graph.py`` (the float model,
graph phase applied), ``02-quantize.py`` (the quantized model: the pipeline's input, graph phase
applied), ``03-dispatch.py`` ... ``06-vm.py``, and for CUDA the generated kernels as ``kernels.cu``.

A CUDA artifact holds its kernels as device code compiled ahead of time (a fatbin with SASS for
every ``--arch`` and PTX of the newest, ``schedules.nvcc``), so loading it compiles nothing and
needs TVM's runtime libraries only; nvcc is needed to compile, no GPU.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from safetensors.numpy import save_file
from tqdm.auto import tqdm

from . import __version__
from .config import DEFAULT_SCHEME, QUANT_SCHEMES, QuantScheme
from .errors import QoqcError
from .frontend.checkpoint import default_model_path, from_torch_model, load_torch_model, open_checkpoint
from .frontend.llama import ENTRY_POINTS, KV4_ENTRY_POINTS, LlamaForCausalLM, LlamaKV4ForCausalLM
from .frontend.loader import convert
from .frontend.sharding import check_tensor_parallel, full_shape, shard_parameter
from .frontend.synthetic import open_config
from .passes.dispatch_kernels import dispatch_kernels
from .passes.dispatch_kv_cache import dispatch_kv_cache
from .passes.lift_weight_layouts import lift_weight_layouts, take_lifted_layouts
from .passes.quantize_linears import QuantizeLinears
from .quant.convert import quantizer
from .quant.kv_choice import choose_kv_rotation
from .quant.qoq import quantize_model
from .runtime.artifact import CPU_FEATURES, LIBRARY, TOKENIZER_DIR, write_manifest, writing
from .runtime.kv_cache import bytes_per_token
from .tvm_env import tvm

import tvm_ffi  # noqa: E402  (after tvm_env's version check)
from tvm import relax  # noqa: E402

from schedules import nvcc, pipeline, registry  # noqa: E402

TARGETS = ("llvm", "cuda")
#: GPU archs a CUDA artifact may carry device code for (mma.sync s8 m16n8k32 and cp.async need sm_80)
CUDA_ARCHS = ("sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_120")
DEFAULT_CUDA_ARCHS = "sm_80,sm_89,sm_90"
SHARD_BYTES = 2 << 30
KV4_PAGE_SIZE = 16


def cuda_archs(arch: str | None) -> list[str]:
    """The archs of a comma-separated ``--arch`` (default ``DEFAULT_CUDA_ARCHS``), validated and in
    increasing order. Kernels are generated for the first (the oldest: its code runs on every
    later one) and compiled to SASS for each; PTX of the last rides along for newer GPUs."""
    names = [a.strip() for a in (arch or DEFAULT_CUDA_ARCHS).split(",") if a.strip()]
    bad = [a for a in names if a not in CUDA_ARCHS]
    if bad or not names:
        raise QoqcError(f"invalid CUDA arch {bad[0] if bad else arch!r} (choose from {', '.join(CUDA_ARCHS)}, "
                        "several separated by commas)")
    return sorted(set(names), key=lambda a: int(a[3:]))


def make_target(target: str, arch: str | None = None) -> "tvm.target.Target":
    """``llvm`` (``arch`` = LLVM CPU name, default this machine's) or ``cuda`` (``arch`` = sm_XX list,
    default ``DEFAULT_CUDA_ARCHS``; the target names the oldest). A CUDA artifact's host code (argument
    checks and kernel launches) targets the triple's baseline CPU, so it runs on any GPU server."""
    if target == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": cuda_archs(arch)[0]}, host=_host_target(portable=True))
    if target == "llvm":
        if arch is not None and arch.startswith("sm_"):
            raise QoqcError(f"--arch {arch} is a CUDA arch; use it with --target cuda")
        return _host_target(arch)
    raise QoqcError(f"invalid target {target!r} (choose from {', '.join(TARGETS)})")


def _host_target(cpu: str | None = None, portable: bool = False) -> "tvm.target.Target":
    codegen = tvm.target.codegen
    triple = codegen.llvm_get_system_triple()
    if cpu is not None and not codegen.llvm_is_valid_cpu(cpu, triple):
        names = sorted(str(c) for c in codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm"})))
        raise QoqcError(f"invalid --arch {cpu!r}: not a CPU LLVM knows for {triple.split('-')[0]} "
                        f"({len(names)} do: {', '.join(names[:6])}, ...; default: this machine's)")
    if portable:
        cpu = "x86-64" if triple.startswith("x86_64") else "generic"
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu or codegen.llvm_get_system_cpu()})


def _host_features(host) -> dict:
    """The host target's CPU and the features of ``CPU_FEATURES`` its code may use."""
    features = {str(f) for f in tvm.target.codegen.llvm_get_cpu_features(host)}
    return {"mcpu": str(host.attrs["mcpu"]),
            "cpu_features": sorted(CPU_FEATURES[f] for f in features if f in CPU_FEATURES)}


#: the IR dumps of ``--dump-ir``, in pipeline order
IR_DUMPS = ("graph", "quantize", "dispatch", "lower", "schedule", "vm")


def pipeline_phases(target, allow_portable: bool = False, log=None) -> list[tuple[str, "tvm.transform.Pass"]]:
    """(name, pass) of each phase for ``target``; ``allow_portable`` and ``log``: ``dispatch_kernels``'."""
    t = relax.transform
    seq = tvm.transform.Sequential
    return [
        ("graph", seq([t.FuseTransposeMatmul()])),
        ("dispatch", seq([dispatch_kernels(target, registry.REGISTRY, allow_portable, log),
                          dispatch_kv_cache(target), lift_weight_layouts(registry.WEIGHT_LAYOUT_ATTR)])),
        ("lower", seq([t.LegalizeOps(), t.AnnotateTIROpPattern(), t.FoldConstant(), t.FuseOps(),
                       t.FuseTIR(), t.DeadCodeElimination()])),
        ("schedule", pipeline.schedule(target)),
        # reshape PrimFuncs that became runtime views are dropped, not compiled
        ("vm", seq([t.RewriteDataflowReshape(), t.DeadCodeElimination(), t.ToNonDataflow(),
                    t.RemovePurityChecking(), t.CallTIRRewrite(), t.StaticPlanBlockMemory(), t.RewriteCUDAGraph(),
                    t.LowerAllocTensor(), t.KillAfterLastUse(), t.LowerRuntimeBuiltin(),
                    t.ComputePrimValue(), t.VMShapeLower(), t.AttachGlobalSymbol()])),
    ]


def _default_output(model: Path, quant: str, target: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", model.stem if model.is_file() else model.name)
    return Path("dist") / f"{name}-{quant}-{target}"


@dataclass
class _Job:
    """One compile's validated options (``_job``), read by every stage."""

    scheme: QuantScheme
    target: str
    tgt: "tvm.target.Target"
    arch: str | None
    page_size: int
    cache: dict
    model_path: Path
    out: Path
    dump_ir: bool
    progress: bool
    random_weights: bool
    verbose: bool
    allow_portable_kernels: bool
    shards: int

    def say(self, line: str) -> None:
        if self.progress:
            tqdm.write(line)


def compile(model: str | Path | None = None, target: str = "llvm", quant: str | QuantScheme = DEFAULT_SCHEME,
            output: str | Path | None = None, arch: str | None = None, dump_ir: bool = False,
            progress: bool = True, kv_page_size: int | None = None, random_weights: bool = False,
            verbose: bool = False, allow_portable_kernels: bool = False, tensor_parallel: int = 1) -> Path:
    """Compile ``model`` (HF directory or .gguf; default: the embedded SmolLM2-135M-Instruct) into
    an artifact directory and return its path. ``quant`` names a scheme of ``QUANT_SCHEMES`` or is a
    ``QuantScheme`` (e.g. W8A8 with fp32 activations, to check the integer math exactly).
    ``kv_page_size``: tokens per page of qoqc's 4-bit KV cache (default 16; the float schemes use
    TVM's cache, whose kernels need 16). ``random_weights``: ``model`` is a config.json (or a
    directory holding one) and no weight is written: the artifact records each parameter's shape
    and dtype and the runtime draws them at load (for benchmarks: speed does not depend on them).
    ``verbose``: print each kernel choice; ``allow_portable_kernels``: let a CUDA W4A8 linear of a
    shape the tensor-core GEMM does not take run on the portable kernel instead of failing.
    ``tensor_parallel``: shard the model over that many devices (``frontend.sharding``): one
    module, and each shard's weights in its own files (``runtime.tp.TPEngine`` serves them).

    Stages, each a function below: load, quantize, export, passes, write the weights (in the
    layouts the passes chose), build, write the artifact; the artifact directory appears whole or
    not at all (``runtime.artifact.writing``)."""
    job = _job(model, target, quant, output, arch, dump_ir, progress, kv_page_size, random_weights, verbose,
               allow_portable_kernels, tensor_parallel)
    with writing(job.out) as tmp:
        ckpt, scheme = _load(job)
        t0 = time.perf_counter()
        ckpt, scheme, weights = _quantize(job, ckpt, scheme)
        dump = _ir_dumper(tmp / "ir" if dump_ir else None)
        phases = pipeline_phases(job.tgt, allow_portable_kernels, tqdm.write if verbose else None)
        mod, params = _export(job, ckpt.config, scheme, phases, dump)
        bar = tqdm(total=len(phases) + 2, desc="build", unit="phase", disable=not progress)
        mod, layouts = _passes(job, mod, phases, dump, bar)
        params_doc = _write_weights(job, tmp, ckpt, scheme, weights, params, layouts)
        device_code = _build(job, mod, tmp, bar)
        bar.close()
        _write_artifact(job, tmp, ckpt, scheme, params_doc, device_code)
        job.say(f"qoqc: compiled in {time.perf_counter() - t0:.1f} s -> {job.out}")
    return job.out


def _job(model, target, quant, output, arch, dump_ir, progress, kv_page_size, random_weights, verbose,
         allow_portable_kernels, shards) -> _Job:
    """The options checked (one ``QoqcError`` line for a bad one) before anything is read or written."""
    if not isinstance(quant, QuantScheme) and quant not in QUANT_SCHEMES:
        raise QoqcError(f"invalid quant scheme {quant!r} (choose from {', '.join(QUANT_SCHEMES)})")
    scheme = quant if isinstance(quant, QuantScheme) else QUANT_SCHEMES[quant]
    tgt = make_target(target, arch)
    if target == "cuda" and nvcc.nvcc_path() is None:
        raise QoqcError("--target cuda compiles device code ahead of time with nvcc, which is not on PATH "
                        "(install the CUDA toolkit, or set CUDA_PATH)")
    if kv_page_size is not None and scheme.kv != "int4":
        raise QoqcError(f"--kv-page-size: scheme {scheme.name} keeps TVM's float KV cache, whose pages hold 16 "
                        "tokens; the page size is an option of the 4-bit cache (the *-w4a8kv4 schemes)")
    if kv_page_size is not None and not 1 <= kv_page_size <= 1024:
        raise QoqcError(f"--kv-page-size {kv_page_size}: choose 1 to 1024 tokens")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise QoqcError(f"--tensor-parallel {shards!r}: give a whole number of shards, at least 1")
    page_size = kv_page_size or KV4_PAGE_SIZE
    cache = {"kind": "kv4-paged", "page_size": page_size} if scheme.kv == "int4" else {"kind": "tvm-paged"}
    model_path = Path(model) if model is not None else default_model_path()
    out = Path(output) if output is not None else _default_output(model_path, scheme.name, target)
    return _Job(scheme, target, tgt, arch, page_size, cache, model_path, out, dump_ir, progress, random_weights,
                verbose, allow_portable_kernels, shards)


def _load(job: _Job):
    """Stage load: the checkpoint (or a config alone, for random weights), described and checked
    against the scheme. Returns (checkpoint, scheme as the model allows it)."""
    scheme, model_path = job.scheme, job.model_path
    ckpt = open_config(model_path) if job.random_weights else open_checkpoint(model_path)
    cfg = ckpt.config
    job.say(f"qoqc: {cfg.architecture} from {model_path}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.num_heads}/{cfg.num_kv_heads} heads of {cfg.head_dim}, vocab {cfg.vocab_size}, "
            f"context {cfg.context_window}")
    if job.cache["kind"] == "kv4-paged" and cfg.head_dim % 8:
        raise QoqcError(f"{scheme.name}: the 4-bit KV cache packs 8 codes per 32-bit word, so head_dim must be "
                        f"a multiple of 8; {model_path} has head_dim {cfg.head_dim} (use w8a8 or fp16)")
    check_tensor_parallel(cfg, job.shards, scheme.group if scheme.weights == "int4" else None)
    if job.shards > 1:
        job.say(f"qoqc: {job.shards} tensor-parallel shards of {cfg.num_heads // job.shards}/"
                f"{cfg.num_kv_heads // job.shards} heads and {cfg.intermediate_size // job.shards} MLP channels")
    if ckpt.tokenizer is None:
        job.say(f"qoqc: warning: {model_path} has no tokenizer; the artifact takes token ids only")
    if scheme.kv_rotation and cfg.head_dim & (cfg.head_dim - 1):
        job.say(f"qoqc: warning: {scheme.name}: head_dim {cfg.head_dim} is not a power of 2, so q and k are not "
                "Hadamard-rotated before the 4-bit KV cache (less accurate)")
        scheme = replace(scheme, kv_rotation=False)
    fp16_bytes = bytes_per_token(cfg, "tvm-paged", "float16")
    kv_bytes = bytes_per_token(cfg, job.cache["kind"], scheme.dtype)
    job.say(f"qoqc: KV cache {kv_bytes:,} bytes/token" + (
        f" in 4 bits, {job.page_size}-token pages (fp16: {fp16_bytes:,}, {kv_bytes / fp16_bytes:.0%} of it)"
        if job.cache["kind"] == "kv4-paged" else f" in {scheme.dtype}"))
    return ckpt, scheme


def _quantize(job: _Job, ckpt, scheme: QuantScheme):
    """Stage quantize: for 4-bit weights, the K cache's treatment chosen and the QoQ passes (or
    round-to-nearest) run on the torch model. Returns (checkpoint of the transformed float weights,
    scheme, quantized weights by parameter name, or None where the loader quantizes)."""
    if scheme.weights != "int4" or job.random_weights:
        return ckpt, scheme, None
    job.say(f"qoqc: {scheme.name}: " + ("calibrating QoQ passes" if scheme.passes else "round-to-nearest weights"))
    hf = ckpt.torch_model if ckpt.torch_model is not None else load_torch_model(job.model_path)
    scheme, loss = choose_kv_rotation(hf, ckpt.tokenizer, scheme)
    if loss is not None:
        job.say(f"qoqc: KV4: q/k {'Hadamard-rotated' if scheme.kv_rotation else 'not rotated, SmoothAttention'}"
                f" (4-bit-KV calibration loss {loss['rotated']:.4f} rotated, {loss['smoothed']:.4f} smoothed)")
    weights = quantize_model(hf, ckpt.tokenizer, scheme, progress=job.progress)
    return from_torch_model(hf, job.model_path, ckpt.tokenizer), scheme, weights  # rotation unties lm_head


def _export(job: _Job, cfg, scheme: QuantScheme, phases, dump):
    """Stage export: the float model, its linears rewritten into QoQ ops, exported to Relax IR that
    names no target (one shard's, with several). Returns (module, [(parameter name, shape, dtype)])."""
    cfg = cfg.shard(job.shards)
    if scheme.kv == "int4":
        model = LlamaKV4ForCausalLM(cfg, scheme.dtype, registry.OPS, job.page_size, scheme.kv_rotation, job.shards)
    else:
        model = LlamaForCausalLM(cfg, scheme.dtype, registry.OPS, job.shards)
    if job.dump_ir:
        with job.tgt:
            dump("graph", phases[0][1](model.export_tvm(spec=model.get_default_spec())[0]))
    model = QuantizeLinears(scheme, registry.OPS).visit("", model)
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    return mod, [(name, tuple(int(d) for d in p.shape), p.dtype) for name, p in named_params]


def _write_weights(job: _Job, tmp: Path, ckpt, scheme: QuantScheme, weights, params, layouts: dict) -> dict:
    """Stage weights: every parameter converted (quantized, split into the tensor-parallel shards'
    pieces, then reordered into its kernel's layout by the layouts the passes lifted: ``layouts``
    {index: (name, PrimFunc, shape, dtype)}) and written as safetensors files of at most
    ``SHARD_BYTES`` (``params-NNNNN``, or ``params-shard-I-NNNNN`` per tensor-parallel shard I), or
    with random weights only their shapes recorded. Returns the manifest's ``params``."""
    if job.random_weights:
        job.say("qoqc: random weights: none written, each parameter drawn when the artifact is loaded")
        stored = [(n, *layouts[i][2:]) if i in layouts else (n, s, d) for i, (n, s, d) in enumerate(params)]
        return {"files": [], "names": [n for n, _, _ in stored],
                "random": {"seed": 0, "shapes": [list(s) for _, s, _ in stored], "dtypes": [d for _, _, d in stored]}}
    reorder, n, cfg = _weight_layouts(layouts), job.shards, ckpt.config
    whole = [(name, full_shape(name, shape, cfg, n), dtype) for name, shape, dtype in params]
    pieces = ((name, [reorder(i, a) for a in shard_parameter(name, arr, cfg, n)])
              for i, (name, arr) in enumerate(convert(ckpt, whole, quantizer(scheme, weights))))
    try:
        files = _write_params(tmp, pieces, len(params), n, job.progress)
    except OSError as e:
        raise QoqcError(f"cannot write the weights into {job.out}: {e.strerror or e}") from None
    names = [name for name, _, _ in params]
    return {"files": files[0], "names": names} if n == 1 else {"shard_files": files, "names": names}


def _passes(job: _Job, mod, phases, dump, bar):
    """Stage passes: the phases in order (``pipeline_phases``), each one's output dumped. Returns
    (module, the weight layouts lifted by the dispatch phase: ``take_lifted_layouts``)."""
    layouts = {}
    with job.tgt:
        for name, phase in phases:
            bar.set_postfix_str(name)
            mod = phase(mod)
            dump("quantize" if name == "graph" else name, mod)
            if name == "dispatch":
                mod, layouts = take_lifted_layouts(mod)
            bar.update()
    return mod, layouts


def _weight_layouts(layouts: dict):
    """``reorder(index, array)``: parameter ``index`` through its lifted layout PrimFunc (each
    distinct one built for this CPU once), or unchanged."""
    if not layouts:
        return lambda _i, arr: arr
    funcs = {name: f.with_attr("global_symbol", name) for name, f, _, _ in layouts.values()}
    lib = tvm.compile(tvm.IRModule(funcs), target=_host_target())

    def reorder(i: int, arr):
        if i not in layouts:
            return arr
        name, _, shape, dtype = layouts[i]
        out = tvm.runtime.empty(shape, dtype)
        lib[name](tvm.runtime.tensor(arr), out)
        return out.numpy()

    return reorder


def _build(job: _Job, mod, tmp: Path, bar) -> dict | None:
    """Stage build: code generation and the library (for CUDA with its device code compiled ahead of
    time). Returns the manifest's ``device_code`` (None on CPUs)."""
    bar.set_postfix_str("codegen")
    ex = tvm.compile(mod, target=job.tgt, relax_pipeline=None, tir_pipeline=pipeline.TIR_PIPELINE)
    if job.dump_ir and job.target == "cuda":
        (tmp / "ir" / "kernels.cu").write_text(nvcc.cuda_source(ex))
    bar.update()
    bar.set_postfix_str("export")
    device_code = None
    if job.target == "cuda":
        archs = cuda_archs(job.arch)
        images = nvcc.export_library(ex, tmp / LIBRARY, archs, archs[-1], job.tgt.host)
        device_code = {"format": "fatbin", "sass": [a for kind, a in images if kind == "sass"],
                       "ptx": [a for kind, a in images if kind == "ptx"]}
    else:
        ex.export_library(str(tmp / LIBRARY))
    bar.update()
    return device_code


def _write_artifact(job: _Job, tmp: Path, ckpt, scheme: QuantScheme, params_doc: dict, device_code) -> None:
    """Stage write: the tokenizer and the manifest (which lists every file with its checksum)."""
    if ckpt.tokenizer is not None:
        ckpt.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
    write_manifest(tmp, {
        "qoqc_version": __version__,
        "tvm_version": tvm.__version__,
        "tvm_ffi_version": tvm_ffi.__version__,
        "target": {"name": job.target, **{k: str(v) for k, v in job.tgt.export().items()
                                          if k in ("kind", "arch", "mcpu")}},
        "host": _host_features(job.tgt.host or job.tgt),
        "quant": scheme.name,
        "dtype": scheme.dtype,
        "quant_scheme": scheme.to_dict(),
        "source": str(job.model_path.absolute()),
        "model": ckpt.config.to_dict(),
        "entry_points": list(KV4_ENTRY_POINTS if scheme.kv == "int4" else ENTRY_POINTS),
        "kv_cache": job.cache,
        **({"tensor_parallel": job.shards} if job.shards > 1 else {}),
        "library": LIBRARY,
        **({"device_code": device_code} if device_code else {}),
        "params": params_doc,
        "tokenizer": TOKENIZER_DIR if ckpt.tokenizer is not None else None,
    })


def _ir_dumper(folder: Path | None):
    """``dump(step, mod)`` writing ``folder/NN-step.py`` (NN: the step's place in ``IR_DUMPS``), or
    doing nothing without a folder."""
    if folder is None:
        return lambda _step, _mod: None
    folder.mkdir()

    def dump(step: str, mod) -> None:
        (folder / f"{IR_DUMPS.index(step) + 1:02d}-{step}.py").write_text(mod.script(show_meta=False))

    return dump


def _write_params(root: Path, tensors, count: int, shards: int, progress: bool) -> list[list[str]]:
    """Save (name, [one array per tensor-parallel shard]) as safetensors files of at most
    ``SHARD_BYTES`` each; returns each shard's file names."""
    prefix = ["params-"] if shards == 1 else [f"params-shard-{i}-" for i in range(shards)]
    files: list[list[str]] = [[] for _ in range(shards)]
    batch: list[dict] = [{} for _ in range(shards)]
    size = [0] * shards

    def flush(i: int) -> None:
        name = f"{prefix[i]}{len(files[i]):05d}.safetensors"
        save_file(batch[i], str(root / name))
        files[i].append(name)
        batch[i], size[i] = {}, 0

    for name, arrays in tqdm(tensors, total=count, desc="weights", unit="tensor", disable=not progress):
        for i, arr in enumerate(arrays):
            if batch[i] and size[i] + arr.nbytes > SHARD_BYTES:
                flush(i)
            batch[i][name] = arr
            size[i] += arr.nbytes
    for i in range(shards):
        if batch[i]:
            flush(i)
    return files
