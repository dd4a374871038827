"""The collective-communication backends of ``runtime.ccl``: the CPU one (``shm``) in threaded and
process Disco sessions of 2 and 3 workers, against NumPy reductions in rank order (bit-exact, on
every worker); its failures (a peer that never arrives, bad tensors, worker groups, a killed
controller) in subprocesses, as an error inside a Disco worker-0 thread aborts the whole process;
the NCCL one built from the wheel's TVM source (loaded and registered only: there is no GPU here)."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import tvm_ffi

from qoq_compiler.errors import QoqcError
from qoq_compiler.runtime import ccl
from qoq_compiler.tvm_env import disco

ROOT = Path(__file__).resolve().parents[1]
SLOT_BYTES = 1 << 20  # kSlotBytes in csrc/shm_ccl.cc: larger tensors take several steps
WORKER = "qoq_compiler.runtime.disco_worker"


def _segments(pid: int) -> list[str]:
    return glob.glob(f"/dev/shm/qoqc-ccl-{pid}-*")


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    """The libraries built into a temporary directory (with NCCL where it is installed) and
    loaded; QOQC_CCL_LIB_DIR points Disco's process workers there too."""
    out = tmp_path_factory.mktemp("ccl")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QOQC_CCL_LIB_DIR", str(out))
        built = ccl.build(nccl=None)
        yield out, built, ccl.load()


@pytest.fixture(scope="module", params=["threaded-2", "process-2", "threaded-3", "process-3"])
def sess(request, libs):
    kind, n = request.param.split("-")
    di = disco()
    s = di.ThreadedSession(int(n)) if kind == "threaded" else di.ProcessSession(int(n), entrypoint=WORKER)
    ccl.init_ccl(s, "shm", *range(int(n)))
    s._sync_all()
    return s  # dropped, not shut down: DRefs that outlive a ProcessSession's shutdown abort the process


def _random(rng, dtype: str, shape) -> np.ndarray:
    if dtype == "int32":
        return rng.integers(-(2**31), 2**31, size=shape, dtype=np.int64).astype(np.int32)  # sums wrap
    x = (rng.standard_normal(shape) * 8).astype(np.float32)
    return x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


def _reference(arrays: list[np.ndarray], op: str) -> np.ndarray:
    """Rank 0, 1, ... in order, accumulated in float32 (int64 for int32), rounded once."""
    acc_type = np.int64 if arrays[0].dtype == np.int32 else np.float32
    fn = {"sum": np.add, "max": np.maximum, "min": np.minimum}[op]
    acc = arrays[0].astype(acc_type)
    for a in arrays[1:]:
        acc = fn(acc, a.astype(acc_type))
    return acc.astype(arrays[0].dtype)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


@pytest.mark.parametrize("dtype,op,shape", [
    ("float32", "sum", (1000,)),
    ("float16", "sum", (7, 129)),
    ("bfloat16", "sum", (1000,)),
    ("int32", "sum", (1000,)),
    ("float32", "max", (1000,)),
    ("float16", "min", (1000,)),
    ("int32", "max", (3, 5)),
    ("float32", "sum", (600_000,)),     # 2.4 MB: three steps through the slots
    ("float16", "sum", (2, 650_000)),   # 2.6 MB
])
def test_allreduce_matches_numpy_on_every_worker(sess, dtype, op, shape):
    n = sess.num_workers
    rng = np.random.default_rng([n, len(shape), shape[-1]])
    arrays = [_random(rng, dtype, shape) for _ in range(n)]
    x, y = sess.empty(shape, dtype), sess.empty(shape, dtype)
    for i, a in enumerate(arrays):
        x.debug_copy_from(i, a)
    sess.allreduce(x, y, op=op, in_group=shape[0] % 2 == 0)
    want = _bits(_reference(arrays, op))
    for i in range(n):
        np.testing.assert_array_equal(_bits(y.debug_get_from_remote(i).numpy()), want, err_msg=f"worker {i}")


def test_allreduce_in_place_and_repeated(sess):
    """send is recv; consecutive collectives alternate the two slot buffers."""
    n = sess.num_workers
    rng = np.random.default_rng(1)
    shape = (SLOT_BYTES // 4 + 3,)
    x = sess.empty(shape, "float32")
    for _ in range(3):
        arrays = [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]
        for i, a in enumerate(arrays):
            x.debug_copy_from(i, a)
        sess.allreduce(x, x, op="sum")
        for i in range(n):
            np.testing.assert_array_equal(x.debug_get_from_remote(i).numpy(), _reference(arrays, "sum"))


@pytest.mark.parametrize("dtype,shape", [("float32", (5, 3)), ("int8", (SLOT_BYTES * 2 + 17,))])
def test_broadcast_from_worker0(sess, dtype, shape):
    src = np.random.default_rng(2).integers(-100, 100, size=shape).astype(dtype)
    dst = sess.broadcast(src)
    for i in range(sess.num_workers):
        np.testing.assert_array_equal(dst.debug_get_from_remote(i).numpy(), src)


def test_segment_unlinked_once_workers_map_it(sess):
    assert _segments(os.getpid()) == []


def test_init_checks_device_ids_on_the_controller(libs):
    s = disco().ThreadedSession(2)
    with pytest.raises(ValueError, match="one device id per worker"):
        ccl.init_ccl(s, "shm", 0)
    assert _segments(os.getpid()) == []


_FAULT = textwrap.dedent("""
    import os, sys, time
    import numpy as np, tvm_ffi
    from qoq_compiler.runtime import ccl
    from qoq_compiler.tvm_env import disco, tvm
    mode = sys.argv[1]
    di = disco()

    @tvm_ffi.register_global_func("qoqc_test.allreduce_on_worker0")
    def _(x, y):
        if tvm.get_global_func("runtime.disco.worker_rank")() == 0:
            tvm.get_global_func("runtime.disco.allreduce")(x, tvm_ffi.Shape([0]), False, y)

    @tvm_ffi.register_global_func("qoqc_test.sleep_on_worker1")
    def _():
        if tvm.get_global_func("runtime.disco.worker_rank")() == 1:
            time.sleep(5)

    if mode == "killed":
        sess = di.ProcessSession(2, entrypoint="qoq_compiler.runtime.disco_worker")
    else:
        sess = di.ThreadedSession(2, 2 if mode == "groups" else 1)
    if mode == "init-timeout":
        sess.get_global_func("qoqc_test.sleep_on_worker1")()
        try:
            ccl.init_ccl(sess, "shm", 0, 1)
        except RuntimeError as e:  # on the controller: catchable
            print(e, file=sys.stderr, flush=True)
            os._exit(3)  # before worker 1 wakes up and fails to open the segment
    ccl.init_ccl(sess, "shm", 0, 1)
    sess._sync_all()
    x = sess.empty((4,), "float32")
    if mode == "timeout":
        sess.get_global_func("qoqc_test.allreduce_on_worker0")(x, sess.empty((4,), "float32"))
    elif mode == "dtype":
        sess.allreduce(x, sess.empty((4,), "float16"))
    sess._sync_all()
    print("ready", flush=True)
    time.sleep(120)
""")


def _run_fault(libs, mode: str, **env) -> tuple[subprocess.CompletedProcess, int]:
    proc = subprocess.Popen([sys.executable, "-c", _FAULT, mode], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "QOQC_CCL_LIB_DIR": str(libs[0]), **env})
    try:
        if mode == "killed":
            assert proc.stdout.readline().strip() == "ready"
            os.killpg(proc.pid, signal.SIGKILL)  # the controller and its worker processes
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


@pytest.mark.parametrize("mode,message", [
    ("timeout", "worker 0 waited 1 s at a barrier, and only 1 of 2 workers arrived"),
    ("groups", "shm CCL supports one worker group only"),
    ("dtype", "send and recv have different dtypes"),
])
def test_worker_errors_are_clear(libs, mode, message):
    proc, pid = _run_fault(libs, mode, QOQC_CCL_TIMEOUT="1")
    assert proc.returncode != 0 and "ready" not in proc.stdout
    assert message in proc.stderr
    assert _segments(pid) == []


def test_init_timeout_is_an_error_on_the_controller(libs):
    proc, pid = _run_fault(libs, "init-timeout", QOQC_CCL_TIMEOUT="1")
    assert proc.returncode == 3, proc.stderr
    assert "only 1 of 2 workers set up the CCL within 1 s" in proc.stderr
    assert _segments(pid) == []


def test_no_segment_left_when_the_controller_is_killed(libs):
    proc, pid = _run_fault(libs, "killed")
    assert proc.returncode == -signal.SIGKILL
    assert _segments(pid) == []


def test_bad_timeout_is_rejected_on_the_controller(libs, monkeypatch):
    monkeypatch.setenv("QOQC_CCL_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="QOQC_CCL_TIMEOUT must be a positive number"):
        ccl.init_ccl(disco().ThreadedSession(2), "shm", 0, 1)


def test_build_is_incremental(libs):
    out, built, _ = libs
    stamps = [p.stat().st_mtime_ns for p in built]
    assert ccl.build(nccl=len(built) == 2) == built
    assert [p.stat().st_mtime_ns for p in built] == stamps
    expected = [p.name for p in built] + [p.name + ".sha256" for p in built]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)


def test_compiler_errors(libs, tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "shm_ccl.cc").write_text("int main() { return undeclared; }\n")
    monkeypatch.setattr(ccl, "CSRC", tmp_path / "src")
    with pytest.raises(QoqcError, match="(?s)compiling the shm CCL library failed.*undeclared"):
        ccl.build(nccl=False, out=tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # no partial library


def test_cli(libs, tmp_path, monkeypatch, capsys):
    proc = subprocess.run([sys.executable, "-m", "qoq_compiler.runtime.ccl", "--no-nccl"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "QOQC_CCL_LIB_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "libqoqc_ccl_shm.so")]
    monkeypatch.setenv("CXX", "/bin/false")
    assert ccl.main(["--no-nccl"]) == 2
    assert capsys.readouterr().err.startswith("qoqc: error: no working C++ compiler '/bin/false'")


def test_load_without_libraries(libs, tmp_path, monkeypatch):
    monkeypatch.setenv("QOQC_CCL_LIB_DIR", str(tmp_path))
    monkeypatch.setattr(ccl, "_loaded", {})
    with pytest.raises(QoqcError, match="run python -m qoq_compiler.runtime.ccl"):
        ccl.load()


def test_load_is_idempotent(libs):
    assert ccl.load() == libs[2] == ccl.load()
    assert "shm" in libs[2]


def test_nccl_built_from_the_wheel_source_registers(libs):
    if ccl._find_nccl() is None or ccl._find_cuda() is None:
        pytest.skip("the nvidia-nccl-cu13 wheel or the CUDA 13 toolkit headers are not installed")
    out, built, names = libs
    assert "nccl" in names and out / "libqoqc_ccl_nccl.so" in built
    registered = set(tvm_ffi.registry.list_global_func_names())
    for fn in ("init_ccl", "init_ccl_per_worker", "allreduce", "allgather", "broadcast_from_worker0",
               "scatter_from_worker0", "gather_to_worker0", "sync_worker"):
        assert f"runtime.disco.nccl.{fn}" in registered
