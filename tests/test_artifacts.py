"""Artifacts never hurt the user's files and never run where they cannot: only a directory whose
manifest says it is a qoqc artifact is replaced, SIGTERM cleans up like Ctrl-C, files follow the
umask, and a load refuses another TVM, or host code for CPU features this CPU lacks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from qoq_compiler import QoqcError, load
from qoq_compiler.cli import main
from qoq_compiler.runtime.artifact import cpu_flags, write_manifest


def one_error_line(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qoqc:")]
    assert len(err) == 1 and err[0].startswith("qoqc: error: "), err
    return err[0]


def _rewrite(art, **changes):
    manifest = json.loads((art / "manifest.json").read_text())
    manifest.update(changes)
    write_manifest(art, {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")})


def test_a_directory_with_a_foreign_manifest_is_not_replaced(capsys, tmp_path, tiny_dirs):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "my web app"}))
    (out / "index.html").write_text("keep me")
    assert "not a qoqc artifact: refusing to overwrite" in one_error_line(
        capsys, "compile", str(tiny_dirs["llama"]), "-o", str(out), "--quiet")
    assert (out / "index.html").read_text() == "keep me" and len(list(out.iterdir())) == 2


def test_an_unwritable_output_is_one_line(capsys, tmp_path, tiny_dirs):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write the artifact" in one_error_line(
        capsys, "compile", str(tiny_dirs["llama"]), "-o", str(blocker / "out"), "--quiet")


def test_files_follow_the_umask(tiny_artifacts):
    mask = os.umask(0)
    os.umask(mask)
    for f in tiny_artifacts["llama"].iterdir():
        if f.suffix == ".safetensors" or f.name == "manifest.json":
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_an_unknown_cpu_is_refused_at_compile(capsys, tmp_path, tiny_dirs):
    assert "invalid --arch 'foo'" in one_error_line(capsys, "compile", str(tiny_dirs["llama"]), "--arch", "foo",
                                                    "-o", str(tmp_path / "o"), "--quiet")


def test_host_code_for_another_cpu_is_refused_at_load(tmp_path, tiny_dirs):
    from qoq_compiler import compile
    from qoq_compiler.compiler import _host_features, make_target

    flags = cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo here")
    for cpu in ("sapphirerapids", "graniterapids", "znver5", "cannonlake", "x86-64-v4", "neoverse-v2"):
        try:
            needed = _host_features(make_target("llvm", cpu))["cpu_features"]
        except QoqcError:
            continue  # not a CPU of this triple
        missing = [f for f in needed if f not in flags]
        if missing:
            break
    else:
        pytest.skip("this CPU has every feature of the candidate CPUs")
    art = compile(tiny_dirs["llama"], target="llvm", arch=cpu, quant="fp32", output=tmp_path / "a", progress=False)
    assert json.loads((art / "manifest.json").read_text())["host"]["mcpu"] == cpu
    with pytest.raises(QoqcError, match=f"compiled for CPU {cpu} and uses .*{missing[0]}.* which this CPU lacks"):
        load(art)


def test_another_tvm_is_refused_and_another_qoqc_warned(capsys, tmp_path, tiny_artifacts):
    art = tmp_path / "a"
    shutil.copytree(tiny_artifacts["llama"], art)
    _rewrite(art, qoqc_version="0.0.9")
    capsys.readouterr()
    assert load(art).generate([1, 2], max_new_tokens=2).token_ids
    assert "was written by qoqc 0.0.9; this is qoqc" in capsys.readouterr().err
    for key, name in (("tvm_version", "apache-tvm"), ("tvm_ffi_version", "apache-tvm-ffi")):
        shutil.rmtree(art)
        shutil.copytree(tiny_artifacts["llama"], art)
        _rewrite(art, **{key: "0.26.0"})
        with pytest.raises(QoqcError, match=f"compiled with {name} 0.26.0, this runtime has .*recompile"):
            load(art)


def test_truncated_gguf_is_one_line(capsys, tmp_path):
    from qoq_compiler.frontend.checkpoint import default_model_path

    bad = tmp_path / "cut.gguf"
    bad.write_bytes(default_model_path().read_bytes()[:3_000_000])
    assert "cut.gguf" in one_error_line(capsys, "compile", str(bad), "-o", str(tmp_path / "o"), "--quiet")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]


def test_sigterm_during_compile_leaves_nothing(tmp_path, tiny_dirs):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "qoq_compiler.cli", "compile", str(tiny_dirs["llama"]), "-o",
                             str(out), "--quant", "qoq-w4a8kv4-g128", "--calib-samples", "64", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.partial-*")), "the compile never started writing"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # 130, or death by SIGINT (-2, which a shell also reports as 130) when a library met the
    # KeyboardInterrupt first and CPython re-raises it at exit
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)
    assert err.strip().splitlines()[-1] == "qoqc: interrupted", err
    assert not out.exists() and not list(tmp_path.iterdir()), list(tmp_path.iterdir())


@pytest.mark.parametrize("quant", ["fp16", "rtn-w4a8kv4"])
def test_a_tensor_of_the_wrong_shape_is_one_line(capsys, tmp_path, tiny_dirs, quant):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["llama"], model)
    weights = load_file(str(model / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"] = weights["model.layers.0.self_attn.q_proj.weight"][:100]
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    line = one_error_line(capsys, "compile", str(model), "--quant", quant, "-o", str(tmp_path / "o"), "--quiet")
    assert "q_proj" in line or "cannot read" in line
    assert not (tmp_path / "o").exists()


def test_chat_with_nan_temperature_is_one_line(capsys, tiny_artifacts):
    assert "temperature=nan is not a finite number" in one_error_line(
        capsys, "chat", str(tiny_artifacts["llama"]), "--prompt", "hi", "--temperature", "nan")
