"""The tutorial examples run as written (on the small real checkpoint)."""

import subprocess
import sys
from pathlib import Path

from conftest import STORIES, requires_shared_data

ROOT = Path(__file__).resolve().parents[1]


@requires_shared_data()
def test_compile_and_generate_example(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "compile_and_generate.py"), str(STORIES),
                           "--quant", "fp32", "--output", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'Once upon a time' ->" in proc.stdout and "by hand, full prompt" in proc.stdout
