"""W4A8 GEMM for CPUs: UINT4 weight codes unpacked in registers, multiplied by int8 activations with
the CPU's integer dot-product instruction, int32 accumulators, QoQ's epilogues.

The math is ``w4a8_gemm``'s. Per group g (progressive) the level-2 weight q * s2 - z2 is never
formed: the group's dot product of the codes is scaled by s2 in int32 and the zero point leaves
through the group's sum of activations,
    acc_g[m, n] = sum_{k in g} qx[m, k] * q[n, k]                   u4 x s8 dot products, int32
    psum[m, n]  = sum_g acc_g[m, n] * s2[g, n] - z2[g, n] * xs[m, g]  xs[m, g] = sum_{k in g} qx[m, k]
which is the same integer as sum_k qx * (q * s2 - z2), exactly; per channel psum = sum_k qx * q and
the epilogue subtracts z * sx * xsum as there. y = psum * sx * s1 (- z * sx * xsum) in fp32, in
that order, then cast to the output dtype: the results equal the portable kernel's bit for bit.

Layout (``cpu_pack_codes``, prepared at compile time): channels in blocks of L (the vector's int32
lanes), each channel's codes in 32-bit words of 8 inputs,
    qv[b, w, l] (uint32)  byte r: low nibble q[bL + l, 8w + r], high nibble q[bL + l, 8w + 4 + r]
so one vector load gives L channels x 8 inputs; ``& 0x0F0F0F0F`` and ``>> 4`` give two operands of
L x 4 unsigned bytes, each multiplied by the broadcast 4 activation bytes of its inputs:
    ISA          L   instruction (per 4 inputs x L channels)
    avx512vnni   16  vpdpbusd zmm             u8 x s8, summed by 4 into int32 (no saturation)
    avxvnni       8  {vex} vpdpbusd ymm
    avx2          8  vpmaddubsw + vpmaddwd    pairs to int16 (15 * 127 * 2 < 2^15: exact), then int32
    dotprod       4  sdot (aarch64)           s8 x s8 (codes 0..15 are valid s8)
Group scales and zeros as [N/L, G, L] int8 (``cpu_channel_groups``): one L-byte load per block
and group. K, the group size and N must be multiples of 8, 8 and L (``supports``).

W8A8 (``bits=8``, ``w8a8_gemm``'s math) runs on the same loops: its int8 weights are stored as bytes
w + 128 (``cpu_pack_bytes``; the x86 instructions read that operand unsigned), four inputs a word,
and psum = sum_k (w + 128) x - 128 * sum_k x exactly; sdot takes the int8 weights as they are.
AVX2 does not serve W8A8: vpmaddubsw's int16 pair sums (255 * 127 * 2) would saturate.

Loops: channel blocks in parallel over the cores; inside, tokens in tiles of TOKENS (each unpacked
weight vector feeds TOKENS dot products; remaining tokens one at a time, so one token, decode, does
no wasted work). The group sums xs are computed first, rows in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx
from tvm.script import tirx as T

from qoq_compiler.formats import ceildiv

from .toolkit import PARALLEL_ROWS

TOKENS = 8


@dataclass(frozen=True)
class Isa:
    """An integer dot-product instruction set: ``lanes`` int32 accumulators per vector; ``features``
    the LLVM CPU features it needs (all of them); ``dot(acc, codes, x4)`` adds to each lane the dot
    product of its 4 code bytes (the lane's uint32 of ``codes``) with the 4 int8 activations packed
    in the int32 ``x4``."""

    name: str
    lanes: int
    features: tuple[str, ...]
    intrinsic: str  # LLVM's (accumulator, a bytes, b bytes) -> int32 lanes; avx2: two instructions
    unsigned: bool = True  # the weight operand is read as unsigned bytes (x86), else signed (sdot)
    bytes_exact: bool = True  # exact for any weight byte (avx2's int16 pairs saturate past 15 * 127 * 2)

    def dot(self, acc, codes, x4):
        L, B = self.lanes, 4 * self.lanes
        a = T.reinterpret(codes, dtype=f"int8x{B}")
        b = T.reinterpret(T.broadcast(x4, L), dtype=f"int8x{B}")
        if self.name == "avx2":
            pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), a, b,
                                            dtype="int16x16")
            return acc + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                                                 pairs, T.broadcast(T.int16(1), 16), dtype="int32x8")
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(self.intrinsic), acc, a, b, dtype=f"int32x{L}")


#: in order of preference (the registry's kernel order follows it)
ISAS = (Isa("avx512vnni", 16, ("avx512vnni", "avx512bw", "avx512vl"), "llvm.x86.avx512.vpdpbusd.512"),
        Isa("avxvnni", 8, ("avxvnni", "avx2"), "llvm.x86.avx512.vpdpbusd.256"),
        Isa("avx2", 8, ("avx2",), "llvm.x86.avx2.pmadd.ub.sw", bytes_exact=False),
        Isa("dotprod", 4, ("neon", "dotprod"), "llvm.aarch64.neon.sdot.v4i32.v16i8", unsigned=False))


def supports(n: int, k: int, group: int | None, isa: Isa) -> bool:
    return k % 8 == 0 and n % isa.lanes == 0 and (group is None or group % 8 == 0)


def supports_w8a8(n: int, k: int, isa: Isa) -> bool:
    return isa.bytes_exact and k % 4 == 0 and n % isa.lanes == 0


def w8_offset(isa: Isa) -> int:
    """What the W8A8 layout adds to each int8 weight: 128 where the instruction reads the weight
    operand as unsigned bytes, then psum = sum_k (w + 128) x - 128 * sum_k x; 0 for sdot."""
    return 128 if isa.unsigned else 0


def cpu_gemm(n: int, k: int, group: int | None, isa: Isa, dtype: str, bits: int = 4) -> tirx.PrimFunc:
    """PrimFunc (qx, sx, qv, s1, e0, e1, y) for B0 x B1 = M tokens (the model's [batch, tokens]
    rows, taken as they are: no reshape around the call): qx [B0, B1, K] int8, sx [B0, B1, 1]
    fp16, qv [N/L, K/8, L] uint32, s1 [N] fp16, (e0, e1) = (s2, z2) int8 [N/L, G, L] per group
    or (z [N] fp16, xsum [B0, B1, 1] int32) per channel; y [B0, B1, N] in ``dtype``.

    ``bits=8``: the W8A8 GEMM, PrimFunc (qx, sx, qv, sw, y): qv [N/L, K/4, L] holds the int8 weights
    plus ``w8_offset`` as bytes (``cpu_pack_bytes``), four inputs a word, one dot product each;
    psum = acc - offset * sum_k qx (the row sum computed first), y = psum * sx * sw."""
    eight = bits == 8
    L, nb, words = isa.lanes, n // isa.lanes, k // (4 if eight else 8)
    offset = w8_offset(isa) if eight else 0
    per_group = group is not None and not eight
    g_count = ceildiv(k, group) if per_group else 1
    g_words = group // 8 if per_group else words
    e0_shape, e0_dtype = ((nb, g_count, L), "int8") if per_group else ((n,), "float16")
    nibbles, four = T.broadcast(T.uint32(0x0F0F0F0F), L), T.broadcast(T.uint32(4), L)

    def x4(qx, t, kk):
        """The 4 activations qx[t, kk:kk+4] as one int32."""
        return T.reinterpret(qx.vload([t, kk], "int8x4"), dtype="int32")

    def codes(qv, b, w, high: bool):
        """The L x 4 code bytes of word w of block b: its low or high nibbles."""
        v = qv.vload([b, w, 0], f"uint32x{L}")
        return T.bitwise_and(T.shift_right(v, four) if high else v, nibbles)

    def vec(buf, i):
        return buf.vload([i, 0], f"int32x{L}")

    def epilogue(tot, sx, s1, e0, e1, t, ch, lane, i):
        scaled = T.Cast("float32", tot[i, lane]) * T.Cast("float32", sx[t, 0]) * T.Cast("float32", s1[ch])
        if per_group or eight:
            return T.Cast(dtype, scaled)
        return T.Cast(dtype, scaled - T.Cast("float32", e0[ch]) * T.Cast("float32", sx[t, 0])
                      * T.Cast("float32", e1[t, 0]))

    @T.macro
    def tile(qx, sx, qv, s1, e0, e1, xs, y, b, t0, mt):
        acc = T.alloc_buffer((mt, L), "int32")  # "global" scope: small ones live on the stack
        tot = T.alloc_buffer((mt, L), "int32")
        for i in T.unroll(mt):
            tot[i, T.ramp(0, 1, L)] = T.broadcast(0, L)
        for g in range(g_count):
            for i in T.unroll(mt):
                acc[i, T.ramp(0, 1, L)] = T.broadcast(0, L)
            for w in range(T.min(g_words, words - g * g_words)):
                for i in T.unroll(mt):
                    if eight:
                        acc[i, T.ramp(0, 1, L)] = isa.dot(vec(acc, i), qv.vload([b, w, 0], f"uint32x{L}"),
                                                          x4(qx, t0 + i, w * 4))
                    else:
                        acc[i, T.ramp(0, 1, L)] = isa.dot(vec(acc, i), codes(qv, b, g * g_words + w, False),
                                                          x4(qx, t0 + i, (g * g_words + w) * 8))
                        acc[i, T.ramp(0, 1, L)] = isa.dot(vec(acc, i), codes(qv, b, g * g_words + w, True),
                                                          x4(qx, t0 + i, (g * g_words + w) * 8 + 4))
            for i in T.unroll(mt):
                if offset != 0:
                    tot[i, T.ramp(0, 1, L)] = vec(acc, i) - T.broadcast(xs[t0 + i, 0] * offset, L)
                elif per_group:
                    tot[i, T.ramp(0, 1, L)] = vec(tot, i) + vec(acc, i) * T.Cast(
                        f"int32x{L}", e0.vload([b, g, 0], f"int8x{L}")) - T.Cast(
                        f"int32x{L}", e1.vload([b, g, 0], f"int8x{L}")) * T.broadcast(xs[t0 + i, g], L)
                else:
                    tot[i, T.ramp(0, 1, L)] = vec(acc, i)
        for i in T.unroll(mt):
            for lane in T.vectorized(L):
                y[t0 + i, b * L + lane] = epilogue(tot, sx, s1, e0, e1, t0 + i, b * L + lane, lane, i)

    @T.macro
    def row_sums(qx, xs, t):
        for g in range(g_count):
            xs[t, g] = 0
            for kk in range(T.min(group if per_group else k, k - g * group if per_group else k)):
                xs[t, g] = xs[t, g] + T.Cast("int32", qx[t, (g * group if per_group else 0) + kk])

    @T.macro
    def group_sums(qx, xs, m):
        """xs[t, g] = sum of token t's activations in group g (one group of K for W8A8); rows in
        parallel from PARALLEL_ROWS on (a parallel launch costs more than a few rows' sums)."""
        if m >= PARALLEL_ROWS:
            for t in T.parallel(m):
                row_sums(qx, xs, t)
        else:
            for t in range(m):
                row_sums(qx, xs, t)

    @T.macro
    def gemm(qx, sx, qv, s1, e0, e1, xs, y, m):
        for b in T.parallel(nb):
            for mo in range(m // TOKENS):
                tile(qx, sx, qv, s1, e0, e1, xs, y, b, mo * TOKENS, TOKENS)
            for t in range(m // TOKENS * TOKENS, m):
                tile(qx, sx, qv, s1, e0, e1, xs, y, b, t, 1)

    if eight:  # only the function asked for is parsed: the other's buffers would not type-check
        @T.prim_func(private=True)
        def func8(var_qx: T.handle, var_sx: T.handle, var_qv: T.handle, var_sw: T.handle, var_y: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            b0, b1 = T.int64(), T.int64()
            qx3 = T.match_buffer(var_qx, (b0, b1, k), "int8")
            sx3 = T.match_buffer(var_sx, (b0, b1, 1), "float16")
            qv = T.match_buffer(var_qv, (nb, words, L), "uint32")
            sw = T.match_buffer(var_sw, (n,), "float16")
            y3 = T.match_buffer(var_y, (b0, b1, n), dtype)
            m = T.meta_var(b0 * b1)
            qx = T.decl_buffer((m, k), "int8", data=qx3.data)
            sx = T.decl_buffer((m, 1), "float16", data=sx3.data)
            y = T.decl_buffer((m, n), dtype, data=y3.data)
            xs = T.alloc_buffer((m, 1) if offset != 0 else (1, 1), "int32")
            if offset != 0:
                group_sums(qx, xs, m)
            gemm(qx, sx, qv, sw, sw, sw, xs, y, m)

        return func8

    @T.prim_func(private=True)
    def func(var_qx: T.handle, var_sx: T.handle, var_qv: T.handle, var_s1: T.handle, var_e0: T.handle,
             var_e1: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b0, b1 = T.int64(), T.int64()
        qx3 = T.match_buffer(var_qx, (b0, b1, k), "int8")
        sx3 = T.match_buffer(var_sx, (b0, b1, 1), "float16")
        qv = T.match_buffer(var_qv, (nb, words, L), "uint32")
        s1 = T.match_buffer(var_s1, (n,), "float16")
        e0 = T.match_buffer(var_e0, e0_shape, e0_dtype)
        e13 = T.match_buffer(var_e1, e0_shape if per_group else (b0, b1, 1), e0_dtype if per_group else "int32")
        y3 = T.match_buffer(var_y, (b0, b1, n), dtype)
        m = T.meta_var(b0 * b1)
        qx = T.decl_buffer((m, k), "int8", data=qx3.data)
        sx = T.decl_buffer((m, 1), "float16", data=sx3.data)
        e1 = T.decl_buffer(e0_shape if per_group else (m, 1), e0_dtype if per_group else "int32", data=e13.data)
        y = T.decl_buffer((m, n), dtype, data=y3.data)
        xs = T.alloc_buffer((m, g_count) if per_group else (1, 1), "int32")
        if per_group:
            group_sums(qx, xs, m)
        gemm(qx, sx, qv, s1, e0, e1, xs, y, m)

    return func


def cpu_pack_codes(q: te.Tensor, lanes: int) -> te.Tensor:
    """Codes uint8 [N, K] -> qv uint32 [N/L, K/8, L] (the module docstring's layout, in TE)."""
    n, k = (int(d) for d in q.shape)
    r = te.reduce_axis((0, 8), name="r")

    def word(b, w, lane):
        code = q[b * lanes + lane, w * 8 + r % 4 + r // 4 * 4].astype("uint32")
        return te.sum(code << (r % 4 * 8 + r // 4 * 4).astype("uint32"), axis=r)

    return te.compute((n // lanes, k // 8, lanes), word, name="cpu_codes")


def cpu_pack_bytes(w: te.Tensor, lanes: int, offset: int) -> te.Tensor:
    """W8A8 weights int8 [N, K] -> uint32 [N/L, K/4, L]: byte r of word w is w[bL + l, 4w + r] + offset."""
    n, k = (int(d) for d in w.shape)
    r = te.reduce_axis((0, 4), name="r")

    def word(b, wi, lane):
        byte = ((w[b * lanes + lane, wi * 4 + r].astype("int32") + offset) & 255).astype("uint32")
        return te.sum(byte << (r * 8).astype("uint32"), axis=r)

    return te.compute((n // lanes, k // 4, lanes), word, name="cpu_bytes")


def cpu_channel_groups(v: te.Tensor, lanes: int) -> te.Tensor:
    """Per-channel rows int8 [N, G] -> [N/L, G, L]."""
    n, g = (int(d) for d in v.shape)
    return te.compute((n // lanes, g, lanes), lambda b, gi, lane: v[b * lanes + lane, gi], name="cpu_groups")
