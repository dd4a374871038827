"""Shared fixtures: tiny random Hugging Face models saved to disk, and their compiled artifacts.

Tiny models reuse the real 512-token tokenizer of stories260K so that text round-trips too; without
the shared data, a byte-level BPE of the same special ids trained on the packaged calibration text
stands in (``tiny_tokenizer``), so only the tests marked ``requires_shared_data`` skip.
Weights are random with a larger spread than HF's default init (std 0.02 makes every logit
nearly equal, which would turn greedy comparisons into coin flips); biases are random, not zero.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA = Path(os.environ.get("QOQC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
STORIES = DATA / "stories260K" / "hf"

TINY = dict(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
            max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

#: name -> (transformers config class name, extra config fields)
TINY_MODELS = {
    # GQA 4:2, untied, head_dim (32) != hidden / heads (24), Llama-3 RoPE scaling
    "llama": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                  tie_word_embeddings=False, rope_theta=500000.0,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64})),
    # GQA 8:2, untied, head_dim (16) != hidden / heads (12), sliding window longer than the context
    "mistral": ("MistralConfig", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                      tie_word_embeddings=False, sliding_window=4096)),
    # MHA 6:6 would be trivial: GQA 6:2 with QKV bias, tied embeddings, large rope_theta
    "qwen2": ("Qwen2Config", dict(num_attention_heads=6, num_key_value_heads=2,
                                  tie_word_embeddings=True, rope_theta=1000000.0)),
}


def requires_shared_data():
    return pytest.mark.skipif(not STORIES.is_dir(), reason=f"shared data not found at {DATA}")


def save_tiny_model(name: str, path: Path, seed: int = 0) -> Path:
    import transformers

    cls_name, extra = TINY_MODELS[name]
    return save_random_model(getattr(transformers, cls_name)(**TINY, **extra), path, seed)


def save_random_model(cfg, path: Path, seed: int = 0) -> Path:
    """A model of transformers config ``cfg`` with random weights (norms near 1) and the tiny tokenizer."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_tokenizer():
    """stories260K's tokenizer, or (shared data absent) a 400-token byte-level BPE with <unk> 0,
    <s> 1, </s> 2 trained on the first 200 kB of the packaged calibration text."""
    import transformers

    if STORIES.is_dir():
        return transformers.AutoTokenizer.from_pretrained(STORIES)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (Path(__file__).resolve().parents[1] / "qoq_compiler" / "data" / "calibration.txt").read_text()[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: save_tiny_model(name, root / name) for name in TINY_MODELS}


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """fp32 llvm artifacts of every tiny model (compiled once per session)."""
    from qoq_compiler import compile

    root = tmp_path_factory.mktemp("art")
    return {name: compile(d, target="llvm", quant="fp32", output=root / name, progress=False)
            for name, d in tiny_dirs.items()}


@pytest.fixture(scope="session")
def kv4_artifact(tiny_dirs, tmp_path_factory) -> Path:
    """The tiny Llama with RTN 4-bit weights (groups of 32) and the 4-bit KV cache, fp32 activations
    (so the integer math is exact): the serving tests' model."""
    from qoq_compiler import compile
    from qoq_compiler.config import QuantScheme

    scheme = QuantScheme("rtn-test", "float32", weights="int4", group=32, kv="int4", passes=None)
    return compile(tiny_dirs["llama"], target="llvm", quant=scheme, output=tmp_path_factory.mktemp("kv4") / "a",
                   progress=False)


def hf_model(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()


def hf_greedy(model, ids: list[int], n: int, eos: set[int]) -> list[int]:
    """Greedy decoding with full recomputation each step: the plainest possible reference."""
    out, seq = [], list(ids)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if nxt in eos:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


def rel_err(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def w4a8_case(m: int, n: int, k: int, group: int | None, seed: int = 0):
    """A quantized linear on random data: (x, w, qw, (qx, sx, *params)) with the W4A8 GEMM's
    arguments in the kernel layouts; activations with per-token outliers."""
    import numpy as np

    from schedules.reference.w4a8_gemm import mma_parameters
    from qoq_compiler.quant import reference as qref
    from qoq_compiler.quant.convert import weight_params

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)) * 0.05
    x = rng.standard_normal((m, k)) * rng.uniform(0.5, 4, size=(m, 1))
    qx, sx = qref.quantize_per_token(x)
    qw = qref.per_channel_quantize(w) if group is None else qref.progressive_quantize(w, group=group)
    p = mma_parameters(weight_params("w.weight", qw))
    if group is None:
        extra = (p["w.weight_zero"], qx.sum(axis=1, keepdims=True, dtype=np.int32))
    else:
        extra = (p["w.weight_group_scale"], p["w.weight_group_zero"])
    return x, w, qw, (qx, sx, p["w.weight"], p["w.weight_scale"], *extra)
