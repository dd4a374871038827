"""KV4 prefill attention on tensor cores (CUDA, fp16 mma.sync), over the cache of ``kv4_attention``.

Same arguments, cache layout and causal semantics as ``kv4_attention`` (which also serves prefill
on CPUs and at shapes this kernel does not take), output written in full (no split, no merge):
    score_rj = sm_scale * (s_j * (q_r . code_j) + lo_j * sum_d q_rd)       K's minimum factored out
    out_r    = sum_j p_rj (s'_j code'_j + lo'_j) / sum_j p_rj,  p = softmax over j <= position(r)
The 4-bit codes 0..15 are exact in fp16, so both products run on the tensor cores without
dequantizing: S' = Q . codes_K^T (m16n8k16, fp16 x fp16 -> fp32) and O += (p s') . codes_V, with
p s' rounded to fp16 (FlashAttention rounds p alike); sum_j p_j lo'_j stays in fp32.

Rows are (token, query head) pairs of one kv head, r = token * G + head-in-group, so a GQA group
shares every load of K and V. One CTA (4 warps, 128 threads) takes BM = 64 rows (16 a warp) and
walks the keys BK = 32 at a time; its rows may belong to several sequences of the ragged batch,
so it walks each sequence present, masking rows of the others (a sequence's tokens are contiguous
and ``token_seq`` never decreases, as ``runtime.kv_cache`` lays a step out). Per key block, phases behind
barriers:
  load     K codes -> K_sh [BK, D] as fp16 pairs (u32), V codes -> VT_sh [D, BK] (transposed, u32
           pairs of keys), (s, lo) of K and V -> sc_sh; rows padded by 8 halves (no bank conflicts)
  scores   per warp, per 8 keys: D / 16 mma with Q's fragments (registers, loaded once) ->
           scaled, masked scores -> S_sh [BM, BK] fp32
  softmax  one thread per row: running max (log2 domain), correction, p s' -> P_sh as fp16 pairs,
           denominator and sum p lo' in fp32
  values   per warp: O *= correction, then BK / 16 x D / 8 mma of P_sh with VT_sh
``PrefillMaps`` holds every index the kernel computes; ``emulate`` runs the kernel's phases in
NumPy through the same maps with the PTX ISA's m16n8k16 fragment layouts, so CPU tests check the
data movement against ``schedules/reference/kv4.py`` without a GPU.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from qoq_compiler.formats import ceildiv

from .kv4_attention import LOG2E
from .reference.ptx import mma_m16n8k16_f16, pack_halves

BM, BK, WARPS = 64, 32, 4
THREADS = 32 * WARPS
FLOOR = -1.0e30  # running maxima start finite, so a fully masked block gives p = 0, never NaN


def supports(head_dim: int, dtype: str) -> bool:
    """Shapes this kernel takes: fp16 activations, head_dim 32, 64, 96 or 128 (a key block's codes
    are whole 128-thread copy rounds; O and Q's fragments stay in registers)."""
    return dtype == "float16" and head_dim % 32 == 0 and head_dim <= 128


class PrefillMaps:
    """Every index of the kernel, as expressions on Python ints, NumPy arrays and TIR alike.
    ``lane`` = thread % 32, ``w`` = warp; fragment registers per the PTX ISA (m16n8k16, f16):
    A (16 x 16) r0 (g, 2t), r1 (g + 8, 2t), r2 (g, 8 + 2t), r3 (g + 8, 8 + 2t); B (16 x 8)
    r0 (2t, g), r1 (8 + 2t, g), each two consecutive k; C (16 x 8) c0 (g, 2t), c1 (g, 2t + 1),
    c2 (g + 8, 2t), c3 (g + 8, 2t + 1), for lane 4g + t."""

    def __init__(self, head_dim: int, group: int):
        self.d, self.group = head_dim, group
        self.k_words = (head_dim + 8) // 2       # u32 per K_sh row (key): D halves + 8 of padding
        self.v_words = (BK + 8) // 2             # u32 per VT_sh row (dim) and per P_sh row
        self.k_iters = BK * head_dim // 8 // THREADS
        self.v_iters = ceildiv((BK // 2) * (head_dim // 8), THREADS)

    # accumulator element c of a lane: local row, column within the 8-wide tile
    @staticmethod
    def c_row(w, lane, c):
        return w * 16 + lane // 4 + c // 2 * 8

    @staticmethod
    def c_col(lane, c):
        return lane % 4 * 2 + c % 2

    # A register r: local row, u32 word (pair of k) within a 16-wide k tile
    @staticmethod
    def a_row(w, lane, r):
        return w * 16 + lane // 4 + r % 2 * 8

    @staticmethod
    def a_word(lane, r):
        return r // 2 * 4 + lane % 4

    # B register r: the n (key or dim) within the 8-wide tile, u32 word within a 16-wide k tile
    @staticmethod
    def b_n(lane):
        return lane // 4

    @staticmethod
    def b_word(lane, r):
        return r * 4 + lane % 4

    # load phase: which key (pair) and 8-code word an iteration of a thread copies
    def k_key(self, it, tx):
        return (it * THREADS + tx) // (self.d // 8)

    def k_word(self, it, tx):
        return (it * THREADS + tx) % (self.d // 8)

    def v_pair(self, it, tx):
        return (it * THREADS + tx) // (self.d // 8)

    v_word = k_word

    def v_valid(self, it, tx):
        return it * THREADS + tx < BK // 2 * (self.d // 8)


def _code(word, e):
    return (word >> T.uint32(4 * e)) & T.uint32(15)


def _half_bits(v):
    """u32 holding the fp16 bits of v (an fp16 or fp32 expression) in its low half."""
    return T.Cast("uint32", T.reinterpret("uint16", T.Cast("float16", v)))


def _pack(lo, hi):
    return _half_bits(lo) | (_half_bits(hi) << T.uint32(16))


def kv4_prefill(num_layers: int, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                sm_scale: float) -> tirx.PrimFunc:
    """PrimFunc (q fp16 [T, Hq, D], kv_data, kv_param, positions [T], token_seq [T], page_table [B, MP],
    layer int64, out fp16 [T, Hq, D]) for CUDA; ``supports`` tells the shapes it takes."""
    if not supports(head_dim, "float16"):
        raise ValueError(f"the tensor-core prefill takes head_dim 32, 64, 96 or 128, got {head_dim}")
    group, d = num_q_heads // num_kv_heads, head_dim
    maps, half = PrefillMaps(d, group), d // 2
    kt, nt = d // 16, d // 8  # k tiles of the scores, n tiles of the output
    scale = tirx.const(sm_scale * LOG2E, "float32")
    mma = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"

    @T.prim_func(private=True)
    def prefill(var_q: T.handle, var_data: T.handle, var_param: T.handle, var_pos: T.handle, var_seq: T.handle,
                var_table: T.handle, layer: T.int64, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "qoqc.tir_pipeline": "tirx"})
        n, s, b, mp = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (n, num_q_heads, d), "float16")
        data = T.match_buffer(var_data, (num_layers, 2, s, num_kv_heads, half), "uint8")
        param = T.match_buffer(var_param, (num_layers, 2, s, num_kv_heads, 2), "float16")
        positions = T.match_buffer(var_pos, (n,), "int32")
        token_seq = T.match_buffer(var_seq, (n,), "int32")
        table = T.match_buffer(var_table, (b, mp), "int32")
        out = T.match_buffer(var_out, (n, num_q_heads, d), "float16")
        words = T.decl_buffer((num_layers, 2, s, num_kv_heads, d // 8), "uint32", data=data.data)
        rows = T.meta_var(T.Cast("int32", n) * group)
        bx = T.env_thread("blockIdx.x")
        by = T.env_thread("blockIdx.y")
        tx = T.env_thread("threadIdx.x")
        T.launch_thread(bx, (rows + BM - 1) // BM)
        T.launch_thread(by, num_kv_heads)
        T.launch_thread(tx, THREADS)
        k_sh = T.decl_buffer((BK, maps.k_words), "uint32", scope="shared")
        vt_sh = T.decl_buffer((d, maps.v_words), "uint32", scope="shared")
        p_sh = T.decl_buffer((BM, maps.v_words), "uint32", scope="shared")
        s_sh = T.decl_buffer((BM, BK + 1), "float32", scope="shared")
        sc_sh = T.decl_buffer((BK, 4), "float32", scope="shared")      # K scale, K min, V scale, V min
        row_sh = T.decl_buffer((BM, 6), "float32", scope="shared")     # max, denominator, sum p lo', corr, q sum
        meta_sh = T.decl_buffer((BM + 1, 2), "int32", scope="shared")  # position, sequence; [BM]: keys of s
        qa = T.decl_buffer((kt * 4,), "uint32", scope="local")
        pa = T.decl_buffer((4,), "uint32", scope="local")
        acc = T.decl_buffer((4,), "float32", scope="local")
        o = T.decl_buffer((nt * 4,), "float32", scope="local")
        wd = T.decl_buffer((2,), "uint32", scope="local")
        red = T.decl_buffer((4,), "float32", scope="local")
        slot = T.decl_buffer((2,), "int64", scope="local")
        w, lane = tx // 32, tx % 32
        # rows of this CTA: metadata, running state, q sums; Q's fragments into registers
        if tx < BM:
            if bx * BM + tx < rows:
                meta_sh[tx, 0] = positions[(bx * BM + tx) // group]
                meta_sh[tx, 1] = token_seq[(bx * BM + tx) // group]
                red[0] = T.float32(0)
                for i in range(d):
                    red[0] = red[0] + T.Cast("float32", q[(bx * BM + tx) // group,
                                                          by * group + (bx * BM + tx) % group, i])
                row_sh[tx, 4] = red[0]
            else:
                meta_sh[tx, 0] = -1
                meta_sh[tx, 1] = -1
                row_sh[tx, 4] = T.float32(0)
            row_sh[tx, 0] = T.float32(FLOOR)
            row_sh[tx, 1] = T.float32(0)
            row_sh[tx, 2] = T.float32(0)
        for i in T.unroll(nt * 4):
            o[i] = T.float32(0)
        for kk in T.unroll(kt):
            for r in T.unroll(4):
                qa[kk * 4 + r] = _pack(
                    q[T.min(bx * BM + maps.a_row(w, lane, r), rows - 1) // group,
                      by * group + T.min(bx * BM + maps.a_row(w, lane, r), rows - 1) % group,
                      kk * 16 + maps.a_word(lane, r) * 2],
                    q[T.min(bx * BM + maps.a_row(w, lane, r), rows - 1) // group,
                      by * group + T.min(bx * BM + maps.a_row(w, lane, r), rows - 1) % group,
                      kk * 16 + maps.a_word(lane, r) * 2 + 1])
        first = token_seq[bx * BM // group]  # the sequences of the CTA's rows (token_seq rises)
        last = token_seq[(T.min(bx * BM + BM, rows) - 1) // group]
        for si in T.serial(last - first + 1):
            T.evaluate(T.cuda.cta_sync())
            if tx == 0:  # keys of this sequence the CTA's rows see: 1 + their largest position
                meta_sh[BM, 0] = 0
                for r in range(BM):
                    if meta_sh[r, 1] == first + si:
                        meta_sh[BM, 0] = T.max(meta_sh[BM, 0], meta_sh[r, 0] + 1)
            T.evaluate(T.cuda.cta_sync())
            for kb in T.serial((meta_sh[BM, 0] + BK - 1) // BK):
                T.evaluate(T.cuda.cta_sync())
                # load: K codes as fp16 pairs, V codes transposed, (scale, min) of both
                for it in T.unroll(maps.k_iters):
                    if kb * BK + maps.k_key(it, tx) < meta_sh[BM, 0]:
                        slot[0] = T.Cast("int64", table[first + si, (kb * BK + maps.k_key(it, tx)) // page_size]) \
                            * page_size + (kb * BK + maps.k_key(it, tx)) % page_size
                        wd[0] = words[layer, 0, slot[0], by, maps.k_word(it, tx)]
                    else:
                        wd[0] = T.uint32(0)
                    for i in T.unroll(4):
                        k_sh[maps.k_key(it, tx), maps.k_word(it, tx) * 4 + i] = _pack(
                            _code(wd[0], 2 * i), _code(wd[0], 2 * i + 1))
                for it in T.unroll(maps.v_iters):
                    if maps.v_valid(it, tx):
                        for e in T.unroll(2):
                            if kb * BK + maps.v_pair(it, tx) * 2 + e < meta_sh[BM, 0]:
                                slot[e] = T.Cast("int64", table[first + si, (kb * BK + maps.v_pair(it, tx) * 2 + e)
                                                               // page_size]) * page_size \
                                    + (kb * BK + maps.v_pair(it, tx) * 2 + e) % page_size
                                wd[e] = words[layer, 1, slot[e], by, maps.v_word(it, tx)]
                            else:
                                wd[e] = T.uint32(0)
                        for i in T.unroll(8):
                            vt_sh[maps.v_word(it, tx) * 8 + i, maps.v_pair(it, tx)] = _pack(_code(wd[0], i),
                                                                                            _code(wd[1], i))
                if tx < BK:
                    if kb * BK + tx < meta_sh[BM, 0]:
                        slot[0] = T.Cast("int64", table[first + si, (kb * BK + tx) // page_size]) * page_size \
                            + (kb * BK + tx) % page_size
                        for i in T.unroll(4):
                            sc_sh[tx, i] = T.Cast("float32", param[layer, i // 2, slot[0], by, i % 2])
                    else:
                        for i in T.unroll(4):
                            sc_sh[tx, i] = T.float32(0)
                T.evaluate(T.cuda.cta_sync())
                # scores: S' = Q . codes^T per 8 keys, then scaled and masked
                for ni in T.unroll(BK // 8):
                    for c in T.unroll(4):
                        acc[c] = T.float32(0)
                    for kk in T.unroll(kt):
                        T.ptx[mma](acc[0], acc[1], acc[2], acc[3],
                                   qa[kk * 4], qa[kk * 4 + 1], qa[kk * 4 + 2], qa[kk * 4 + 3],
                                   k_sh[ni * 8 + maps.b_n(lane), kk * 8 + maps.b_word(lane, 0)],
                                   k_sh[ni * 8 + maps.b_n(lane), kk * 8 + maps.b_word(lane, 1)],
                                   acc[0], acc[1], acc[2], acc[3])
                    for c in T.unroll(4):
                        if meta_sh[maps.c_row(w, lane, c), 1] == first + si and \
                                kb * BK + ni * 8 + maps.c_col(lane, c) <= meta_sh[maps.c_row(w, lane, c), 0]:
                            s_sh[maps.c_row(w, lane, c), ni * 8 + maps.c_col(lane, c)] = scale * (
                                sc_sh[ni * 8 + maps.c_col(lane, c), 0] * acc[c]
                                + sc_sh[ni * 8 + maps.c_col(lane, c), 1] * row_sh[maps.c_row(w, lane, c), 4])
                        else:
                            s_sh[maps.c_row(w, lane, c), ni * 8 + maps.c_col(lane, c)] = T.reinterpret(
                                "float32", T.uint32(0xFF800000))  # -inf
                T.evaluate(T.cuda.cta_sync())
                # softmax: one thread per row
                if tx < BM:
                    red[0] = row_sh[tx, 0]
                    for j in T.unroll(BK):
                        red[0] = T.max(red[0], s_sh[tx, j])
                    red[1] = T.float32(0)
                    red[2] = T.float32(0)
                    for jp in T.unroll(BK // 2):
                        p_sh[tx, jp] = _pack(T.exp2(s_sh[tx, 2 * jp] - red[0]) * sc_sh[2 * jp, 2],
                                             T.exp2(s_sh[tx, 2 * jp + 1] - red[0]) * sc_sh[2 * jp + 1, 2])
                        red[1] = red[1] + T.exp2(s_sh[tx, 2 * jp] - red[0]) + T.exp2(s_sh[tx, 2 * jp + 1] - red[0])
                        red[2] = red[2] + T.exp2(s_sh[tx, 2 * jp] - red[0]) * sc_sh[2 * jp, 3] \
                            + T.exp2(s_sh[tx, 2 * jp + 1] - red[0]) * sc_sh[2 * jp + 1, 3]
                    red[3] = T.exp2(row_sh[tx, 0] - red[0])
                    row_sh[tx, 1] = row_sh[tx, 1] * red[3] + red[1]
                    row_sh[tx, 2] = row_sh[tx, 2] * red[3] + red[2]
                    row_sh[tx, 0] = red[0]
                    row_sh[tx, 3] = red[3]
                T.evaluate(T.cuda.cta_sync())
                # values: O = O * corr + (p s') . codes_V
                for ni in T.unroll(nt):
                    for c in T.unroll(4):
                        o[ni * 4 + c] = o[ni * 4 + c] * row_sh[maps.c_row(w, lane, c), 3]
                for kk in T.unroll(BK // 16):
                    for r in T.unroll(4):
                        pa[r] = p_sh[maps.a_row(w, lane, r), kk * 8 + maps.a_word(lane, r)]
                    for ni in T.unroll(nt):
                        T.ptx[mma](o[ni * 4], o[ni * 4 + 1], o[ni * 4 + 2], o[ni * 4 + 3],
                                   pa[0], pa[1], pa[2], pa[3],
                                   vt_sh[ni * 8 + maps.b_n(lane), kk * 8 + maps.b_word(lane, 0)],
                                   vt_sh[ni * 8 + maps.b_n(lane), kk * 8 + maps.b_word(lane, 1)],
                                   o[ni * 4], o[ni * 4 + 1], o[ni * 4 + 2], o[ni * 4 + 3])
        T.evaluate(T.cuda.cta_sync())
        for ni in T.unroll(nt):
            for c in T.unroll(4):
                if bx * BM + maps.c_row(w, lane, c) < rows:
                    out[(bx * BM + maps.c_row(w, lane, c)) // group,
                        by * group + (bx * BM + maps.c_row(w, lane, c)) % group,
                        ni * 8 + maps.c_col(lane, c)] = T.Cast(
                        "float16", (o[ni * 4 + c] + row_sh[maps.c_row(w, lane, c), 2])
                        / row_sh[maps.c_row(w, lane, c), 1])

    return prefill


def emulate(q, data, param, positions, token_seq, table, layer: int, page_size: int, sm_scale: float,
            num_kv_heads: int) -> np.ndarray:
    """NumPy run of every CTA of ``kv4_prefill`` through ``PrefillMaps``: the same shared-memory
    contents (fp16 pairs packed in u32), fragments gathered per lane and ``mma_m16n8k16_f16`` with
    the PTX ISA's layouts (``schedules.reference.ptx``). Returns out fp16 [T, Hq, D]; rows never written stay NaN."""
    n, hq, d = q.shape
    group = hq // num_kv_heads
    maps, rows = PrefillMaps(d, group), n * group
    words = np.ascontiguousarray(data).view(np.uint32)  # [L, 2, S, Hkv, D/8]
    scale = np.float32(sm_scale * LOG2E)
    out = np.full(q.shape, np.nan, np.float16)
    lanes = np.arange(32)
    for by in range(num_kv_heads):
        for bx in range(ceildiv(rows, BM)):
            r_glob = bx * BM + np.arange(BM)
            valid = r_glob < rows
            tok = np.minimum(r_glob, rows - 1) // group
            head = by * group + np.minimum(r_glob, rows - 1) % group
            pos = np.where(valid, positions[tok], -1)
            seq = np.where(valid, token_seq[tok], -1)
            qsum = np.where(valid, q[tok, head].astype(np.float32).sum(axis=1), 0).astype(np.float32)
            m = np.full(BM, FLOOR, np.float32)
            l_, lo_ = np.zeros(BM, np.float32), np.zeros(BM, np.float32)
            o = np.zeros((WARPS, 32, d // 8, 4), np.float32)
            qa = np.zeros((WARPS, 32, d // 16, 4), np.uint32)
            for w in range(WARPS):
                for kk in range(d // 16):
                    for r in range(4):
                        rr = np.minimum(bx * BM + maps.a_row(w, lanes, r), rows - 1)
                        col = kk * 16 + maps.a_word(lanes, r) * 2
                        qa[w, :, kk, r] = pack_halves(q[rr // group, by * group + rr % group, col],
                                                      q[rr // group, by * group + rr % group, col + 1])
            first, last = token_seq[bx * BM // group], token_seq[(min(bx * BM + BM, rows) - 1) // group]
            for s in range(first, last + 1):
                keys = max([p + 1 for p, sq in zip(pos, seq) if sq == s], default=0)
                for kb in range(ceildiv(keys, BK)):
                    k_sh = np.zeros((BK, maps.k_words), np.uint32)
                    vt_sh = np.zeros((d, maps.v_words), np.uint32)
                    sc = np.zeros((BK, 4), np.float32)

                    def slot_of(j, s=s):
                        return table[s, j // page_size] * page_size + j % page_size

                    for tx in range(THREADS):
                        for it in range(maps.k_iters):
                            j, wd = kb * BK + maps.k_key(it, tx), maps.k_word(it, tx)
                            word = words[layer, 0, slot_of(j), by, wd] if j < keys else np.uint32(0)
                            for i in range(4):
                                k_sh[maps.k_key(it, tx), wd * 4 + i] = pack_halves((word >> 8 * i) & 15,
                                                                                   (word >> (8 * i + 4)) & 15)
                        for it in range(maps.v_iters):
                            if not maps.v_valid(it, tx):
                                continue
                            jp, wd = maps.v_pair(it, tx), maps.v_word(it, tx)
                            w2 = [words[layer, 1, slot_of(kb * BK + 2 * jp + e), by, wd]
                                  if kb * BK + 2 * jp + e < keys else np.uint32(0) for e in (0, 1)]
                            for i in range(8):
                                vt_sh[wd * 8 + i, jp] = pack_halves((w2[0] >> 4 * i) & 15, (w2[1] >> 4 * i) & 15)
                        if tx < BK and kb * BK + tx < keys:
                            sc[tx] = [param[layer, i // 2, slot_of(kb * BK + tx), by, i % 2] for i in range(4)]
                    s_sh = np.zeros((BM, BK), np.float32)
                    for w in range(WARPS):
                        for ni in range(BK // 8):
                            acc = np.zeros((32, 4), np.float32)
                            for kk in range(d // 16):
                                b = np.stack([k_sh[ni * 8 + maps.b_n(lanes), kk * 8 + maps.b_word(lanes, r)]
                                              for r in (0, 1)], axis=1)
                                acc = mma_m16n8k16_f16(acc, qa[w, :, kk], b)
                            for c in range(4):
                                r, jl = maps.c_row(w, lanes, c), ni * 8 + maps.c_col(lanes, c)
                                live = (seq[r] == s) & (kb * BK + jl <= pos[r])
                                s_sh[r, jl] = np.where(live, scale * (sc[jl, 0] * acc[:, c] + sc[jl, 1] * qsum[r]),
                                                       -np.inf)
                    mx = np.maximum(m, s_sh.max(axis=1))
                    p = np.exp2(s_sh - mx[:, None]).astype(np.float32)
                    corr = np.exp2(m - mx).astype(np.float32)
                    p_sh = pack_halves(p[:, 0::2] * sc[0::2, 2], p[:, 1::2] * sc[1::2, 2])  # [BM, BK/2]
                    l_ = l_ * corr + p.sum(axis=1)
                    lo_ = lo_ * corr + (p * sc[:, 3]).sum(axis=1)
                    m = mx
                    for w in range(WARPS):
                        for c in range(4):
                            o[w, :, :, c] *= corr[maps.c_row(w, lanes, c)][:, None]
                        for kk in range(BK // 16):
                            pa = np.stack([p_sh[maps.a_row(w, lanes, r), kk * 8 + maps.a_word(lanes, r)]
                                           for r in range(4)], axis=1)
                            for ni in range(d // 8):
                                b = np.stack([vt_sh[ni * 8 + maps.b_n(lanes), kk * 8 + maps.b_word(lanes, r)]
                                              for r in (0, 1)], axis=1)
                                o[w, :, ni] = mma_m16n8k16_f16(o[w, :, ni], pa, b)
            for w in range(WARPS):
                for ni in range(d // 8):
                    for c in range(4):
                        r = maps.c_row(w, lanes, c)
                        ok = bx * BM + r < rows
                        rg = bx * BM + r[ok]
                        out[rg // group, by * group + rg % group, ni * 8 + maps.c_col(lanes[ok], c)] = (
                            (o[w, ok, ni, c] + lo_[r[ok]]) / l_[r[ok]]).astype(np.float16)
    return out
