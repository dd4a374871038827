"""KV4 attention for CPUs: one task per (token, query head), over the paged 4-bit cache of
``kv4_attention`` (same layout, same math), vectorized along the head dimension.

Codes sit two to a byte along D (low nibble: even d), so q is split once into its even and odd
halves qe, qo [D/2], and each key's D/2 bytes give, as two vectors of nibbles,
    dot_j   = sum_i qe_i * (byte_ji & 15) + qo_i * (byte_ji >> 4)          (D/2-wide vectors, one sum)
    score_j = sm_scale * log2(e) * (s_j * dot_j + lo_j * sum_d q_d)          (K's minimum factored out)
and the values accumulate the same way, in even and odd halves:
    oe_i += p_j s_j (byte_ji & 15),  oo_i += p_j s_j (byte_ji >> 4),  plo += p_j lo_j
    out[2i] = (oe_i + plo) / den,  out[2i + 1] = (oo_i + plo) / den
Keys are taken CHUNK at a time with an online softmax (running max m and denominator den, both
rescaled by 2^(m_old - m) per chunk), so every buffer has a fixed size and lives on the task's
stack. Tasks run in parallel over the cores: decode of one sequence gives Hq tasks, prefill T * Hq.
Reference: ``schedules/reference/kv4.py`` (``attention``).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .kv4_attention import LOG2E

CHUNK = 32


def kv4_attention_cpu(num_layers: int, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                      sm_scale: float, dtype: str) -> tirx.PrimFunc:
    """PrimFunc (q [T, Hq, D], kv_data, kv_param, positions [T], token_seq [T], page_table [B, MP],
    layer (int64 scalar), out [T, Hq, D]): the signature of ``kv4_attention_definition``."""
    half, group = head_dim // 2, num_q_heads // num_kv_heads
    scale = tirx.const(sm_scale * LOG2E, "float32")

    def nibble(data, layer, i, slot, kv, byte, high: bool):
        b = data[layer, i, slot, kv, byte]
        return T.Cast("float32", T.shift_right(b, T.uint8(4)) if high else T.bitwise_and(b, T.uint8(15)))

    def kparam(param, layer, i, slot, kv, which):
        return T.Cast("float32", param[layer, i, slot, kv, which])

    @T.macro
    def halve(dot, w):
        for i in T.vectorized(w):
            dot[i] = dot[i] + dot[i + w]

    @T.prim_func(private=True)
    def attention(var_q: T.handle, var_data: T.handle, var_param: T.handle, var_pos: T.handle,
                  var_seq: T.handle, var_table: T.handle, layer: T.int64, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n, s, b, mp = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (n, num_q_heads, head_dim), dtype)
        data = T.match_buffer(var_data, (num_layers, 2, s, num_kv_heads, half), "uint8")
        param = T.match_buffer(var_param, (num_layers, 2, s, num_kv_heads, 2), "float16")
        positions = T.match_buffer(var_pos, (n,), "int32")
        token_seq = T.match_buffer(var_seq, (n,), "int32")
        table = T.match_buffer(var_table, (b, mp), "int32")
        out = T.match_buffer(var_out, (n, num_q_heads, head_dim), dtype)
        for task in T.parallel(n * num_q_heads):
            qh = T.alloc_buffer((2, half), "float32")     # q's even and odd elements
            acc = T.alloc_buffer((2, half), "float32")    # oe, oo
            dot = T.alloc_buffer((half,), "float32")
            score = T.alloc_buffer((CHUNK,), "float32")
            slots = T.alloc_buffer((CHUNK,), "int64")
            st = T.alloc_buffer((5,), "float32")          # m, den, plo, q sum, new m / p
            t = task // num_q_heads
            h = task % num_q_heads
            kv = h // group
            for e in range(2):
                for i in T.vectorized(half):
                    qh[e, i] = T.Cast("float32", q[t, h, 2 * i + e])
                    acc[e, i] = T.float32(0)
            st[3] = T.float32(0)
            for d in range(head_dim):
                st[3] = st[3] + T.Cast("float32", q[t, h, d])
            st[0] = T.float32(-3.0e38)
            st[1] = T.float32(0)
            st[2] = T.float32(0)
            for c in range((positions[t] + CHUNK) // CHUNK):
                st[4] = st[0]
                for jj in range(T.min(CHUNK, positions[t] + 1 - c * CHUNK)):
                    slots[jj] = T.Cast("int64", table[token_seq[t], (c * CHUNK + jj) // page_size]) * page_size \
                        + (c * CHUNK + jj) % page_size
                    for i in T.vectorized(half):
                        dot[i] = qh[0, i] * nibble(data, layer, 0, slots[jj], kv, i, False) \
                            + qh[1, i] * nibble(data, layer, 0, slots[jj], kv, i, True)
                    if half > 64:  # a tree: half is a power of two, at most 128
                        halve(dot, 64)
                    if half > 32:
                        halve(dot, 32)
                    if half > 16:
                        halve(dot, 16)
                    if half > 8:
                        halve(dot, 8)
                    if half > 4:
                        halve(dot, 4)
                    if half > 2:
                        halve(dot, 2)
                    halve(dot, 1)
                    score[jj] = scale * (kparam(param, layer, 0, slots[jj], kv, 0) * dot[0]
                                         + kparam(param, layer, 0, slots[jj], kv, 1) * st[3])
                    st[4] = T.max(st[4], score[jj])
                st[2] = st[2] * T.exp2(st[0] - st[4])  # rescale to the new running max
                st[1] = st[1] * T.exp2(st[0] - st[4])
                for e in range(2):
                    for i in T.vectorized(half):
                        acc[e, i] = acc[e, i] * T.exp2(st[0] - st[4])
                st[0] = st[4]
                for jj in range(T.min(CHUNK, positions[t] + 1 - c * CHUNK)):
                    st[4] = T.exp2(score[jj] - st[0])
                    st[1] = st[1] + st[4]
                    st[2] = st[2] + st[4] * kparam(param, layer, 1, slots[jj], kv, 1)
                    for i in T.vectorized(half):
                        acc[0, i] = acc[0, i] + st[4] * kparam(param, layer, 1, slots[jj], kv, 0) \
                            * nibble(data, layer, 1, slots[jj], kv, i, False)
                        acc[1, i] = acc[1, i] + st[4] * kparam(param, layer, 1, slots[jj], kv, 0) \
                            * nibble(data, layer, 1, slots[jj], kv, i, True)
            for e in range(2):
                for i in T.vectorized(half):
                    out[t, h, 2 * i + e] = T.Cast(dtype, (acc[e, i] + st[2]) / st[1])

    return attention


def supports(head_dim: int) -> bool:
    """The tree sum needs D/2 a power of two, D = 4 ... 256."""
    return 4 <= head_dim <= 256 and (head_dim // 2) & (head_dim // 2 - 1) == 0
