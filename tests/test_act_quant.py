"""Fused activation quantization (``schedules.act_quant``) on llvm equals its NumPy reference exactly,
in its block form and its vectorized CPU form, and the two forms agree bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from qoq_compiler.tvm_env import tvm
from schedules import act_quant
from schedules.reference import act_quant as ref


FORMS = {"block": lambda kind, k, dtype: act_quant.act_quant(kind, k, dtype, gpu=False, eps=1e-5),
         "cpu": lambda kind, k, dtype: act_quant.act_quant_cpu(kind, k, dtype, eps=1e-5)}


SHAPES = [(64, "float32"), (300, "float32"), (576, "float16"), (1000, "float16")]


@pytest.mark.parametrize("kind", ref.KINDS)
@pytest.mark.parametrize("form,rows,k,dtype", [("block", (2, 3), *s) for s in SHAPES]
                         + [("cpu", (2, 3), *s) for s in SHAPES] + [("cpu", (1, 1), *s) for s in SHAPES[2:]])
def test_act_quant_equals_reference(form, rows, kind, k, dtype):
    rng = np.random.default_rng(k)
    func = FORMS[form](kind, k, dtype)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    ins = ref.random_inputs(kind, *rows, k, dtype, rng)
    expected = ref.reference(kind, *ins, dtype=dtype, eps=1e-5)
    args = [tvm.runtime.tensor(a) for a in ins] + [tvm.runtime.tensor(np.zeros(r.shape, r.dtype)) for r in expected]
    lib["main"](*args)
    got = [a.numpy() for a in args[len(ins):]]
    for g, r in zip(got, expected):
        assert g.dtype == r.dtype and (g == r).all()
    qx, sx = expected[-3], expected[-2]
    assert np.abs(qx).max() == 127 and len(np.unique(sx)) == rows[0] * rows[1]  # every row its full int8 range


@pytest.mark.parametrize("kind", ref.KINDS)
def test_cpu_and_block_forms_agree_on_wide_rows(kind):
    """Both forms on 1024 rows of 1536 values spanning four decades: identical outputs. (By
    construction they also sum in the same order; that is not observable here: reversing the CPU
    form's order per lane leaves these outputs unchanged.)"""
    rng = np.random.default_rng(3)
    ins = ref.random_inputs(kind, 4, 256, 1536, "float16", rng)
    ins[0] = (ins[0].astype(np.float32) * np.exp(rng.uniform(-6, 3, ins[0].shape))).astype("float16")
    outs = []
    for form in FORMS.values():
        lib = tvm.compile(tvm.IRModule({"main": form(kind, 1536, "float16").with_attr("global_symbol", "main")}),
                          target=tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}))
        expected = ref.reference(kind, *ins, dtype="float16", eps=1e-5)
        args = [tvm.runtime.tensor(a) for a in ins] + [tvm.runtime.tensor(np.zeros(r.shape, r.dtype)) for r in expected]
        lib["main"](*args)
        outs.append([a.numpy() for a in args[len(ins):]])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_zero_row_keeps_a_positive_scale():
    func = act_quant.act_quant("quantize", 64, "float32", gpu=False)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    x = np.zeros((1, 2, 64), "float32")
    x[0, 1] = np.linspace(-1, 1, 64)
    out = [tvm.runtime.tensor(np.full(s, 7, d)) for s, d in (((1, 2, 64), "int8"), ((1, 2, 1), "float16"),
                                                             ((1, 2, 1), "int32"))]
    lib["main"](tvm.runtime.tensor(x), *out)
    qx, sx, xsum = (a.numpy() for a in out)
    assert (qx[0, 0] == 0).all() and sx[0, 0, 0] > 0 and xsum[0, 0, 0] == 0
    assert qx[0, 1, 0] == -127 and qx[0, 1, -1] == 127


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown activation-quantization kind"):
        act_quant.act_quant("gelu", 64, "float32", gpu=False)

