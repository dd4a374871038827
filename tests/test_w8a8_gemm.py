"""W8A8 linear: activation quantization (``act_quant``) and the GEMM compiled for llvm equal NumPy
bit for bit; the GEMM takes the CPU schedule rule."""

from __future__ import annotations

import numpy as np
import pytest
from tvm import te, tirx

from qoq_compiler.quant import reference as qref
from qoq_compiler.tvm_env import tvm
from schedules import act_quant, w8a8_gemm
from schedules.cpu_matmul import CPUReduction
from schedules.reference import w8a8_gemm as w8a8_ref

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def _funcs(k, n):
    m = tirx.Var("m", "int64")
    quant = act_quant.act_quant("quantize", k, "float16", gpu=False)
    qx_in = te.placeholder((1, m, k), "int8", name="qx_in")
    sx_in = te.placeholder((1, m, 1), "float16", name="sx_in")
    qw = te.placeholder((n, k), "int8", name="qw")
    sw = te.placeholder((n,), "float16", name="sw")
    matmul = te.create_prim_func([qx_in, sx_in, qw, sw, w8a8_gemm.w8a8_matmul(qx_in, sx_in, qw, sw)])
    return quant, matmul


@pytest.mark.parametrize("m,k,n", [(1, 96, 40), (9, 576, 192), (4, 172, 12)])
def test_w8a8_matches_numpy_exactly(m, k, n):
    quant, matmul = _funcs(k, n)
    sch = CPUReduction().apply(matmul, TARGET, False)
    assert sch is not None  # the GEMM is a single-reduction function the CPU rule schedules
    libs = [tvm.compile(tvm.IRModule({"main": f}), target=TARGET)
            for f in (quant.with_attr("global_symbol", "main"), sch.mod["main"])]
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((1, m, k)) * rng.uniform(0.1, 8, size=(1, m, 1))).astype("float16")
    qw, sw = qref.quantize_per_token(rng.standard_normal((n, k)) * 0.05)
    sw = sw[:, 0]
    qx = tvm.runtime.tensor(np.zeros((1, m, k), "int8"))
    sx = tvm.runtime.tensor(np.zeros((1, m, 1), "float16"))
    xsum = tvm.runtime.tensor(np.zeros((1, m, 1), "int32"))
    y = tvm.runtime.tensor(np.zeros((1, m, n), "float32"))
    libs[0]["main"](tvm.runtime.tensor(x), qx, sx, xsum)
    libs[1]["main"](qx, sx, tvm.runtime.tensor(qw), tvm.runtime.tensor(sw), y)
    psum_ref, y_ref = w8a8_ref.reference(x, qw, sw)
    assert (y.numpy() == y_ref).all()
    # the int8 codes are the reference quantizer's (same fp16 scale, same rounding)
    q_ref, s_ref = qref.quantize_per_token(x.astype(np.float32))
    assert (sx.numpy() == s_ref).all() and (qx.numpy() == q_ref).all()
    assert (xsum.numpy() == q_ref.astype(np.int64).sum(axis=-1, keepdims=True)).all()
    dense = x.astype(np.float64) @ (qw * sw.astype(np.float64)[:, None]).T
    assert np.linalg.norm(y.numpy() - dense) / np.linalg.norm(dense) < 0.02
