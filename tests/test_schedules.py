"""Schedule rules: numerics against NumPy at odd shapes, and that each rule applies where it should."""

from __future__ import annotations

import numpy as np
import pytest

from qoq_compiler.tvm_env import tvm
from tvm import te, tirx

from schedules.cpu_matmul import CPUReduction

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def nt_matmul(k: int, n: int, dtype: str):
    """C[1, m, n] = sum_k A[1, m, k] * B[n, k] in fp32, m symbolic (as the model's linear layers)."""
    m = tirx.Var("m", "int64")
    a = te.placeholder((1, m, k), dtype, name="A")
    b = te.placeholder((n, k), dtype, name="B")
    r = te.reduce_axis((0, k), name="k")
    c = te.compute((1, m, n), lambda x, i, j: te.sum(a[x, i, r].astype("float32") * b[j, r].astype("float32"),
                                                      axis=r), name="C")
    return te.create_prim_func([a, b, c])


@pytest.mark.parametrize("m,k,n,dtype", [(1, 576, 1536, "float32"), (37, 172, 64, "float32"),
                                         (5, 96, 1001, "float16"), (3, 8, 12, "float32")])
def test_cpu_reduction_matches_numpy(m, k, n, dtype):
    sch = CPUReduction().apply(nt_matmul(k, n, dtype), TARGET, False)
    assert sch is not None
    script = sch.mod["main"].script()
    assert "T.vectorized" in script and "T.parallel" in script
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=TARGET)
    rng = np.random.default_rng(m * k + n)
    a = rng.standard_normal((1, m, k)).astype(dtype)
    b = rng.standard_normal((n, k)).astype(dtype)
    c = tvm.runtime.tensor(np.zeros((1, m, n), "float32"))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
    ref = a.astype(np.float64) @ b.astype(np.float64).T
    assert np.linalg.norm(c.numpy() - ref) / np.linalg.norm(ref) < 1e-6


def test_cpu_reduction_declines_what_it_does_not_handle():
    rule = CPUReduction()
    assert rule.apply(nt_matmul(7, 16, "float32"), TARGET, False) is None  # no vector width divides K
    assert rule.apply(nt_matmul(64, 16, "float32"), tvm.target.Target({"kind": "cuda", "arch": "sm_80"}),
                      False) is None
    x = te.placeholder((4, 8), "float32", name="x")
    injective = te.create_prim_func([x, te.compute((4, 8), lambda i, j: x[i, j] * 2, name="y")])
    assert rule.apply(injective, TARGET, False) is None
    # k not innermost in B (the NN layout): the contiguous-load schedule does not apply
    a = te.placeholder((4, 32), "float32", name="a")
    b = te.placeholder((32, 8), "float32", name="b")
    r = te.reduce_axis((0, 32), name="r")
    nn = te.create_prim_func([a, b, te.compute((4, 8), lambda i, j: te.sum(a[i, r] * b[r, j], axis=r))])
    assert rule.apply(nn, TARGET, False) is None


def test_cuda_intrinsics_load_fast_and_register():
    from schedules.intrin import load_cuda_intrinsics

    mod = load_cuda_intrinsics()
    assert tvm.s_tir.TensorIntrin.get(mod.MMA_i8i8i32_TRANS_B_INTRIN) is not None
