"""Every CUDA kernel on the device against its NumPy reference (``schedules/reference``), on fresh
random data (never zeros), every output poisoned with NaN before the launch."""

from __future__ import annotations

import numpy as np
import pytest

from qoq_compiler.quant.hadamard import orthogonal_hadamard
from qoq_compiler.quant.reference import kv4_quantize
from schedules.reference import act_quant as act_ref
from schedules.reference import argmax as argmax_ref
from schedules.reference import kv4 as kv4_ref
from schedules.reference import w4a8_gemm as gemm_ref

pytestmark = pytest.mark.gpu
GROUPS = {"g128": 128, "chn": None}


@pytest.fixture
def rng():
    return np.random.default_rng()  # fresh data every run


def _fp16_close(got: np.ndarray, expected: np.ndarray, ulps: int = 1) -> bool:
    """Within ``ulps`` units in the last place of fp16 (fused multiply-adds and fast-math
    intrinsics may round the last bit differently from NumPy's separate operations); values that
    cancel to near zero are held to 2^-10 of the largest instead (fp32 rounding of the terms)."""
    got, expected = got.astype(np.float64), expected.astype(np.float64)
    ulp = np.maximum(np.abs(expected), 2.0 ** -10 * np.abs(expected).max()) * 2.0 ** -10
    return bool(np.all(np.abs(got - expected) <= ulps * ulp))


@pytest.mark.parametrize("group", GROUPS)
def test_w4a8_gemm_every_tile(prebuilt, kernels, rng, group):
    """M values served by each of the three tiles (decode, medium, prefill), every prepared shape; one
    reference evaluation per shape covers the activations of every M."""
    ms = prebuilt.spec["gemm"]["lane_m"]
    for shape, (n, k) in prebuilt.spec["gemm"]["shapes"].items():
        weights = gemm_ref.random_weights(n, k, GROUPS[group], rng)
        qx, sx = gemm_ref.random_activations(sum(ms), k, rng)
        _, expected = gemm_ref.reference(*gemm_ref.kernel_args(qx, sx, weights, GROUPS[group]), group=GROUPS[group])
        gemm, start = kernels.gemm(shape, group), 0
        for m in ms:
            rows = slice(start, start + m)
            start += m
            args = gemm_ref.kernel_args(qx[rows], sx[rows], weights, GROUPS[group])
            y = kernels.tensor(np.full((m, n), np.nan, np.float16))
            gemm(*[kernels.tensor(a) for a in args], y)
            got = y.numpy()
            assert not np.isnan(got).any(), f"{shape} M={m}: outputs left unwritten"
            assert _fp16_close(got, expected[rows]), (f"{shape} {group} M={m}: max |diff| "
                                                     f"{np.abs(got.astype(np.float64) - expected[rows]).max():.3g}")


def _paged_case(prebuilt, rng, seqs):
    attn = prebuilt.spec["attention"]
    return kv4_ref.random_case(*attn["heads"], attn["page"], attn["layers"], seqs, rng)


def _attend(kernels, run, q, data, param, pos, seq, table, layer):
    out = kernels.tensor(np.full(q.shape, np.nan, np.float16))
    run(*[kernels.tensor(a) for a in (q, data, param, pos, seq, table)], layer, out)
    return out.numpy()


def _rel(got, expected) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - expected) / np.linalg.norm(expected))


def test_kv4_decode_attention_and_merge(prebuilt, kernels, rng):
    """One query per sequence over contexts from 1 token to several splits, page boundaries included."""
    page = prebuilt.spec["attention"]["page"]
    lengths = [(0, 1), (page - 1, 1), (page, 1), (3 * page + 4, 1), (2047, 1), (700, 1)]
    args, expected = _paged_case(prebuilt, rng, lengths)
    got = _attend(kernels, kernels.attention, *args)
    assert not np.isnan(got).any()
    assert _rel(got, expected) < 5e-3


def test_kv4_prefill_attention(prebuilt, kernels, rng):
    """Ragged prefill with history (tokens of several sequences in one launch), causal."""
    args, expected = _paged_case(prebuilt, rng, [(0, 70), (33, 9), (100, 1), (5, 130)])
    got = _attend(kernels, kernels.prefill, *args)
    assert not np.isnan(got).any()
    assert _rel(got, expected) < 5e-3


def test_kv4_append(prebuilt, kernels, rng):
    """RoPE(K) (Hadamard-rotated where the schemes rotate it) and V quantized into their slots:
    minima exact, scales within an fp16 ulp of the NumPy spec, every value within half a
    quantization step of float64; every other slot untouched."""
    attn = prebuilt.spec["attention"]
    hq, hkv, d = attn["heads"]
    page, layers, theta = attn["page"], attn["layers"], attn["theta"]
    n, slots_total = 40, 6 * page
    pos = rng.integers(0, 4000, size=n).astype(np.int32)
    slots = rng.permutation(slots_total)[:n].astype(np.int32)
    qkv = (rng.standard_normal((n, hq + 2 * hkv, d)) * rng.uniform(0.2, 3, size=(1, 1, d))).astype(np.float16)
    data0 = rng.integers(0, 256, size=(layers, 2, slots_total, hkv, d // 2), dtype=np.uint8)
    param0 = rng.uniform(0.01, 0.3, size=(layers, 2, slots_total, hkv, 2)).astype(np.float16)
    data, param = kernels.tensor(data0), kernels.tensor(param0)
    layer = layers - 1
    kernels.append(data, param, kernels.tensor(qkv), kernels.tensor(pos), kernels.tensor(slots), layer)
    data, param = data.numpy(), param.numpy()
    untouched = np.setdiff1d(np.arange(slots_total), slots)
    assert (data[:, :, untouched] == data0[:, :, untouched]).all()
    assert (param[:, :, untouched] == param0[:, :, untouched]).all()
    k = kv4_ref.rope(qkv[:, hq:hq + hkv].astype(np.float64), pos, theta)
    if attn["kv_rotation"]:
        k = k @ orthogonal_hadamard(d)
    v = qkv[:, hq + hkv:].astype(np.float64)
    for i, (x, rounding) in enumerate(((k, 2.0 ** -10), (v, 0.0))):  # K is RoPE'd in fp32, rounded to fp16
        _, scale, low = kv4_quantize(x)
        got = param[layer, i, slots]
        assert _fp16_close(got[..., 0], scale) and (i == 0 or (got[..., 1] == low).all())
        x_hat = kv4_ref.dequantize(data[layer, i, slots], got)
        step = got[..., :1].astype(np.float64)
        assert (np.abs(x_hat - x) <= 0.5 * step * (1 + 2.0 ** -9) + rounding * np.abs(x) + 1e-6).all(), i


def test_rope_q_rotated(prebuilt, kernels, rng):
    """q's RoPE and Hadamard rotation (what K gets in the cache) against float64."""
    attn = prebuilt.spec["attention"]
    hq, hkv, d = attn["heads"]
    n = 50
    qkv = rng.standard_normal((n, hq + 2 * hkv, d)).astype(np.float16)
    pos = rng.integers(0, 4000, size=n).astype(np.int32)
    out = kernels.tensor(np.full((n, hq, d), np.nan, np.float16))
    kernels.rope_q(kernels.tensor(qkv), kernels.tensor(pos), out)
    expected = kv4_ref.rope(qkv[:, :hq].astype(np.float64), pos, attn["theta"]) @ orthogonal_hadamard(d)
    assert _rel(out.numpy(), expected) < 2e-3  # fp16 output, fp32 angles


@pytest.mark.parametrize("kind", act_ref.KINDS)
def test_act_quant(prebuilt, kernels, rng, kind):
    act = prebuilt.spec["act_quant"]
    k = act["silu_k"] if kind == "silu_mul" else act["k"]
    ins = act_ref.random_inputs(kind, 3, 5, k, "float16", rng)
    expected = act_ref.reference(kind, *ins, dtype="float16", eps=act["eps"])
    outs = [kernels.tensor(np.full(r.shape, np.nan, r.dtype) if r.dtype.kind == "f" else np.full(r.shape, 99, r.dtype))
            for r in expected]
    kernels.act_quant(kind)(*[kernels.tensor(a) for a in ins], *outs)
    got = [o.numpy() for o in outs]
    *x_out, qx, sx, xsum = got
    *x_ref, qx_ref, sx_ref, _ = expected
    for g, r in zip(x_out, x_ref):
        assert (g == r).all()  # the residual add rounds once, as NumPy does
    assert _fp16_close(sx, sx_ref)  # rsqrt / exp may differ in the last bit on the device
    assert np.abs(qx.astype(np.int32) - qx_ref).max() <= 1
    assert (xsum == qx.astype(np.int32).sum(axis=-1, keepdims=True)).all()
    assert np.abs(qx).max() == 127


def test_argmax(prebuilt, kernels, rng):
    logits = argmax_ref.random_logits(16, prebuilt.spec["argmax"]["vocab"], rng)
    tokens = kernels.tensor(np.full(16, -1, np.int32))
    kernels.argmax()(kernels.tensor(logits), tokens)
    assert (tokens.numpy() == argmax_ref.reference(logits)).all()
