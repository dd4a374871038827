"""CPU schedule for injective functions (elementwise ops, gathers, RoPE, layout copies): every
spatial loop nest vectorized along its innermost axis and parallel over the rest.

For each block of a function whose blocks are all injective (in order; a block's loops are its own),
with innermost extent E static and V the largest of 16, 8, 4, 2 dividing E:
    for outer in parallel(prod(other extents) * E / V):    # fused: rows and vector steps, over the cores
      for v in vectorized(V):                              # one vector of the innermost axis
A block whose innermost extent is dynamic, or odd, only gets the parallel loop; one whose static
extents hold fewer than PARALLEL_MIN elements only the vector loop (waking the other cores costs
more than its work: RoPE of one token's 9 query heads took 5 us vectorized and 11 us in parallel on
2 cores). The reduction rule (``cpu_matmul``) comes first; this one takes what it leaves that is
injective.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func

LANES = (16, 8, 4, 2)
PARALLEL_MIN = 16384


class CPUInjective(dl.ScheduleRule):
    """``apply`` returns a schedule for an all-injective function on an ``llvm`` target, else ``None``."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or "cpu" not in target.keys:
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(info.is_injective() for info in infos):
            return None
        for info in infos:
            loops = sch.get_loops(info.block_rv)
            if not loops:
                continue
            *outer, inner = loops
            extents = [sch.get(loop).extent for loop in loops]
            static = 1
            for e in extents:
                static *= int(e) if isinstance(e, tirx.IntImm) else 1
            extent = extents[-1]
            lanes = next((v for v in LANES if isinstance(extent, tirx.IntImm) and int(extent) % v == 0), None)
            if lanes is not None:
                step, vec = sch.split(inner, [None, lanes])
                sch.vectorize(vec)
                outer = [*outer, step]
            else:
                outer = [*outer, inner]
            if static >= PARALLEL_MIN or lanes is None:
                sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        return sch
