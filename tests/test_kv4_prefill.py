"""Tensor-core KV4 prefill attention (``schedules.kv4_prefill``): its NumPy emulation (the kernel's
index maps, shared-memory packing and PTX m16n8k16 fragments) equals float64 attention over the
same dequantized cache on ragged batches; the CUDA kernel compiles for sm_80/sm_90 without spills."""

from __future__ import annotations

import numpy as np
import pytest

from qoq_compiler.tvm_env import tvm
from schedules import kv4_prefill as kp
from schedules import nvcc
from schedules.reference import kv4 as ref


def _case(hq, hkv, d, page, seqs, seed=0):
    """A random paged cache (pages out of order: the kernel must follow the table); seqs: (history, new)."""
    args, expected = ref.random_case(hq, hkv, d, page, 2, seqs, np.random.default_rng(seed))
    return (*args, page, d ** -0.5, hkv), expected


@pytest.mark.parametrize("hq,hkv,d,page,seqs", [
    (4, 4, 64, 16, [(0, 20)]),                       # GQA 1, one sequence inside one CTA
    (6, 2, 64, 4, [(5, 17), (0, 30), (40, 3)]),      # GQA 3: a token's heads split across CTAs; history
    (8, 2, 128, 16, [(0, 70), (33, 9)]),             # GQA 4, head_dim 128, a page boundary mid-block
    (7, 1, 32, 16, [(100, 12), (0, 1), (0, 9)]),     # GQA 7 (Qwen2.5-7B), a one-token sequence
    (8, 8, 96, 4, [(0, 3), (2, 2), (0, 64)]),        # head_dim 96, many sequences in one CTA
])
def test_emulated_prefill_equals_float64_attention(hq, hkv, d, page, seqs):
    args, ref = _case(hq, hkv, d, page, seqs)
    out = kp.emulate(*args)
    assert not np.isnan(out).any()  # every (token, head) written
    rel = np.linalg.norm(out.astype(np.float64) - ref) / np.linalg.norm(ref)
    assert rel < 1e-3  # p s' and the output rounded to fp16


def test_supported_shapes():
    assert [d for d in (16, 32, 48, 64, 96, 128, 256) if kp.supports(d, "float16")] == [32, 64, 96, 128]
    assert not kp.supports(64, "float32")
    with pytest.raises(ValueError, match="head_dim 32, 64, 96 or 128"):
        kp.kv4_prefill(1, 8, 8, 16, 16, 0.25)


@pytest.mark.skipif(nvcc.nvcc_path() is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_prefill_compiles_on_tensor_cores_without_spills(arch):
    from schedules.pipeline import TIR_PIPELINE

    funcs = {f"prefill_{d}_{hq}": kp.kv4_prefill(2, hq, hkv, d, 16, d ** -0.5).with_attr("global_symbol",
                                                                                        f"prefill_{d}_{hq}")
             for hq, hkv, d in ((32, 8, 128), (9, 3, 64), (28, 4, 128))}
    ex = tvm.compile(tvm.IRModule(funcs), target=tvm.target.Target({"kind": "cuda", "arch": arch}),
                     tir_pipeline=TIR_PIPELINE)
    src = nvcc.cuda_source(ex)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src
    report = nvcc.ptxas_report(src, arch)
    assert len(report) == 3 and all(r.spill_stores == 0 and r.spill_loads == 0 for r in report)
    assert all(r.shared_bytes <= 48 * 1024 for r in report)
