"""The pipeline's import direction: leaves <- frontend <- compiler; the runtime needs no compiler stage."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "qoq_compiler"

#: module group -> qoqc groups (and third-party roots) it must not import
FORBIDDEN = {
    "config": {"frontend", "compiler", "runtime", "schedules", "torch", "transformers"},
    "layout": {"frontend", "compiler", "runtime", "schedules", "quant", "config", "torch", "tvm"},
    "errors": {"frontend", "compiler", "runtime", "schedules", "config"},
    "frontend": {"compiler", "runtime", "schedules", "quant", "passes"},
    "quant": {"compiler", "runtime", "schedules", "passes"},
    "passes": {"compiler", "runtime", "schedules", "quant"},  # kernels are handed in by the compiler
    "runtime": {"frontend", "compiler", "schedules", "passes", "quant", "torch"},  # (tvm itself may import torch)
    "schedules": {"qoq_compiler.frontend", "qoq_compiler.quant", "qoq_compiler.compiler", "qoq_compiler.runtime",
                  "qoq_compiler.cli"},  # kernels see only the leaves (layout, errors, tvm_env)
}


def _group(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts
    if rel[0] == "schedules":
        return "schedules"
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
