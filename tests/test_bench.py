"""``qoqc bench``: artifacts of a config with random weights, batch planning, throughput and latency runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qoq_compiler import compile
from qoq_compiler.cli import main
from qoq_compiler.errors import QoqcError
from qoq_compiler.runtime import bench
from qoq_compiler.runtime.artifact import params_bytes, random_params, read_manifest
from qoq_compiler.tvm_env import tvm


@pytest.fixture(scope="module")
def random_artifact(tiny_dirs, tmp_path_factory):
    """The tiny Llama's config.json alone, and its fp32 artifact of random weights."""
    root = tmp_path_factory.mktemp("bench")
    config = root / "llama.json"
    config.write_text((tiny_dirs["llama"] / "config.json").read_text())
    return config, compile(config, target="llvm", quant="fp32", output=root / "art", progress=False,
                           random_weights=True)


def test_random_weights_artifact_declares_the_parameters_of_a_real_one(random_artifact, tiny_artifacts):
    from safetensors.numpy import load_file

    _, art = random_artifact
    manifest, real = read_manifest(art), read_manifest(tiny_artifacts["llama"])
    assert manifest["params"]["files"] == [] and not list(art.glob("*.safetensors"))
    assert manifest["params"]["names"] == real["params"]["names"] and manifest["tokenizer"] is None
    arrays = {}
    for f in real["params"]["files"]:
        arrays.update(load_file(str(tiny_artifacts["llama"] / f)))
    drawn = list(random_params(manifest["params"]))
    assert [(a.shape, a.dtype) for a in drawn] == [(arrays[n].shape, arrays[n].dtype) for n in real["params"]["names"]]
    assert params_bytes(manifest, art) == sum(a.nbytes for a in drawn) == sum(a.nbytes for a in arrays.values())
    for a in drawn:  # finite, never zero, within +-[1/128, 1/64); the same draw every time
        assert np.isfinite(a).all() and (np.abs(a) >= 1 / 128).all() and (np.abs(a) < 1 / 64).all()
    assert all((x == y).all() for x, y in zip(drawn, random_params(manifest["params"])))


def test_random_weights_artifact_serves(random_artifact):
    from qoq_compiler import load

    _, art = random_artifact
    r = load(art).generate([1, 7, 99], max_new_tokens=5)
    assert r.prompt_tokens == 3 and 1 <= len(r.token_ids) <= 5


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
