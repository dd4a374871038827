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
                 The key's minimum factors out of the dot product: one multiply-add per code;
                 codes become floats through the exponent field (``_code``), not a conversion.
                 One block per (token, kv head, split of the context) serves the kv head's G query
                 heads, so each code is loaded once for all of them; the context is split
                 (flash-decoding) only when there are too few (token, kv head) pairs to fill the
                 device, and ``kv4_merge`` combines the splits by their log-sum-exp.
New tokens are written before attention reads, so a prefill attends to its own (quantized) keys,
as the fake-quant reference does. The same PrimFuncs run on CPUs (blocks in parallel, each phase's
threads one after another) and on CUDA (threadIdx, shared memory, explicit barriers). CUDA builds
run prefill on the tensor cores (``kv4_prefill``) where its shapes allow; this kernel serves
decode, and prefill on CPUs and at other shapes. Reference: ``schedules/reference/kv4.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx
from tvm.relax.frontend.nn.llm.position_embedding import switch_rope_freq_func
from tvm.script import tirx as T

from qoq_compiler.formats import RANGE_FLOOR, UINT4_MAX, ceildiv

from .toolkit import Launch

LOG2E = 1.4426950408889634


def _rotated(qkv, t, head, i, positions, freq, d: int, theta: float):
    """RoPE of element (t, head, i) of ``qkv`` at ``positions[t]`` (rotate-half layout), in qkv's dtype."""
    cos_f, sin_f, var_map = freq(positions[t].astype("float32"), i, d, theta, "float32")
    other = tirx.if_then_else(i < d // 2, -qkv[t, head, i + d // 2], qkv[t, head, i - d // 2]).astype("float32")
    expr = (cos_f * qkv[t, head, i].astype("float32") + sin_f * other).astype(qkv.dtype)
    for var, value in var_map.items():
        expr = tirx.Let(var, value, expr)
    return expr


def hadamard_sign(i, j):
    """Entry (i, j) of the Sylvester Hadamard matrix of an order up to 2^16, (-1)^popcount(i & j), as
    float32; the parity by xor-folding shifts (plain integer ops, which vectorize; LLVM's ctpop
    intrinsic is refused for TVM's vector types)."""
    b = tirx.Cast("int32", i) & tirx.Cast("int32", j)
    for s in (8, 4, 2, 1):
        b = b ^ (b >> s)
    return tirx.const(1.0, "float32") - (b & 1).astype("float32") * tirx.const(2.0, "float32")


def hadamard_row(x, i, d: int):
    """(H_D x)_i / sqrt(D) for a vector x in (shared) memory: D fp32 multiply-adds, j ascending."""
    acc = tirx.const(0.0, "float32")
    for j in range(d):
        acc = acc + x[j] * hadamard_sign(i, j)
    return acc * tirx.const(d ** -0.5, "float32")


@T.macro
def fwht(x, d: int):
    """x <- H_D x in place, unnormalized: log2(D) stages of butterflies (x[lo], x[lo + h]) <-
    (x[lo] + x[lo + h], x[lo] - x[lo + h]) at strides h = 1, 2, 4, ... (one CPU "thread")."""
    for s in range(d.bit_length() - 1):
        for p in range(d // 2):
            lo = ((p >> s) << (s + 1)) + (p & ((1 << s) - 1))
            a = x[lo]
            b = x[lo + (1 << s)]
            x[lo] = a + b
            x[lo + (1 << s)] = a - b


def rope_q(qkv: te.Tensor, positions: te.Tensor, num_q_heads: int, theta: float, rope_scaling: dict) -> te.Tensor:
    """qkv [T, Hq + 2 Hkv, D], positions [T] int32 -> RoPE(q) [T, Hq, D] (K is rotated by ``kv4_append``)."""
    d = int(qkv.shape[2])
    freq = switch_rope_freq_func(dict(rope_scaling))
    return te.compute((qkv.shape[0], num_q_heads, d),
                      lambda t, h, i: _rotated(qkv, t, h, i, positions, freq, d, theta), name="q_rope")


def rope_q_rotated(num_q_heads: int, num_kv_heads: int, head_dim: int, theta: float, rope_scaling: dict,
                   dtype: str, gpu: bool) -> tirx.PrimFunc:
    """RoPE(q), then H_D RoPE(q) / sqrt(D): what ``kv4_append(rotate=True)`` does to K, so q . k is
    unchanged. One block per (token, q head). On GPUs one thread per element sums its row of the
    Hadamard matrix over the RoPE'd vector in shared memory (D fp32 multiply-adds each, j
    ascending); on CPUs a fast Walsh-Hadamard transform rotates the vector in place (D/2 log2 D
    butterflies, ``fwht``; ``quant.simulate`` sums in that order).
    PrimFunc (qkv [T, Hq + 2 Hkv, D], positions [T], out [T, Hq, D])."""
    if head_dim & (head_dim - 1):
        raise ValueError(f"the q/k Hadamard rotation needs a power-of-2 head_dim, got {head_dim}")
    freq = switch_rope_freq_func(dict(rope_scaling))
    launch = Launch(gpu)

    @T.prim_func(private=True)
    def rope_rotate(var_qkv: T.handle, var_pos: T.handle, var_out: T.handle):
        T.func_attr(launch.attrs)
        n = T.int64()
        qkv = T.match_buffer(var_qkv, (n, num_q_heads + 2 * num_kv_heads, head_dim), dtype)
        positions = T.match_buffer(var_pos, (n,), "int32")
        out = T.match_buffer(var_out, (n, num_q_heads, head_dim), dtype)
        for bx in launch.blocks(n * num_q_heads):
            x = T.alloc_buffer((head_dim,), "float32", scope=launch.shared)
            t = bx // num_q_heads
            h = bx % num_q_heads
            for i in launch.threads(head_dim):
                x[i] = T.Cast("float32", _rotated(qkv, t, h, i, positions, freq, head_dim, theta))
            if gpu:
                for i in launch.threads(head_dim):
                    T.tvm_storage_sync("shared")
                    out[t, h, i] = T.Cast(dtype, hadamard_row(x, i, head_dim))
            else:
                fwht(x, head_dim)
                for i in range(head_dim):
                    out[t, h, i] = T.Cast(dtype, x[i] * T.float32(head_dim ** -0.5))

    return rope_rotate


def kv4_append(num_layers: int, num_q_heads: int, num_kv_heads: int, head_dim: int, theta: float,
               rope_scaling: dict, dtype: str, gpu: bool, rotate: bool = False) -> tirx.PrimFunc:
    """In place, one block per (new token, K or V, kv head), one thread per element: RoPE (K only,
    rounded to ``dtype`` as the model's activations are), with ``rotate`` then H_D RoPE(k) / sqrt(D)
    in fp32 (as ``rope_q_rotated`` rotates q), then (scale, minimum) and UINT4 codes
    (``quant.reference.kv4_quantize``) written to slot ``slots[t]`` of layer ``layer``.
    PrimFunc (kv_data, kv_param, qkv [T, Hq + 2 Hkv, D], positions [T], slots [T], layer int64)."""
    if rotate and head_dim & (head_dim - 1):
        raise ValueError(f"the q/k Hadamard rotation needs a power-of-2 head_dim, got {head_dim}")
    half = head_dim // 2
    freq = switch_rope_freq_func(dict(rope_scaling))
    launch = Launch(gpu)
    floor = tirx.const(RANGE_FLOOR, "float32")

    def code(x, lo, scale):
        c = T.round((x - T.Cast("float32", lo)) / T.Cast("float32", scale))
        return T.Cast("uint8", T.min(T.max(c, T.float32(0)), T.float32(UINT4_MAX)))

    @T.prim_func(private=True)
    def append(var_data: T.handle, var_param: T.handle, var_qkv: T.handle, var_pos: T.handle, var_slots: T.handle,
               layer: T.int64):
        T.func_attr(launch.attrs)
        n, s = T.int64(), T.int64()
        data = T.match_buffer(var_data, (num_layers, 2, s, num_kv_heads, half), "uint8")
        param = T.match_buffer(var_param, (num_layers, 2, s, num_kv_heads, 2), "float16")
        qkv = T.match_buffer(var_qkv, (n, num_q_heads + 2 * num_kv_heads, head_dim), dtype)
        positions = T.match_buffer(var_pos, (n,), "int32")
        slots = T.match_buffer(var_slots, (n,), "int32")
        for bx in launch.blocks(n * 2 * num_kv_heads):
            x0 = T.alloc_buffer((head_dim,), "float32", scope=launch.shared)  # RoPE(k) or v
            x = T.alloc_buffer((head_dim,), "float32", scope=launch.shared)   # what is quantized
            st = T.alloc_buffer((2,), "float16", scope=launch.shared)  # scale, minimum as stored
            t = bx // (2 * num_kv_heads)
            kv = bx // num_kv_heads % 2
            h = bx % num_kv_heads
            slot = T.Cast("int64", slots[t])
            for i in launch.threads(head_dim):
                if kv == 0:
                    x0[i] = T.Cast("float32", _rotated(qkv, t, num_q_heads + h, i, positions, freq, head_dim, theta))
                else:
                    x0[i] = T.Cast("float32", qkv[t, num_q_heads + num_kv_heads + h, i])
            if rotate and not gpu:
                if kv == 0:
                    fwht(x0, head_dim)
            for i in launch.threads(head_dim):
                if gpu:
                    T.tvm_storage_sync("shared")
                if rotate:
                    if kv == 0:
                        if gpu:
                            x[i] = hadamard_row(x0, i, head_dim)
                        else:
                            x[i] = x0[i] * T.float32(head_dim ** -0.5)
                    else:
                        x[i] = x0[i]
                else:
                    x[i] = x0[i]
            for i in launch.threads(head_dim):
                if gpu:
                    T.tvm_storage_sync("shared")
                mm = T.alloc_buffer((2,), "float32", scope=launch.local)  # min, max
                if i == 0:
                    mm[0] = x[0]
                    mm[1] = x[0]
                    for d in range(1, head_dim):
                        mm[0] = T.min(mm[0], x[d])
                        mm[1] = T.max(mm[1], x[d])
                    st[1] = T.Cast("float16", mm[0])
                    st[0] = T.Cast("float16", T.max(mm[1] - T.Cast("float32", T.Cast("float16", mm[0])), floor)
                                   / T.float32(UINT4_MAX))
                    param[layer, kv, slot, h, 0] = st[0]
                    param[layer, kv, slot, h, 1] = st[1]
            for i in launch.threads(head_dim):
                if gpu:
                    T.tvm_storage_sync("shared")
                if i < half:
                    data[layer, kv, slot, h, i] = code(x[2 * i], st[1], st[0]) | (code(x[2 * i + 1], st[1], st[0])
                                                                                 << T.uint8(4))

    return append


THREADS = 128  # threads per block of the split attention kernel


@dataclass(frozen=True)
class SplitPlan:
    """How ``kv4_attention`` cuts the work: one block per (new token, kv head, split of its context).

    A block serves the G = Hq / Hkv query heads of one kv head (each code is read once for all of
    them) and walks its split ``keys`` keys at a time: THREADS / lanes keys side by side, lanes =
    D / 8 threads per key, one 32-bit word (8 codes) per thread, ``unroll`` keys per thread.
    A token's context is split only while the launch is short of ``target_blocks`` blocks
    (decode of few sequences over long contexts); splits hold at least ``min_chunk`` keys and are
    combined by ``kv4_merge`` through a workspace of ``target_blocks`` rows.
    """

    num_kv_heads: int
    group: int
    head_dim: int
    target_blocks: int
    min_chunk: int = 256

    @property
    def lanes(self) -> int:
        return self.head_dim // 8

    @property
    def unroll(self) -> int:
        return max(1, 32 * self.lanes // THREADS)

    @property
    def keys(self) -> int:
        return THREADS // self.lanes * self.unroll

    @property
    def v_split(self) -> int:
        """Threads sharing one (head, word) of the V accumulation, each over every v_split-th key."""
        return max(1, THREADS // (self.group * self.lanes))

    def splits_cap(self, n):
        """Splits per (token, kv head) in a launch of n tokens: 1 once n * Hkv blocks fill the GPU."""
        return T.Cast("int32", T.max(T.min(T.int64(self.target_blocks) // (n * self.num_kv_heads),
                                           T.int64(self.target_blocks)), T.int64(1)))

    def chunk(self, length, cap):
        """Keys per split of a context of ``length`` keys: a multiple of ``keys``, >= ``min_chunk``."""
        splits = T.min(cap, (length + self.min_chunk - 1) // self.min_chunk)
        per = (length + splits - 1) // splits
        return (per + self.keys - 1) // self.keys * self.keys


def split_plan(num_q_heads: int, num_kv_heads: int, head_dim: int, gpu: bool, **overrides) -> SplitPlan:
    """The plan for a target: enough blocks for every SM of a large GPU, a few per core on CPUs."""
    if head_dim % 8:
        raise ValueError(f"KV4 attention needs head_dim % 8 == 0 (one 32-bit word per 8 codes), got {head_dim}")
    return SplitPlan(num_kv_heads, num_q_heads // num_kv_heads, head_dim,
                     **{"target_blocks": 1024 if gpu else 16, **overrides})


def workspace_shape(plan: SplitPlan) -> tuple[int, int, int]:
    """[rows, G, D + 2] float32: each split's normalised output, then its running max and denominator."""
    return (plan.target_blocks, plan.group, plan.head_dim + 2)


def _code(word, e: int):
    """Code e of a 32-bit word of eight as float32 without an int-to-float conversion: the nibble
    ORed into the mantissa of 2^23 is the float 2^23 + code; subtracting 2^23 is exact. One shift,
    one and-or (a single LOP3) and one add per code, all on full-rate ALUs (the conversion unit
    runs at a quarter of their rate or less)."""
    bits = (word >> T.uint32(4 * e)) & T.uint32(15) | T.uint32(0x4B000000)
    return T.reinterpret("float32", bits) - T.float32(8388608.0)


def kv4_attention(num_layers: int, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                  sm_scale: float, dtype: str, gpu: bool, plan: SplitPlan | None = None) -> tirx.PrimFunc:
    """PrimFunc (q [T, Hq, D], kv_data, kv_param, positions [T], token_seq [T], page_table [B, MP],
    layer (int64 scalar), out [T, Hq, D], workspace ``workspace_shape``).

    Block (t, kv head g, split s) over keys [start, end) of token t's context, G query heads at once,
    in phases separated by barriers (on CPUs the same loops run one after another):
      A  each thread loads one 32-bit K word and one V word of a key (V to shared, ahead of use) and
         its (scale, min) pairs, unpacks the 8 K codes with shift-and-mask and forms G partial dots;
      B  score[h, k] = sm_scale * log2(e) * (s_k * sum of the partial dots + lo_k * sum_d q_hd);
      C  online softmax: per head the new running max m and correction 2^(m_old - m) (one thread
         per head), p = 2^(score - m) (one per (head, key)), then the denominator;
      D  acc[h, d] = acc * correction + sum_k p_k s_k code_kd + sum_k p_k lo_k, the V codes taken from
         shared (the second sum is shared by a thread's 8 codes);
    then out = acc / denominator, to ``out`` when the context is one split, else to the workspace
    with (m, denominator) for ``kv4_merge``.
    """
    plan = plan or split_plan(num_q_heads, num_kv_heads, head_dim, gpu)
    half, group, lanes, keys, unroll = head_dim // 2, plan.group, plan.lanes, plan.keys, plan.unroll
    v_split, nt, by_key = plan.v_split, THREADS, THREADS // lanes
    launch = Launch(gpu)
    scale = tirx.const(sm_scale * LOG2E, "float32")
    floor = T.float32(-3.0e38)

    @T.prim_func(private=True)
    def attention(var_q: T.handle, var_data: T.handle, var_param: T.handle, var_pos: T.handle,
                  var_seq: T.handle, var_table: T.handle, layer: T.int64, var_out: T.handle, var_ws: T.handle):
        T.func_attr(launch.attrs)
        n, s, b, mp = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (n, num_q_heads, head_dim), dtype)
        data = T.match_buffer(var_data, (num_layers, 2, s, num_kv_heads, half), "uint8")
        param = T.match_buffer(var_param, (num_layers, 2, s, num_kv_heads, 2), "float16")
        positions = T.match_buffer(var_pos, (n,), "int32")
        token_seq = T.match_buffer(var_seq, (n,), "int32")
        table = T.match_buffer(var_table, (b, mp), "int32")
        out = T.match_buffer(var_out, (n, num_q_heads, head_dim), dtype)
        ws = T.match_buffer(var_ws, workspace_shape(plan), "float32")
        words = T.decl_buffer((num_layers, 2, s, num_kv_heads, lanes), "uint32", data=data.data)
        cap = T.meta_var(plan.splits_cap(n))
        for bx in launch.blocks(n * num_kv_heads * cap):
            q_sh = T.alloc_buffer((group, head_dim), "float32", scope=launch.shared)
            part = T.alloc_buffer((group, keys, lanes), "float32", scope=launch.shared)
            v_sh = T.alloc_buffer((keys, lanes), "uint32", scope=launch.shared)
            pair = T.alloc_buffer((keys, 4), "float32", scope=launch.shared)  # K scale, K min, V scale, V min
            score = T.alloc_buffer((group, keys), "float32", scope=launch.shared)
            prob = T.alloc_buffer((group, keys), "float32", scope=launch.shared)
            state = T.alloc_buffer((group, 4), "float32", scope=launch.shared)  # max, denominator, correction, q sum
            acc = T.alloc_buffer((v_split, group, head_dim), "float32", scope=launch.shared)
            t = T.Cast("int32", bx) // (num_kv_heads * cap)  # index math in 32 bits, slots in 64
            g = T.Cast("int32", bx) // cap % num_kv_heads
            split = T.Cast("int32", bx) % cap
            length = positions[t] + 1
            chunk = plan.chunk(length, cap)
            start = split * chunk
            end = T.min(length, start + chunk)
            seq = token_seq[t]
            for tx in launch.threads(nt):
                for r in range(ceildiv(group * head_dim, nt)):
                    if r * nt + tx < group * head_dim:
                        q_sh[(r * nt + tx) // head_dim, (r * nt + tx) % head_dim] = T.Cast(
                            "float32", q[t, g * group + (r * nt + tx) // head_dim, (r * nt + tx) % head_dim])
                for r in range(ceildiv(v_split * group * head_dim, nt)):
                    if r * nt + tx < v_split * group * head_dim:
                        acc[(r * nt + tx) // (group * head_dim), (r * nt + tx) // head_dim % group,
                            (r * nt + tx) % head_dim] = T.float32(0)
            for tx in launch.threads(nt):
                if gpu:
                    T.tvm_storage_sync("shared")
                if tx < group:
                    qsum = T.alloc_buffer((1,), "float32", scope=launch.local)
                    qsum[0] = T.float32(0)
                    for d in range(head_dim):
                        qsum[0] = qsum[0] + q_sh[tx, d]
                    state[tx, 0] = floor
                    state[tx, 1] = T.float32(0)
                    state[tx, 3] = qsum[0]
            for it in range((T.max(end - start, 0) + keys - 1) // keys):  # none past the context
                for tx in launch.threads(nt):  # A
                    if gpu:
                        T.tvm_storage_sync("shared")
                    codes = T.alloc_buffer((8,), "float32", scope=launch.local)
                    dot = T.alloc_buffer((1,), "float32", scope=launch.local)
                    for u in range(unroll):
                        if start + it * keys + u * by_key + tx // lanes < end:
                            j = start + it * keys + u * by_key + tx // lanes
                            slot = T.Cast("int64", table[seq, j // page_size]) * page_size + j % page_size
                            v_sh[u * by_key + tx // lanes, tx % lanes] = words[layer, 1, slot, g, tx % lanes]
                            if tx % lanes == 0:
                                for i in range(4):
                                    pair[u * by_key + tx // lanes, i] = T.Cast(
                                        "float32", param[layer, i // 2, slot, g, i % 2])
                            for e in range(8):
                                codes[e] = _code(words[layer, 0, slot, g, tx % lanes], e)
                            for h in range(group):
                                dot[0] = T.float32(0)
                                for e in range(8):
                                    dot[0] = dot[0] + q_sh[h, tx % lanes * 8 + e] * codes[e]
                                part[h, u * by_key + tx // lanes, tx % lanes] = dot[0]
                for tx in launch.threads(nt):  # B
                    if gpu:
                        T.tvm_storage_sync("shared")
                    dot = T.alloc_buffer((1,), "float32", scope=launch.local)
                    for r in range(ceildiv(group * keys, nt)):
                        if r * nt + tx < group * keys:
                            if start + it * keys + (r * nt + tx) % keys < end:
                                dot[0] = T.float32(0)
                                for l in range(lanes):
                                    dot[0] = dot[0] + part[(r * nt + tx) // keys, (r * nt + tx) % keys, l]
                                score[(r * nt + tx) // keys, (r * nt + tx) % keys] = scale * (
                                    pair[(r * nt + tx) % keys, 0] * dot[0]
                                    + pair[(r * nt + tx) % keys, 1] * state[(r * nt + tx) // keys, 3])
                            else:
                                score[(r * nt + tx) // keys, (r * nt + tx) % keys] = floor
                for tx in launch.threads(nt):  # C1: new running max per head, and the correction
                    if gpu:
                        T.tvm_storage_sync("shared")
                    mx = T.alloc_buffer((1,), "float32", scope=launch.local)
                    if tx < group:
                        mx[0] = state[tx, 0]
                        for k in range(keys):
                            mx[0] = T.max(mx[0], score[tx, k])
                        state[tx, 2] = T.exp2(state[tx, 0] - mx[0])
                        state[tx, 0] = mx[0]
                for tx in launch.threads(nt):  # C2: p = 2^(score - m), one thread per (head, key)
                    if gpu:
                        T.tvm_storage_sync("shared")
                    for r in range(ceildiv(group * keys, nt)):
                        if r * nt + tx < group * keys:
                            prob[(r * nt + tx) // keys, (r * nt + tx) % keys] = T.exp2(
                                score[(r * nt + tx) // keys, (r * nt + tx) % keys] - state[(r * nt + tx) // keys, 0])
                for tx in launch.threads(nt):  # C3: denominator per head
                    if gpu:
                        T.tvm_storage_sync("shared")
                    total = T.alloc_buffer((1,), "float32", scope=launch.local)
                    if tx < group:
                        total[0] = T.float32(0)
                        for k in range(keys):
                            total[0] = total[0] + prob[tx, k]
                        state[tx, 1] = state[tx, 1] * state[tx, 2] + total[0]
                for tx in launch.threads(nt):  # D
                    if gpu:
                        T.tvm_storage_sync("shared")
                    a = T.alloc_buffer((8,), "float32", scope=launch.local)
                    pv = T.alloc_buffer((2,), "float32", scope=launch.local)  # p * V scale, sum of p * V min
                    for r in range(ceildiv(v_split * group * lanes, nt)):
                        if r * nt + tx < v_split * group * lanes:
                            for e in range(8):
                                a[e] = T.float32(0)
                            pv[1] = T.float32(0)
                            for kk in range(ceildiv(keys, v_split)):
                                if kk * v_split + (r * nt + tx) // (group * lanes) < keys:
                                    if start + it * keys + kk * v_split + (r * nt + tx) // (group * lanes) < end:
                                        pv[0] = prob[(r * nt + tx) // lanes % group,
                                                      kk * v_split + (r * nt + tx) // (group * lanes)] \
                                            * pair[kk * v_split + (r * nt + tx) // (group * lanes), 2]
                                        pv[1] = pv[1] + prob[(r * nt + tx) // lanes % group,
                                                      kk * v_split + (r * nt + tx) // (group * lanes)] \
                                            * pair[kk * v_split + (r * nt + tx) // (group * lanes), 3]
                                        for e in range(8):
                                            a[e] = a[e] + pv[0] * _code(
                                                v_sh[kk * v_split + (r * nt + tx) // (group * lanes),
                                                     (r * nt + tx) % lanes], e)
                            for e in range(8):
                                acc[(r * nt + tx) // (group * lanes), (r * nt + tx) // lanes % group,
                                    (r * nt + tx) % lanes * 8 + e] = \
                                    acc[(r * nt + tx) // (group * lanes), (r * nt + tx) // lanes % group,
                                        (r * nt + tx) % lanes * 8 + e] \
                                    * state[(r * nt + tx) // lanes % group, 2] + a[e] + pv[1]
            for tx in launch.threads(nt):  # out = acc / denominator
                if gpu:
                    T.tvm_storage_sync("shared")
                total = T.alloc_buffer((1,), "float32", scope=launch.local)
                for r in range(ceildiv(group * head_dim, nt)):
                    if r * nt + tx < group * head_dim and start < length:
                        total[0] = T.float32(0)
                        for i in range(v_split):
                            total[0] = total[0] + acc[i, (r * nt + tx) // head_dim, (r * nt + tx) % head_dim]
                        if chunk >= length:
                            out[t, g * group + (r * nt + tx) // head_dim, (r * nt + tx) % head_dim] = T.Cast(
                                dtype, total[0] / state[(r * nt + tx) // head_dim, 1])
                        else:
                            ws[(t * num_kv_heads + g) * cap + split, (r * nt + tx) // head_dim,
                               (r * nt + tx) % head_dim] = total[0] / state[(r * nt + tx) // head_dim, 1]
                            if (r * nt + tx) % head_dim == 0:
                                ws[(t * num_kv_heads + g) * cap + split, (r * nt + tx) // head_dim,
                                   head_dim] = state[(r * nt + tx) // head_dim, 0]
                                ws[(t * num_kv_heads + g) * cap + split, (r * nt + tx) // head_dim,
                                   head_dim + 1] = state[(r * nt + tx) // head_dim, 1]

    return attention


def kv4_merge(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str, gpu: bool,
              plan: SplitPlan | None = None) -> tirx.PrimFunc:
    """In place on out [T, Hq, D]: for tokens whose context ``kv4_attention`` split into S > 1 parts
    with outputs o_s, running maxima m_s (log2 domain) and denominators l_s,
        out = sum_s 2^(m_s - M) l_s o_s / sum_s 2^(m_s - M) l_s,   M = max_s m_s.
    PrimFunc (out, workspace, positions [T])."""
    plan = plan or split_plan(num_q_heads, num_kv_heads, head_dim, gpu)
    group = plan.group
    launch = Launch(gpu)

    @T.prim_func(private=True)
    def merge(var_out: T.handle, var_ws: T.handle, var_pos: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        out = T.match_buffer(var_out, (n, num_q_heads, head_dim), dtype)
        ws = T.match_buffer(var_ws, workspace_shape(plan), "float32")
        positions = T.match_buffer(var_pos, (n,), "int32")
        cap = T.meta_var(plan.splits_cap(n))
        for bx in launch.blocks(n * num_q_heads):
            for d in launch.threads(head_dim):
                st = T.alloc_buffer((3,), "float32", scope=launch.local)  # M, denominator, numerator
                length = positions[bx // num_q_heads] + 1
                chunk = plan.chunk(length, cap)
                row = (bx // num_q_heads * num_kv_heads + bx % num_q_heads // group) * cap
                if chunk < length:
                    st[0] = T.float32(-3.0e38)
                    for i in range((length + chunk - 1) // chunk):
                        st[0] = T.max(st[0], ws[row + i, bx % group, head_dim])
                    st[1] = T.float32(0)
                    st[2] = T.float32(0)
                    for i in range((length + chunk - 1) // chunk):
                        st[1] = st[1] + ws[row + i, bx % group, head_dim + 1] \
                            * T.exp2(ws[row + i, bx % group, head_dim] - st[0])
                        st[2] = st[2] + ws[row + i, bx % group, d] * ws[row + i, bx % group, head_dim + 1] \
                            * T.exp2(ws[row + i, bx % group, head_dim] - st[0])
                    out[bx // num_q_heads, bx % num_q_heads, d] = T.Cast(dtype, st[2] / st[1])

    return merge


def kv4_attention_definition(num_layers: int, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                             sm_scale: float, dtype: str) -> tirx.PrimFunc:
    """What the attention op computes, as a plain loop nest: the definition the model emits
    (``schedules.registry``: op ``kv4_attention``), which the dispatch pass replaces by a kernel.
    For each token t and query head h, over the keys j = 0..positions[t] of sequence token_seq[t],
    dequantized as code * scale + minimum, with a running (max, denominator) softmax:
        out[t, h] = sum_j exp(s_j - m) v_j / sum_j exp(s_j - m),  s_j = sm_scale * q[t, h] . k_j
    PrimFunc (q [T, Hq, D], kv_data, kv_param, positions [T], token_seq [T], page_table [B, MP],
    layer int64, out [T, Hq, D]): ``kv4_attention``'s arguments without its workspace."""
    group, half = num_q_heads // num_kv_heads, head_dim // 2

    def value(data, param, layer, kv, slot, g, d):
        code = (data[layer, kv, slot, g, d // 2] >> T.Cast("uint8", 4 * (d % 2))) & T.uint8(15)
        return T.Cast("float32", code) * T.Cast("float32", param[layer, kv, slot, g, 0]) \
            + T.Cast("float32", param[layer, kv, slot, g, 1])

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
        for t, h in T.grid(n, num_q_heads):
            st = T.alloc_buffer((4,), "float32", scope="local")  # max, denominator, score, new max
            acc = T.alloc_buffer((head_dim,), "float32", scope="local")
            st[0] = T.float32(-3.0e38)
            st[1] = T.float32(0)
            for d in range(head_dim):
                acc[d] = T.float32(0)
            for j in range(positions[t] + 1):
                slot = T.Cast("int64", table[token_seq[t], j // page_size]) * page_size + j % page_size
                st[2] = T.float32(0)
                for d in range(head_dim):
                    st[2] = st[2] + T.Cast("float32", q[t, h, d]) * value(data, param, layer, 0, slot, h // group, d)
                st[2] = st[2] * T.float32(sm_scale)
                st[3] = T.max(st[0], st[2])
                st[1] = st[1] * T.exp(st[0] - st[3]) + T.exp(st[2] - st[3])
                for d in range(head_dim):
                    acc[d] = acc[d] * T.exp(st[0] - st[3]) \
                        + T.exp(st[2] - st[3]) * value(data, param, layer, 1, slot, h // group, d)
                st[0] = st[3]
            for d in range(head_dim):
                out[t, h, d] = T.Cast(dtype, acc[d] / st[1])

    return attention
