"""Tensor-parallel serving on TVM's Disco: ``TPEngine``, an ``Engine`` whose module runs on N workers.

An artifact compiled with ``--tensor-parallel N`` holds one module and each shard's weights
(``params-shard-I-*``; ``frontend.sharding`` says how the model divides). ``DiscoRuntime`` runs it:
    workers      a Disco ``ProcessSession`` of N workers (worker 0 a thread of this process, the
                 others ``runtime.disco_worker`` processes), worker I on device I (``cuda``) or the
                 CPU; collectives through the CCL of the device (``runtime.ccl``: NCCL or shm)
    module       every worker loads the same library (``runtime.disco.load_vm_module``) and its own
                 shard's weights (``qoqc.tp.load_params``, run by each worker)
    KV cache     each worker holds 1/N of the KV heads (the shard's model config); the block
                 manager, the scheduler and every request stay here, on the controller
    a step       the host arrays of the step (token ids, logit rows, the cache's addressing) are
                 packed into one int32 buffer, copied to worker 0 and broadcast to the others in
                 one collective; each worker then copies them out into the function's inputs
    results      every worker computes the full logits (lm_head is replicated); worker 0's are
                 copied back
The workers end with the engine: ``close`` (or leaving a ``with`` block, or the engine being
collected) shuts the session down; a worker process whose controller dies sees its pipe close and
exits, and ignores Ctrl-C (the controller owns shutdown).

An error inside a worker's call is fatal to the process (Disco's worker threads do not carry C++
exceptions back), so everything a step needs is checked here first, as ``Model`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tvm_ffi

from ..errors import QoqcError
from ..tvm_env import disco, tvm
from . import ccl
from .engine import Engine
from .model import read_params

ENTRYPOINT = "qoq_compiler.runtime.disco_worker"


@tvm_ffi.register_global_func("qoqc.tp.load_params", override=True)
def _load_params(root: str, spec_json: str) -> list:
    """Run by each worker: its shard's parameters on its device, in the module's order."""
    worker = int(tvm.get_global_func("runtime.disco.worker_id")()[0])
    device = tvm.get_global_func("runtime.disco.device")()
    spec = json.loads(spec_json)
    files = spec["shard_files"][worker] if "shard_files" in spec else []
    return [tvm.runtime.tensor(a, device) for a in read_params(Path(root), spec, files)]


class DiscoRuntime:
    """The compiled module on ``shards`` Disco workers (the ``LocalRuntime`` interface, on DRefs)."""

    def __init__(self, library: Path, shards: int, device: str):
        di = disco()
        names = ccl.load()
        want = "nccl" if device == "cuda" else "shm"
        if want not in names:
            raise QoqcError(f"tensor parallelism on {device} needs the {want} collectives, which are not built "
                            f"(built: {', '.join(names)}): run `python -m qoq_compiler.runtime.ccl"
                            f"{' --nccl' if want == 'nccl' else ''}`")
        self.sess = di.ProcessSession(shards, entrypoint=ENTRYPOINT)
        try:
            ccl.init_ccl(self.sess, want, *(range(shards) if device == "cuda" else [0] * shards))
            self.vm = self.sess.load_vm_module(str(library))
            self._view = self.sess.get_global_func("runtime.TVMTensorCreateView")
            self._getitem = self.sess.get_global_func("vm.builtin.tuple_getitem")
            self._bcast = self.sess.get_global_func("runtime.disco.broadcast_from_worker0")
            self._copy = self.sess.get_global_func("runtime.TVMTensorCopyFromTo")
            self._held: dict[str, list] = {}
        except BaseException:
            self.close()
            raise

    def function(self, name: str):
        return self.vm[name]

    def global_func(self, name: str):
        return self.sess.get_global_func(name)

    def empty(self, shape, dtype: str):
        return self.sess.empty(tuple(shape), dtype)

    def inputs(self, arrays: list[np.ndarray]) -> list:
        """The host int32 arrays on every worker: packed into one buffer, copied to worker 0 and
        broadcast, then each copied out of it into its own buffer (compiled functions take
        tensors that start at their buffer's start, not views at an offset)."""
        flat = np.concatenate([np.asarray(a, "int32").ravel() for a in arrays])
        sizes = [int(np.size(a)) for a in arrays]
        packed = self._buffers("packed", [len(flat), len(flat)])
        send, recv = (self._view(b, tvm_ffi.Shape([len(flat)]), "int32", 0) for b in packed)
        self.sess.copy_to_worker_0(tvm.runtime.tensor(flat), send)
        self._bcast(send, False, recv)
        views, offset = [], 0
        for buf, a, n in zip(self._buffers("input", sizes), arrays, sizes):
            shape = tvm_ffi.Shape(list(np.shape(a)))
            dst = self._view(buf, shape, "int32", 0)
            self._copy(self._view(recv, shape, "int32", 4 * offset), dst)
            views.append(dst)
            offset += n
        return views

    def _buffers(self, kind: str, sizes: list[int]) -> list:
        """Int32 buffers on every worker of at least ``sizes`` elements, kept and grown by doubling
        (allocating is a device malloc, too slow for every step)."""
        held = self._held.setdefault(kind, [])
        for i, n in enumerate(sizes):
            if i == len(held):
                held.append((0, None))
            if held[i][0] < n:
                cap = max(2 * held[i][0], n, 1024)
                held[i] = (cap, self.sess.empty((cap,), "int32"))
        return [buf for _, buf in held[:len(sizes)]]

    def item(self, result, i: int):
        return self._getitem(result, i)

    def numpy(self, x, shape, dtype) -> np.ndarray:
        host = tvm.runtime.empty(tuple(shape), dtype)
        self.sess.copy_from_worker_0(host, x)
        self.sess.sync_worker_0()
        return host.numpy()

    def load_params(self, root: Path, spec: dict):
        return self.sess.get_global_func("qoqc.tp.load_params")(str(root), json.dumps(spec))

    def close(self) -> None:
        """Drop every reference to the workers' objects, then the session: the session's destructor
        (the last reference gone) shuts the workers down and reaps their processes. Shutting down
        first would leave the objects' release messages to pipes nobody reads: fatal."""
        self.vm = self._view = self._getitem = self._bcast = self._copy = None
        self._held = {}
        self.sess = None


class TPEngine(Engine):
    """An ``Engine`` (same interface and options) for an artifact compiled with ``--tensor-parallel N``:
    N Disco workers, on GPUs 0..N-1 (``device="cuda"``) or on this CPU (``device="cpu"``, with the
    shared-memory collectives: for testing the sharded model, not for speed)."""

    def _check_devices(self, device: str) -> None:
        if self.shards == 1:
            raise QoqcError(f"artifact {self.path} is not sharded: load it with Engine (or compile it with "
                            "--tensor-parallel N)")
        if device == "cuda":
            present = sum(1 for i in range(self.shards) if tvm.cuda(i).exist)
            if present < self.shards:
                raise QoqcError(f"artifact {self.path} is sharded for {self.shards} GPUs; this machine has {present}")
            for i in range(1, self.shards):  # the controller checked GPU 0's architecture; the others must match
                if tvm.cuda(i).compute_version != self.device.compute_version:
                    raise QoqcError(f"GPU {i} is sm_{tvm.cuda(i).compute_version.replace('.', '')}, GPU 0 is "
                                    f"sm_{self.device.compute_version.replace('.', '')}: tensor parallelism needs "
                                    "identical GPUs")

    def _runtime(self) -> DiscoRuntime:
        kind = "cuda" if self.manifest["target"]["kind"] == "cuda" else "cpu"
        return DiscoRuntime(self.path / self.manifest["library"], self.shards, kind)

    def close(self) -> None:
        """End the workers (``DiscoRuntime.close``), this engine's objects on them first."""
        with self.lock:
            self.params = self.kv = self._f = self._argmax = None
            self.rt.close()

    def __del__(self):
        rt = getattr(self, "rt", None)
        if rt is not None:
            rt.close()


__all__ = ["DiscoRuntime", "TPEngine"]
