"""Real checkpoints: stories260K (safetensors + sentencepiece tokenizer) and the embedded SmolLM2 GGUF."""

from __future__ import annotations

import pytest
import torch

from qoq_compiler import compile, load
from qoq_compiler.frontend.checkpoint import DEFAULT_MODEL_FILE, default_model_path
from conftest import STORIES, hf_greedy, hf_model, rel_err, requires_shared_data


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    return load(compile(STORIES, target="llvm", quant="fp32", output=tmp_path_factory.mktemp("s") / "a",
                        progress=False))


@requires_shared_data()
def test_stories260k_greedy_64_tokens_identical(stories):
    ref = hf_model(STORIES)
    expected = hf_greedy(ref, [1], 64, {2})
    got = stories.generate([1], max_new_tokens=64)
    assert got.token_ids == expected
    assert got.text.startswith("Once upon a time, there was a little girl named Lily.")


@requires_shared_data()
def test_stream_pieces_join_to_the_text(stories):
    full = stories.generate("Once upon a time", max_new_tokens=40)
    stream = stories.stream("Once upon a time", max_new_tokens=40)
    pieces = list(stream)
    assert len(pieces) > 5 and "".join(pieces) == full.text == stream.result.text


@requires_shared_data()
def test_stop_string_truncates(stories):
    full = stories.generate("Once upon a time", max_new_tokens=40)
    stop = "Lily"
    assert stop in full.text
    cut = stories.generate("Once upon a time", max_new_tokens=40, stop=[stop, "zzz"])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    streamed = "".join(stories.stream("Once upon a time", max_new_tokens=40, stop=stop))
    assert streamed == cut.text


def test_smollm2_gguf_greedy_16_tokens_identical(tmp_path):
    gguf = default_model_path()
    eng = load(compile(None, target="llvm", quant="fp32", output=tmp_path / "smol", progress=False))
    ref = hf_model(gguf.parent, gguf_file=DEFAULT_MODEL_FILE)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = eng.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = eng.encode(text, add_special_tokens=False)
    expected = hf_greedy(ref, ids, 16, set(eng.config.eos_token_ids))
    got = eng.generate(ids, max_new_tokens=16)
    assert got.token_ids == expected
    assert "Paris" in got.text
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits[0].numpy()
    assert rel_err(eng.logits(ids), ref_logits) < 1e-4
