"""What qoqc's hand-written TVMScript kernels share: how one PrimFunc source maps onto a target.

``act_quant``, ``argmax`` and ``kv4_attention`` are written once for CPUs and CUDA as blocks of
threads that meet at barriers. ``Launch(gpu)`` gives each construct its meaning on the target:

    construct          CUDA                                  CPU
    blocks(n)          blockIdx.x                            a parallel loop (one core a block)
    threads(n)         threadIdx.x                           a serial loop: each phase's threads in turn
    shared             "shared" memory of the block          "global": the block's scratch buffer
    local              registers ("local")                   "global": TVM 0.27 puts small "global"
                                                             buffers on the stack, but allocates
                                                             every "local" one from the workspace
                                                             pool (a call per allocation)
    attrs              scheduled, no aliasing, lowered by    scheduled, no aliasing
                       TVM's tirx pipeline

Barriers stay in the kernels as ``if gpu: T.tvm_storage_sync("shared")``: on CPUs the phases are
already ordered. On CUDA the kernels go through the tirx pipeline (``schedules.pipeline``) because
they place their barriers themselves: the s_tir pipeline's ThreadSync cannot prove a thread's
read-modify-writes of its own shared elements race-free (after CSE) and refuses to place barriers
inside conditions. Format constants and shape helpers come from ``qoq_compiler.formats``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T


#: CPU kernels run fewer rows than this on one core: waking TVM's thread pool costs ~5 us on 2
#: cores (a one-row add_rmsnorm_quantize: 0.3 us on one core, 5.7 us as a parallel loop), more
#: than a few rows' work; their parallel loops branch on the row count at run time
PARALLEL_ROWS = 4


@dataclass(frozen=True)
class Launch:
    gpu: bool

    def blocks(self, n):
        return T.thread_binding(n, thread="blockIdx.x") if self.gpu else T.parallel(n)

    def threads(self, n):
        return T.thread_binding(n, thread="threadIdx.x") if self.gpu else T.serial(n)

    @property
    def shared(self) -> str:
        return "shared" if self.gpu else "global"

    @property
    def local(self) -> str:
        return "local" if self.gpu else "global"

    @property
    def attrs(self) -> dict:
        return {"tirx.noalias": True, "tirx.is_scheduled": True, **({"qoqc.tir_pipeline": "tirx"} if self.gpu else {})}
