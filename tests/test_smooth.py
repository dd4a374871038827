"""Smoothing scales folded into the weights leave outputs unchanged; the scale formulas."""

from __future__ import annotations

import pytest
import torch

from qoq_compiler.quant import smooth
from conftest import TINY_MODELS, hf_model, rel_err

IDS = torch.tensor([[1, 45, 300, 17, 99, 260, 4, 511, 128, 77, 300, 12, 5, 6, 7, 8]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits[0].numpy()


def _kv_shape(model):
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_key_value_heads, d


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_smooth_attention_is_exact(name, tiny_dirs):
    model = hf_model(tiny_dirs[name])
    before = _logits(model)
    gen = torch.Generator().manual_seed(0)
    for layer in model.model.layers:
        lam = smooth.attention_scales(torch.rand(_kv_shape(model), generator=gen, dtype=torch.float64) * 20, 0.5)
        smooth.smooth_attention(layer, lam)
    assert rel_err(_logits(model), before) < 1e-5


def test_smooth_attention_rejects_scales_that_break_rope(tiny_dirs):
    model = hf_model(tiny_dirs["llama"])
    with pytest.raises(ValueError, match="RoPE pair"):
        smooth.smooth_attention(model.model.layers[0], torch.rand(_kv_shape(model)) + 0.5)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_smooth_down_proj_is_exact(name, tiny_dirs):
    model = hf_model(tiny_dirs[name])
    before = _logits(model)
    for layer in model.model.layers:
        x_absmax = torch.rand(model.config.intermediate_size, dtype=torch.float64) * 10
        w_absmax = layer.mlp.down_proj.weight.abs().amax(dim=0)
        smooth.smooth_down_proj(layer, smooth.linear_scales(x_absmax, w_absmax, 0.3, 0.7))
    assert rel_err(_logits(model), before) < 1e-5


def test_scale_formulas():
    k = torch.tensor([[1.0, 9.0, 4.0, 1.0]])  # pairs (0, 2) and (1, 3)
    assert torch.allclose(smooth.attention_scales(k, 0.5), torch.tensor([[2.0, 3.0, 2.0, 3.0]], dtype=torch.float64))
    s = smooth.linear_scales(torch.tensor([16.0, 1.0]), torch.tensor([1.0, 16.0]), 0.5, 0.5)
    assert torch.allclose(s, torch.tensor([4.0, 0.25], dtype=torch.float64))


def test_linear_scale_search_lowers_the_quantized_output_error():
    """On a down_proj whose inputs have outlier channels, the searched (alpha, beta) gives a smaller
    output error with 4-bit weights and 8-bit activations than no smoothing and than the fixed
    default (0.3, 0.7) (both are on the grid); the error is measured on held-out inputs."""
    from qoq_compiler.config import QUANT_SCHEMES
    from qoq_compiler.quant.convert import quantize_weight
    from qoq_compiler.quant.simulate import fake_quantize_per_token

    g = torch.Generator().manual_seed(0)
    n, i = 48, 256
    col = torch.ones(i, dtype=torch.float64)
    col[torch.randperm(i, generator=g)[:6]] = 40.0  # outlier input channels
    x = torch.randn(4096, i, generator=g, dtype=torch.float64) * col
    w = torch.randn(n, i, generator=g, dtype=torch.float64) * 0.05
    scheme = QUANT_SCHEMES["qoq-w4a8kv4-g128"]

    def quantize(wt):
        return torch.from_numpy(quantize_weight(scheme, wt).dequantize()).double()

    fit, held = x[:2048], x[2048:]
    h = 2 / len(fit) * fit.T @ fit
    (alpha, beta), s = smooth.search_linear_scales(w, fit.abs().amax(dim=0), h, fit[::4], quantize,
                                                   fake_quantize_per_token)

    def output_error(s):
        return float(((held @ w.T - fake_quantize_per_token(held / s) @ quantize(w * s).T) ** 2).sum())
    assert (alpha, beta) in smooth.LINEAR_GRID and (alpha, beta) != (0.0, 0.0)
    fixed = smooth.linear_scales(fit.abs().amax(dim=0), w.abs().amax(dim=0), 0.3, 0.7)
    assert output_error(s) < output_error(torch.ones(i, dtype=torch.float64))
    assert output_error(s) <= output_error(fixed) * 1.02
