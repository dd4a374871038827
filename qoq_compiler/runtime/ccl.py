"""Collective-communication (CCL) backends for TVM's Disco runtime: build them, load them.

A tensor-parallel Relax program reduces across workers with ``R.ccl.allreduce``, which lowers to
the packed function ``runtime.disco.allreduce``; Disco dispatches that to
``runtime.disco.<ccl>.allreduce`` for the CCL that ``init_ccl`` set up on the workers. The pinned
apache-tvm wheel registers no CCL at all, so qoqc builds two, as shared libraries that register
their functions when loaded:

``shm``
    CPU workers (the threads of a ``ThreadedSession``, or the processes of a ``ProcessSession``)
    exchanging data through a POSIX shared-memory segment (``csrc/shm_ccl.cc``, whose header
    comment gives the algorithm). TVM has no CPU backend in any version, only NCCL/RCCL and
    CUDA IPC, so qoqc has its own.
``nccl``
    TVM's own NCCL backend, compiled from the C++ source the wheel ships
    (``tvm/src/runtime/extra/disco/nccl/nccl.cc``), not rewritten: the sources are copied into a
    temporary build tree next to two shims for what the wheel leaves out (``support/process_id.h``,
    which nccl.cc includes but does not use, and ``tvm/support/io.h`` / ``serializer.h``, which
    ``tvm/runtime/tensor.h`` includes for its Save/Load, which no CCL calls: declarations
    suffice, and ``--no-undefined`` makes the link fail if that ever changes). NCCL comes from
    the ``nvidia-nccl-cu13`` wheel, the CUDA runtime headers from the CUDA 13 toolkit
    (``CUDA_PATH``, ``CUDA_HOME`` or /usr/local/cuda).

Nothing is downloaded, at build or at run time: ``python -m qoq_compiler.runtime.ccl
[--nccl|--no-nccl]`` compiles with the local C++ compiler (``CXX``, else g++) against the
installed wheels, into ``runtime/ccl_lib/`` (or ``QOQC_CCL_LIB_DIR``), and rebuilds a library
only when its sources, flags or compiler changed. ``load()`` loads what was built; Disco's
process workers (``runtime.disco_worker``) call it too.

``Session.init_ccl`` accepts only "nccl" and "rccl"; ``init_ccl`` below initialises any loaded CCL.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import QoqcError

CSRC = Path(__file__).resolve().parent / "csrc"
CCL_NAMES = ("shm", "nccl")

#: nccl.cc and nccl_context.h include it, and use nothing from it
_PROCESS_ID_SHIM = "// qoqc build shim: the wheel lacks support/process_id.h; nccl.cc uses none of it.\n"
#: the wheel's tvm/runtime/tensor.h includes these for Tensor::Save/Load, and does not ship them
_IO_SHIM = """// qoqc build shim: the wheel's tvm/runtime/tensor.h includes this header, which the wheel
// does not ship, for the inline Tensor::Save/Load. The CCL sources never call those, so the
// members are declared only: any use fails the link (-Wl,--no-undefined).
#ifndef QOQC_SHIM_TVM_SUPPORT_IO_H_
#define QOQC_SHIM_TVM_SUPPORT_IO_H_
#include <cstddef>
namespace tvm {
namespace support {
class Stream {
 public:
  virtual size_t Read(void* ptr, size_t size) = 0;
  virtual size_t Write(const void* ptr, size_t size) = 0;
  virtual ~Stream() = default;
  template <typename T> void Write(const T& data);
  template <typename T> bool Read(T* data);
  template <typename T> void WriteArray(const T* data, size_t num_elems);
  template <typename T> bool ReadArray(T* data, size_t num_elems);
};
}  // namespace support
}  // namespace tvm
#endif
"""
_SHIMS = {
    "include/tvm/support/io.h": _IO_SHIM,
    "include/tvm/support/serializer.h": "// qoqc build shim (see io.h)\n#include <tvm/support/io.h>\n",
    "src/support/process_id.h": _PROCESS_ID_SHIM,
}
_NCCL_SRC = "src/runtime/extra/disco/nccl/nccl.cc"
_NCCL_COPIES = ("nccl/nccl.cc", "nccl/nccl_context.h", "utils.h")  # relative to the wheel's disco sources

_loaded: dict[str, Path] = {}


def lib_dir() -> Path:
    """Where the libraries are built and loaded from."""
    env = os.environ.get("QOQC_CCL_LIB_DIR")
    return Path(env) if env else Path(__file__).resolve().parent / "ccl_lib"


def _lib_name(ccl: str) -> str:
    return f"libqoqc_ccl_{ccl}.so"


def _tvm_paths() -> dict[str, Path]:
    import tvm_ffi.libinfo

    from ..tvm_env import tvm

    tvm_root = Path(tvm.__file__).resolve().parent
    return {"tvm": tvm_root, "tvm_lib": tvm_root / "lib", "tvm_include": tvm_root / "include",
            "ffi_include": Path(tvm_ffi.libinfo.find_include_path()),
            "dlpack_include": Path(tvm_ffi.libinfo.find_dlpack_include_path()),
            "ffi_lib": Path(tvm_ffi.libinfo.find_libtvm_ffi()).parent,
            "disco_src": tvm_root / "src" / "runtime" / "extra" / "disco"}


def _find_nccl() -> Path | None:
    """The nvidia-nccl wheel's root (with include/nccl.h and lib/libnccl.so.2), or None."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        nccl = Path(root) / "nccl"
        if (nccl / "include" / "nccl.h").is_file() and (nccl / "lib" / "libnccl.so.2").is_file():
            return nccl
    return None


def _find_cuda() -> tuple[Path, Path] | None:
    """(include dir, lib dir) of a CUDA 13 toolkit, or None."""
    roots = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    for root in filter(None, roots):
        include = Path(root) / "include"
        for lib in (Path(root) / "lib64", Path(root) / "lib"):
            if (include / "cuda_runtime.h").is_file() and (lib / "libcudart.so.13").exists():
                return include, lib
    return None


def _command(ccl: str, tmp: str, paths: dict[str, Path], output: str) -> list[str]:
    """The compiler command line; ``tmp`` is the build tree with the shims (and NCCL's sources)."""
    source = str(CSRC / "shm_ccl.cc") if ccl == "shm" else f"{tmp}/{_NCCL_SRC}"
    includes = [f"{tmp}/include", paths["tvm_include"], paths["ffi_include"], paths["dlpack_include"]]
    lib_dirs = [paths["tvm_lib"], paths["ffi_lib"]]
    libs = ["-ltvm_runtime_extra", "-ltvm_runtime", "-ltvm_ffi"]
    if ccl == "nccl":
        nccl, (cuda_include, cuda_lib) = _find_nccl(), _find_cuda()
        includes += [cuda_include, nccl / "include"]
        lib_dirs += [cuda_lib, nccl / "lib"]
        libs += ["-l:libcudart.so.13", "-l:libnccl.so.2"]
    return [os.environ.get("CXX", "g++"), "-std=c++17", "-O2", "-fPIC", "-shared", "-Wall",
            *(f"-I{d}" for d in includes), source, "-o", output,
            *(f"-L{d}" for d in lib_dirs), *libs,
            "-Wl,--no-undefined", "-Wl,-rpath," + ":".join(str(d) for d in lib_dirs)]


def _fingerprint(ccl: str, paths: dict[str, Path]) -> str:
    h = hashlib.sha256()
    compiler = _command(ccl, "<tmp>", paths, "<out>")
    h.update("\0".join(compiler).encode())
    try:
        version = subprocess.run([compiler[0], "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise QoqcError(f"no working C++ compiler {compiler[0]!r} ({e}): install g++ or set CXX") from None
    h.update(version.encode())
    for text in _SHIMS.values():
        h.update(text.encode())
    sources = [CSRC / "shm_ccl.cc"] if ccl == "shm" else [paths["disco_src"] / f for f in _NCCL_COPIES]
    for f in sources:
        h.update(f.read_bytes())
    return h.hexdigest()


def _compile(ccl: str, out: Path, paths: dict[str, Path]) -> Path:
    target = out / _lib_name(ccl)
    stamp = target.with_name(target.name + ".sha256")
    digest = _fingerprint(ccl, paths)
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return target
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"qoqc-ccl-{ccl}-") as tmp:
        for rel, text in _SHIMS.items():
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_text(text)
        if ccl == "nccl":
            for rel in _NCCL_COPIES:
                dst = Path(tmp) / "src/runtime/extra/disco" / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(paths["disco_src"] / rel, dst)
        fd, partial = tempfile.mkstemp(dir=out, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            proc = subprocess.run(_command(ccl, tmp, paths, partial), capture_output=True, text=True,
                                  check=False)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
                raise QoqcError(f"compiling the {ccl} CCL library failed:\n{tail}")
            os.chmod(partial, 0o755)
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    fd, partial = tempfile.mkstemp(dir=out, prefix=f".{stamp.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(digest + "\n")
    os.chmod(partial, 0o644)
    os.replace(partial, stamp)
    return target


def build(nccl: bool | None = None, out: Path | None = None) -> list[Path]:
    """Build libqoqc_ccl_shm.so, and libqoqc_ccl_nccl.so if ``nccl`` (None: if NCCL and CUDA 13
    headers are installed); returns the libraries' paths. A library not built is removed from
    ``out``, so that ``load()`` loads exactly what this returns."""
    out = Path(out) if out is not None else lib_dir()
    paths = _tvm_paths()
    if nccl is None:
        nccl = (_find_nccl() is not None and _find_cuda() is not None
                and (paths["disco_src"] / "nccl" / "nccl.cc").is_file())
    elif nccl:
        missing = [what for what, found in (("the nvidia-nccl-cu13 wheel (pip install nvidia-nccl-cu13)",
                                             _find_nccl()),
                                            ("the CUDA 13 toolkit headers (install it, or set CUDA_PATH)",
                                             _find_cuda()),
                                            (f"TVM's NCCL source {paths['disco_src'] / 'nccl' / 'nccl.cc'}",
                                             (paths["disco_src"] / "nccl" / "nccl.cc").is_file()))
                   if not found]
        if missing:
            raise QoqcError(f"the NCCL backend needs {' and '.join(missing)}")
    built = [_compile("shm", out, paths)]
    if nccl:
        built.append(_compile("nccl", out, paths))
    else:
        for stale in (out / _lib_name("nccl"), out / (_lib_name("nccl") + ".sha256")):
            stale.unlink(missing_ok=True)
    return built


def load() -> list[str]:
    """Load every built CCL library (once per process); returns the CCL names available."""
    from ..tvm_env import tvm  # noqa: F401  (the libraries link against the libraries tvm loads)

    directory = lib_dir()
    for ccl in CCL_NAMES:
        path = directory / _lib_name(ccl)
        if ccl in _loaded or not path.is_file():
            continue
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise QoqcError(f"cannot load {path} ({e}): rebuild it with python -m qoq_compiler.runtime.ccl") \
                from None
        _loaded[ccl] = path
    if not _loaded:
        raise QoqcError(f"no CCL library is built in {directory}: run python -m qoq_compiler.runtime.ccl")
    return [ccl for ccl in CCL_NAMES if ccl in _loaded]


def init_ccl(sess, ccl: str, *device_ids: int) -> None:
    """``sess.init_ccl(ccl, *device_ids)`` for any loaded CCL (``Session.init_ccl`` asserts nccl or rccl)."""
    from tvm_ffi import Shape

    from ..tvm_env import disco

    if ccl not in load():
        raise QoqcError(f"the {ccl} CCL library is not built: run python -m qoq_compiler.runtime.ccl")
    disco()._ffi_api.SessionInitCCL(sess, ccl, Shape(device_ids))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qoq_compiler.runtime.ccl",
                                description="Build qoqc's collective-communication libraries for Disco.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--nccl", dest="nccl", action="store_true", default=None,
                   help="also build the NCCL backend (an error if NCCL or CUDA 13 is missing)")
    g.add_argument("--no-nccl", dest="nccl", action="store_false", help="build the CPU (shm) backend only")
    args = p.parse_args(argv)
    try:
        for path in build(nccl=args.nccl):
            print(path)
    except QoqcError as e:
        print(f"qoqc: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
