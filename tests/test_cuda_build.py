"""The CUDA build compiles on a machine without a GPU; nvcc accepts the generated kernels."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from qoq_compiler import compile

nvcc = shutil.which("nvcc")


@pytest.mark.skipif(nvcc is None, reason="nvcc not installed")
@pytest.mark.parametrize("name,quant", [("qwen2", "fp16"), ("llama", "w8a8"), ("mistral", "rtn-w4a8kv4")])
def test_tiny_model_cuda_artifact_compiles_with_nvcc(name, quant, tiny_dirs, tmp_path):
    out = compile(tiny_dirs[name], target="cuda", arch="sm_90", quant=quant, output=tmp_path / "cuda",
                  dump_ir=True, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == {"name": "cuda", "kind": "cuda", "arch": "sm_90"} and manifest["quant"] == quant
    assert {"model.so", "ir/relax_before.py", "ir/relax_after.py", "ir/kernels.cu"} <= set(manifest["files"])
    src = (out / "ir" / "kernels.cu").read_text()
    assert "__global__" in src
    proc = subprocess.run([nvcc, "-arch=sm_90", "-cubin", "-o", str(tmp_path / "k.cubin"), str(out / "ir" / "kernels.cu")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
