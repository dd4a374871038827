"""GPTQ keeps the static quantization parameters and lowers the layer's output error below RTN."""

from __future__ import annotations

import pytest
import torch

from qoq_compiler.quant import reference as qref
from qoq_compiler.quant.gptq import gptq_per_channel, gptq_progressive, hessian


def correlated_inputs(t, k, seed):
    """Activations with correlated channels and a few large channels, like an LLM's."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5
    x = torch.randn(t, k, generator=g, dtype=torch.float64) @ (torch.eye(k, dtype=torch.float64) + 0.7 * mix)
    x[:, :4] *= 8
    return x


def out_err(x, w, w_hat):
    return float(((x @ (w - torch.as_tensor(w_hat, dtype=torch.float64)).T) ** 2).sum())


@pytest.mark.parametrize("k", [256, 384])
def test_gptq_progressive(k):
    w = torch.randn(64, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64) * 0.02
    x = correlated_inputs(1024, k, seed=k)
    x[:, 7] = 0.0  # a dead input channel
    rtn = qref.progressive_quantize(w.numpy())
    g = gptq_progressive(w, hessian(x))
    assert (g.s1 == rtn.s1).all() and (g.s2 == rtn.s2).all() and (g.z2 == rtn.z2).all()  # static groups
    assert g.q.max() <= 15
    g.level1()  # asserts the int8 range
    assert out_err(x, w, g.dequantize()) < 0.8 * out_err(x, w, rtn.dequantize())


def test_gptq_per_channel():
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.02
    x = correlated_inputs(1024, 256, seed=3)
    rtn = qref.per_channel_quantize(w.numpy())
    g = gptq_per_channel(w, hessian(x))
    assert (g.s == rtn.s).all() and (g.z == rtn.z).all() and g.q.max() <= 15
    assert out_err(x, w, g.dequantize()) < 0.8 * out_err(x, w, rtn.dequantize())
