"""down_proj channel reordering is exact; the clipping search lowers the output error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qoq_compiler.quant import reference as qref
from qoq_compiler.quant.clipping import candidate_ratios, search_channel_ratios
from qoq_compiler.quant.reorder import reorder_down_proj
from conftest import TINY_MODELS, hf_model, rel_err

IDS = torch.tensor([[1, 45, 300, 17, 99, 260, 4, 511, 128, 77, 300, 12]])


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_reorder_is_exact_and_sorts(name, tiny_dirs):
    model = hf_model(tiny_dirs[name])
    with torch.no_grad():
        before = model(IDS).logits[0].numpy()
    gen = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        metric = torch.rand(model.config.intermediate_size, generator=gen)
        up_before = layer.mlp.up_proj.weight.clone()
        pi = reorder_down_proj(layer, metric)
        assert torch.equal(layer.mlp.up_proj.weight, up_before[pi])
        assert (metric[pi][1:] >= metric[pi][:-1]).all()
    with torch.no_grad():
        assert rel_err(model(IDS).logits[0].numpy(), before) < 1e-6


def test_candidates_follow_deepcompressor():
    r = candidate_ratios(80, 0.2)
    assert len(r) == 81 and r[0] == 1.0 and np.isclose(r[1], 0.99) and np.isclose(r[-1], 0.2)


def test_clipping_search_lowers_output_error():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 256)) * 0.02
    w[rng.random(w.shape) < 0.003] *= 25  # a few outliers per channel stretch the range
    x = rng.standard_normal((512, 256))
    ratios = search_channel_ratios(w, 2 / len(x) * x.T @ x, grids=40)
    assert ((ratios >= 0.2) & (ratios <= 1.0)).all() and (ratios < 1).any()

    def out_err(r):
        return ((x @ (w - qref.per_channel_quantize(w, r).dequantize()).T) ** 2).sum(axis=0)

    searched, plain = out_err(ratios), out_err(1.0)
    assert (searched <= plain + 1e-12).all()  # 1.0 is a candidate: never worse per channel
    assert searched.sum() < 0.9 * plain.sum()
