"""The per-model choice between a rotated and a smoothed 4-bit K cache (``quant.kv_choice``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer

from qoq_compiler.config import QUANT_SCHEMES
from qoq_compiler.quant import kv_choice
from conftest import hf_model


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_both_candidates_are_exact_without_quantization(name, tiny_dirs, monkeypatch):
    """With the 4-bit quantizer replaced by the identity, SmoothAttention inside attention and the
    q/k rotation leave the loss exactly as the float model's (GQA, biases, llama3 RoPE)."""
    model = hf_model(tiny_dirs[name])
    tokens = torch.randint(3, 300, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens).logits[:, :-1]
        ref = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)))
    monkeypatch.setattr(kv_choice, "fake_quantize_kv4", lambda x: x)
    loss = kv_choice.kv4_losses(model, tokens, alpha=0.5, batch_size=2)
    assert loss["smoothed"] == pytest.approx(ref, rel=1e-5) and loss["rotated"] == pytest.approx(ref, rel=1e-5)
    assert model.config._attn_implementation != kv_choice.PROBE  # restored
    monkeypatch.undo()
    with_kv4 = kv_choice.kv4_losses(model, tokens, alpha=0.5, batch_size=2)
    assert with_kv4["smoothed"] != loss["smoothed"] and with_kv4["rotated"] != loss["rotated"]


@pytest.mark.parametrize("rotated_wins", [True, False])
def test_the_lower_loss_decides(rotated_wins, tiny_dirs, monkeypatch):
    model = hf_model(tiny_dirs["llama"])
    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    monkeypatch.setattr(kv_choice, "kv4_losses",
                        lambda *a, **k: {"smoothed": 2.0, "rotated": 1.0 if rotated_wins else 3.0})
    g128 = QUANT_SCHEMES["qoq-w4a8kv4-g128"]
    chosen, loss = kv_choice.choose_kv_rotation(model, tok, g128)
    assert loss is not None and not chosen.passes.choose_kv_rotation
    assert chosen.kv_rotation == rotated_wins
    assert chosen.passes.smooth_attn_alpha == (None if rotated_wins else g128.passes.smooth_attn_alpha)
    # nothing to choose: no request for it, a float cache, no tokenizer, or a head_dim without a fast Hadamard
    for scheme, t in ((replace(g128, passes=replace(g128.passes, choose_kv_rotation=False)), tok),
                      (replace(g128, kv="float"), tok), (g128, None), (QUANT_SCHEMES["rtn-w4a8kv4"], tok)):
        assert kv_choice.choose_kv_rotation(model, t, scheme) == (scheme, None)
    unrotatable, loss = kv_choice.choose_kv_rotation(model, tok, replace(g128, kv_rotation=False))
    assert loss is None and not unrotatable.kv_rotation and unrotatable.passes.smooth_attn_alpha == 0.5


@pytest.mark.parametrize("flag,rotation,alpha,choose", [
    ([], True, 0.5, True), (["--kv-rotation", "auto"], True, 0.5, True), (["--kv-rotation", "on"], True, None, False),
    (["--kv-rotation", "off"], False, 0.5, False), (["--kv-rotation", "off", "--smooth-attn-alpha", "0.3"], False, 0.3,
                                                    False)])
def test_kv_rotation_option(flag, rotation, alpha, choose):
    from qoq_compiler.cli import _parser, _scheme

    scheme = _scheme(_parser().parse_args(["compile", *flag]))
    assert (scheme.kv_rotation, scheme.passes.smooth_attn_alpha, scheme.passes.choose_kv_rotation) == \
        (rotation, alpha, choose)
