"""TensorIR schedules qoqc applies to the functions the Relax pipeline lowers.

``default_rules(target)`` is the ordered rule list: on GPUs, dlight's generic rules; on CPUs
qoqc's vectorized, multi-core reduction rule (``cpu_matmul``), other functions staying as
legalized loops (``dlight.cpu.GEMV`` is left out: it stalls LLVM codegen for minutes on LLM
shapes). Functions already scheduled (the KV-cache kernels, tagged ``tirx.is_scheduled``) are
skipped by ``ApplyDefaultSchedule``.
"""

from types import SimpleNamespace

import tvm
from tvm import tirx
from tvm.s_tir import dlight as dl

from . import kv4_attention, w4a8_gemm, w8a8_gemm
from .cpu_matmul import CPUReduction
from .intrin import load_cuda_intrinsics

#: Compute definitions that the model's quantized layers emit (handed to the frontend by the compiler).
kernels = SimpleNamespace(quantize_per_token=w8a8_gemm.quantize_per_token, w8a8_matmul=w8a8_gemm.w8a8_matmul,
                          w4a8_matmul=w4a8_gemm.w4a8_matmul, rope=kv4_attention.rope,
                          kv4_quantize=kv4_attention.kv4_quantize, kv4_scatter=kv4_attention.kv4_scatter,
                          kv4_attention=kv4_attention.kv4_attention)


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
        return [CPUReduction()]
    load_cuda_intrinsics()  # dlight's tensor-core rules import them; do it the fast way first
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
