"""Tensor-core W4A8 GEMM without a GPU: its data movement, emulated in NumPy, equals the reference
exactly; every CUDA variant compiles with nvcc, uses s8 mma.sync m16n8k32, and spills nothing."""

from __future__ import annotations

import numpy as np
import pytest

from schedules import nvcc, w4a8_gemm_tc
from schedules.reference import w4a8_gemm as w4a8_ref
from conftest import w4a8_case


@pytest.mark.parametrize("m,n,k,group", [
    (5, 96, 256, 128),      # decode-sized M, bn shrunk to divide N
    (40, 64, 576, 128),     # SmolLM2's K: a shorter last group, bk shrunk to 64
    (3, 72, 160, None),     # per channel, N padded to 96 (padded channels never stored)
    (70, 64, 128, 32),      # fewer k tiles than pipeline stages; M over two row tiles
    (130, 128, 256, None),  # per channel, M past the medium tile
])
def test_emulated_kernel_equals_reference(m, n, k, group):
    args = w4a8_case(m, n, k, group, seed=m + n + k)[3]
    psum_ref, y_ref = w4a8_ref.reference(*args, group=group)
    for _, maps in w4a8_gemm_tc.tile_maps(n, k, group):
        psum, y = w4a8_gemm_tc.emulate(maps, *args)
        assert (psum == psum_ref).all(), maps.cfg
        assert not np.isnan(y).any(), maps.cfg
        assert (y == y_ref).all(), maps.cfg


def test_tile_fitting_and_shape_limits():
    small = w4a8_gemm_tc.DEFAULT_TILES[0][1]
    fitted = w4a8_gemm_tc.fit_tile(small, 576, 576)
    assert (fitted.bn, fitted.bk) == (64, 64) and 576 % fitted.bk == 0
    assert w4a8_gemm_tc.fit_tile(small, 72, 96).bn == 32
    assert not w4a8_gemm_tc.supports_tensor_cores(64, 172, None)
    with pytest.raises(ValueError, match="K % 32"):
        w4a8_gemm_tc.tensor_core_gemm(64, 172, None)


@pytest.mark.skipif(nvcc.nvcc_path() is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("group", [128, None])
def test_cuda_variants_compile_use_s8_mma_and_do_not_spill(arch, group):
    src = nvcc.cuda_source(w4a8_gemm_tc.build(4096, 4096, group, arch))
    assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in src
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in src and "cp.async.cg.shared.global" in src
    kernels = nvcc.ptxas_report(src, arch)
    assert len(kernels) == len(w4a8_gemm_tc.DEFAULT_TILES)
    for kern in kernels:
        assert kern.spill_stores == 0 and kern.spill_loads == 0, kern
        assert kern.shared_bytes <= 48 * 1024, kern
