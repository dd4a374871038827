"""nvcc at compile time: device code ahead of time, and a checker of generated CUDA.

Device code. ``export_library(executable, path, archs, ptx)`` writes a compiled module whose CUDA
kernels travel as one fatbin instead of CUDA source: SASS for every arch in ``archs`` plus PTX
for ``ptx`` (forward compatibility: the driver JIT-compiles it on newer GPUs), compiled by nvcc
with TVM's own nvcc flags (``-O3 --use_fast_math``). A module that carries source is compiled
at load by TVM's ``tvm_callback_cuda_compile`` (NVRTC or nvcc, and TVM's compiler library): one
carrying a fatbin loads with the CUDA driver alone (``cuModuleLoadData``).

How the fatbin gets in: ``Module.export_library`` serializes every imported module into one blob
(``runtime.ModulePackImportsToTensor``: u64 size, the import tree as two u64 vectors, then per
module its type key and ``SaveToBytes``), linked into the shared library. A CUDA module saves
[format][function table][code] with format "cuda" and the source as code; ``pack_imports``
rewrites that record to format "fatbin" with the fatbin as code, the function table untouched,
and links the blob as ``codegen.codegen_blob`` would. TVM's loader
(``ffi.Module.load_from_bytes.cuda``) then takes the code as it is.

``fatbin_images(blob)`` lists what a fatbin holds, read from its headers (the toolkit on the
build machines has no cuobjdump): 16-byte file header (magic 0xBA55ED50, version, header size,
payload size), then per image a header whose first u16 is the kind (1 PTX, 2 ELF/SASS) and whose
u32 at byte 28 is the arch (80 for sm_80 / compute_80).

Checker. ``ptxas_report(source, arch)`` compiles a source to a cubin and reads ptxas' resource
report (registers, spills, shared memory): used by the tests and the ``--cpu-check`` benches, no
GPU needed; a kernel that spills registers to local memory, or that nvcc rejects, is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
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
    """nvcc on PATH, else under ``CUDA_PATH``."""
    found = shutil.which("nvcc")
    if found is None and os.environ.get("CUDA_PATH"):
        candidate = Path(os.environ["CUDA_PATH"]) / "bin" / "nvcc"
        found = str(candidate) if candidate.is_file() else None
    return found


#: nvcc flags TVM's own nvcc path uses (``tvm.support.nvcc``), so ahead-of-time code equals what
#: TVM would have compiled at load
NVCC_FLAGS = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__"]
FATBIN_MAGIC = 0xBA55ED50


def fatbin(source: str, archs: list[str], ptx: str | None) -> bytes:
    """nvcc's fatbin of ``source``: SASS for each ``sm_XX`` of ``archs``, PTX of ``ptx`` (an
    ``sm_XX`` whose ``compute_XX`` is embedded; None for none). nvcc's threads compile the archs in
    parallel. Raises RuntimeError with nvcc's message when it fails."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found (on PATH or under CUDA_PATH)")
    codes = [f"arch=compute_{a[3:]},code=sm_{a[3:]}" for a in archs]
    if ptx is not None:
        codes.append(f"arch=compute_{ptx[3:]},code=compute_{ptx[3:]}")
    with tempfile.TemporaryDirectory(prefix="qoqc-nvcc-") as tmp:
        cu, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        cu.write_text(source)
        cmd = [nvcc, "--fatbin", "--threads", "0", *NVCC_FLAGS, *(f"-gencode={c}" for c in codes), "-o", str(out),
               str(cu)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(archs)}):\n{proc.stderr[-3000:]}")
        return out.read_bytes()


def fatbin_images(blob: bytes) -> list[tuple[str, str]]:
    """(kind, arch) of every image of a fatbin: ("sass", "sm_90") or ("ptx", "compute_90")."""
    magic, _, header, size = struct.unpack_from("<IHHQ", blob, 0)
    if magic != FATBIN_MAGIC:
        raise ValueError("not a fatbin (bad magic)")
    images, off = [], header
    while off < header + size:
        kind, _, image_header, payload = struct.unpack_from("<HHIQ", blob, off)
        arch = struct.unpack_from("<I", blob, off + 28)[0]
        images.append(("ptx", f"compute_{arch}") if kind == 1 else ("sass", f"sm_{arch}"))
        off += image_header + payload
    return images


def library_fatbin(path: str | Path) -> bytes:
    """The fatbin embedded in a shared library that ``export_library`` wrote."""
    data = Path(path).read_bytes()
    at = data.find(struct.pack("<I", FATBIN_MAGIC))
    if at < 0:
        raise ValueError(f"{path} holds no fatbin")
    _, _, header, size = struct.unpack_from("<IHHQ", data, at)
    return data[at:at + header + size]


def _read(blob: bytes, off: int, fmt: str) -> tuple[int, int]:
    return struct.unpack_from(fmt, blob, off)[0], off + struct.calcsize(fmt)


def _string(blob: bytes, off: int) -> tuple[bytes, int]:
    n, off = _read(blob, off, "<Q")
    return blob[off:off + n], off + n


def _bytes_field(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def with_fatbin(packed: bytes, source: str, code: bytes) -> bytes:
    """The packed import blob (``runtime.ModulePackImportsToTensor``) with its one CUDA module,
    which holds ``source``, holding the fatbin ``code`` instead."""
    _, off = _read(packed, 0, "<Q")
    rows, off = _read(packed, off, "<Q")
    off += 8 * rows
    children, off = _read(packed, off, "<Q")
    off += 8 * children
    head, records, cuda = packed[8:off], [], 0
    source_field = _bytes_field(source.encode())
    for _ in range(rows - 1):
        key, off = _string(packed, off)
        if key == b"_lib":  # the shared library itself: no payload
            records.append(_bytes_field(key))
            continue
        data, off = _string(packed, off)
        if key == b"cuda":
            fmt, pos = _string(data, 0)
            if fmt != b"cuda" or not data.endswith(source_field):
                raise ValueError(f"the CUDA module holds {fmt.decode()} code, not the source it was built from")
            data = _bytes_field(b"fatbin") + data[pos:len(data) - len(source_field)] + _bytes_field(code)
            cuda += 1
        records.append(_bytes_field(key) + _bytes_field(data))
    if off != len(packed) or cuda != 1:
        raise ValueError(f"unexpected module blob ({cuda} CUDA modules, {len(packed) - off} bytes left over)")
    body = head + b"".join(records)
    return struct.pack("<Q", len(body)) + body


def export_library(executable, path: str | Path, archs: list[str], ptx: str | None,
                   host_target) -> list[tuple[str, str]]:
    """Export ``executable`` (``tvm.compile``'s result for a CUDA target) to the shared library
    ``path`` with its kernels as a fatbin for ``archs`` (+ PTX of ``ptx``); returns the fatbin's
    images. Needs nvcc, no GPU."""
    import tvm_ffi

    source = cuda_source(executable)
    code = fatbin(source, archs, ptx)
    pack_to_tensor = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")
    codegen_blob = tvm_ffi.get_global_func("codegen.codegen_blob")

    def pack_imports(mod, is_system_lib, prefix, workspace):
        blob = with_fatbin(pack_to_tensor(mod).numpy().tobytes(), source, code)
        obj = os.path.join(workspace, f"{prefix}devc.o")
        codegen_blob(blob, is_system_lib, str(host_target), prefix).write_to_file(obj)
        return obj

    executable.export_library(str(path), fpack_imports=pack_imports)
    return fatbin_images(code)


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
