"""Reference of ``schedules.kv4_attention`` and ``schedules.kv4_prefill``: RoPE and the paged 4-bit
cache's contents and attention, in float64 NumPy.

    rope          RoPE (rotate-half layout, default scaling) of x [T, H, D] at positions [T]
    packed_codes  the cache bytes ``kv4_append`` writes for x [T, H, D]: codes of
                  ``quant.reference.kv4_quantize``, two per byte along D, low nibble first
    dequantize    kv_data uint8 [..., D/2], kv_param fp16 [..., 2] -> float64 [..., D]
    attention     each query's softmax attention over its (dequantized) history
    random_case   a random paged cache with ragged histories and its expected attention
"""

from __future__ import annotations

import numpy as np

from qoq_compiler.formats import ceildiv
from qoq_compiler.quant.reference import kv4_quantize


def rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """float64 RoPE (rotate-half layout) of x [T, H, D] at positions pos [T]."""
    d = x.shape[-1]
    angle = pos[:, None].astype(np.float64) * theta ** (-np.arange(0, d, 2) / d)       # [T, D/2]
    cos, sin = (np.concatenate([f(angle)] * 2, axis=-1)[:, None] for f in (np.cos, np.sin))
    rotated = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
    return x * cos + rotated * sin


def packed_codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kv_data uint8 [T, H, D/2], kv_param fp16 [T, H, 2]) of x [T, H, D] as the cache holds them."""
    q, s, lo = kv4_quantize(x)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), np.stack([s, lo], axis=-1)


def dequantize(data: np.ndarray, param: np.ndarray) -> np.ndarray:
    """float64 values of cache vectors: codes * scale + minimum."""
    codes = np.stack([data & 15, data >> 4], axis=-1).reshape(*data.shape[:-1], -1).astype(np.float64)
    return codes * param[..., :1].astype(np.float64) + param[..., 1:].astype(np.float64)


def attention(q: np.ndarray, k_hist: list[np.ndarray], v_hist: list[np.ndarray], sm_scale: float) -> np.ndarray:
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


def page_table(lengths: list[int], page: int, spare: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(page table [B, max pages], pages in the pool): every sequence's pages drawn from a shuffled
    pool with ``spare`` pages nobody owns, so a kernel that ignores the table reads wrong data."""
    pages = sum(ceildiv(n, page) for n in lengths) + spare
    free = list(rng.permutation(pages))
    table = np.zeros((len(lengths), max(ceildiv(n, page) for n in lengths)), "int32")
    for b, n in enumerate(lengths):
        for i in range(ceildiv(n, page)):
            table[b, i] = free.pop()
    return table, pages


def history_slots(table: np.ndarray, seq: np.ndarray, pos: np.ndarray, page: int) -> list[np.ndarray]:
    """For each token t, the cache slots of positions 0..pos[t] of its sequence seq[t]."""
    return [table[seq[t], np.arange(pos[t] + 1) // page] * page + np.arange(pos[t] + 1) % page
            for t in range(len(seq))]


def random_case(hq: int, hkv: int, d: int, page: int, layers: int, seqs: list[tuple[int, int]],
                rng: np.random.Generator):
    """A random paged cache (codes and (scale, min), never zeros) holding sequences of (history, new)
    tokens in pages from a shuffled pool with 2 spare pages, the new tokens' queries, and the
    float64 attention of each over its history in the last layer. Returns
    ((q fp16 [T, Hq, D], kv_data, kv_param, positions [T], token_seq [T], page_table, layer), expected)."""
    table, pages = page_table([h + n for h, n in seqs], page, 2, rng)
    data = rng.integers(0, 256, size=(layers, 2, pages * page, hkv, d // 2), dtype=np.uint8)
    param = np.stack([rng.uniform(0.01, 0.3, size=(layers, 2, pages * page, hkv)),
                      rng.uniform(-2, 0, size=(layers, 2, pages * page, hkv))], axis=-1).astype(np.float16)
    seq = np.concatenate([[b] * n for b, (_, n) in enumerate(seqs)]).astype(np.int32)
    pos = np.concatenate([np.arange(h, h + n) for h, n in seqs]).astype(np.int32)
    q = (rng.standard_normal((len(seq), hq, d)) * 0.5).astype(np.float16)
    deq = dequantize(data, param)
    hist = history_slots(table, seq, pos, page)
    layer = layers - 1
    expected = attention(q, [deq[layer, 0, h] for h in hist], [deq[layer, 1, h] for h in hist], d ** -0.5)
    return (q, data, param, pos, seq, table, layer), expected
