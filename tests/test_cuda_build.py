"""The CUDA build compiles on a machine without a GPU: the kernels are compiled ahead of time into
a fatbin inside model.so (SASS per requested arch + PTX of the newest), ptxas accepts them without
spills, and the artifact carries no CUDA source."""

from __future__ import annotations

import json

import pytest

from qoq_compiler import compile
from qoq_compiler.errors import QoqcError
from schedules import nvcc


@pytest.mark.skipif(nvcc.nvcc_path() is None, reason="nvcc not installed")
@pytest.mark.parametrize("name,quant,arch", [("qwen2", "fp16", "sm_90"), ("llama", "w8a8", "sm_90"),
                                            ("mistral", "rtn-w4a8kv4", "sm_90"), ("llama", "rtn-w4a8kv4", None)])
def test_tiny_model_cuda_artifact_compiles_with_nvcc(name, quant, arch, tiny_dirs, tmp_path):
    out = compile(tiny_dirs[name], target="cuda", arch=arch, quant=quant, output=tmp_path / "cuda",
                  dump_ir=True, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    archs = ["sm_90"] if arch else ["sm_80", "sm_89", "sm_90"]  # None: the default list
    assert manifest["target"] == {"name": "cuda", "kind": "cuda", "arch": archs[0]} and manifest["quant"] == quant
    assert manifest["device_code"] == {"format": "fatbin", "sass": archs, "ptx": ["compute_90"]}
    assert {"model.so", "ir/02-quantize.py", "ir/06-vm.py", "ir/kernels.cu"} <= set(manifest["files"])
    images = nvcc.fatbin_images(nvcc.library_fatbin(out / "model.so"))
    assert sorted(images) == sorted([("sass", a) for a in archs] + [("ptx", "compute_90")])
    src = (out / "ir" / "kernels.cu").read_text()
    assert "__global__" in src
    signature = next(line for line in src.splitlines() if "__global__" in line)
    assert signature.encode() not in (out / "model.so").read_bytes()  # no source travels
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


@pytest.mark.parametrize("arch,message", [("sm_75", "invalid CUDA arch 'sm_75'"),
                                          ("sm_90,foo", "invalid CUDA arch 'foo'"), (",", "invalid CUDA arch")])
def test_bad_cuda_arch_is_refused(arch, message, tiny_dirs, tmp_path):
    with pytest.raises(QoqcError, match=message):
        compile(tiny_dirs["llama"], target="cuda", arch=arch, output=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("compute,ok", [("8.0", True), ("8.6", True), ("9.0", True), ("12.0", True),
                                        ("7.5", False)])
def test_device_code_check_by_compute_capability(compute, ok, tmp_path):
    from qoq_compiler.runtime.artifact import check_device_code

    manifest = {"device_code": {"format": "fatbin", "sass": ["sm_80", "sm_89", "sm_90"], "ptx": ["compute_90"]}}
    if ok:
        check_device_code(manifest, tmp_path, compute, "GPU")
    else:
        with pytest.raises(QoqcError, match="this GPU .GPU. is sm_75, and artifact .* has device code for sm_80, "
                                            "sm_89, sm_90, PTX compute_90 only"):
            check_device_code(manifest, tmp_path, compute, "GPU")
    with pytest.raises(QoqcError, match="is sm_80, .* recompile it with --arch including sm_80"):
        check_device_code({"device_code": {"sass": ["sm_90"], "ptx": []}}, tmp_path, "8.0", "A100")
    with pytest.raises(QoqcError, match="CUDA source .* recompile it"):
        check_device_code({}, tmp_path, "9.0", "H100")
