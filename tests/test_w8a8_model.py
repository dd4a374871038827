"""``--quant w8a8`` end to end: the compiled model computes the W8A8 math, not the float model."""

from __future__ import annotations

import pytest
import torch

from qoq_compiler import compile, load
from qoq_compiler.config import QUANT_SCHEMES, QuantScheme
from qoq_compiler.quant.qoq import quantize_model
from qoq_compiler.quant.simulate import simulate
from conftest import STORIES, hf_model, rel_err, requires_shared_data

PROMPT = [1, 45, 300, 17, 99, 260, 4, 511, 128, 77, 300, 12, 5, 6]


def _logits(src, scheme, tmp_path, **hf_kwargs):
    eng = load(compile(src, target="llvm", quant=scheme, output=tmp_path / "w8", progress=False))
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        ref = hf_model(src, **hf_kwargs)
        float_logits = ref(ids).logits[0].numpy()
        sim = QUANT_SCHEMES["w8a8"]  # the simulation runs in the model's fp32 whatever the scheme's dtype
        simulate(ref, sim, quantize_model(ref, None, sim, progress=False))
        quant_logits = ref(ids).logits[0].numpy()
    return eng, eng.logits(PROMPT), quant_logits, float_logits


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_w8a8_computes_exactly_the_quantized_math(name, tiny_dirs, tmp_path):
    """With fp32 activations the compiled W8A8 model equals its fake-quant simulation (QKV bias too)."""
    _, got, quant_logits, float_logits = _logits(tiny_dirs[name], QuantScheme("w8a8", "float32", "int8"), tmp_path)
    assert rel_err(got, quant_logits) < 1e-5
    assert rel_err(got, float_logits) > 1e-3  # and it is not the float model


@requires_shared_data()
def test_w8a8_fp16_scheme_on_real_weights(tmp_path):
    eng, got, quant_logits, float_logits = _logits(STORIES, "w8a8", tmp_path)
    manifest = eng.manifest
    assert manifest["quant"] == "w8a8" and manifest["dtype"] == "float16"
    assert rel_err(got, float_logits) < 0.02 and rel_err(got, quant_logits) < 0.02
    text = eng.generate([1], max_new_tokens=24).text
    assert text.startswith("Once upon a time, there was a little girl named Lily.")
