"""A directory of kernels and artifacts built on a CPU machine for a GPU check, and how to use it.

``python bench/gpu_check.py prepare DIR`` writes it; the GPU test lane (``tests/gpu``) and the
stages of ``gpu_check.py run`` read it through ``Prebuilt``, with TVM's runtime libraries only:

    DIR/prepared.json   what was built: mode (full: Llama-3-8B shapes; tiny: a pipeline check),
                        archs, the shapes of every kernel, the e2e models and their llvm greedy
                        tokens, the serving configs, the runtime's files
    DIR/kernels/cuda.so every kernel at the prepared shapes, device code ahead of time (fatbin);
                        symbols: ``gemm_SHAPE_GROUP`` (tensor-core W4A8 GEMM; GROUP g128 or chn),
                        ``rope_q_rotated``, ``kv4_append`` (both Hadamard-rotating, as the
                        *-w4a8kv4 schemes), ``kv4_attention``, ``kv4_merge``, ``kv4_prefill``,
                        ``act_KIND`` (``act_quant`` at the shape's K), ``argmax``
    DIR/kernels/llvm.so tiny mode only: the same symbols for llvm (the portable GEMM, the CPU forms
                        of the KV4 and activation kernels; ``kv4_prefill`` has none, attention
                        serves it), the stand-ins a dry run executes on a CPU
    DIR/e2e/NAME-DEVICE artifacts of the e2e models (llvm ones in tiny mode only: in full mode only
                        their greedy tokens travel)
    DIR/serving/SCHEME-DEVICE  artifacts of random weights (drawn at load) for the serving stage
    DIR/rt/             TVM without its compiler library, and the apache-tvm-ffi cp312 wheel

``Kernels`` gives each kernel as a callable with the model's calling convention, hiding what the
stand-ins differ in (the portable GEMM also writes its int32 accumulators; prefill on a CPU runs
the split attention kernel and its merge).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PREPARED = "prepared.json"
GROUPS = {"g128": 128, "chn": None}


def gemm_symbol(shape: str, group: str) -> str:
    return f"gemm_{shape}_{group}"


def act_symbol(kind: str) -> str:
    return f"act_{kind}"


class Kernels:
    """The prebuilt kernel module of one device ("cuda" or "cpu") as callables over TVM tensors."""

    def __init__(self, prebuilt: "Prebuilt"):
        from qoq_compiler.tvm_env import tvm

        self.tvm, self.dev, self.spec = tvm, prebuilt.dev, prebuilt.spec
        self.standin = prebuilt.device == "cpu"
        self.module = tvm.runtime.load_module(str(prebuilt.root / self.spec["kernels"][prebuilt.device]))
        attn = self.spec["attention"]
        self.workspace = self.tensor(np.zeros(attn["workspace"][prebuilt.device], np.float32))

    def tensor(self, a: np.ndarray):
        return self.tvm.runtime.tensor(np.ascontiguousarray(a), self.dev)

    def gemm(self, shape: str, group: str):
        """f(qx, sx, qw, s1, e0, e1, y): y fp16 [M, N] (the stand-in also fills an int32 psum)."""
        f = self.module[gemm_symbol(shape, group)]
        if not self.standin:
            return f
        n = self.spec["gemm"]["shapes"][shape][0]
        psum: dict[int, object] = {}

        def portable(qx, sx, qw, s1, e0, e1, y):
            m = qx.shape[0]
            if m not in psum:
                psum[m] = self.tensor(np.zeros((m, n), np.int32))
            f(qx, sx, qw, s1, e0, e1, psum[m], y)
        return portable

    def rope_q(self, qkv, positions, out) -> None:
        """RoPE of q, then the Hadamard rotation: out [T, Hq, D]."""
        self.module["rope_q_rotated"](qkv, positions, out)

    def append(self, data, param, qkv, positions, slots, layer: int) -> None:
        self.module["kv4_append"](data, param, qkv, positions, slots, layer)

    def attention(self, q, data, param, positions, token_seq, table, layer: int, out) -> None:
        """Decode attention: the split kernel, then the merge of its splits."""
        self.module["kv4_attention"](q, data, param, positions, token_seq, table, layer, out, self.workspace)
        self.module["kv4_merge"](out, self.workspace, positions)

    def prefill(self, q, data, param, positions, token_seq, table, layer: int, out) -> None:
        """Prefill attention: the tensor-core kernel (the split kernel on a CPU)."""
        if self.standin:
            self.attention(q, data, param, positions, token_seq, table, layer, out)
        else:
            self.module["kv4_prefill"](q, data, param, positions, token_seq, table, layer, out)

    def act_quant(self, kind: str):
        return self.module[act_symbol(kind)]

    def argmax(self):
        return self.module["argmax"]


@dataclass
class Prebuilt:
    """``DIR`` as prepared, on ``device`` ("cuda", or "cpu" for the stand-ins of a tiny DIR)."""

    root: Path
    spec: dict
    device: str

    @classmethod
    def open(cls, root: str | Path, device: str | None = None) -> "Prebuilt":
        root = Path(root)
        spec = json.loads((root / PREPARED).read_text())
        device = device or os.environ.get("QOQC_GPU_DEVICE", "cuda")
        if device not in spec["kernels"]:
            raise ValueError(f"{root} was prepared in {spec['mode']} mode: no kernels for {device}")
        return cls(root, spec, device)

    @property
    def dev(self):
        from qoq_compiler.tvm_env import tvm

        return tvm.cuda(0) if self.device == "cuda" else tvm.cpu(0)

    def kernels(self) -> Kernels:
        return Kernels(self)

    def artifact(self, entry: dict) -> Path:
        """The artifact of an e2e or serving entry for this device."""
        return self.root / entry[self.device]
