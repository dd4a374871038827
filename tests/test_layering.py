"""The pipeline's import direction: leaves <- frontend <- compiler; the runtime needs no compiler stage,
and runs on TVM's runtime libraries alone (as on a GPU machine without TVM's compiler)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "qoq_compiler"

#: module group -> qoqc groups (and third-party roots) it must not import
FORBIDDEN = {
    "config": {"frontend", "compiler", "runtime", "schedules", "torch", "transformers"},
    # the number formats: constants and integer helpers, importable by everything, importing nothing
    "formats": {"frontend", "compiler", "runtime", "schedules", "quant", "passes", "config", "layout", "errors",
                "numpy", "torch", "tvm", "tvm_ffi"},
    "layout": {"frontend", "compiler", "runtime", "schedules", "quant", "config", "torch", "tvm"},
    "errors": {"frontend", "compiler", "runtime", "schedules", "config"},
    "frontend": {"compiler", "runtime", "schedules", "quant", "passes"},
    "quant": {"compiler", "runtime", "schedules", "passes"},
    "passes": {"compiler", "runtime", "schedules", "quant"},  # kernels are handed in by the compiler
    "runtime": {"frontend", "compiler", "schedules", "passes", "quant", "torch"},  # (tvm itself may import torch)
    "schedules": {"qoq_compiler.frontend", "qoq_compiler.quant", "qoq_compiler.compiler", "qoq_compiler.runtime",
                  "qoq_compiler.cli"},  # kernels see only the leaves (formats, layout, errors, tvm_env)
    # the kernels' NumPy references also read the number formats they implement (quant.reference), never TVM
    "schedules.reference": {"qoq_compiler.frontend", "qoq_compiler.compiler", "qoq_compiler.runtime",
                            "qoq_compiler.cli", "tvm", "tvm_ffi", "torch"},
}


def _group(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts
    if rel[0] == "schedules":
        return "schedules.reference" if rel[1] == "reference" else "schedules"
    return rel[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = node.module.split(".")
                names.add(".".join(parts[:2]) if parts[0] == "qoq_compiler" else parts[0])
            else:  # relative: resolve to the qoqc group it names
                base = path.relative_to(ROOT).with_suffix("").parts[:-node.level]
                target = (*base, *(node.module.split(".") if node.module else ()))
                names.add(target[1] if target[0] == "qoq_compiler" and len(target) > 1 else target[0])
                if not node.module:
                    names |= {a.name for a in node.names}
    return names


def test_import_direction():
    bad = []
    for path in sorted([*PKG.rglob("*.py"), *(ROOT / "schedules").rglob("*.py")]):
        group = _group(path)
        for name in _imports(path) & FORBIDDEN.get(group, set()):
            bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_running_an_artifact_loads_no_compiler(tiny_artifacts):
    code = (
        "import sys, qoq_compiler\n"
        f"r = qoq_compiler.load({str(tiny_artifacts['llama'])!r}).generate([1, 2, 3], max_new_tokens=4)\n"
        "assert len(r.token_ids) == 4\n"
        "loaded = [m for m in ('qoq_compiler.compiler', 'qoq_compiler.frontend', 'schedules')"
        " if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_artifact_serves_with_tvm_runtime_only(tiny_artifacts, tmp_path):
    """TVM as ``bench/gpu_check.py`` packs it for a GPU machine (no libtvm_compiler.so) with
    TVM_USE_RUNTIME_LIB=1: load, generate, and ``qoqc bench ARTIFACT``; the compiler library is
    never mapped."""
    import tarfile

    sys.path.insert(0, str(ROOT))
    from bench.gpu_check import _pack_runtime

    _pack_runtime(tmp_path / "rt", wheel=False)
    site = tmp_path / "site"
    with tarfile.open(tmp_path / "rt" / "tvm_rt.tar.xz") as tar:
        tar.extractall(site, filter="data")
    assert not (site / "tvm" / "lib" / "libtvm_compiler.so").exists()
    art = str(tiny_artifacts["llama"])
    code = (
        "import sys, qoq_compiler\n"
        "from qoq_compiler.cli import main\n"
        f"r = qoq_compiler.load({art!r}).generate([1, 2, 3], max_new_tokens=4)\n"
        "assert len(r.token_ids) == 4\n"
        f"assert main(['bench', {art!r}, '--batch', '2', '--input-len', '8', '--output-len', '3', '--warmup', '0',"
        " '--quiet']) == 0\n"
        "import tvm\n"
        f"assert tvm.__file__.startswith({str(site)!r}), tvm.__file__\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert 'libtvm_runtime.so' in maps and 'libtvm_compiler' not in maps\n"
    )
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "throughput:" in proc.stdout
