"""W4A8 GEMM: the MMA weight layout, and the portable kernel's int32 accumulators equal NumPy exactly."""

from __future__ import annotations

import numpy as np
import pytest

from qoq_compiler import layout
from schedules.reference.w4a8_gemm import mma_parameters, mma_shapes
from qoq_compiler.quant import reference as qref
from qoq_compiler.quant.convert import weight_params
from qoq_compiler.tvm_env import tvm
from schedules import w4a8_gemm
from schedules.reference import w4a8_gemm as w4a8_ref
from conftest import w4a8_case

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def _qserve_bytes(codes):
    """QServe's own formulation of the reordering (qserve ``w4a8_linear.from_linear``), as bytes."""
    n, k = codes.shape
    w = codes.astype(np.uint8).reshape(n // 32, 2, 2, 8, k // 32, 2, 4, 4)
    w = w.transpose(0, 4, 3, 6, 1, 5, 2, 7).transpose(0, 1, 2, 3, 5, 6, 7, 4)
    return (w[..., 1] << 4) | w[..., 0]                              # [N/32, K/32, 8, 4, 2, 2, 4]


@pytest.mark.parametrize("n,k", [(64, 96), (144, 576), (40, 172), (5, 7)])
def test_mma_layout_roundtrip_and_reference_formulation(n, k):
    codes = np.random.default_rng(n + k).integers(0, 16, size=(n, k)).astype(np.uint8)
    packed = layout.pack_uint4_mma(codes)
    assert packed.shape == (-(-n // 32), -(-k // 32), 32, 4) and packed.dtype == np.uint32
    assert (layout.unpack_uint4_mma(packed, n, k) == codes).all()
    padded = np.zeros((layout.pad32(n), layout.pad32(k)), np.uint8)
    padded[:n, :k] = codes
    assert (packed.view(np.uint8).reshape(-1) == _qserve_bytes(padded).reshape(-1)).all()
    order = layout.mma_channel_order(n)
    assert (order[layout.mma_channel_position(np.arange(layout.pad32(n)))] == np.arange(layout.pad32(n))).all()


def test_mma_layout_gives_each_lane_its_mma_fragments():
    """Emulate a warp: lane 4g + t unpacks its four words into the B fragments of m16n8k32 (PTX ISA:
    register j holds rows k = 16j + 4t + r, r < 4, of column n = g), and four mma n8 blocks cover
    channels (0-7, 8-15, 16-23, 24-31) of the tile."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(32, 32)).astype(np.uint8)
    tile = layout.pack_uint4_mma(codes)[0, 0]                         # [32 lanes, 4 words]
    got = np.zeros((32, 32), np.uint8)
    for lane in range(32):
        g, t = divmod(lane, 4)
        x, y, z, w = (int(v) for v in tile[lane])
        # QServe's unpack: b0/b1 of block 0 = x, z low nibbles; block 1 = y, w; blocks 2, 3 = high nibbles
        regs = {0: (x, z), 1: (y, w), 2: (x >> 4, z >> 4), 3: (y >> 4, w >> 4)}
        for block, (b0, b1) in regs.items():
            for j, reg in enumerate((b0 & 0x0F0F0F0F, b1 & 0x0F0F0F0F)):
                for r in range(4):
                    got[8 * block + g, 16 * j + 4 * t + r] = (reg >> 8 * r) & 0xFF
    assert (got == codes).all()


def test_bytes_mul_sub_is_the_int8_level_two_weight():
    rng = np.random.default_rng(1)
    q = rng.integers(0, 16, size=(20000, 4)).astype(np.uint32)
    s = rng.integers(1, 17, size=20000).astype(np.uint32)
    z = rng.integers(-128, 128, size=20000)
    q4 = (q << np.arange(0, 32, 8, dtype=np.uint32)).sum(axis=1).astype(np.uint32)
    out = w4a8_gemm.bytes_mul_sub(q4, s, z.astype(np.int8).view(np.uint8).astype(np.uint32)).astype(np.uint32)
    expect = (q * s[:, None]).astype(np.int64) - z[:, None]
    assert (out.view(np.int8).reshape(-1, 4) == (expect + 128) % 256 - 128).all()


def test_weight_layout_transform_declares_and_fills_the_kernel_shapes():
    w = np.random.default_rng(2).standard_normal((40, 200)) * 0.05
    for group in (128, None):
        qw = qref.progressive_quantize(w, group=group) if group else qref.per_channel_quantize(w)
        out = mma_parameters(weight_params("l.weight", qw))
        for suffix, shape in mma_shapes(40, 200, group).items():
            assert out[f"l.{suffix}"].shape == shape
        assert (layout.unpack_uint4_mma(out["l.weight"], 40, 200) == qw.q).all()
        if group:
            assert (out["l.weight_group_zero"][:, layout.mma_channel_position(np.arange(40))].T == qw.z2).all()


@pytest.mark.parametrize("n,k,group", [(40, 200, 128), (64, 576, 128), (24, 172, 64), (16, 96, None)])
def test_layout_primfuncs_equal_the_numpy_layout(n, k, group):
    """The kernels' weight reorderings in TE (run at compile time by ``passes.lift_weight_layouts``)
    write exactly what ``mma_parameters`` writes, padding included."""
    from tvm import te

    w = np.random.default_rng(n + k).standard_normal((n, k)) * 0.05
    qw = qref.progressive_quantize(w, group=group) if group else qref.per_channel_quantize(w)
    logical = weight_params("l.weight", qw)
    expected = mma_parameters(logical)
    cases = [("l.weight", w4a8_gemm.mma_pack_codes)]
    if group:
        cases += [("l.weight_group_scale", w4a8_gemm.mma_channel_columns),
                  ("l.weight_group_zero", w4a8_gemm.mma_channel_columns)]
    for name, layout_func in cases:
        src = te.placeholder(logical[name].shape, str(logical[name].dtype), name="src")
        (got,) = _run(te.create_prim_func([src, layout_func(src)]).with_attr("global_symbol", "main"),
                      logical[name], out_shapes=[(expected[name].shape, expected[name].dtype)])
        assert (got == expected[name]).all(), name


def _run(func, *arrays, out_shapes):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    outs = [tvm.runtime.tensor(np.zeros(s, d)) for s, d in out_shapes]
    lib["main"](*[tvm.runtime.tensor(a) for a in arrays], *outs)
    return [o.numpy() for o in outs]


@pytest.mark.parametrize("m,k,n,group", [(1, 256, 48, 128), (7, 384, 40, 128), (5, 264, 24, None),
                                         (3, 128, 16, 32), (4, 576, 24, 128),  # 576: a shorter last group
                                         (2, 172, 16, None), (3, 172, 16, 64)])  # 172: padded K
def test_w4a8_gemm_matches_reference(m, k, n, group):
    x, w, qw, args = w4a8_case(m, n, k, group, seed=m + k + n)
    psum_ref, y_ref = w4a8_ref.reference(*args, group=group)
    psum, y = _run(w4a8_gemm.w4a8_gemm(k, n, group), *args, out_shapes=[((m, n), "int32"), ((m, n), "float16")])
    qx, sx = args[:2]
    assert (psum == psum_ref).all()  # integer accumulators: exact
    assert np.abs(y.astype(np.float32) - y_ref.astype(np.float32)).max() <= 2e-3 * np.abs(y_ref).max()
    # and the whole thing is the product of the dequantized operands
    x_hat = qx.astype(np.float64) * sx.astype(np.float64)
    dense = x_hat @ qw.dequantize().astype(np.float64).T
    assert np.linalg.norm(y - dense) / np.linalg.norm(dense) < 2e-3
    # and close to the float product (4-bit weights, 8-bit activations)
    exact = x @ w.T
    assert np.linalg.norm(y - exact) / np.linalg.norm(exact) < 0.2


@pytest.mark.parametrize("m,k,n,group", [(3, 576, 40, 128), (2, 172, 16, None)])
def test_w4a8_definition_on_the_quantizers_layout_equals_reference(m, k, n, group):
    """The W4A8 op's definition reads the weights as the quantizers write them; it computes what the
    kernels compute on the MMA layout."""
    from tvm import te

    x, w, qw, args = w4a8_case(m, n, k, group, seed=m + k)
    _, y_ref = w4a8_ref.reference(*args, group=group)
    logical = weight_params("w.weight", qw)
    qx, sx = args[:2]
    extra = (logical["w.weight_zero"], args[5]) if group is None else \
        (logical["w.weight_group_scale"], logical["w.weight_group_zero"])
    ins = [qx, sx, logical["w.weight"], logical["w.weight_scale"], *extra]
    ph = [te.placeholder(a.shape, str(a.dtype), name=f"a{i}") for i, a in enumerate(ins)]
    y = w4a8_gemm.w4a8_matmul_definition(*ph, group=group)
    (got,) = _run(te.create_prim_func([*ph, y]).with_attr("global_symbol", "main"), *ins,
                  out_shapes=[((m, n), "float32")])
    assert np.abs(got - y_ref.astype(np.float32)).max() <= 2e-3 * np.abs(y_ref).max()
