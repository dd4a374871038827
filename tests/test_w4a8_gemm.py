"""Portable W4A8 GEMM: int32 accumulators equal NumPy exactly; the output equals the dequantized product."""

from __future__ import annotations

import numpy as np
import pytest

from qoq_compiler.layout import pack_uint4, unpack_uint4
from qoq_compiler.quant import reference as qref
from qoq_compiler.tvm_env import tvm
from schedules import w4a8_gemm

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def test_pack_roundtrip_and_index_functions():
    codes = np.random.default_rng(0).integers(0, 16, size=(3, 40)).astype(np.uint8)
    packed = pack_uint4(codes)
    assert packed.shape == (3, 5) and packed.dtype == np.uint32
    assert (unpack_uint4(packed) == codes).all()
    assert (packed[1, 2] >> 4 * 3) & 0xF == codes[1, 2 * 8 + 3]
    with pytest.raises(ValueError):
        pack_uint4(codes[:, :7])


def _pack(codes):
    """Pack along K, zero-padding the last word (as ``quant.convert.packed_params`` does)."""
    padded = np.zeros((codes.shape[0], -(-codes.shape[1] // 8) * 8), np.uint8)
    padded[:, :codes.shape[1]] = codes
    return pack_uint4(padded)


def _run(func, *arrays, out_shapes):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    outs = [tvm.runtime.tensor(np.zeros(s, d)) for s, d in out_shapes]
    lib["main"](*[tvm.runtime.tensor(a) for a in arrays], *outs)
    return [o.numpy() for o in outs]


@pytest.mark.parametrize("m,k,n,group", [(1, 256, 48, 128), (7, 384, 40, 128), (5, 264, 24, None),
                                         (3, 128, 16, 32), (4, 576, 24, 128),  # 576: a shorter last group
                                         (2, 172, 16, None), (3, 172, 16, 64)])  # 172: a padded last word
def test_w4a8_gemm_matches_reference(m, k, n, group):
    rng = np.random.default_rng(m + k + n)
    w = rng.standard_normal((n, k)) * 0.05
    x = rng.standard_normal((m, k)) * rng.uniform(0.5, 4, size=(m, 1))
    qx, sx = qref.quantize_per_token(x)
    if group is None:
        cw = qref.per_channel_quantize(w)
        params = (_pack(cw.q), cw.s, cw.z)
        w_hat = cw.dequantize()
    else:
        pw = qref.progressive_quantize(w, group=group)
        params = (_pack(pw.q), pw.s1, pw.s2, pw.z2)
        w_hat = pw.dequantize()
    psum_ref, y_ref = w4a8_gemm.reference(qx, sx, *params, group=group)
    psum, y = _run(w4a8_gemm.w4a8_gemm(k, n, group), qx, sx, *params,
                   out_shapes=[((m, n), "int32"), ((m, n), "float16")])
    assert (psum == psum_ref).all()  # integer accumulators: exact
    assert np.abs(y.astype(np.float32) - y_ref.astype(np.float32)).max() <= 2e-3 * np.abs(y_ref).max()
    # and the whole thing is the product of the dequantized operands
    x_hat = qx.astype(np.float64) * sx.astype(np.float64)
    dense = x_hat @ w_hat.astype(np.float64).T
    assert np.linalg.norm(y - dense) / np.linalg.norm(dense) < 2e-3
    # and close to the float product (4-bit weights, 8-bit activations)
    exact = x @ w.T
    assert np.linalg.norm(y - exact) / np.linalg.norm(exact) < 0.2


