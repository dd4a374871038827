"""Greedy decoding on the device: the argmax of each row of logits, so a decode step of B greedy
sequences returns B token ids instead of B x V floats (a batch of 256 at Llama-3's 128256-token
vocabulary would otherwise copy 131 MB to the host and scan it there at every step).

    token[b] = min { i : logits[b, 0, i] = max_j logits[b, 0, j] }      (NumPy's argmax, NaN-free rows)

Layout: logits fp32 [B, 1, V], tokens int32 [B]. One block per row, THREADS threads striding over
it (coalesced); each thread keeps its first maximum, then a shared-memory tree combines (value,
index) pairs, the larger value winning and the smaller index on ties. Runs on CPUs (rows in
parallel, each phase's threads one after another) and on CUDA. Reference: ``schedules/reference/argmax.py``.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from qoq_compiler.formats import ceildiv

from .act_quant import with_root_block
from .toolkit import Launch

THREADS = 256
LOG_THREADS = 8


def argmax(vocab: int, gpu: bool) -> tirx.PrimFunc:
    """PrimFunc (logits fp32 [B, 1, vocab], tokens int32 [B])."""
    launch = Launch(gpu)
    per_thread = ceildiv(vocab, THREADS)

    @T.prim_func(private=True)
    def func(var_logits: T.handle, var_tokens: T.handle):
        T.func_attr(launch.attrs)
        nb = T.int64()
        logits = T.match_buffer(var_logits, (nb, 1, vocab), "float32")
        tokens = T.match_buffer(var_tokens, (nb,), "int32")
        for b in launch.blocks(nb):
            best = T.alloc_buffer((THREADS,), "float32", scope=launch.shared)
            where = T.alloc_buffer((THREADS,), "int32", scope=launch.shared)
            for tid in launch.threads(THREADS):
                v = T.alloc_buffer((1,), "float32", scope=launch.local)
                at = T.alloc_buffer((1,), "int32", scope=launch.local)
                v[0] = T.reinterpret("float32", T.uint32(0xFF800000))  # -inf
                at[0] = vocab
                for j in range(per_thread):
                    i = j * THREADS + tid
                    if i < vocab:
                        if logits[b, 0, i] > v[0] or at[0] == vocab:
                            v[0] = logits[b, 0, i]
                            at[0] = i
                best[tid] = v[0]
                where[tid] = at[0]
            for s in T.unroll(LOG_THREADS):
                for tid in launch.threads(THREADS):
                    if gpu:
                        T.tvm_storage_sync("shared")
                    if tid < (THREADS >> (s + 1)):
                        other = tid + (THREADS >> (s + 1))
                        if best[other] > best[tid] or (best[other] == best[tid] and where[other] < where[tid]):
                            best[tid] = best[other]
                            where[tid] = where[other]
            for tid in launch.threads(THREADS):
                if gpu:
                    T.tvm_storage_sync("shared")
                if tid == 0:
                    tokens[b] = where[0]

    return with_root_block(func)
