"""End to end on the device: CUDA artifacts built on a CPU machine give the greedy tokens their llvm
builds of the same weights gave there (``bench/gpu_check.py prepare`` recorded them, with the gap
between the two best logits at every step)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

#: a step whose two best llvm logits lie closer than this is a tie that another device's rounding
#: may break: tokens are compared up to the first such step
TIE = 0.01


def test_greedy_tokens_equal_the_llvm_build(prebuilt):
    from qoq_compiler.runtime.engine import Engine

    assert prebuilt.spec["e2e"], "nothing prepared"
    for entry in prebuilt.spec["e2e"]:
        engine = Engine(prebuilt.artifact(entry), device=prebuilt.device)
        got = engine.generate(entry["prompt"], max_new_tokens=len(entry["tokens"])).token_ids
        n = next((i for i, m in enumerate(entry["margins"]) if m < TIE), len(entry["margins"]))
        expected = [t for t in entry["tokens"][:n] if t not in engine.config.eos_token_ids]
        assert n >= 8, f"{entry['name']} {entry['quant']}: a near-tie at step {n} leaves too few tokens to compare"
        if got[:len(expected)] != expected:
            i = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
            pytest.fail(f"{entry['name']} {entry['quant']}: greedy tokens differ from the llvm build at step {i} "
                        f"(llvm's top-2 logit gap there: {entry['margins'][i]:.4g})\n got {got}\nwant {expected}")
