"""Activation quantization: the per-token INT8 input of every quantized linear, fused with the
elementwise work that produces it, so an activation row crosses HBM once on its way to a GEMM.

    kind          inputs          outputs                          feeds
    quantize      x               q(x)                             o_proj (the attention output)
    rmsnorm       x, w            q(RMSNorm(x) w)                  layer 0's qkv_proj
    add_rmsnorm   x, d, w         x' = x + d,  q(RMSNorm(x') w)    qkv_proj, gate_up_proj (residual add folded in)
    silu_mul      gu = [g | u]    q(silu(g) u)                     down_proj

For a token row v of K values, rounded to the model dtype where the unfused model rounds (x',
RMSNorm's output, silu(g) u once):
    RMSNorm(x) = x * rsqrt(sum(x^2) / K + eps) * w                 fp32, as TVM's ``rms_norm``
    sx   = fp16(max(max_k |v_k|, 1e-4) / 127)                     per-token scale
    qx_k = clamp(round(v_k / sx), -127, 127)                       int8 (``quant.reference.quantize_per_token``)
    xsum = sum_k qx_k                                              int32, the per-channel W4A8 epilogue's
                                                                   zero-point term (``w4a8_gemm``)

Layout: tensors [B, T, K] (``silu_mul``'s input [B, T, 2K], gate first); one block per token row,
THREADS threads striding over it (element k belongs to thread k % THREADS in every phase, so a
thread rereads only what it wrote or read itself: no barrier guards the row). Phases: row pass
(x' written, sum of squares or max), block reduction, [norm pass: max of the normalised row,
block reduction], quantization pass (qx written, partial xsum), block reduction. Block-wide
reductions run as a shared-memory tree behind barriers. The row is read from HBM once; the
later passes reread it from cache. The same PrimFuncs run on CPUs (rows in parallel, each
phase's threads one after another) and on CUDA. Reference: ``schedules/reference/act_quant.py``.
"""

from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.script import tirx as T

from qoq_compiler.formats import INT8_MAX, RANGE_FLOOR, ceildiv

from .reference.act_quant import KINDS
from .toolkit import PARALLEL_ROWS, Launch

THREADS = 256
LOG_THREADS = 8


def _elementwise(k: int, dtype: str):
    """The per-element expressions of both forms (so both compute the same values): rounded(v) (fp32
    rounded to the model dtype and back), silu_mul, normed (RMSNorm given the row's rsqrt), summed
    (the residual add, rounded), quant (the int8 code of v at a scale)."""

    def rounded(v):
        return T.Cast("float32", T.Cast(dtype, v))

    def silu_mul(gu, b, t, i):
        g, u = T.Cast("float32", gu[b, t, i]), T.Cast("float32", gu[b, t, k + i])
        return rounded(g / (T.float32(1) + T.exp(-g)) * u)

    def normed(x, w, b, t, i, rs):
        return rounded(T.Cast("float32", x[b, t, i]) * rs * T.Cast("float32", w[i]))

    def summed(x, d, b, t, i):
        return rounded(T.Cast("float32", x[b, t, i]) + T.Cast("float32", d[b, t, i]))

    def quant(v, scale):
        return T.Cast("int8", T.min(T.max(T.round(v / scale), T.float32(-INT8_MAX)), T.float32(INT8_MAX)))

    return rounded, silu_mul, normed, summed, quant


def act_quant(kind: str, k: int, dtype: str, gpu: bool, eps: float = 1e-6) -> tirx.PrimFunc:
    """PrimFunc of ``kind`` (see the module docstring) for rows of K values in ``dtype``:
        quantize     (x, qx, sx, xsum)
        rmsnorm      (x, w, qx, sx, xsum)
        add_rmsnorm  (x, d, w, x_out, qx, sx, xsum)
        silu_mul     (gu, qx, sx, xsum)
    x, d, x_out [B, T, K] dtype; gu [B, T, 2K]; w [K] dtype; qx [B, T, K] int8; sx [B, T, 1] fp16;
    xsum [B, T, 1] int32."""
    if kind not in KINDS:
        raise ValueError(f"unknown activation-quantization kind {kind!r} (one of {', '.join(KINDS)})")
    launch = Launch(gpu)
    per_thread = ceildiv(k, THREADS)
    floor, inv_k, eps_ = (tirx.const(v, "float32") for v in (RANGE_FLOOR, 1.0 / k, eps))

    rounded, silu_mul, normed, _, quant = _elementwise(k, dtype)

    @T.macro
    def tree(red, is_max):
        """red[0] = max or sum of red[0:THREADS]."""
        for s in T.unroll(LOG_THREADS):
            for tid in launch.threads(THREADS):
                if gpu:
                    T.tvm_storage_sync("shared")
                if tid < (THREADS >> (s + 1)):
                    if is_max:
                        red[tid] = T.max(red[tid], red[tid + (THREADS >> (s + 1))])
                    else:
                        red[tid] = red[tid] + red[tid + (THREADS >> (s + 1))]

    @T.macro
    def quantize_pass(value, amax, qx, sx, xsum, b, t, isum):
        """qx, sx from the row ``value(i)`` and its block maximum amax[0]; xsum by the tree."""
        for tid in launch.threads(THREADS):
            if gpu:
                T.tvm_storage_sync("shared")
            scale = T.Cast("float32", T.Cast("float16", T.max(amax[0], floor) / T.float32(INT8_MAX)))
            acc = T.alloc_buffer((1,), "int32", scope=launch.local)
            acc[0] = 0
            for j in range(per_thread):
                i = j * THREADS + tid
                if i < k:
                    q = quant(value(i), scale)
                    qx[b, t, i] = q
                    acc[0] = acc[0] + T.Cast("int32", q)
            isum[tid] = acc[0]
            if tid == 0:
                sx[b, t, 0] = T.Cast("float16", scale)
        tree(isum, False)
        for tid in launch.threads(THREADS):
            if gpu:
                T.tvm_storage_sync("shared")
            if tid == 0:
                xsum[b, t, 0] = isum[0]

    @T.macro
    def row_max(value, fmax):
        """fmax[0] = max_i |value(i)|."""
        for tid in launch.threads(THREADS):
            if gpu:
                T.tvm_storage_sync("shared")
            acc = T.alloc_buffer((1,), "float32", scope=launch.local)
            acc[0] = T.float32(0)
            for j in range(per_thread):
                i = j * THREADS + tid
                if i < k:
                    acc[0] = T.max(acc[0], T.abs(value(i)))
            fmax[tid] = acc[0]
        tree(fmax, True)

    @T.macro
    def norm_quant(x, w, qx, sx, xsum, b, t, fsum, fmax, isum):
        """RMSNorm of the row x[b, t] (its sum of squares already in fsum[0]), then quantize; the
        row's rsqrt is computed once, into fsum[1]."""
        for tid in launch.threads(THREADS):
            if gpu:
                T.tvm_storage_sync("shared")
            if tid == 0:
                fsum[1] = T.rsqrt(fsum[0] * inv_k + eps_)
        row_max(lambda i: normed(x, w, b, t, i, fsum[1]), fmax)
        quantize_pass(lambda i: normed(x, w, b, t, i, fsum[1]), fmax, qx, sx, xsum, b, t, isum)

    @T.macro
    def sum_squares(x, b, t, fsum):
        for tid in launch.threads(THREADS):
            acc = T.alloc_buffer((1,), "float32", scope=launch.local)
            acc[0] = T.float32(0)
            for j in range(per_thread):
                i = j * THREADS + tid
                if i < k:
                    acc[0] = acc[0] + T.Cast("float32", x[b, t, i]) * T.Cast("float32", x[b, t, i])
            fsum[tid] = acc[0]
        tree(fsum, False)

    if kind == "quantize":
        @T.prim_func(private=True)
        def func(var_x: T.handle, var_qx: T.handle, var_sx: T.handle, var_xsum: T.handle):
            T.func_attr(launch.attrs)
            nb, nt = T.int64(), T.int64()
            x = T.match_buffer(var_x, (nb, nt, k), dtype)
            qx = T.match_buffer(var_qx, (nb, nt, k), "int8")
            sx = T.match_buffer(var_sx, (nb, nt, 1), "float16")
            xsum = T.match_buffer(var_xsum, (nb, nt, 1), "int32")
            for bx in launch.blocks(nb * nt):
                fmax = T.alloc_buffer((THREADS,), "float32", scope=launch.shared)
                isum = T.alloc_buffer((THREADS,), "int32", scope=launch.shared)
                b, t = bx // nt, bx % nt
                row_max(lambda i: T.Cast("float32", x[b, t, i]), fmax)
                quantize_pass(lambda i: T.Cast("float32", x[b, t, i]), fmax, qx, sx, xsum, b, t, isum)

    elif kind == "rmsnorm":
        @T.prim_func(private=True)
        def func(var_x: T.handle, var_w: T.handle, var_qx: T.handle, var_sx: T.handle, var_xsum: T.handle):
            T.func_attr(launch.attrs)
            nb, nt = T.int64(), T.int64()
            x = T.match_buffer(var_x, (nb, nt, k), dtype)
            w = T.match_buffer(var_w, (k,), dtype)
            qx = T.match_buffer(var_qx, (nb, nt, k), "int8")
            sx = T.match_buffer(var_sx, (nb, nt, 1), "float16")
            xsum = T.match_buffer(var_xsum, (nb, nt, 1), "int32")
            for bx in launch.blocks(nb * nt):
                fsum = T.alloc_buffer((THREADS,), "float32", scope=launch.shared)
                fmax = T.alloc_buffer((THREADS,), "float32", scope=launch.shared)
                isum = T.alloc_buffer((THREADS,), "int32", scope=launch.shared)
                b, t = bx // nt, bx % nt
                sum_squares(x, b, t, fsum)
                norm_quant(x, w, qx, sx, xsum, b, t, fsum, fmax, isum)

    elif kind == "add_rmsnorm":
        @T.prim_func(private=True)
        def func(var_x: T.handle, var_d: T.handle, var_w: T.handle, var_out: T.handle, var_qx: T.handle,
                 var_sx: T.handle, var_xsum: T.handle):
            T.func_attr(launch.attrs)
            nb, nt = T.int64(), T.int64()
            x = T.match_buffer(var_x, (nb, nt, k), dtype)
            d = T.match_buffer(var_d, (nb, nt, k), dtype)
            w = T.match_buffer(var_w, (k,), dtype)
            x_out = T.match_buffer(var_out, (nb, nt, k), dtype)
            qx = T.match_buffer(var_qx, (nb, nt, k), "int8")
            sx = T.match_buffer(var_sx, (nb, nt, 1), "float16")
            xsum = T.match_buffer(var_xsum, (nb, nt, 1), "int32")
            for bx in launch.blocks(nb * nt):
                fsum = T.alloc_buffer((THREADS,), "float32", scope=launch.shared)
                fmax = T.alloc_buffer((THREADS,), "float32", scope=launch.shared)
                isum = T.alloc_buffer((THREADS,), "int32", scope=launch.shared)
                b, t = bx // nt, bx % nt
                for tid in launch.threads(THREADS):
                    acc = T.alloc_buffer((1,), "float32", scope=launch.local)
                    acc[0] = T.float32(0)
                    for j in range(per_thread):
                        i = j * THREADS + tid
                        if i < k:
                            v = rounded(T.Cast("float32", x[b, t, i]) + T.Cast("float32", d[b, t, i]))
                            x_out[b, t, i] = T.Cast(dtype, v)
                            acc[0] = acc[0] + v * v
                    fsum[tid] = acc[0]
                tree(fsum, False)
                norm_quant(x_out, w, qx, sx, xsum, b, t, fsum, fmax, isum)

    else:
        @T.prim_func(private=True)
        def func(var_gu: T.handle, var_qx: T.handle, var_sx: T.handle, var_xsum: T.handle):
            T.func_attr(launch.attrs)
            nb, nt = T.int64(), T.int64()
            gu = T.match_buffer(var_gu, (nb, nt, 2 * k), dtype)
            qx = T.match_buffer(var_qx, (nb, nt, k), "int8")
            sx = T.match_buffer(var_sx, (nb, nt, 1), "float16")
            xsum = T.match_buffer(var_xsum, (nb, nt, 1), "int32")
            for bx in launch.blocks(nb * nt):
                fmax = T.alloc_buffer((THREADS,), "float32", scope=launch.shared)
                isum = T.alloc_buffer((THREADS,), "int32", scope=launch.shared)
                b, t = bx // nt, bx % nt
                row_max(lambda i: silu_mul(gu, b, t, i), fmax)
                quantize_pass(lambda i: silu_mul(gu, b, t, i), fmax, qx, sx, xsum, b, t, isum)

    return with_root_block(func)


def with_root_block(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with its body in an empty root block. Relax's RewriteDataflowReshape inspects every
    call_tir of a single tensor argument and needs one there; the CUDA lowering (tirx pipeline)
    takes it off again (``schedules.pipeline``)."""
    root = s_tir.SBlock([], [], [], "root", func.body)
    return func.with_body(s_tir.SBlockRealize([], tirx.const(True, "bool"), root))


def act_quant_cpu(kind: str, k: int, dtype: str, eps: float = 1e-6) -> tirx.PrimFunc:
    """``act_quant`` for CPUs, vectorized: the same PrimFunc signature and the same arithmetic in the
    same order. Rows run in parallel; within a row, the THREADS partial sums of the block kernel
    (element i in partial i % THREADS, each partial summed in increasing i) are THREADS vector lanes
    (taken 16 at a time: one zmm of fp32), and the tree that combines them halves them at each step.
    So every sum, and so every output, equals the CPU and CUDA forms' bit for bit, where those walk
    the THREADS threads one at a time. Fewer than PARALLEL_ROWS rows run on one core."""
    if kind not in KINDS:
        raise ValueError(f"unknown activation-quantization kind {kind!r} (one of {', '.join(KINDS)})")
    full, rem = k // THREADS, k % THREADS
    floor, inv_k, eps_ = (tirx.const(v, "float32") for v in (RANGE_FLOOR, 1.0 / k, eps))
    attrs = Launch(False).attrs

    _, silu_mul, normed, summed, quant = _elementwise(k, dtype)

    def step(n: int) -> int:
        """Vector width for n lanes: at most 16 (one zmm of fp32; wider vectors only slow LLVM)."""
        return math.gcd(n, 16)

    def at(to, ti, n: int):
        """Lane to * step(n) + ti of an n-lane loop."""
        return to * step(n) + ti

    @T.macro
    def halve(red, w, is_max):
        for to in range(w // step(w)):
            for ti in T.vectorized(step(w)):
                if is_max:
                    red[at(to, ti, w)] = T.max(red[at(to, ti, w)], red[at(to, ti, w) + w])
                else:
                    red[at(to, ti, w)] = red[at(to, ti, w)] + red[at(to, ti, w) + w]

    @T.macro
    def tree(red, is_max):
        """red[0] = max or sum of red[0:256], as ``act_quant``'s block tree (THREADS = 256)."""
        halve(red, 128, is_max)
        halve(red, 64, is_max)
        halve(red, 32, is_max)
        halve(red, 16, is_max)
        halve(red, 8, is_max)
        halve(red, 4, is_max)
        halve(red, 2, is_max)
        halve(red, 1, is_max)

    # each of these takes n lanes of the row from element ``base`` (a whole THREADS, then the rest)
    @T.macro
    def accumulate(red, update, base, n):
        for to in range(n // step(n)):
            for ti in T.vectorized(step(n)):
                red[at(to, ti, n)] = update(red[at(to, ti, n)], base + at(to, ti, n))

    @T.macro
    def codes(value, qx, b, t, scale, ired, base, n):
        for to in range(n // step(n)):
            for ti in T.vectorized(step(n)):
                qx[b, t, base + at(to, ti, n)] = quant(value(base + at(to, ti, n)), scale)
                ired[at(to, ti, n)] = ired[at(to, ti, n)] + T.Cast("int32", quant(value(base + at(to, ti, n)), scale))

    @T.macro
    def residual(x, d, x_out, b, t, base, n):
        for to in range(n // step(n)):
            for ti in T.vectorized(step(n)):
                x_out[b, t, base + at(to, ti, n)] = T.Cast(dtype, summed(x, d, b, t, base + at(to, ti, n)))

    @T.macro
    def lanes(red, init, update):
        """red[tid] = update over i = tid, tid + THREADS, ... < K of ``update(acc, i)``, from ``init``."""
        for to in range(THREADS // step(THREADS)):
            for ti in T.vectorized(step(THREADS)):
                red[at(to, ti, THREADS)] = init
        for j in range(full):
            accumulate(red, update, j * THREADS, THREADS)
        if rem > 0:
            accumulate(red, update, full * THREADS, rem)

    @T.macro
    def quantize_row(value, qx, sx, xsum, b, t, fred, ired):
        """qx, sx, xsum of the row ``value(i)``: the max tree, then the codes and their sum."""
        lanes(fred, T.float32(0), lambda acc, i: T.max(acc, T.abs(value(i))))
        tree(fred, True)
        fred[0] = T.Cast("float32", T.Cast("float16", T.max(fred[0], floor) / T.float32(INT8_MAX)))
        sx[b, t, 0] = T.Cast("float16", fred[0])
        for to in range(THREADS // step(THREADS)):
            for ti in T.vectorized(step(THREADS)):
                ired[at(to, ti, THREADS)] = 0
        for j in range(full):
            codes(value, qx, b, t, fred[0], ired, j * THREADS, THREADS)
        if rem > 0:
            codes(value, qx, b, t, fred[0], ired, full * THREADS, rem)
        tree(ired, False)
        xsum[b, t, 0] = ired[0]

    @T.macro
    def norm_quantize(x, w, qx, sx, xsum, b, t, fred, ired, rs):
        """RMSNorm of row x[b, t] (its sum of squares in fred[0]), then quantize."""
        rs[0] = T.rsqrt(fred[0] * inv_k + eps_)
        quantize_row(lambda i: normed(x, w, b, t, i, rs[0]), qx, sx, xsum, b, t, fred, ired)

    @T.macro
    def quantize_one(x, qx, sx, xsum, b, t):
        fred = T.alloc_buffer((THREADS,), "float32")
        ired = T.alloc_buffer((THREADS,), "int32")
        quantize_row(lambda i: T.Cast("float32", x[b, t, i]), qx, sx, xsum, b, t, fred, ired)

    @T.macro
    def rmsnorm_one(x, w, qx, sx, xsum, b, t):
        fred = T.alloc_buffer((THREADS,), "float32")
        ired = T.alloc_buffer((THREADS,), "int32")
        rs = T.alloc_buffer((1,), "float32")
        lanes(fred, T.float32(0), lambda acc, i: acc + T.Cast("float32", x[b, t, i]) * T.Cast("float32", x[b, t, i]))
        tree(fred, False)
        norm_quantize(x, w, qx, sx, xsum, b, t, fred, ired, rs)

    @T.macro
    def add_rmsnorm_one(x, d, w, x_out, qx, sx, xsum, b, t):
        for j in range(full):
            residual(x, d, x_out, b, t, j * THREADS, THREADS)
        if rem > 0:
            residual(x, d, x_out, b, t, full * THREADS, rem)
        rmsnorm_one(x_out, w, qx, sx, xsum, b, t)

    @T.macro
    def silu_mul_one(gu, qx, sx, xsum, b, t):
        fred = T.alloc_buffer((THREADS,), "float32")
        ired = T.alloc_buffer((THREADS,), "int32")
        quantize_row(lambda i: silu_mul(gu, b, t, i), qx, sx, xsum, b, t, fred, ired)

    # rows run in parallel from PARALLEL_ROWS rows on: decode's single row would wait ~5 us for the
    # thread pool, 20 times its own work (the branch is on the row count, at run time)
    if kind == "quantize":
        @T.prim_func(private=True)
        def func(var_x: T.handle, var_qx: T.handle, var_sx: T.handle, var_xsum: T.handle):
            T.func_attr(attrs)
            nb, nt = T.int64(), T.int64()
            x = T.match_buffer(var_x, (nb, nt, k), dtype)
            qx = T.match_buffer(var_qx, (nb, nt, k), "int8")
            sx = T.match_buffer(var_sx, (nb, nt, 1), "float16")
            xsum = T.match_buffer(var_xsum, (nb, nt, 1), "int32")
            if nb * nt >= PARALLEL_ROWS:
                for row in T.parallel(nb * nt):
                    quantize_one(x, qx, sx, xsum, row // nt, row % nt)
            else:
                for row in range(nb * nt):
                    quantize_one(x, qx, sx, xsum, row // nt, row % nt)

    elif kind == "rmsnorm":
        @T.prim_func(private=True)
        def func(var_x: T.handle, var_w: T.handle, var_qx: T.handle, var_sx: T.handle, var_xsum: T.handle):
            T.func_attr(attrs)
            nb, nt = T.int64(), T.int64()
            x = T.match_buffer(var_x, (nb, nt, k), dtype)
            w = T.match_buffer(var_w, (k,), dtype)
            qx = T.match_buffer(var_qx, (nb, nt, k), "int8")
            sx = T.match_buffer(var_sx, (nb, nt, 1), "float16")
            xsum = T.match_buffer(var_xsum, (nb, nt, 1), "int32")
            if nb * nt >= PARALLEL_ROWS:
                for row in T.parallel(nb * nt):
                    rmsnorm_one(x, w, qx, sx, xsum, row // nt, row % nt)
            else:
                for row in range(nb * nt):
                    rmsnorm_one(x, w, qx, sx, xsum, row // nt, row % nt)

    elif kind == "add_rmsnorm":
        @T.prim_func(private=True)
        def func(var_x: T.handle, var_d: T.handle, var_w: T.handle, var_out: T.handle, var_qx: T.handle,
                 var_sx: T.handle, var_xsum: T.handle):
            T.func_attr(attrs)
            nb, nt = T.int64(), T.int64()
            x = T.match_buffer(var_x, (nb, nt, k), dtype)
            d = T.match_buffer(var_d, (nb, nt, k), dtype)
            w = T.match_buffer(var_w, (k,), dtype)
            x_out = T.match_buffer(var_out, (nb, nt, k), dtype)
            qx = T.match_buffer(var_qx, (nb, nt, k), "int8")
            sx = T.match_buffer(var_sx, (nb, nt, 1), "float16")
            xsum = T.match_buffer(var_xsum, (nb, nt, 1), "int32")
            if nb * nt >= PARALLEL_ROWS:
                for row in T.parallel(nb * nt):
                    add_rmsnorm_one(x, d, w, x_out, qx, sx, xsum, row // nt, row % nt)
            else:
                for row in range(nb * nt):
                    add_rmsnorm_one(x, d, w, x_out, qx, sx, xsum, row // nt, row % nt)

    else:
        @T.prim_func(private=True)
        def func(var_gu: T.handle, var_qx: T.handle, var_sx: T.handle, var_xsum: T.handle):
            T.func_attr(attrs)
            nb, nt = T.int64(), T.int64()
            gu = T.match_buffer(var_gu, (nb, nt, 2 * k), dtype)
            qx = T.match_buffer(var_qx, (nb, nt, k), "int8")
            sx = T.match_buffer(var_sx, (nb, nt, 1), "float16")
            xsum = T.match_buffer(var_xsum, (nb, nt, 1), "int32")
            if nb * nt >= PARALLEL_ROWS:
                for row in T.parallel(nb * nt):
                    silu_mul_one(gu, qx, sx, xsum, row // nt, row % nt)
            else:
                for row in range(nb * nt):
                    silu_mul_one(gu, qx, sx, xsum, row // nt, row % nt)

    return with_root_block(func)
