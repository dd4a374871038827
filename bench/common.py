"""What the bench scripts share: building kernels ahead of time, timing them on a device, the
CPU-check tally, writing the Markdown table, and running an engine in a child process.

Timing (``Timer``). On a GPU, ``launches`` calls of ``fn`` are captured once into a CUDA graph
(TVM's launches join torch's capture stream through ``tvm_ffi.use_torch_stream``); a sample
flushes the L2 (a write of twice its size) and replays the graph between two CUDA events. Timing
single launches would measure launch latency at small M, and the same operands every time an
L2-resident working set: callers that time a memory-bound kernel hand it several copies of its
operands (``copies_for_l2``) and cycle through them, so each launch reads from HBM as a model's
next layer would. Where capture fails the launches are issued eagerly instead (``Timer.mode``
says which). The result is the median over ``samples`` of time per launch. On a CPU (the dry
runs' llvm stand-ins) the same loop runs under ``time.perf_counter``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


class Timer:
    """Median microseconds per launch of ``fn`` on ``device`` ("cuda" or "cpu")."""

    def __init__(self, device: str, samples: int = 10, launches: int = 20):
        self.device, self.samples, self.launches = device, samples, launches
        self.mode = "CUDA graph" if device == "cuda" else "wall clock"
        self._flush = None
        if device == "cuda":
            import torch

            l2 = torch.cuda.get_device_properties(0).L2_cache_size
            self._flush = torch.empty(2 * max(l2, 1 << 20), dtype=torch.uint8, device="cuda")

    @property
    def l2_bytes(self) -> int:
        return 0 if self._flush is None else self._flush.numel() // 2

    def __call__(self, fn, launches: int | None = None) -> float:
        launches = max(launches or 0, self.launches)
        fn()  # warm-up: the first launch loads the module
        if self.device != "cuda":
            times = []
            for _ in range(self.samples):
                t0 = time.perf_counter()
                for _ in range(launches):
                    fn()
                times.append((time.perf_counter() - t0) * 1e6 / launches)
            return statistics.median(times)
        import torch
        import tvm_ffi

        def issue():
            for _ in range(launches):
                fn()

        run = issue
        if self.mode == "CUDA graph":
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            try:
                with tvm_ffi.use_torch_stream(torch.cuda.graph(graph)):
                    issue()
                run = graph.replay
            except Exception as e:  # noqa: BLE001  (torch or TVM refused the capture): eager launches from now on
                print(f"bench: CUDA graph capture failed ({str(e).splitlines()[0]}); timing eager launches")
                self.mode = "eager launches"
                torch.cuda.synchronize()
        times = []
        for _ in range(self.samples):
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1000 / launches)
        return statistics.median(times)

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()


def copies_for_l2(nbytes: int, timer: Timer) -> int:
    """Copies of an operand of ``nbytes`` whose round robin overflows twice the L2 (1 on CPUs)."""
    return max(1, -(-2 * timer.l2_bytes // max(nbytes, 1)))


def export_kernels(funcs: dict, target, path: Path, archs: list[str] | None = None) -> Path:
    """Compile the PrimFuncs ``funcs`` (name -> PrimFunc, exported under that name) for ``target``
    into the shared library ``path``: for CUDA with device code ahead of time (``archs``, PTX of the
    last), so loading it needs no NVRTC and no TVM compiler."""
    from qoq_compiler.tvm_env import tvm
    from schedules import nvcc, pipeline

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    with target:
        mod = pipeline.schedule(target)(mod)  # the model pipeline's rules for whatever is unscheduled
    ex = tvm.compile(mod, target=target, tir_pipeline=pipeline.TIR_PIPELINE)
    if target.kind.name == "cuda":
        archs = archs or [str(target.arch)]
        nvcc.export_library(ex, path, archs, archs[-1], target.host or tvm.target.Target("llvm"))
    else:
        ex.export_library(str(path))
    return path


def load_kernels(funcs: dict, target, archs: list[str] | None = None):
    """``export_kernels`` into a temporary file, loaded: the kernels as a runtime module."""
    from qoq_compiler.tvm_env import tvm

    with tempfile.TemporaryDirectory(prefix="qoqc-bench-") as tmp:
        return tvm.runtime.load_module(str(export_kernels(funcs, target, Path(tmp) / "kernels.so", archs)))


def gpu_arch(default: str = "sm_90") -> str:
    """sm_XY of this machine's GPU (torch), or ``default`` when there is none."""
    import torch

    if not torch.cuda.is_available():
        return default
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


class Checks:
    """``--cpu-check`` tally: one printed line a check, exit status 1 if any failed."""

    def __init__(self):
        self.failures: list[str] = []

    def __call__(self, ok: bool, what: str) -> None:
        print(("ok    " if ok else "FAIL  ") + what, flush=True)
        if not ok:
            self.failures.append(what)

    def exit_status(self) -> int:
        print(f"{len(self.failures)} failure(s)")
        return 1 if self.failures else 0


def emit_table(lines: list[str], out: str | None) -> None:
    """Print the Markdown table and, with ``--out``, write it to that file too."""
    table = "\n".join(lines) + "\n"
    print(table)
    if out:
        Path(out).write_text(table)


def child_result(cmd: list[str], env: dict, what: str) -> dict:
    """Run ``cmd`` (a bench script's child mode) and return the JSON it printed after "RESULT ";
    stop with the child's stderr when it failed."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])
