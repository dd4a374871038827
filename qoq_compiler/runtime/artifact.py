"""The artifact directory ``qoqc compile`` writes, and its integrity check.

    OUT/
      manifest.json            versions, target, model config, quant scheme, parameter order, sha256 of every file
      model.so                 the compiled Relax VM executable: host code, and for CUDA a fatbin of the
                               kernels (SASS per compiled arch + PTX; ``manifest["device_code"]``)
      params-00000.safetensors parameters in the layout the module expects (sharded at 2 GiB); none for an
                               artifact of random weights (``manifest["params"]["random"]``: shapes and
                               dtypes, drawn at load by ``random_params``)
      tokenizer/               tokenizer files with the chat template (absent if the checkpoint has none)
      ir/                      the IR after each compiler step (only with --dump-ir)

An artifact is written into a temporary sibling directory and renamed into place at the end, so an
interrupted or failed compile never leaves a half-written OUT.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import QoqcError

#: set by a termination signal (``qoqc``'s SIGTERM handler): an artifact is then never finalized,
#: even when the KeyboardInterrupt the handler raises is swallowed somewhere (an ``__del__``)
stop_requested = threading.Event()

FORMAT = "qoqc-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"
TOKENIZER_DIR = "tokenizer"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def is_artifact(path: Path) -> bool:
    """Whether ``path`` is a directory whose manifest says it is a qoqc artifact."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@contextmanager
def writing(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; on success it replaces ``out``, on failure
    (or interruption) it is removed.

    ``out`` may be absent, an empty directory or an earlier artifact (its manifest names the
    format); anything else is refused rather than overwritten. Temporary directories that a killed
    compile left (their process gone) are removed too. Files are written with the permissions the
    user's umask gives (safetensors itself would write 0600).
    """
    out = Path(out).absolute()
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or is_artifact(out))):
        raise QoqcError(f"output {out} exists and is not a qoqc artifact: refusing to overwrite it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{out.name}.partial-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _running(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise QoqcError(f"cannot write the artifact {out}: {e.strerror or e}") from None
    try:
        yield tmp
        if stop_requested.is_set():
            raise KeyboardInterrupt
        try:
            mode = 0o666 & ~_umask()
            for f in tmp.rglob("*"):
                if f.is_file() and not os.access(f, os.X_OK):
                    f.chmod(mode)
            if out.exists():
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old)
            else:
                tmp.rename(out)
        except OSError as e:
            raise QoqcError(f"cannot write the artifact {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Record the sha256 of every file under ``root`` and write ``manifest.json``."""
    files = {p.relative_to(root).as_posix(): sha256(p) for p in _files(root)}
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    (root / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")


def read_manifest(root: str | Path, verify: bool = True) -> dict[str, Any]:
    """Parse ``manifest.json`` and (by default) check every file's sha256 against it."""
    root = Path(root)
    if not root.is_dir():
        raise QoqcError(f"artifact directory does not exist: {root}")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise QoqcError(f"{root} is not a qoqc artifact (no {MANIFEST})")
    try:
        doc = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QoqcError(f"corrupt artifact: {mpath} is not valid JSON ({e})") from None
    if doc.get("format") != FORMAT:
        raise QoqcError(f"{mpath} is not a qoqc manifest")
    if doc.get("format_version") != FORMAT_VERSION:
        raise QoqcError(
            f"artifact format version {doc.get('format_version')} is not supported "
            f"(this qoqc reads version {FORMAT_VERSION}): recompile the model"
        )
    if verify:
        for rel, digest in doc["files"].items():
            p = root / rel
            if not p.is_file():
                raise QoqcError(f"corrupt artifact: {p} is missing")
            if sha256(p) != digest:
                raise QoqcError(f"corrupt artifact: {p} was altered after compile (sha256 mismatch)")
    return doc


def check_device_code(manifest: dict[str, Any], root: Path, compute_version: str, gpu: str) -> None:
    """Refuse a CUDA artifact that holds no code this GPU (compute capability "9.0") can run.

    SASS for sm_XY runs on GPUs of major X and minor >= Y; PTX for compute_XY is compiled by the
    driver for any GPU of compute capability XY or newer."""
    code = manifest.get("device_code")
    if code is None:
        raise QoqcError(f"artifact {root} holds CUDA source that TVM would compile at load (written by a qoqc "
                        "before ahead-of-time device code): recompile it")
    major, minor = (int(v) for v in compute_version.split("."))
    sass = [(int(a[3:-1]), int(a[-1])) for a in code.get("sass", [])]
    ptx = [(int(a[8:-1]), int(a[-1])) for a in code.get("ptx", [])]
    if any(M == major and m <= minor for M, m in sass) or any((M, m) <= (major, minor) for M, m in ptx):
        return
    have = ", ".join(code.get("sass", []) + [f"PTX {a}" for a in code.get("ptx", [])])
    fix = (f"recompile it with --arch including sm_{major}{minor}" if major >= 8 else
           "qoqc's CUDA kernels need sm_80 or newer")
    raise QoqcError(f"this GPU ({gpu}) is sm_{major}{minor}, and artifact {root} has device code for {have} only: "
                    + fix)


#: bits kept and set when drawing floats: random sign and mantissa, exponent fixed at 2^-7, so
#: every value lies in +-[1/128, 1/64): finite, never zero, no products that overflow fp16
_FLOAT_BITS = {"float16": (np.uint16, 0x83FF, 0x2000), "float32": (np.uint32, 0x807FFFFF, 0x3C000000)}


def random_params(spec: dict[str, Any]) -> Iterator[np.ndarray]:
    """The parameters of a random-weight artifact (``spec`` = ``manifest["params"]``), in order:
    integers uniform over their whole range, floats as in ``_FLOAT_BITS``; drawn as random 64-bit
    words (about 1 GB/s on one core), reproducibly from the recorded seed."""
    rand = spec["random"]
    rng = np.random.default_rng(rand["seed"])

    def words(count: int, dtype) -> np.ndarray:
        nbytes = count * np.dtype(dtype).itemsize
        raw = rng.integers(0, np.iinfo(np.uint64).max, size=-(-nbytes // 8), dtype=np.uint64, endpoint=True)
        return raw.view(np.uint8)[:nbytes].view(dtype)

    for shape, dtype in zip(rand["shapes"], rand["dtypes"]):
        count = int(np.prod(shape, dtype=np.int64))
        if dtype in _FLOAT_BITS:
            word, keep, fixed = _FLOAT_BITS[dtype]
            yield (words(count, word) & word(keep) | word(fixed)).view(dtype).reshape(shape)
        else:
            yield words(count, dtype).reshape(shape)


def params_bytes(manifest: dict[str, Any], root: Path) -> int:
    """Bytes the artifact's parameters take on one device (a tensor-parallel shard's: all equal)."""
    spec = manifest["params"]
    if "random" in spec:
        return sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize
                   for s, d in zip(spec["random"]["shapes"], spec["random"]["dtypes"]))
    files = spec["shard_files"][0] if "shard_files" in spec else spec["files"]
    return sum((Path(root) / f).stat().st_size for f in files)


#: LLVM CPU features that change the instructions of generated code -> their name in /proc/cpuinfo
#: (x86 "flags", Arm "Features"); an artifact records the ones its target enables
CPU_FEATURES = {
    "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt", "avx": "avx",
    "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "lzcnt": "abm", "movbe": "movbe",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16", "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2",
    "avx512ifma": "avx512ifma", "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512vp2intersect": "avx512_vp2intersect", "avxvnni": "avx_vnni", "amx-tile": "amx_tile",
    "amx-int8": "amx_int8", "amx-bf16": "amx_bf16", "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq",
    "neon": "asimd", "fullfp16": "asimdhp", "dotprod": "asimddp", "i8mm": "i8mm", "bf16": "bf16", "sve": "sve",
    "sve2": "sve2",
}


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags as /proc/cpuinfo names them; None where that file is not readable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def check_compatible(manifest: dict[str, Any], root: Path) -> None:
    """Refuse an artifact this runtime cannot run: another TVM or tvm-ffi release (the compiled
    module's ABI is theirs), or host code for CPU features this CPU lacks (it would die of an
    illegal instruction); warn, once, when another qoqc wrote it."""
    import sys

    import tvm_ffi

    from .. import __version__
    from ..tvm_env import tvm

    for name, have in (("apache-tvm", tvm.__version__), ("apache-tvm-ffi", tvm_ffi.__version__)):
        built = manifest.get("tvm_version" if name == "apache-tvm" else "tvm_ffi_version")
        if built is not None and built != have:
            raise QoqcError(f"artifact {root} was compiled with {name} {built}, this runtime has {have}: "
                            "recompile it with this qoqc")
    if manifest.get("qoqc_version") != __version__:
        print(f"qoqc: warning: artifact {root} was written by qoqc {manifest.get('qoqc_version')}; "
              f"this is qoqc {__version__}", file=sys.stderr)
    needed = manifest.get("host", {}).get("cpu_features", [])
    flags = cpu_flags()
    missing = [f for f in needed if flags is not None and f not in flags]
    if missing:
        cpu = manifest["host"].get("mcpu", "?")
        raise QoqcError(f"artifact {root} was compiled for CPU {cpu} and uses {', '.join(missing)}, which this CPU "
                        "lacks (it would stop with an illegal instruction): recompile it on this machine, or with "
                        "--arch naming this CPU")
