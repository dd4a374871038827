"""``bench/gpu_check.py`` on a CPU: ``prepare --tiny`` builds every kernel and artifact the GPU check
needs (device code in a fatbin for the requested arch), and ``run --dry-run`` executes every stage's
driver code, the GPU test lane included, against the llvm stand-ins and writes every table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from schedules import nvcc

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(nvcc.nvcc_path() is None, reason="nvcc not installed")
def test_prepare_tiny_and_dry_run(tmp_path):
    prepared, out = tmp_path / "prepared", tmp_path / "out"
    script = str(ROOT / "bench" / "gpu_check.py")
    proc = subprocess.run([sys.executable, script, "prepare", str(prepared), "--tiny"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    spec = json.loads((prepared / "prepared.json").read_text())
    assert spec["mode"] == "tiny" and spec["archs"] == ["sm_90"]
    assert sorted(map(tuple, spec["fatbin"])) == [("ptx", "compute_90"), ("sass", "sm_90")]
    images = nvcc.fatbin_images(nvcc.library_fatbin(prepared / spec["kernels"]["cuda"]))
    assert sorted(images) == [("ptx", "compute_90"), ("sass", "sm_90")]
    assert spec["e2e"] and all(len(e["tokens"]) == len(e["margins"]) > 0 for e in spec["e2e"])
    assert all((prepared / e["cuda"] / "model.so").is_file() for e in spec["e2e"])
    assert sum(f.stat().st_size for f in prepared.rglob("*") if f.is_file()) < 40 * 2 ** 20
    assert "MiB" in proc.stdout

    proc = subprocess.run([sys.executable, script, "run", str(prepared), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, summary + (out / "lane.log").read_text()[-3000:]
    for stage in ("lane", "gemm", "attention", "serving"):
        assert f"| {stage} | ok |" in summary and f"## {stage}" in summary
    assert "passed" in (out / "lane.md").read_text() and "failed" not in (out / "lane.md").read_text()
    for header in ("| weights | shape | M |", "| batch | context |", "| prefill tokens |", "| engine | batch |"):
        assert header in summary
    assert "ours / cuBLAS fp16 summed over the 4 shapes" in summary


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "prepare", str(tmp_path), "--tiny"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "refusing to replace it" in proc.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep me"
