"""``qoqc bench``: random-weight checkpoints of a config, batch planning, throughput and latency runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qoq_compiler import compile
from qoq_compiler.cli import main
from qoq_compiler.errors import QoqcError
from qoq_compiler.frontend import synthetic
from qoq_compiler.frontend.checkpoint import open_checkpoint
from qoq_compiler.runtime import bench
from qoq_compiler.tvm_env import tvm


@pytest.fixture(scope="module")
def random_artifact(tiny_dirs, tmp_path_factory):
    """A sharded random-weight checkpoint of the tiny Llama config, and its fp32 artifact."""
    root = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setattr(synthetic, "SHARD_BYTES", 60_000)  # several shards and an index, as a 7B model has
    model = synthetic.write_random_checkpoint(tiny_dirs["llama"] / "config.json", root / "model", progress=False)
    mp.undo()
    return model, compile(model, target="llvm", quant="fp32", output=root / "art", progress=False)


def test_random_checkpoint_has_every_tensor_of_the_config(random_artifact, tiny_dirs):
    from transformers import AutoConfig, AutoModelForCausalLM

    model, _ = random_artifact
    assert (model / "model.safetensors.index.json").is_file() and len(list(model.glob("*.safetensors"))) > 2
    ckpt = open_checkpoint(model)
    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(tiny_dirs["llama"])))
    shapes = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    assert sorted(ckpt.names) == sorted(shapes)
    for name in ckpt.names:
        t = ckpt.read(name)
        assert tuple(t.shape) == shapes[name] and t.dtype == torch.float16
        if name.endswith("norm.weight"):
            assert (t == 1).all()
        else:
            assert 0.015 < float(t.float().std()) < 0.025


def test_plan_batch_fills_the_budget(random_artifact):
    _, art = random_artifact
    per_token = 2 * 2 * 2 * 32 * 4  # layers x (K, V) x kv heads x head_dim x fp32 bytes
    seq_pages = -(-(40 + 20) // 16)
    budget = 5 * seq_pages * 16 * per_token + 100  # five sequences and change
    assert bench.plan_batch(art, "cpu", 40, 20, None, budget) == (5, 5 * seq_pages * 16)
    assert bench.plan_batch(art, "cpu", 40, 20, 3, budget) == (3, 3 * seq_pages * 16)
    assert bench.plan_batch(art, "cpu", 40, 20, None, "4GiB")[0] == bench.MAX_BATCH
    with pytest.raises(QoqcError, match="batch 6 of 60 tokens needs"):
        bench.plan_batch(art, "cpu", 40, 20, 6, budget)
    with pytest.raises(QoqcError, match="context window"):
        bench.plan_batch(art, "cpu", 200, 100, 1)
    with pytest.raises(QoqcError, match="cannot hold one sequence"):
        bench.plan_batch(art, "cpu", 40, 20, None, 1000)
    if not tvm.cuda(0).exist:  # an artifact benchmarked on a GPU this machine lacks: one clear line
        with pytest.raises(QoqcError, match="no cuda device"):
            bench.plan_batch(art, "cuda", 40, 20, None, 0.5)


def test_throughput_and_latency_run(random_artifact):
    _, art = random_artifact
    r = bench.throughput(art, "cpu", input_len=24, output_len=6, batch=3, warmup=1, repeats=2, progress=False)
    assert (r.batch, r.output_len) == (3, 6) and r.prefill_seconds > 0 and r.decode_seconds > 0
    assert r.tokens_per_s == pytest.approx(18 / (r.prefill_seconds + r.decode_seconds))
    lat = bench.latency(art, "cpu", input_len=24, output_len=6, warmup=0, repeats=2, progress=False)
    assert lat.ttft_seconds > 0 and lat.decode_tokens_per_s > 0


def test_cli_config_only_ends_with_tokens_per_s(tiny_dirs, tmp_path, capsys):
    cfg = tmp_path / "llama.json"
    cfg.write_text((tiny_dirs["llama"] / "config.json").read_text())
    assert main(["bench", "--config-only", str(cfg), "--quant", "rtn-w4a8kv4", "--input-len", "16",
                 "--output-len", "4", "--batch", "2", "--warmup", "0", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "random weights" in lines[0] and "rtn-w4a8kv4" in lines[0] and "batch 2" in lines[0]
    value = lines[-1].removeprefix("throughput: ").removesuffix(" tokens/s")
    assert float(value) > 0


@pytest.mark.parametrize("argv,message", [
    (["bench"], "either an ARTIFACT or --config-only"),
    (["bench", "art", "--config-only", "c.json"], "either an ARTIFACT or --config-only"),
    (["bench", "--config-only", "/nonexistent.json"], "config file does not exist"),
    (["bench", "--config-only", "{bad}"], "not valid JSON"),
    (["bench", "--config-only", "{gpt2}"], "unsupported architecture"),
    (["bench", "--config-only", "{ok}", "--quant", "int3"], "invalid quant scheme"),
    (["bench", "--config-only", "{ok}", "--repeats", "0"], "--repeats must be at least 1"),
])
def test_cli_errors(argv, message, tiny_dirs, tmp_path, capsys):
    files = {"{bad}": "{not json", "{gpt2}": json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}),
             "{ok}": (tiny_dirs["llama"] / "config.json").read_text()}
    for key, text in files.items():
        (tmp_path / key).write_text(text)
    argv = [str(tmp_path / a) if a in files else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_random_weights_are_seeded(tiny_dirs, tmp_path):
    a = synthetic.write_random_checkpoint(tiny_dirs["llama"] / "config.json", tmp_path / "a", seed=3, progress=False)
    b = synthetic.write_random_checkpoint(tiny_dirs["llama"] / "config.json", tmp_path / "b", seed=3, progress=False)
    ra, rb = open_checkpoint(a), open_checkpoint(b)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert np.array_equal(ra.read(name).numpy(), rb.read(name).numpy())


def test_decode_greedy_equals_host_argmax(random_artifact):
    from qoq_compiler.runtime.engine import Engine

    _, art = random_artifact
    eng = Engine(art, max_batch_size=3)
    assert eng._argmax is not None  # the artifact has the device argmax entry point
    sids = [eng.add_sequence() for _ in range(3)]
    eng.prefill([(s, [5 + s, 9, 17 * s % 512]) for s in sids])
    tokens = [3, 100, 511]
    logits = eng.decode(sids, tokens)
    for s in sids:
        eng.truncate_sequence(s, 3)
    assert eng.decode_greedy(sids, tokens) == logits.argmax(axis=1).tolist()
