"""TensorIR schedules qoqc applies to the functions the Relax pipeline lowers.

``default_rules(target)`` is the ordered rule list: on GPUs, dlight's generic rules; on CPUs none
(LLVM compiles the legalized loops as they are; ``dlight.cpu.GEMV`` is left out because it stalls
LLVM codegen for minutes on LLM shapes). Functions already scheduled (the KV-cache kernels, tagged
``tirx.is_scheduled``) are skipped by ``ApplyDefaultSchedule``.
"""

from tvm.s_tir import dlight as dl

from .intrin import load_cuda_intrinsics


def default_rules(target) -> list:
    if "gpu" not in target.keys:
        return []
    load_cuda_intrinsics()  # dlight's tensor-core rules import them; do it the fast way first
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
