"""A compiled model loaded on one device, and its serving primitives.

Needs only the artifact, ``tvm.runtime`` and a tokenizer; no compiler stage is imported.

A sequence lives in the paged KV cache under an integer id that the block manager
(``kv_cache.BlockManager``, the one owner of pages) hands out. One forward step declares which
sequences advance and by how many tokens, is granted its pages by the block manager, and runs an
entry point over their concatenated tokens:
    prefill: tokens of one or more sequences, packed up to ``prefill_chunk_size`` per call
    decode:  one token for each of B sequences
Every public method holds ``lock`` (re-entrant) around device work and the block manager, so one
model may be used from several threads: calls run one at a time.

Where the module runs is the model's runtime (``rt``): ``LocalRuntime`` here, the VM on one device
of this process; ``tp.DiscoRuntime`` for a tensor-parallel artifact, the same VM on each of N Disco
workers. Both offer the calls the model and its KV cache make: ``function``, ``global_func``,
``empty``, ``inputs`` (host arrays to the device), ``item`` (of a returned tuple), ``numpy``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors.numpy import load_file

from ..config import ModelConfig
from ..errors import QoqcError
from ..tvm_env import tvm
from .artifact import check_compatible, check_device_code, random_params, read_manifest
from .kv_cache import (BlockManager, KV4PagedCache, TVMPagedCache, bytes_per_token, capacity_tokens,
                       parse_memory)

from tvm.runtime.vm import VirtualMachine  # noqa: E402

PAGE_SIZE = 16  # TVM's paged KV-cache kernels are generated for 16-token pages (older manifests name none)


class Model:
    """An artifact on ``device``.

    The KV cache holds ``kv_memory`` (bytes, "4GiB", or a fraction of the device's free memory,
    ``kv_cache.parse_memory``) or else ``max_total_tokens`` tokens over all live sequences (default:
    the model's context window, at most 8192); a sequence holds at most the model's context window
    or the whole cache, whichever is less. ``max_batch_size`` bounds the sequences of one step.
    """

    def __init__(self, path: str | Path, device: str = "cpu", max_total_tokens: int | None = None,
                 max_batch_size: int = 8, prefill_chunk_size: int = 2048, verify: bool = True,
                 kv_memory: int | float | str | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, verify=verify)
        check_compatible(self.manifest, self.path)
        self.config = ModelConfig.from_dict(self.manifest["model"])
        kind = self.manifest["target"]["kind"]
        if device not in ("cpu", "cuda"):
            raise QoqcError(f"invalid device {device!r} (choose cpu or cuda)")
        if (kind == "cuda") != (device == "cuda"):
            raise QoqcError(f"artifact {self.path} was compiled for {kind}; it cannot run on device {device!r}")
        for name, value in (("max_batch_size", max_batch_size), ("prefill_chunk_size", prefill_chunk_size),
                            ("max_total_tokens", max_total_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise QoqcError(f"{name} must be a whole number of at least 1 (got {value!r})")
        self.device = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
        self.shards = self.manifest.get("tensor_parallel", 1)
        self._check_devices(device)
        if kind == "cuda":
            check_device_code(self.manifest, self.path, self.device.compute_version, self.device.device_name)
        cache = self.manifest.get("kv_cache", {"kind": "tvm-paged"})
        if cache["kind"] not in ("kv4-paged", "tvm-paged"):
            raise QoqcError(f"artifact {self.path} needs a KV cache of kind {cache['kind']!r}, "
                            "which this qoqc does not know (a newer qoqc wrote it?)")
        self.page_size = cache.get("page_size", PAGE_SIZE)
        # KV heads per device: a tensor-parallel shard holds 1/N of them
        self.device_config = self.config.shard(self.shards)
        self.kv_bytes_per_token = bytes_per_token(self.device_config, cache["kind"],
                                                  self.manifest.get("dtype", "float16"))
        if kv_memory is not None:
            self.cache_tokens = capacity_tokens(parse_memory(kv_memory), self.kv_bytes_per_token, self.page_size,
                                                self.device)
        else:
            self.cache_tokens = max_total_tokens or min(self.config.context_window, 8192)

        self.context_window = min(self.config.context_window, self.cache_tokens)
        self.max_batch_size = max_batch_size
        self.prefill_chunk_size = min(prefill_chunk_size, self.context_window)
        self.blocks = BlockManager(-(-self.cache_tokens // self.page_size), self.page_size)
        self.rt = self._runtime()
        try:
            self.params = self.rt.load_params(self.path, self.manifest["params"])
            if cache["kind"] == "kv4-paged":
                self.kv = KV4PagedCache(self.device_config, self.rt, self.blocks)
            else:
                self.kv = TVMPagedCache(self.rt, max_batch_size, self.cache_tokens, self.prefill_chunk_size,
                                        PAGE_SIZE)
            self._f = {name: self.rt.function(name) for name in ("prefill", "decode")}
            # greedy tokens chosen on the device (artifacts older than this entry point choose on the host)
            self._argmax = self.rt.function("argmax") if "argmax" in self.manifest.get("entry_points", ()) else None
        except BaseException:
            self.rt.close()
            raise
        self._tokenizer = None
        self.lock = threading.RLock()

    # ---------------------------------------------------------------- loading
    def _check_devices(self, device: str) -> None:
        if self.shards > 1:
            raise QoqcError(f"artifact {self.path} is sharded for {self.shards} devices (--tensor-parallel): "
                            "load it with TPEngine (qoqc chat and serve do)")
        if not self.device.exist:
            raise QoqcError(f"no {device} device on this machine")

    def _runtime(self) -> "LocalRuntime":
        return LocalRuntime(self.path / self.manifest["library"], self.device)

    def close(self) -> None:
        """Release the runtime (a tensor-parallel model's workers); the model is unusable after."""
        self.rt.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def has_tokenizer(self) -> bool:
        return bool(self.manifest.get("tokenizer"))

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.has_tokenizer:
                raise QoqcError(f"artifact {self.path} has no tokenizer: pass token ids instead of text")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path / self.manifest["tokenizer"]))
        return self._tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def prompt_ids(self, prompt: str | Sequence[int], room: int = 1) -> list[int]:
        """Validated token ids of a prompt that leaves ``room`` free positions in the context."""
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise QoqcError("a prompt is a string or a sequence of token ids") from None
        if not ids:
            raise QoqcError("empty prompt")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise QoqcError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) + room > self.context_window:
            held = f" after the {room - 1} tokens the sequence already holds" if room > 1 else ""
            note = " (it must leave room for at least one new token)" if room else ""
            raise QoqcError(f"prompt has {len(ids)} tokens{held}, over the context window of "
                            f"{self.context_window}{note}")
        return ids

    # ---------------------------------------------------------------- sequences (the serving primitives)
    def add_sequence(self) -> int:
        """Open an empty sequence in the KV cache and return its id."""
        with self.lock:
            sid = self.blocks.open()
            self.kv.add(sid)
            return sid

    def remove_sequence(self, seq_id: int) -> None:
        """Free a sequence's KV-cache pages."""
        with self.lock:
            self._known(seq_id)
            self.kv.remove(seq_id)
            self.blocks.close(seq_id)

    def sequence_length(self, seq_id: int) -> int:
        """Tokens a sequence holds in the KV cache."""
        with self.lock:
            self._known(seq_id)
            return self.blocks.lengths[seq_id]

    def truncate_sequence(self, seq_id: int, length: int) -> None:
        """Drop a sequence's last tokens so that it holds ``length`` (e.g. to re-use a shared prefix)."""
        with self.lock:
            held = self.sequence_length(seq_id)
            if not 0 <= length <= held:
                raise QoqcError(f"cannot truncate sequence {seq_id} of {held} tokens to {length}")
            if length < held:
                self.kv.truncate(seq_id, held - length)
                self.blocks.truncate(seq_id, length)

    def _known(self, seq_id: int) -> None:
        if seq_id not in self.blocks.lengths:
            raise QoqcError(f"sequence {seq_id} is not open (add_sequence first)")

    def _step(self, fn: str, seq_ids: list[int], lens: list[int], *args):
        """Run one step of an entry point after the block manager granted it; logits stay on the device."""
        for s in seq_ids:
            self._known(s)
        if len(set(seq_ids)) != len(seq_ids):
            raise QoqcError("a sequence appears twice in one step")
        if len(seq_ids) > self.max_batch_size:
            raise QoqcError(f"{len(seq_ids)} sequences in one step; this engine batches at most {self.max_batch_size}")
        for s, n in zip(seq_ids, lens):
            if self.blocks.lengths[s] + n > self.context_window:
                raise QoqcError(f"sequence {s} would hold {self.blocks.lengths[s] + n} tokens, over the context "
                                f"window of {self.context_window}")
        self.blocks.append(dict(zip(seq_ids, lens)))
        return self.kv.run(lambda *a: self._f[fn](*a, self.params), seq_ids, lens, list(args))

    def _prefill_call(self, batch: list[tuple[int, list[int]]], all_logits: bool) -> np.ndarray:
        ids = np.array([[t for _, tk in batch for t in tk]], dtype="int32")
        ends = np.cumsum([len(tk) for _, tk in batch])
        pos = np.arange(ends[-1], dtype="int32") if all_logits else (ends - 1).astype("int32")
        logits = self._step("prefill", [sid for sid, _ in batch], [len(tk) for _, tk in batch], ids, pos)
        return self.rt.numpy(logits, (1, len(pos), self.config.vocab_size), "float32")[0]

    def prefill(self, items: list[tuple[int, list[int]]], all_logits: bool = False) -> list[np.ndarray]:
        """Feed each (seq_id, tokens) (distinct sequences), packed ``prefill_chunk_size`` tokens a
        call; return per item its last row of logits (or all rows)."""
        out: list[list[np.ndarray]] = [[] for _ in items]
        pending = [(i, sid, list(toks)) for i, (sid, toks) in enumerate(items)]
        with self.lock:
            while pending:
                batch, budget = [], self.prefill_chunk_size
                while pending and budget > 0 and len(batch) < self.max_batch_size:
                    i, sid, toks = pending.pop(0)
                    batch.append((i, sid, toks[:budget]))
                    if len(toks) > budget:
                        pending.insert(0, (i, sid, toks[budget:]))
                    budget -= len(batch[-1][2])
                logits = self._prefill_call([(sid, tk) for _, sid, tk in batch], all_logits)
                ends = np.cumsum([len(tk) for _, _, tk in batch])
                starts = np.concatenate([[0], ends[:-1]])
                for k, (i, _, _) in enumerate(batch):
                    out[i].append(logits[starts[k]:ends[k]] if all_logits else logits[k:k + 1])
        return [np.concatenate(rows) if all_logits else rows[-1][0] for rows in out]

    def decode(self, seq_ids: list[int], tokens: list[int]) -> np.ndarray:
        """Append one token to each sequence; return their next-token logits [B, vocab]."""
        with self.lock:
            logits = self._step("decode", seq_ids, [1] * len(seq_ids), np.array(tokens, dtype="int32")[:, None])
            return self.rt.numpy(logits, (len(seq_ids), 1, self.config.vocab_size), "float32")[:, 0]

    def decode_greedy(self, seq_ids: list[int], tokens: list[int]) -> list[int]:
        """``decode``, then each sequence's most likely next token (the first on ties), chosen on the
        device: B token ids cross to the host instead of B x vocab logits."""
        with self.lock:
            logits = self._step("decode", seq_ids, [1] * len(seq_ids), np.array(tokens, dtype="int32")[:, None])
            if self._argmax is None:
                shape = (len(seq_ids), 1, self.config.vocab_size)
                return self.rt.numpy(logits, shape, "float32")[:, 0].argmax(axis=1).tolist()
            return self.rt.numpy(self._argmax(logits), (len(seq_ids),), "int32").tolist()

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [len(ids), vocab] (float32) of a whole sequence, for evaluation."""
        ids = self.prompt_ids(ids, room=0)
        with self.lock:
            sid = self.add_sequence()
            try:
                return self.prefill([(sid, ids)], all_logits=True)[0]
            finally:
                self.remove_sequence(sid)


class LocalRuntime:
    """The compiled module's VM on one device of this process."""

    def __init__(self, library: Path, device):
        self.device = device
        self.vm = VirtualMachine(tvm.runtime.load_module(str(library)), device)

    def function(self, name: str):
        return self.vm[name]

    def global_func(self, name: str):
        return tvm.get_global_func(name)

    def empty(self, shape, dtype: str):
        return tvm.runtime.empty(shape, dtype, self.device)

    def inputs(self, arrays: list[np.ndarray]) -> list:
        return [tvm.runtime.tensor(a, self.device) for a in arrays]

    def item(self, result, i: int):
        return result[i]

    def numpy(self, x, shape, dtype) -> np.ndarray:
        return x.numpy()

    def load_params(self, root: Path, spec: dict) -> list:
        return [tvm.runtime.tensor(a, self.device) for a in read_params(root, spec, spec.get("files", []))]

    def close(self) -> None:
        """Nothing to release: the VM and its tensors go with the model."""


def read_params(root: Path, spec: dict, files: list[str]) -> list[np.ndarray]:
    """The host arrays of ``spec`` (``manifest["params"]``) from ``files``, or drawn at random."""
    if "random" in spec:  # an artifact compiled from a config alone (benchmarks)
        return list(random_params(spec))
    arrays: dict[str, np.ndarray] = {}
    for f in files:
        arrays.update(load_file(str(root / f)))
    missing = [n for n in spec["names"] if n not in arrays]
    if missing:
        raise QoqcError(f"corrupt artifact: parameter {missing[0]} missing from {root}")
    return [arrays[n] for n in spec["names"]]
