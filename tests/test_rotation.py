"""Rotations folded into the weights leave the model's outputs unchanged (fp32 rounding only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qoq_compiler import compile, load
from qoq_compiler.quant import rotation
from qoq_compiler.quant.hadamard import hadamard, orthogonal_hadamard
from conftest import STORIES, TINY_MODELS, hf_model, rel_err, requires_shared_data


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 64, 96, 576, 896, 1536])
def test_hadamard_orders(n):
    h = hadamard(n).astype(np.float64)
    assert set(np.unique(h)) <= {-1.0, 1.0}
    assert (h @ h.T == n * np.eye(n)).all()


def test_hadamard_unavailable_order_is_an_error():
    from qoq_compiler import QoqcError

    with pytest.raises(QoqcError, match="size 63"):
        hadamard(63)


IDS = torch.tensor([[1, 45, 300, 17, 99, 260, 4, 511, 128, 77, 300, 12, 5, 6, 7, 8, 9, 10]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits[0].numpy()


@pytest.mark.parametrize("name", list(TINY_MODELS))
@pytest.mark.parametrize("step", ["fold", "residual", "heads", "all"])
def test_rotation_is_exact(name, step, tiny_dirs):
    model = hf_model(tiny_dirs[name])
    before = _logits(model)
    if step == "fold":
        rotation.fold_norms(model)
        assert all((layer.input_layernorm.weight == 1).all() for layer in model.model.layers)
    elif step == "residual":
        rotation.fold_norms(model)
        rotation.rotate_residual(model, torch.from_numpy(orthogonal_hadamard(model.config.hidden_size)))
    elif step == "heads":
        rotation.rotate_heads(model)
    else:
        rotation.rotate(model)
    assert rel_err(_logits(model), before) < 1e-5
    if step in ("residual", "all"):  # the weights really changed
        assert not torch.allclose(model.model.embed_tokens.weight, hf_model(tiny_dirs[name]).model.embed_tokens.weight)


def test_rotated_model_compiles_to_the_same_logits(tiny_dirs, tmp_path):
    """Tied Qwen2 with QKV bias: rotate, save, compile; the artifact reproduces the original model."""
    original = hf_model(tiny_dirs["qwen2"])
    model = hf_model(tiny_dirs["qwen2"])
    rotation.rotate(model)
    model.save_pretrained(tmp_path / "rot")
    eng = load(compile(tmp_path / "rot", target="llvm", quant="fp32", output=tmp_path / "a", progress=False))
    assert eng.config.tie_word_embeddings is False
    assert rel_err(eng.logits(IDS[0].tolist()), _logits(original)) < 1e-4


@requires_shared_data()
def test_rotation_on_real_weights():
    model = hf_model(STORIES)
    before = _logits(model)
    rotation.rotate(model)
    assert rel_err(_logits(model), before) < 1e-5
