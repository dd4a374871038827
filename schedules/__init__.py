"""TensorIR schedules qoqc applies to the functions the Relax pipeline lowers.

``default_rules(target)`` is the ordered rule list: on GPUs, dlight's generic rules; on CPUs
qoqc's vectorized, multi-core reduction rule (``cpu_matmul``), other functions staying as
legalized loops (``dlight.cpu.GEMV`` is left out: it stalls LLVM codegen for minutes on LLM shapes). Functions already scheduled (the KV-cache kernels, tagged
``tirx.is_scheduled``) are skipped by ``ApplyDefaultSchedule``.
"""

from tvm.s_tir import dlight as dl

from .cpu_matmul import CPUReduction
from .intrin import load_cuda_intrinsics


def default_rules(target) -> list:
    if "gpu" not in target.keys:
        return [CPUReduction()]
    load_cuda_intrinsics()  # dlight's tensor-core rules import them; do it the fast way first
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
