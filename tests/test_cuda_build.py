"""The CUDA build compiles on a machine without a GPU; nvcc accepts the generated kernels."""

from __future__ import annotations

import json

import pytest

from qoq_compiler import compile
from schedules import nvcc


@pytest.mark.skipif(nvcc.nvcc_path() is None, reason="nvcc not installed")
@pytest.mark.parametrize("name,quant", [("qwen2", "fp16"), ("llama", "w8a8"), ("mistral", "rtn-w4a8kv4"),
                                       ("llama", "rtn-w4a8kv4")])
def test_tiny_model_cuda_artifact_compiles_with_nvcc(name, quant, tiny_dirs, tmp_path):
    out = compile(tiny_dirs[name], target="cuda", arch="sm_90", quant=quant, output=tmp_path / "cuda",
                  dump_ir=True, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == {"name": "cuda", "kind": "cuda", "arch": "sm_90"} and manifest["quant"] == quant
    assert {"model.so", "ir/relax_before.py", "ir/relax_after.py", "ir/kernels.cu"} <= set(manifest["files"])
    src = (out / "ir" / "kernels.cu").read_text()
    assert "__global__" in src
    kernels = nvcc.ptxas_report(src, "sm_90")  # raises with nvcc's message if it rejects the source
    if quant.endswith("w4a8kv4"):
        # the W4A8 linears run on the tensor-core GEMM and the KV4 cache on its own kernels, without spills
        assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in src
        gemms = [k for k in kernels if k.name.startswith("w4a8_gemm")]
        kv4 = {k.name: k for k in kernels if k.name.startswith("kv4_")}
        assert gemms and {"kv4_append_kernel", "kv4_attention_kernel", "kv4_merge_kernel"} <= set(kv4)
        # prefill attention on the fp16 tensor cores at head_dim 32 (llama); at 16 (mistral) on the split kernel
        assert ("kv4_prefill_kernel" in kv4) == (name == "llama")
        assert ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src) == (name == "llama")
        assert not [k for k in gemms + list(kv4.values()) if k.spill_stores or k.spill_loads], kernels
