"""KV4 kernels on CPU: quantization equals the NumPy spec, attention over the paged 4-bit cache
equals float64 attention over the same dequantized cache (page boundaries, GQA, ragged batch)."""

from __future__ import annotations

import numpy as np
import pytest

from qoq_compiler.quant import reference as qref
from qoq_compiler.tvm_env import tvm
from schedules import kv4_attention as ka
from tvm import te

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def _build(func):
    """Compile one kernel (the model's are private functions: export this one as ``main``)."""
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)["main"]


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a))


def quantize_and_store(k, v, cache, slots, layer):
    """Run kv4_quantize + kv4_scatter on the device arrays of ``cache`` (data, param)."""
    n, hkv, d = k.shape
    kp = te.placeholder((n, hkv, d), "float32", name="k")
    vp = te.placeholder((n, hkv, d), "float32", name="v")
    codes, params = ka.kv4_quantize(kp, vp)
    c = np.zeros((n, 2, hkv, d // 2), "uint8")
    p = np.zeros((n, 2, hkv, 2), "float16")
    tc, tp = _t(c), _t(p)
    _build(te.create_prim_func([kp, vp, codes, params]))(_t(k), _t(v), tc, tp)
    num_layers = cache[0].shape[0]
    _build(ka.kv4_scatter(num_layers, hkv, d))(cache[0], cache[1], tc, tp, _t(slots), layer)
    return tc.numpy(), tp.numpy()


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
    pages = sum(-(-n // page) for n in lengths) + 3  # spare pages stay unread
    # pages handed out in a shuffled order: the kernels must follow the page table
    free = list(rng.permutation(pages))
    table = np.zeros((len(lengths), max(-(-n // page) for n in lengths)), "int32")
    for b, n in enumerate(lengths):
        for i in range(-(-n // page)):
            table[b, i] = free.pop()
    seq = np.concatenate([[b] * n for b, n in enumerate(lengths)]).astype("int32")
    pos = np.concatenate([np.arange(n) for n in lengths]).astype("int32")
    slots = (table[seq, pos // page] * page + pos % page).astype("int32")
    n = len(seq)
    k = rng.standard_normal((n, hkv, d)).astype("float32") * rng.uniform(0.2, 3, size=(1, hkv, d)).astype("float32")
    v = rng.standard_normal((n, hkv, d)).astype("float32")
    cache = (_t(rng.integers(0, 255, size=(layers, 2, pages * page, hkv, d // 2)).astype("uint8")),
             _t(rng.standard_normal((layers, 2, pages * page, hkv, 2)).astype("float16")))

    codes, params = quantize_and_store(k, v, cache, slots, layer)
    for i, x in enumerate((k, v)):  # codes and (scale, min) equal the NumPy spec bit for bit
        q_ref, s_ref, lo_ref = qref.kv4_quantize(x)
        packed = q_ref[..., 0::2] | (q_ref[..., 1::2] << 4)
        assert (codes[:, i] == packed).all()
        assert (params[:, i, :, 0] == s_ref).all() and (params[:, i, :, 1] == lo_ref).all()
    data = cache[0].numpy()
    assert (data[layer, :, slots] == codes).all()  # advanced indexing puts the token axis first

    k_hat = qref.kv4_dequantize(*qref.kv4_quantize(k))
    v_hat = qref.kv4_dequantize(*qref.kv4_quantize(v))
    q = rng.standard_normal((n, hq, d)).astype("float32")
    sm = d ** -0.5
    out = _t(np.zeros((n, hq, d), "float32"))
    _build(ka.kv4_attention(layers, hq, hkv, d, page, sm, "float32", gpu=False))(
        _t(q), cache[0], cache[1], _t(pos), _t(seq), _t(table), layer, out)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])[seq]  # each token's sequence start row
    hist = [slice(first[t], first[t] + pos[t] + 1) for t in range(n)]
    ref = ka.reference(q, [k_hat[h] for h in hist], [v_hat[h] for h in hist], sm)
    got = out.numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5
