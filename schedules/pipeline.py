"""TensorIR schedules qoqc applies to the functions the Relax pipeline lowers.

``default_rules(target)`` is the ordered rule list: on GPUs, dlight's generic rules; on CPUs
qoqc's vectorized, multi-core reduction rule (``cpu_matmul``), then its injective rule
(``cpu_injective``: parallel rows, vectorized innermost axis) (``dlight.cpu.GEMV`` is left out: it
stalls LLVM codegen for minutes on LLM shapes). Functions already scheduled (the KV-cache
kernels, the tensor-core GEMM, tagged ``tirx.is_scheduled``) are skipped by ``ApplyDefaultSchedule``.

Which kernel serves each QoQ op is the registry's business (``schedules.registry``, applied by
``passes.dispatch_kernels`` before this phase). The hand-written kernels (the tensor-core W4A8 GEMM
is TVMScript written against PTX, ``T.ptx``; the CUDA forms of the others place their own
barriers) must be lowered by TVM's ``tirx`` pipeline, which keeps their explicit shared buffers as
declared (the default ``s_tir`` pipeline compacts buffers only addressed through pointers).
``TIR_PIPELINE`` ("qoqc") lowers functions tagged ``qoqc.tir_pipeline = "tirx"`` that way and
everything else with ``s_tir``.
"""

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from .cpu_injective import CPUInjective
from .cpu_matmul import CPUReduction
from .intrin import load_cuda_intrinsics

TIR_PIPELINE = "qoqc"


def _tir_pipeline():
    s_tir_pass, finalize_host, finalize_device = tirx.get_tir_pipeline("s_tir")
    tirx_pass, _, _ = tirx.get_tir_pipeline("tirx")

    @tvm.transform.module_pass(opt_level=0, name="QoqcTIRPipeline")
    def lower(mod, _ctx):
        tagged = {gv: f for gv, f in mod.functions.items()
                  if isinstance(f, tirx.PrimFunc) and f.attrs is not None
                  and f.attrs.get("qoqc.tir_pipeline") == "tirx"}
        if not tagged:
            return s_tir_pass(mod)
        rest = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv not in tagged}, attrs=mod.attrs)
        out = s_tir_pass(rest)
        tagged = {gv: _without_root_block(f) for gv, f in tagged.items()}
        for gv, f in tirx_pass(tvm.IRModule(tagged, attrs=mod.attrs)).functions.items():
            out[gv] = f
        return out

    return lower, finalize_host, finalize_device


def _without_root_block(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The body of an empty root block (no buffers, no iterators) lifted out: the tirx lowering has
    no block support, and such a block only serves Relax's analyses (``act_quant``)."""
    body = func.body
    if isinstance(body, s_tir.SBlockRealize) and not body.block.iter_vars and not body.block.alloc_buffers:
        return func.with_body(body.block.body)
    return func


tirx.register_tir_pipeline(TIR_PIPELINE, _tir_pipeline)


@tvm.transform.module_pass(opt_level=0, name="KeepInt8OffWmma")
def keep_int8_off_wmma(mod, _ctx):
    """Tag functions that read int8 buffers ``dlight.do_not_tensorize``.

    dlight's int8 WMMA path fails to compile in TVM 0.27 (InjectSoftwarePipeline); tagged
    functions get its SIMT matmul schedule instead, until qoqc's own tensor-core kernels take over.
    """
    out = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and any(hasattr(p, "dtype") and str(p.dtype) == "int8" for p in func.params):
            func = func.with_attr("dlight.do_not_tensorize", True)
        out[gv] = func
    return tvm.IRModule(out, attrs=mod.attrs, global_infos=mod.global_infos)


def schedule(target) -> "tvm.transform.Pass":
    """The pipeline's schedule phase for ``target``."""
    return tvm.transform.Sequential([keep_int8_off_wmma, dl.ApplyDefaultSchedule(*default_rules(target))])


def default_rules(target) -> list:
    if "gpu" not in target.keys:
        return [CPUReduction(), CPUInjective()]
    load_cuda_intrinsics()  # dlight's tensor-core rules import them; do it the fast way first
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
