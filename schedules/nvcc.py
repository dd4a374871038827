"""nvcc as a checker of generated CUDA: compile a source for an arch and read ptxas' resource report.

Used by the tests and ``bench/gemm.py --cpu-check`` (no GPU needed): a kernel that spills
registers to local memory, or that nvcc rejects, is a failure.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KernelResources:
    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int


def cuda_source(executable) -> str:
    """The CUDA C++ of every device kernel in a compiled executable (kept as source until load)."""
    pending, found = [executable.mod], []
    while pending:
        m = pending.pop()
        if m.kind == "cuda":
            found.append(m.inspect_source("cuda"))
        pending.extend(m.imports)
    if not found:
        raise RuntimeError("the CUDA build produced no device code")
    return "\n".join(found)


def nvcc_path() -> str | None:
    return shutil.which("nvcc")


def ptxas_report(source: str, arch: str) -> list[KernelResources]:
    """Compile ``source`` to a cubin for ``arch`` (e.g. "sm_90"); one entry per kernel. Raises
    RuntimeError with nvcc's message when it fails."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp) / "kernels.cu"
        cu.write_text(source)
        proc = subprocess.run([nvcc, f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o", str(Path(tmp) / "k.cubin"),
                               str(cu)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed for {arch}:\n{proc.stderr[-3000:]}")
    out, name, spills = [], None, (0, 0)
    for line in proc.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spills = (int(m.group(1)), int(m.group(2)))
        elif (m := re.search(r"Used (\d+) registers", line)) and name is not None:
            smem = re.search(r"(\d+) bytes smem", line)
            out.append(KernelResources(name, int(m.group(1)), *spills, int(smem.group(1)) if smem else 0))
            name = None
    return out
