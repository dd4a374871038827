"""W4A8 and W8A8 GEMMs on the CPU's integer dot products: results equal the NumPy reference bit for
bit (int32 accumulators exactly), on every instruction set this CPU runs; the layout PrimFuncs equal the NumPy
layout; the assembly holds the instruction (cross-compiled for the ones this CPU lacks)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from qoq_compiler.layout import mma_channel_position, unpack_uint4_mma
from qoq_compiler.tvm_env import tvm
from schedules import w4a8_gemm_cpu as cpu
from schedules.reference import w4a8_gemm as ref
from tvm import te

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
HOST_FEATURES = {str(f) for f in tvm.target.codegen.llvm_get_cpu_features(HOST)}
ISA = {isa.name: isa for isa in cpu.ISAS}


def _build(func, target=HOST):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a))


def _case(m, k, n, group, lanes, rng):
    """Reference inputs and outputs, and the kernel's inputs in its layout."""
    qw, s1, *extra = ref.random_weights(n, k, group, rng)
    qx, sx = ref.random_activations(m, k, rng)
    args = ref.kernel_args(qx, sx, (qw, s1, *extra), group)
    psum, y = ref.reference(*args, group=group)
    codes = unpack_uint4_mma(qw, n, k)
    if group is None:
        qv, = ref.cpu_layout(codes, (), lanes)
        tail = args[4:]
    else:
        natural = [a[:, mma_channel_position(np.arange(n))].T for a in extra]   # back to [N, G]
        qv, *tail = ref.cpu_layout(codes, natural, lanes)
    return (qx, sx, qv, s1, *tail), psum, y


def _rank3(ins, group):
    """The token-row arguments (qx, sx, and per channel xsum) as the model passes them: [1, M, ...]."""
    rows = {0, 1} if group is not None else {0, 1, 5}
    return tuple(a[None] if i in rows else a for i, a in enumerate(ins))


@pytest.mark.parametrize("isa", [i.name for i in cpu.ISAS if set(i.features) <= HOST_FEATURES])
@pytest.mark.parametrize("m,k,n,group", [(1, 576, 96, 128), (13, 576, 64, 128), (9, 1536, 48, 128),
                                         (3, 64, 32, None), (17, 256, 16, 32)])
def test_cpu_gemm_equals_reference(isa, m, k, n, group):
    isa = ISA[isa]
    rng = np.random.default_rng(m * k + n)
    ins, psum, y = _case(m, k, n, group, isa.lanes, rng)
    ins = _rank3(ins, group)
    lib = _build(cpu.cpu_gemm(n, k, group, isa, "float16"))
    out = _t(np.full((1, m, n), np.nan, np.float16))
    lib["main"](*map(_t, ins), out)
    np.testing.assert_array_equal(out.numpy()[0], y)
    # the int32 accumulators exactly: unit scales, no zero term, fp32 output
    ones = [np.ones_like(ins[1]), np.ones_like(ins[3])]
    tail = ins[4:] if group is not None else (np.zeros_like(ins[4]), ins[5])
    out32 = _t(np.full((1, m, n), np.nan, np.float32))
    _build(cpu.cpu_gemm(n, k, group, isa, "float32"))["main"](*map(_t, (ins[0], ones[0], ins[2], ones[1], *tail)),
                                                           out32)
    np.testing.assert_array_equal(out32.numpy()[0], psum.astype(np.float32))


@pytest.mark.parametrize("isa", [i.name for i in cpu.ISAS if set(i.features) <= HOST_FEATURES and i.bytes_exact])
@pytest.mark.parametrize("m,k,n", [(1, 576, 96), (11, 1536, 48), (3, 100, 32)])
def test_cpu_w8a8_gemm_equals_reference(isa, m, k, n):
    """W8A8 on the offset weight bytes: psum exactly, y as the reference's fp32 epilogue."""
    from qoq_compiler.quant import reference as qref
    from schedules.reference import w8a8_gemm as w8a8_ref

    isa = ISA[isa]
    rng = np.random.default_rng(m + k)
    x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 8, size=(m, 1))).astype(np.float32)
    qw, sw = qref.quantize_per_token(rng.standard_normal((n, k)) * 0.05)
    qw[0, :4] = [-127, 127, -128, 0]  # the byte range's ends
    psum, y = w8a8_ref.reference(x, qw, sw[:, 0])
    sx = (np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1e-4)) / np.float32(127)).astype(np.float16)
    qx = np.clip(np.round(x / sx.astype(np.float32)), -127, 127)  # as the reference's producer
    w = te.placeholder((n, k), "int8", name="w")
    qv = _t(np.zeros((n // isa.lanes, k // 4, isa.lanes), np.uint32))
    _build(te.create_prim_func([w, cpu.cpu_pack_bytes(w, isa.lanes, cpu.w8_offset(isa))]))["main"](_t(qw), qv)
    out = _t(np.full((m, 1, n), np.nan, np.float32))  # rows as decode passes them: [batch, 1]
    qx8 = _t(qx.astype(np.int8)[:, None])
    _build(cpu.cpu_gemm(n, k, None, isa, "float32", bits=8))["main"](
        qx8, _t(sx.astype(np.float16)[:, None]), qv, _t(sw[:, 0].astype(np.float16)), out)
    np.testing.assert_array_equal(out.numpy()[:, 0], y)
    ones = _t(np.full((m, 1, 1), 1, np.float16))
    _build(cpu.cpu_gemm(n, k, None, isa, "float32", bits=8))["main"](qx8, ones, qv, _t(np.ones(n, np.float16)), out)
    np.testing.assert_array_equal(out.numpy()[:, 0], psum.astype(np.float32))


@pytest.mark.parametrize("lanes", [16, 8, 4])
def test_layout_primfuncs_equal_the_numpy_layout(lanes):
    rng = np.random.default_rng(lanes)
    n, k, g = 32, 80, 3
    codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    groups = rng.integers(-128, 128, size=(n, g), dtype=np.int8)
    want = ref.cpu_layout(codes, (groups,), lanes)
    for fn, src, expect in ((cpu.cpu_pack_codes, codes, want[0]), (cpu.cpu_channel_groups, groups, want[1])):
        p = te.placeholder(src.shape, str(src.dtype), name="src")
        got = _t(np.zeros(expect.shape, expect.dtype))
        _build(te.create_prim_func([p, partial(fn, lanes=lanes)(p)]))["main"](_t(src), got)
        np.testing.assert_array_equal(got.numpy(), expect)


@pytest.mark.parametrize("isa,target,instructions", [
    ("avx512vnni", {"kind": "llvm", "mcpu": "sapphirerapids"}, ["vpdpbusd", "zmm"]),
    ("avxvnni", {"kind": "llvm", "mcpu": "alderlake"}, ["{vex}\tvpdpbusd", "ymm"]),
    ("avx2", {"kind": "llvm", "mcpu": "haswell"}, ["vpmaddubsw"]),
    ("dotprod", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1"}, ["sdot"]),
])
def test_assembly_uses_the_dot_product_instruction(isa, target, instructions):
    target = tvm.target.Target(target)
    assert set(ISA[isa].features) <= {str(f) for f in tvm.target.codegen.llvm_get_cpu_features(target)}
    lib = _build(cpu.cpu_gemm(64, 256, 128, ISA[isa], "float16"), target)
    asm = (lib.mod if hasattr(lib, "mod") else lib).inspect_source("asm")
    for ins in instructions:
        assert ins in asm, ins


def test_isa_choice_and_supported_shapes():
    """The registry picks the preferred instruction set the CPU's features allow, else the portable GEMM."""
    from schedules.registry import REGISTRY

    p = dict(n=3072, k=576, group=128, bias=False, dtype="float16")
    for features, kernel in [({"avx2", "avx512vnni", "avx512bw", "avx512vl"}, "w4a8_gemm_avx512vnni"),
                             ({"avx2", "avxvnni"}, "w4a8_gemm_avxvnni"), ({"avx2"}, "w4a8_gemm_avx2"),
                             ({"neon", "dotprod"}, "w4a8_gemm_dotprod"), ({"sse4.2"}, "w4a8_matmul")]:
        assert REGISTRY.select("w4a8_linear", p, "llvm", features).name == kernel
    assert cpu.supports(3072, 576, 128, ISA["avx512vnni"])
    assert not cpu.supports(172, 576, 128, ISA["avx512vnni"])    # N not whole blocks of 16
    assert not cpu.supports(64, 172, None, ISA["avx2"])           # K not whole words of 8
    assert not cpu.supports(64, 576, 36, ISA["avx2"])             # groups not whole words
    assert cpu.supports_w8a8(576, 1536, ISA["avx512vnni"]) and not cpu.supports_w8a8(576, 1536, ISA["avx2"])
