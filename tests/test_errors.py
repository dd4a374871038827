"""Bad input gives one line 'qoqc: error: ...' naming the problem, a non-zero exit, and no output directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from qoq_compiler import QoqcError, load
from qoq_compiler.cli import main


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    rc = main(list(argv))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qoqc:")]
    return rc, err


def check_compile_fails(capsys, tmp_path, model, message, *extra):
    out = tmp_path / "out"
    rc, err = run_cli(capsys, "compile", str(model), "-o", str(out), "--quiet", *extra)
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("qoqc: error:") and message in err[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary output left behind"


def test_missing_directory(capsys, tmp_path):
    check_compile_fails(capsys, tmp_path, tmp_path / "nope", "does not exist")


def test_directory_without_weights(capsys, tmp_path, tiny_dirs):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tiny_dirs["llama"] / "config.json", d)
    check_compile_fails(capsys, tmp_path, d, "no *.safetensors")


def test_truncated_safetensors(capsys, tmp_path, tiny_dirs):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    check_compile_fails(capsys, tmp_path, d, "model.safetensors")


def test_unknown_architecture(capsys, tmp_path, tiny_dirs):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    check_compile_fails(capsys, tmp_path, d, "unsupported architecture GPT2LMHeadModel")


@pytest.mark.parametrize("field,value,message", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope scaling type 'yarn'"),
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
])
def test_unsupported_feature(capsys, tmp_path, tiny_dirs, field, value, message):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    check_compile_fails(capsys, tmp_path, d, message)


def test_qwen2_sliding_window_rejected(capsys, tmp_path, tiny_dirs):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["qwen2"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["use_sliding_window"], cfg["sliding_window"] = True, 64
    (d / "config.json").write_text(json.dumps(cfg))
    check_compile_fails(capsys, tmp_path, d, "sliding window")


def test_kv4_needs_head_dim_multiple_of_8(capsys, tmp_path, tiny_dirs):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["head_dim"] = 12
    (d / "config.json").write_text(json.dumps(cfg))
    check_compile_fails(capsys, tmp_path, d, "head_dim must be a multiple of 8", "--quant", "rtn-w4a8kv4")


@pytest.mark.parametrize("extra,message", [
    (("--target", "vulkan"), "invalid target 'vulkan'"),
    (("--target", "cuda", "--arch", "sm_70"), "invalid CUDA arch 'sm_70'"),
    (("--quant", "int3"), "invalid quant scheme 'int3'"),
    (("--quant", "w8a8", "--no-rotation"), "--no-rotation: options of the qoq-* schemes"),
    (("--quant", "rtn-w4a8kv4", "--kv-rotation", "on"), "--kv-rotation: options of the qoq-* schemes"),
    (("--quant", "qoq-w4a8kv4-g128", "--smooth-attn-alpha", "2"), "must lie in [0, 1]"),
    (("--quant", "qoq-w4a8kv4-g128", "--calib-text", "/nonexistent.txt"), "calibration text does not exist"),
    (("--quant", "qoq-w4a8kv4-g128", "--calib-samples", "0"), "--calib-samples must be at least 1"),
])
def test_invalid_target_or_quant(capsys, tmp_path, tiny_dirs, extra, message):
    check_compile_fails(capsys, tmp_path, tiny_dirs["llama"], message, *extra)


def test_refuses_to_overwrite_a_non_artifact(capsys, tmp_path, tiny_dirs):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, err = run_cli(capsys, "compile", str(tiny_dirs["llama"]), "-o", str(out), "--quiet")
    assert rc != 0 and "refusing to overwrite" in err[0]
    assert (out / "notes.txt").read_text() == "keep me"


def test_altered_artifact_is_refused(capsys, tmp_path, tiny_artifacts):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts["llama"], art)
    f = art / "params-00000.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(QoqcError, match="altered after compile"):
        load(art)
    rc, err = run_cli(capsys, "chat", str(art), "--prompt", "hi")
    assert rc != 0 and "params-00000.safetensors was altered" in err[0]


def test_corrupt_manifest_and_not_an_artifact(tmp_path, tiny_artifacts):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts["llama"], art)
    (art / "manifest.json").write_text("{not json")
    with pytest.raises(QoqcError, match="corrupt artifact"):
        load(art)
    with pytest.raises(QoqcError, match="not a qoqc artifact"):
        load(tmp_path)


def test_prompt_over_context(tiny_artifacts):
    eng = load(tiny_artifacts["llama"])
    with pytest.raises(QoqcError, match="over the context window of 256"):
        eng.generate(list(range(3, 300)))
    with pytest.raises(QoqcError, match="outside the vocabulary"):
        eng.generate([1, 9999])
    with pytest.raises(QoqcError, match="compiled for llvm"):
        load(tiny_artifacts["llama"], device="cuda")


def test_cli_process_exit_status(tmp_path):
    """The installed entry point: exit status 2 and a single stderr line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "qoq_compiler.cli", "compile", str(tmp_path / "nope"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"qoqc: error: model path does not exist: {tmp_path / 'nope'}"]


def test_kv_cache_limits_are_checked(tiny_artifacts):
    eng = load(tiny_artifacts["llama"], max_total_tokens=64, max_batch_size=2)
    sid = eng.add_sequence()
    eng.prefill([(sid, list(range(3, 60)))])
    for _ in range(7):
        eng.decode([sid], [5])
    with pytest.raises(QoqcError, match="holds? 65 tokens, over the context window of 64"):
        eng.decode([sid], [5])
    other = [eng.add_sequence(), eng.add_sequence()]
    with pytest.raises(QoqcError, match="at most 2"):
        eng.decode([sid, *other], [1, 2, 3])
    eng.remove_sequence(sid)
    eng.prefill([(other[0], list(range(3, 40)))])
    with pytest.raises(QoqcError, match="KV cache is full"):
        eng.prefill([(other[1], list(range(3, 40)))])
    with pytest.raises(QoqcError, match="not open"):
        eng.decode([sid], [1])
    eng.remove_sequence(other[0])
    eng.prefill([(other[1], list(range(3, 40)))])  # the freed pages are usable again
