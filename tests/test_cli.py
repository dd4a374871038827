"""``qoqc compile`` and ``qoqc chat`` as a user runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from qoq_compiler import compile, load
from qoq_compiler.cli import main
from conftest import STORIES, requires_shared_data


def test_sharded_checkpoint_equals_single_file(tiny_dirs, tiny_artifacts, tmp_path):
    """A model split over two shards with model.safetensors.index.json compiles to the same weights."""
    d = tmp_path / "sharded"
    shutil.copytree(tiny_dirs["mistral"], d)
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(d / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    eng = load(compile(d, target="llvm", quant="fp32", output=tmp_path / "a", progress=False))
    ref = load(tiny_artifacts["mistral"])
    assert eng.generate([1, 5, 9], max_new_tokens=12).token_ids == ref.generate([1, 5, 9], max_new_tokens=12).token_ids


def test_manifest_records_versions_and_checksums(tiny_artifacts):
    m = json.loads((tiny_artifacts["llama"] / "manifest.json").read_text())
    assert m["tvm_version"] == "0.27.0.post1" and m["tvm_ffi_version"].startswith("0.1.14")
    assert m["quant"] == "fp32" and m["target"]["kind"] == "llvm" and m["model"]["num_layers"] == 2
    assert m["model"]["rope_scaling"]["rope_type"] == "llama3"
    files = set(m["files"])
    assert {"model.so", "params-00000.safetensors", "tokenizer/tokenizer_config.json"} <= files
    assert all(len(v) == 64 for v in m["files"].values())


@requires_shared_data()
def test_compile_then_chat_one_shot(tmp_path, capsys):
    out = tmp_path / "stories"
    assert main(["compile", str(STORIES), "--quant", "fp16", "-o", str(out), "--quiet", "--dump-ir"]) == 0
    assert sorted(p.name for p in (out / "ir").iterdir()) == [
        "01-graph.py", "02-quantize.py", "03-dispatch.py", "04-lower.py", "05-schedule.py", "06-vm.py"]
    capsys.readouterr()
    # stories260K has no chat template: the chat command says so
    rc = main(["chat", str(out), "--prompt", "Once upon a time"])
    assert rc == 2 and "no chat template" in capsys.readouterr().err


@pytest.fixture(scope="module")
def chat_artifact(tmp_path_factory):
    """stories260K with a minimal chat template added (it ships none), manifest re-signed."""
    from transformers import AutoTokenizer

    from qoq_compiler.runtime.artifact import write_manifest

    out = compile(STORIES, target="llvm", quant="fp32", output=tmp_path_factory.mktemp("chat") / "a", progress=False)
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}. {% endfor %}"
    tok.save_pretrained(str(out / "tokenizer"))
    manifest = json.loads((out / "manifest.json").read_text())
    write_manifest(out, {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")})
    return out


@requires_shared_data()
def test_multi_turn_reuses_the_cache_and_matches_a_fresh_prefill(chat_artifact):
    from qoq_compiler.runtime.chat import Conversation

    eng = load(chat_artifact)
    conv = Conversation(eng)
    for user in ("Once upon a time", "The dog ran", "Lily smiled"):
        stream = conv.stream(user, max_new_tokens=10)
        list(stream)
        conv.answered(stream)
        r = stream.result
        full = eng.encode(eng.tokenizer.apply_chat_template(conv.messages[:-1], add_generation_prompt=True,
                                                            tokenize=False), add_special_tokens=False)
        assert r.token_ids == eng.generate(full, max_new_tokens=10).token_ids
        if len(conv.messages) > 2:  # later turns prefill only what is new
            assert r.prompt_tokens < len(full)
    conv.reset()
    assert eng.sequence_length(conv.seq) == 0


@requires_shared_data()
def test_interactive_chat_session(chat_artifact):
    """Two turns, /reset and /exit through stdin, with a template-bearing tokenizer."""
    out = chat_artifact
    proc = subprocess.run(
        [sys.executable, "-m", "qoq_compiler.cli", "chat", str(out), "--temperature", "0", "--max-new-tokens", "12"],
        input="Once upon a time\nThe dog\n/reset\nLily\n/exit\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("tok/s]") == 3 and "(conversation cleared)" in proc.stdout


@requires_shared_data()
def test_chat_refuses_invalid_utf8_with_one_line(chat_artifact):
    cmd = [sys.executable, "-m", "qoq_compiler.cli", "chat", str(chat_artifact), "--temperature", "0",
           "--max-new-tokens", "4"]
    proc = subprocess.run(cmd, input=b"\xff\xfe once\nLily\n/exit\n", capture_output=True, timeout=300)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr
    assert b"qoqc: error: the prompt is not valid UTF-8" in proc.stderr and proc.stdout.count(b"tok/s]") == 1
    proc = subprocess.run([*cmd, "--prompt", b"caf\xe9"], capture_output=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [b"qoqc: error: the prompt is not valid UTF-8"]
