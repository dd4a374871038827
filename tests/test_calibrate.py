"""Calibration samples and statistics (K after RoPE checked against transformers' own RoPE call)."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import AutoTokenizer

from qoq_compiler import QoqcError
from qoq_compiler.quant.calibrate import DEFAULT_TEXT, calibration_tokens, collect_stats, iter_layer_stats, read_text
from conftest import STORIES, hf_model, requires_shared_data


@requires_shared_data()
def test_calibration_tokens_are_seeded_windows():
    tok = AutoTokenizer.from_pretrained(STORIES)
    text = read_text()
    assert DEFAULT_TEXT.is_file() and "Pride" in text[:200].title()
    a = calibration_tokens(tok, text, samples=16, seq_len=64, seed=1)
    b = calibration_tokens(tok, text, samples=16, seq_len=64, seed=1)
    assert a.shape == (16, 64) and torch.equal(a, b)
    assert not torch.equal(a, calibration_tokens(tok, text, samples=16, seq_len=64, seed=2))
    with pytest.raises(QoqcError, match="fewer than one sample"):
        calibration_tokens(tok, "short text", samples=1, seq_len=64)
    with pytest.raises(QoqcError, match="does not exist"):
        read_text("/nonexistent.txt")


@pytest.mark.parametrize("name,module", [("llama", "llama"), ("qwen2", "qwen2"), ("mistral", "mistral")])
def test_stats_match_transformers_rope_and_mlp(name, module, tiny_dirs, monkeypatch):
    model = hf_model(tiny_dirs[name])
    tokens = torch.randint(3, 512, (6, 40), generator=torch.Generator().manual_seed(0))
    stats = collect_stats(model, tokens, batch_size=4, progress=False)

    seen_k, seen_down = [], []
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    original = mod.apply_rotary_pos_emb

    def recording(q, k, cos, sin, *args, **kwargs):
        q2, k2 = original(q, k, cos, sin, *args, **kwargs)
        seen_k.append(k2.detach())  # [B, Hkv, T, D]
        return q2, k2

    monkeypatch.setattr(mod, "apply_rotary_pos_emb", recording)
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda _m, i: seen_down.append(i[0].detach()))
             for layer in model.model.layers]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    for i, s in enumerate(stats):
        ref_k = seen_k[i].abs().amax(dim=(0, 2)).double()
        ref_down = seen_down[i].abs().reshape(-1, seen_down[i].shape[-1]).amax(dim=0).double()
        assert torch.allclose(s.k_absmax, ref_k, rtol=1e-5, atol=1e-6)
        assert torch.allclose(s.down_absmax, ref_down, rtol=1e-5, atol=1e-6)


def test_layer_hessians_are_the_inputs_second_moments(tiny_dirs):
    model = hf_model(tiny_dirs["llama"])
    tokens = torch.randint(3, 512, (5, 24), generator=torch.Generator().manual_seed(1))
    seen = {}
    layer = model.model.layers[1]
    mods = {"qkv": layer.self_attn.q_proj, "o": layer.self_attn.o_proj, "gate_up": layer.mlp.up_proj,
            "down": layer.mlp.down_proj}
    hooks = [m.register_forward_pre_hook(lambda _m, i, key=key: seen.setdefault(key, i[0].detach()))
             for key, m in mods.items()]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    stats = dict(iter_layer_stats(model, tokens, batch_size=2, hessians=True, progress=False))
    for key, x in seen.items():
        x = x.reshape(-1, x.shape[-1]).double()
        assert torch.allclose(stats[1].hessians[key], 2 / len(x) * x.T @ x, rtol=1e-4, atol=1e-6), key


def test_sequential_calibration_feeds_the_quantized_layer_outputs(tiny_dirs):
    """Without changes both orders see the same inputs; after layer 0's weights change at its step,
    layer 1 is calibrated on the new layer 0's outputs only in sequential order."""
    model = hf_model(tiny_dirs["llama"])
    tokens = torch.randint(3, 512, (4, 24), generator=torch.Generator().manual_seed(2))
    plain = dict(iter_layer_stats(model, tokens, batch_size=2, hessians=True, down_sample=True))
    same = dict(iter_layer_stats(model, tokens, batch_size=2, hessians=True, sequential=True))
    assert torch.equal(plain[1].hessians["qkv"], same[1].hessians["qkv"])
    assert plain[1].down_sample.shape == (4 * 2, model.config.intermediate_size)  # tokens 0 and 16 of each

    def changed(sequential):
        m = hf_model(tiny_dirs["llama"])
        out = {}
        for i, st in iter_layer_stats(m, tokens, batch_size=2, hessians=True, sequential=sequential):
            out[i] = st
            if i == 0:
                with torch.no_grad():
                    m.model.layers[0].mlp.down_proj.weight.mul_(3.0)
        return out
    assert torch.equal(changed(False)[1].hessians["qkv"], plain[1].hessians["qkv"])
    seq = changed(True)[1].hessians["qkv"]
    assert not torch.allclose(seq, plain[1].hessians["qkv"])
    m = hf_model(tiny_dirs["llama"])
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    assert torch.allclose(dict(iter_layer_stats(m, tokens, batch_size=2, hessians=True))[1].hessians["qkv"], seq)
