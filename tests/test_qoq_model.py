"""W4A8KV4 end to end: the QoQ passes are exact on the float model, and the compiled model
computes exactly the fake-quantized math of ``quant.simulate`` (4-bit weights, per-token int8
activations, the 4-bit paged KV cache), in prefill and in decode across page boundaries."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from qoq_compiler import compile, load
from qoq_compiler.config import QUANT_SCHEMES, QoQPasses, QuantScheme
from qoq_compiler.quant import reference as qref
from qoq_compiler.quant.kv_choice import choose_kv_rotation
from qoq_compiler.quant.qoq import quantize_model
from qoq_compiler.quant.simulate import fake_quantize_kv4, fake_quantize_per_token, simulate
from conftest import STORIES, hf_model, rel_err, requires_shared_data

PROMPT = [1, 45, 300, 17, 99, 260, 4, 511, 128, 77, 300, 12, 5, 6, 8, 9, 10, 11, 12, 13, 14, 200, 31, 7]
CALIB = dict(calib_samples=4, calib_seq_len=64)


def _scheme(group, passes=True, dtype="float32", kv_rotation=False):
    p = QoQPasses(reorder=group is not None, clip=group is None, **CALIB) if passes else None
    return QuantScheme("test", dtype, weights="int4", group=group, kv="int4", passes=p, kv_rotation=kv_rotation)


def _simulated_logits(src, scheme, ids):
    """The simulation's logits, after the per-model KV choice the compiler makes too, and the float ones."""
    model = hf_model(src)
    tokenizer = AutoTokenizer.from_pretrained(src)
    with torch.no_grad():
        float_logits = model(torch.tensor([ids])).logits[0].numpy()
        scheme, _ = choose_kv_rotation(model, tokenizer, scheme)
        simulate(model, scheme, quantize_model(model, tokenizer, scheme, progress=False))
        return model(torch.tensor([ids])).logits[0].numpy(), float_logits


@pytest.mark.parametrize("name,group,kv_rotation", [("llama", 32, False), ("qwen2", None, False),
                                                    ("mistral", 128, False), ("llama", 32, True)])
def test_compiled_w4a8kv4_equals_simulation(name, group, kv_rotation, tiny_dirs, tmp_path):
    """fp32 activations: compiled == fake-quant simulation; prefill, then decode token by token
    (with ``kv_rotation``: q and k Hadamard-rotated after RoPE in the kernels and the simulation)."""
    scheme = _scheme(group, kv_rotation=kv_rotation)
    eng = load(compile(tiny_dirs[name], target="llvm", quant=scheme, output=tmp_path / "a", progress=False))
    assert eng.manifest["kv_cache"] == {"kind": "kv4-paged", "page_size": 16}
    sim, float_logits = _simulated_logits(tiny_dirs[name], scheme, PROMPT)
    assert rel_err(eng.logits(PROMPT), sim) < 1e-5
    assert rel_err(sim, float_logits) > 1e-2  # and it is not the float model

    sid = eng.add_sequence()  # 5 tokens prefilled, 19 decoded: crosses the 16-token page boundary
    eng.prefill([(sid, PROMPT[:5])])
    rows = np.stack([eng.decode([sid], [t])[0] for t in PROMPT[5:]])
    assert rel_err(rows, sim[5:]) < 1e-5
    eng.truncate_sequence(sid, 10)  # pages freed and re-used: still the same logits
    assert rel_err(eng.prefill([(sid, PROMPT[10:])], all_logits=True)[0], sim[10:]) < 1e-5


def test_batched_kv4_decode_equals_alone(tiny_dirs, tmp_path):
    eng = load(compile(tiny_dirs["llama"], target="llvm", quant=_scheme(32, passes=False), output=tmp_path / "a",
                       progress=False))
    prompts = [PROMPT[:3], PROMPT, PROMPT[4:11]]
    together = [r.token_ids for r in eng.generate_batch(prompts, max_new_tokens=20)]
    assert together == [eng.generate(p, max_new_tokens=20).token_ids for p in prompts]


@pytest.mark.parametrize("name,search", [("llama", False), ("qwen2", False), ("qwen2", True)])
def test_qoq_passes_are_exact(name, search, tiny_dirs):
    """Rotation, reordering and smoothing (SmoothAttention, SmoothLinear fixed or searched) change
    the weights, not the float model's outputs, QKV biases included (Qwen2)."""
    model = hf_model(tiny_dirs[name])
    ids = torch.tensor([PROMPT])
    scheme = _scheme(128)
    scheme = replace(scheme, passes=replace(scheme.passes, smooth_attn_alpha=0.5, smooth_down_search=search))
    with torch.no_grad():
        before = model(ids).logits[0].numpy()
        quantize_model(model, AutoTokenizer.from_pretrained(tiny_dirs[name]), scheme, progress=False)
        assert rel_err(model(ids).logits[0].numpy(), before) < 1e-5


def test_fake_quantizers_follow_the_spec():
    x = torch.randn(5, 3, 64, dtype=torch.float64) * torch.rand(5, 3, 1, dtype=torch.float64) * 4
    x[0, 0] = 0.0  # an all-zero row stays finite
    q, s = qref.quantize_per_token(x.numpy())
    assert torch.allclose(fake_quantize_per_token(x), torch.from_numpy(q * s.astype(np.float64)), atol=1e-12)
    assert torch.allclose(fake_quantize_kv4(x), torch.from_numpy(qref.kv4_dequantize(*qref.kv4_quantize(x.numpy())))
                          .double(), atol=1e-6)
    assert torch.isfinite(fake_quantize_kv4(x)).all() and (fake_quantize_kv4(x)[0, 0] == 0).all()


@requires_shared_data()
def test_qoq_g128_fp16_artifact_on_real_weights(tmp_path):
    """The shipped scheme (fp16 activations) on stories260K.

    fp16 rounding moves 4-bit codes on this 260K-parameter model (head_dim 8): the simulation run
    in fp16 differs from the fp32 one by 12% (measured), so only closeness is asserted here; the
    exact check is ``test_compiled_w4a8kv4_equals_simulation`` with fp32 activations."""
    assert {"rtn-w4a8kv4", "qoq-w4a8kv4-g128", "qoq-w4a8kv4-chn"} <= set(QUANT_SCHEMES)
    scheme = QUANT_SCHEMES["qoq-w4a8kv4-g128"]
    scheme = replace(scheme, passes=replace(scheme.passes, calib_samples=16, calib_seq_len=128))
    eng = load(compile(STORIES, target="llvm", quant=scheme, output=tmp_path / "a", progress=False))
    assert eng.manifest["quant_scheme"]["passes"]["calib_samples"] == 16
    assert eng.manifest["quant_scheme"]["passes"]["choose_kv_rotation"] is False  # the choice made is recorded
    ids = eng.encode("Once upon a time, there was a little girl named Lily. She loved to play")
    sim, float_logits = _simulated_logits(STORIES, scheme, ids)
    got = eng.logits(ids)
    assert rel_err(got, sim) < 0.2 and rel_err(got, float_logits) < 0.3
    assert (got.argmax(axis=1) == float_logits.argmax(axis=1)).mean() > 0.8  # the same next tokens, mostly


def test_a_checkpoint_read_through_transformers_is_not_loaded_again(tiny_dirs, tmp_path, monkeypatch):
    """GGUF checkpoints are read by building the transformers model; the 4-bit path reuses it."""
    from qoq_compiler import compiler
    from qoq_compiler.frontend.checkpoint import from_torch_model

    model = hf_model(tiny_dirs["llama"])
    monkeypatch.setattr(compiler, "open_checkpoint", lambda path: from_torch_model(model, path, None))
    monkeypatch.setattr(compiler, "load_torch_model", lambda path: pytest.fail("model loaded a second time"))
    out = compile(tiny_dirs["llama"], target="llvm", quant=_scheme(32, passes=False), output=tmp_path / "a",
                  progress=False)
    assert (out / "manifest.json").is_file()
