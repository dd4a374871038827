"""KV4 kernels on CPU: RoPE matches float64, the appended codes and scales equal the NumPy spec, and
attention over the paged 4-bit cache (the split kernel, and the CPU kernel llvm builds use) equals
float64 attention over the same dequantized cache (page boundaries, GQA, ragged batch)."""

from __future__ import annotations

import numpy as np
import pytest

from qoq_compiler.quant import reference as qref
from qoq_compiler.tvm_env import tvm
from schedules import kv4_attention as ka
from schedules import kv4_attention_cpu as kc
from schedules.reference import kv4 as ref
from tvm import te

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def _build(func):
    """Compile one kernel (the model's are private functions: export this one as ``main``)."""
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)["main"]


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a))


THETA = 10000.0


def append_tokens(k, v, pos, cache, slots, layer, rotate=False):
    """kv4_append of new tokens' K (RoPE'd, and Hadamard-rotated with ``rotate``, in the kernel) and V
    into ``cache`` (data, param); returns the K it quantizes as TVM computes it (``rope_q`` on K
    placed in the q heads: the same expressions, summed in the same order)."""
    n, hkv, d = k.shape
    qkv = np.concatenate([k, k, v], axis=1)                  # "q" heads = K, so rope_q(qkv) = RoPE(K)
    qkv_p = te.placeholder(qkv.shape, "float32", name="qkv")
    pos_p = te.placeholder((n,), "int32", name="pos")
    k_rot = _t(np.zeros((n, hkv, d), "float32"))
    if rotate:
        _build(ka.rope_q_rotated(hkv, hkv, d, THETA, {}, "float32", gpu=False))(_t(qkv), _t(pos), k_rot)
    else:
        _build(te.create_prim_func([qkv_p, pos_p, ka.rope_q(qkv_p, pos_p, hkv, THETA, {})]))(_t(qkv), _t(pos), k_rot)
    num_layers = cache[0].shape[0]
    _build(ka.kv4_append(num_layers, hkv, hkv, d, THETA, {}, "float32", gpu=False, rotate=rotate))(
        cache[0], cache[1], _t(qkv), _t(pos), _t(slots), layer)
    return k_rot.numpy()


@pytest.mark.parametrize("d", [64, 128])
def test_hadamard_rotation_of_q_and_k(d):
    """rope_q_rotated and kv4_append with ``rotate``: H_D RoPE(x) / sqrt(D) (float64 within 1e-4), and
    the cached K is q's rotation applied to K, quantized, bit for bit."""
    from qoq_compiler.quant.hadamard import orthogonal_hadamard

    rng = np.random.default_rng(d)
    n, hkv, page = 9, 2, 4
    k = (rng.standard_normal((n, hkv, d)) * rng.uniform(0.2, 3, size=(1, hkv, d))).astype("float32")
    v = rng.standard_normal((n, hkv, d)).astype("float32")
    pos = rng.integers(0, 5000, size=n).astype("int32")
    slots = rng.permutation(4 * page)[:n].astype("int32")
    cache = (_t(np.zeros((1, 2, 4 * page, hkv, d // 2), "uint8")), _t(np.zeros((1, 2, 4 * page, hkv, 2), "float16")))
    k_hat = append_tokens(k, v, pos, cache, slots, 0, rotate=True)
    expected = ref.rope(k.astype(np.float64), pos, THETA) @ orthogonal_hadamard(d)
    assert np.linalg.norm(k_hat - expected) / np.linalg.norm(expected) < 1e-4  # fp32 angles at positions < 5000
    data, param = cache[0].numpy()[0][:, slots], cache[1].numpy()[0][:, slots]
    for i, x in enumerate((k_hat, v)):
        data_ref, param_ref = ref.packed_codes(x)
        assert (data[i] == data_ref).all() and (param[i] == param_ref).all()
    with pytest.raises(ValueError, match="power-of-2 head_dim"):
        ka.kv4_append(1, 6, 2, 96, THETA, {}, "float32", gpu=False, rotate=True)


@pytest.mark.parametrize("hq,hkv,d,page,lengths", [
    (4, 4, 64, 4, [1, 7, 13, 9]),       # GQA ratio 1; several pages, partial last pages
    (6, 2, 64, 4, [1, 7, 13, 9]),       # ratio 3 (SmolLM2)
    (8, 2, 128, 16, [5, 33, 16]),       # ratio 4, head_dim 128; a sequence ending on a page boundary
    (8, 1, 128, 16, [1, 2049, 300]),    # ratio 8; lengths 1 to 2049 in one batch
    (8, 1, 16, 4, [3, 4, 1]),           # tiny head_dim
])
def test_kv4_cache_and_attention(hq, hkv, d, page, lengths):
    rng = np.random.default_rng(hq * d + sum(lengths))
    layers, layer = 3, 1
    table, pages = ref.page_table(lengths, page, 3, rng)  # shuffled pages, 3 spare ones never read
    seq = np.concatenate([[b] * n for b, n in enumerate(lengths)]).astype("int32")
    pos = np.concatenate([np.arange(n) for n in lengths]).astype("int32")
    slots = (table[seq, pos // page] * page + pos % page).astype("int32")
    n = len(seq)
    k = rng.standard_normal((n, hkv, d)).astype("float32") * rng.uniform(0.2, 3, size=(1, hkv, d)).astype("float32")
    v = rng.standard_normal((n, hkv, d)).astype("float32")
    cache = (_t(rng.integers(0, 255, size=(layers, 2, pages * page, hkv, d // 2)).astype("uint8")),
             _t(rng.standard_normal((layers, 2, pages * page, hkv, 2)).astype("float16")))

    k_rot = append_tokens(k, v, pos, cache, slots, layer)
    assert np.linalg.norm(k_rot - ref.rope(k, pos, THETA)) / np.linalg.norm(k) < 1e-5  # RoPE is RoPE
    data, param = cache[0].numpy()[layer][:, slots], cache[1].numpy()[layer][:, slots]  # [2, T, Hkv, ...]
    for i, x in enumerate((k_rot, v)):  # codes and (scale, min) equal the NumPy spec bit for bit
        data_ref, param_ref = ref.packed_codes(x)
        assert (data[i] == data_ref).all() and (param[i] == param_ref).all()

    k_hat = qref.kv4_dequantize(*qref.kv4_quantize(k_rot))
    v_hat = qref.kv4_dequantize(*qref.kv4_quantize(v))
    q = rng.standard_normal((n, hq, d)).astype("float32")
    sm = d ** -0.5
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])[seq]  # each token's sequence start row
    hist = [slice(first[t], first[t] + pos[t] + 1) for t in range(n)]
    expected = ref.attention(q, [k_hat[h] for h in hist], [v_hat[h] for h in hist], sm)
    # the CPU plan (contexts split only for few tokens), then the GPU plan with the smallest splits:
    # every context longer than one step of keys is cut into parts that kv4_merge combines
    for plan in (ka.split_plan(hq, hkv, d, gpu=False),
                 ka.split_plan(hq, hkv, d, gpu=True, min_chunk=ka.split_plan(hq, hkv, d, gpu=True).keys)):
        got = attend(q, cache, pos, seq, table, layer, page, sm, plan)
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5, plan
        # decode: one query per sequence (its last position) — few blocks, so long contexts split
        last = np.cumsum(lengths) - 1
        got = attend(q[last], cache, pos[last], seq[last], table, layer, page, sm, plan)
        assert np.linalg.norm(got - expected[last]) / np.linalg.norm(expected[last]) < 1e-5, plan
    # the CPU kernel (llvm's choice), prefill and decode
    for rows in (np.arange(n), np.cumsum(lengths) - 1):
        out = _t(np.full((len(rows), hq, d), np.nan, "float32"))
        _build(kc.kv4_attention_cpu(cache[0].shape[0], hq, hkv, d, page, sm, "float32"))(
            _t(q[rows]), cache[0], cache[1], _t(pos[rows]), _t(seq[rows]), _t(table), layer, out)
        assert np.linalg.norm(out.numpy() - expected[rows]) / np.linalg.norm(expected[rows]) < 1e-5


def attend(q, cache, pos, seq, table, layer, page, sm, plan):
    """kv4_attention then kv4_merge on CPU with ``plan``."""
    n, hq, d = q.shape
    num_layers, hkv = cache[0].shape[0], plan.num_kv_heads
    out = _t(np.full((n, hq, d), np.nan, "float32"))  # every element must be written
    ws = _t(np.full(ka.workspace_shape(plan), np.nan, "float32"))
    _build(ka.kv4_attention(num_layers, hq, hkv, d, page, sm, "float32", gpu=False, plan=plan))(
        _t(q), cache[0], cache[1], _t(pos), _t(seq), _t(table), layer, out, ws)
    _build(ka.kv4_merge(hq, hkv, d, "float32", gpu=False, plan=plan))(out, ws, _t(pos))
    return out.numpy()


def test_attention_definition_equals_float64_attention():
    """The attention op's definition (what the model emits, ``kv4_attention_definition``), compiled
    and run on llvm, is attention over the dequantized paged cache."""
    rng = np.random.default_rng(7)
    for hq, hkv, d, page, seqs in [(6, 2, 64, 4, [(0, 5), (9, 1), (20, 3)]), (4, 4, 16, 16, [(0, 33)])]:
        (q, data, param, pos, seq, table, layer), expected = ref.random_case(hq, hkv, d, page, 3, seqs, rng)
        out = _t(np.full(q.shape, np.nan, np.float16))
        _build(ka.kv4_attention_definition(3, hq, hkv, d, page, d ** -0.5, "float16"))(
            _t(q), _t(data), _t(param), _t(pos), _t(seq), _t(table), layer, out)
        got = out.numpy().astype(np.float64)
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-3  # fp16 output
