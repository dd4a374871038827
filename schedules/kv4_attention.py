"""KV4: RoPE, 4-bit quantization of K/V into a paged cache, and attention over it.

Cache layout (one pair of tensors for all layers; S = pages x page_size token slots):
    kv_data   uint8   [L, 2, S, Hkv, D/2]   two UINT4 codes per byte along D (low nibble first);
                                            index 0 holds K, 1 holds V
    kv_param  float16 [L, 2, S, Hkv, 2]     (scale, minimum) of each (token, kv head) vector
A sequence's position j lives in slot page_table[b, j // P] * P + j % P (P = page size); which
pages a sequence owns is decided by the runtime (``runtime.kv_cache``), not by the kernels.

Per layer, for the T new tokens of a ragged batch (``positions`` [T]: absolute position,
``token_seq`` [T]: its row of ``page_table``, ``slots`` [T]: where its K/V go):
    rope_q       RoPE(q) at ``positions``  (TE; any rope_scaling TVM implements: the cos/sin of
                 ``position_embedding.switch_rope_freq_func``)
    kv4_append   in one pass per (token, K or V, kv head), in place: RoPE(k), then
                 lo = fp16(min x),  s = fp16(max(max x - lo, 1e-4) / 15),
                 code = clamp(round((x - lo) / s), 0, 15)            (``quant.reference.kv4_quantize``)
                 written with (s, lo) into the token's slot
    kv4_attention for each new token t and query head h (kv head h // (Hq / Hkv)), over the
                 positions j <= positions[t] of its sequence, with online softmax:
                     score_j = sm_scale * (s_j * sum_d q_d code_jd + lo_j * sum_d q_d)
                     out     = sum_j softmax(score)_j * (code_j * s_j + lo_j)      (V dequantized)
                 The key's minimum factors out of the dot product: one multiply-add per code.
New tokens are written before attention reads, so a prefill attends to its own (quantized) keys,
as the fake-quant reference does. The attention kernel is written with explicit loops, one
thread per (token, head): portable, correct, and slow on GPUs; the tensor-core version replaces it.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend.nn.llm.position_embedding import switch_rope_freq_func
from tvm.script import tirx as T

RANGE_FLOOR = 1e-4  # as quant.reference: every fp16 scale stays positive


def _rotated(qkv, t, head, i, positions, freq, d: int, theta: float):
    """RoPE of element (t, head, i) of ``qkv`` at ``positions[t]`` (rotate-half layout), in qkv's dtype."""
    cos_f, sin_f, var_map = freq(positions[t].astype("float32"), i, d, theta, "float32")
    other = tirx.if_then_else(i < d // 2, -qkv[t, head, i + d // 2], qkv[t, head, i - d // 2]).astype("float32")
    expr = (cos_f * qkv[t, head, i].astype("float32") + sin_f * other).astype(qkv.dtype)
    for var, value in var_map.items():
        expr = tirx.Let(var, value, expr)
    return expr


def rope_q(qkv: te.Tensor, positions: te.Tensor, num_q_heads: int, theta: float, rope_scaling: dict) -> te.Tensor:
    """qkv [T, Hq + 2 Hkv, D], positions [T] int32 -> RoPE(q) [T, Hq, D] (K is rotated by ``kv4_append``)."""
    d = int(qkv.shape[2])
    freq = switch_rope_freq_func(dict(rope_scaling))
    return te.compute((qkv.shape[0], num_q_heads, d),
                      lambda t, h, i: _rotated(qkv, t, h, i, positions, freq, d, theta), name="q_rope")


def kv4_append(num_layers: int, num_q_heads: int, num_kv_heads: int, head_dim: int, theta: float,
               rope_scaling: dict, dtype: str, gpu: bool) -> tirx.PrimFunc:
    """In place, one pass per (new token, K or V, kv head): RoPE (K only, rounded to ``dtype`` as the
    model's activations are), then (scale, minimum) and UINT4 codes (``quant.reference.kv4_quantize``)
    written to slot ``slots[t]`` of layer ``layer``. PrimFunc (kv_data, kv_param, qkv [T, Hq + 2 Hkv, D],
    positions [T], slots [T], layer int64)."""
    half, threads = head_dim // 2, 64
    freq = switch_rope_freq_func(dict(rope_scaling))
    outer = (lambda n: T.thread_binding(n, thread="blockIdx.x")) if gpu else T.parallel
    inner = (lambda n: T.thread_binding(n, thread="threadIdx.x")) if gpu else T.serial
    floor = tirx.const(RANGE_FLOOR, "float32")

    def code(x, lo, scale):
        c = T.round((x - T.Cast("float32", lo)) / T.Cast("float32", scale))
        return T.Cast("uint8", T.min(T.max(c, T.float32(0)), T.float32(15)))

    @T.prim_func(private=True)
    def append(var_data: T.handle, var_param: T.handle, var_qkv: T.handle, var_pos: T.handle, var_slots: T.handle,
               layer: T.int64):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n, s = T.int64(), T.int64()
        data = T.match_buffer(var_data, (num_layers, 2, s, num_kv_heads, half), "uint8")
        param = T.match_buffer(var_param, (num_layers, 2, s, num_kv_heads, 2), "float16")
        qkv = T.match_buffer(var_qkv, (n, num_q_heads + 2 * num_kv_heads, head_dim), dtype)
        positions = T.match_buffer(var_pos, (n,), "int32")
        slots = T.match_buffer(var_slots, (n,), "int32")
        for bx in outer((n * 2 * num_kv_heads + threads - 1) // threads):
            for tx in inner(threads):
                x = T.alloc_buffer((head_dim,), "float32", scope="local")
                st = T.alloc_buffer((2,), "float32", scope="local")  # min, max
                st16 = T.alloc_buffer((2,), "float16", scope="local")  # minimum, scale as stored
                idx = bx * threads + tx
                if idx < n * 2 * num_kv_heads:
                    t = idx // (2 * num_kv_heads)
                    kv = idx // num_kv_heads % 2
                    h = idx % num_kv_heads
                    slot = T.Cast("int64", slots[t])
                    st[0] = T.float32(3.0e38)
                    st[1] = T.float32(-3.0e38)
                    for i in range(head_dim):
                        if kv == 0:
                            x[i] = T.Cast("float32", _rotated(qkv, t, num_q_heads + h, i, positions, freq, head_dim,
                                                              theta))
                        else:
                            x[i] = T.Cast("float32", qkv[t, num_q_heads + num_kv_heads + h, i])
                        st[0] = T.min(st[0], x[i])
                        st[1] = T.max(st[1], x[i])
                    st16[0] = T.Cast("float16", st[0])
                    st16[1] = T.Cast("float16", T.max(st[1] - T.Cast("float32", st16[0]), floor) / T.float32(15))
                    param[layer, kv, slot, h, 0] = st16[1]
                    param[layer, kv, slot, h, 1] = st16[0]
                    for j in range(half):
                        data[layer, kv, slot, h, j] = code(x[2 * j], st16[0], st16[1]) \
                            | (code(x[2 * j + 1], st16[0], st16[1]) << T.uint8(4))

    return append


def kv4_attention(num_layers: int, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                  sm_scale: float, dtype: str, gpu: bool) -> tirx.PrimFunc:
    """PrimFunc (q [T, Hq, D], kv_data, kv_param, positions [T], token_seq [T], page_table [B, MP],
    layer (int64 scalar), out [T, Hq, D])."""
    half, group, threads = head_dim // 2, num_q_heads // num_kv_heads, 64
    outer = (lambda n: T.thread_binding(n, thread="blockIdx.x")) if gpu else T.parallel
    inner = (lambda n: T.thread_binding(n, thread="threadIdx.x")) if gpu else T.serial
    scale = tirx.const(sm_scale, "float32")

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
        for bx in outer((n * num_q_heads + threads - 1) // threads):
            for tx in inner(threads):
                acc = T.alloc_buffer((head_dim,), "float32", scope="local")
                qf = T.alloc_buffer((head_dim,), "float32", scope="local")
                st = T.alloc_buffer((4,), "float32", scope="local")  # max, denominator, q sum, dot
                idx = bx * threads + tx
                if idx < n * num_q_heads:
                    t = idx // num_q_heads
                    h = idx % num_q_heads
                    kvh = h // group
                    st[0] = T.float32(-3.0e38)
                    st[1] = T.float32(0)
                    st[2] = T.float32(0)
                    for d in range(head_dim):
                        qf[d] = T.Cast("float32", q[t, h, d])
                        st[2] = st[2] + qf[d]
                        acc[d] = T.float32(0)
                    for j in range(T.Cast("int64", positions[t]) + 1):
                        slot = T.Cast("int64", table[T.Cast("int64", token_seq[t]), j // page_size]) * page_size \
                            + j % page_size
                        st[3] = T.float32(0)
                        for d in range(half):
                            byte = data[layer, 0, slot, kvh, d]
                            st[3] = st[3] + qf[2 * d] * T.Cast("float32", byte & T.uint8(15)) \
                                + qf[2 * d + 1] * T.Cast("float32", byte >> T.uint8(4))
                        score = scale * (T.Cast("float32", param[layer, 0, slot, kvh, 0]) * st[3]
                                         + T.Cast("float32", param[layer, 0, slot, kvh, 1]) * st[2])
                        m_new = T.max(st[0], score)
                        corr = T.exp(st[0] - m_new)
                        e = T.exp(score - m_new)
                        st[1] = st[1] * corr + e
                        st[0] = m_new
                        sv = T.Cast("float32", param[layer, 1, slot, kvh, 0])
                        lv = T.Cast("float32", param[layer, 1, slot, kvh, 1])
                        for d in range(half):
                            byte = data[layer, 1, slot, kvh, d]
                            acc[2 * d] = acc[2 * d] * corr + e * (T.Cast("float32", byte & T.uint8(15)) * sv + lv)
                            acc[2 * d + 1] = acc[2 * d + 1] * corr + e * (T.Cast("float32", byte >> T.uint8(4)) * sv
                                                                          + lv)
                    for d in range(head_dim):
                        out[t, h, d] = T.Cast(dtype, acc[d] / st[1])

    return attention


def reference(q: np.ndarray, k_hist: list[np.ndarray], v_hist: list[np.ndarray], sm_scale: float) -> np.ndarray:
    """float64 attention of each query q[t] [Hq, D] over its dequantized history k_hist[t] [J, Hkv, D]."""
    out = np.empty(q.shape, dtype=np.float64)
    group = q.shape[1] // k_hist[0].shape[1]
    for t in range(q.shape[0]):
        k = np.repeat(k_hist[t].astype(np.float64), group, axis=1)  # [J, Hq, D]
        v = np.repeat(v_hist[t].astype(np.float64), group, axis=1)
        s = np.einsum("hd,jhd->hj", q[t].astype(np.float64), k) * sm_scale
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out[t] = np.einsum("hj,jhd->hd", p, v)
    return out
