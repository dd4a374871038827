"""The compiled module against transformers: tiny random Llama / Mistral / Qwen2 (fp32 compute)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qoq_compiler import load
from conftest import TINY_MODELS, hf_greedy, hf_model, rel_err

pytestmark = pytest.mark.usefixtures("tiny_artifacts")
PROMPT = [1, 45, 300, 17, 99, 260, 4, 511, 128, 77, 300, 12]


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_prefill_and_every_decode_step_match_transformers(name, tiny_dirs, tiny_artifacts):
    ref = hf_model(tiny_dirs[name])
    eng = load(tiny_artifacts[name])
    rng = np.random.default_rng(1)
    steps = [int(t) for t in rng.integers(3, 512, size=24)]  # crosses a 16-token page boundary
    with torch.no_grad():
        full = ref(torch.tensor([PROMPT + steps])).logits[0].numpy()

    sid = eng.add_sequence()
    try:
        prefill = eng.prefill([(sid, PROMPT)], all_logits=True)[0]
        assert prefill.shape == (len(PROMPT), 512)
        assert rel_err(prefill, full[: len(PROMPT)]) < 1e-4
        for i, tok in enumerate(steps):
            row = eng.decode([sid], [tok])[0]
            assert rel_err(row, full[len(PROMPT) + i]) < 1e-4, f"decode step {i}"
    finally:
        eng.remove_sequence(sid)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_greedy_32_tokens_identical(name, tiny_dirs, tiny_artifacts):
    ref = hf_model(tiny_dirs[name])
    eng = load(tiny_artifacts[name])
    expected = hf_greedy(ref, PROMPT, 32, set(eng.config.eos_token_ids))
    got = eng.generate(PROMPT, max_new_tokens=32)
    assert got.token_ids == expected
    assert len(expected) >= 8, "the random model stopped too early to be a meaningful check"


def test_logits_api_equals_transformers(tiny_dirs, tiny_artifacts):
    ref = hf_model(tiny_dirs["llama"])
    ids = list(np.random.default_rng(5).integers(0, 512, size=70))
    eng = load(tiny_artifacts["llama"], prefill_chunk_size=32)  # 70 tokens: three prefill chunks
    with torch.no_grad():
        full = ref(torch.tensor([ids])).logits[0].numpy()
    assert rel_err(eng.logits(ids), full) < 1e-4


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_batched_decode_equals_each_alone(name, tiny_artifacts):
    eng = load(tiny_artifacts[name])
    prompts = [PROMPT, PROMPT[:3], list(range(5, 40))]
    together = eng.generate_batch(prompts, max_new_tokens=20)
    alone = [eng.generate(p, max_new_tokens=20) for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_generate_batch_takes_more_prompts_than_the_batch(tiny_artifacts):
    """Five prompts through an engine that decodes two at a time: the rest queue, outputs unchanged."""
    eng = load(tiny_artifacts["llama"], max_batch_size=2)
    prompts = [PROMPT, PROMPT[:3], list(range(5, 40)), PROMPT[2:9], [7]]
    together = eng.generate_batch(prompts, max_new_tokens=12)
    assert [r.token_ids for r in together] == [eng.generate(p, max_new_tokens=12).token_ids for p in prompts]


def test_batched_step_logits_equal_single(tiny_artifacts):
    """One decode call for three sequences of lengths 12, 3, 35 gives each one's own logits."""
    eng = load(tiny_artifacts["mistral"])
    prompts = [PROMPT, PROMPT[:3], list(range(5, 40))]
    single = []
    for p in prompts:
        sid = eng.add_sequence()
        eng.prefill([(sid, p)])
        single.append(eng.decode([sid], [7])[0])
        eng.remove_sequence(sid)
    sids = [eng.add_sequence() for _ in prompts]
    eng.prefill(list(zip(sids, prompts)))
    batched = eng.decode(sids, [7, 7, 7])
    for s in sids:
        eng.remove_sequence(s)
    for b, s in zip(batched, single):
        assert rel_err(b, s) < 1e-5


def test_sampling_is_seeded(tiny_artifacts):
    eng = load(tiny_artifacts["qwen2"])
    a = eng.generate(PROMPT, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    b = eng.generate(PROMPT, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    assert a.token_ids == b.token_ids
