"""Load an artifact and run it: prefill, decode, sampling, streaming text.

Needs only the artifact, ``tvm.runtime`` and a tokenizer; no compiler stage is imported.

A sequence lives in the paged KV cache under an integer id. One forward step declares which
sequences advance and by how many tokens (``kv_state_begin_forward``), runs an entry point over
their concatenated tokens, and closes (``kv_state_end_forward``):
    prefill: tokens of one or more sequences, packed up to ``prefill_chunk_size`` per call
    decode:  one token for each of B sequences
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from safetensors.numpy import load_file

from ..config import ModelConfig
from ..errors import QoqcError
from ..tvm_env import tvm
from .artifact import check_device_code, random_params, read_manifest
from .kv_cache import KV4PagedCache, TVMPagedCache, bytes_per_token, capacity_tokens, parse_memory

from tvm.runtime.vm import VirtualMachine  # noqa: E402

PAGE_SIZE = 16  # TVM's paged KV-cache kernels are generated for 16-token pages (older manifests name none)


@dataclass
class GenerationResult:
    """One request's output: ``token_ids`` and ``text`` hold the new tokens only."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str  # "eos", "stop" (a stop string), "length" (max_new_tokens or context)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.token_ids) - 1  # the first new token comes from prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds else 0.0


@dataclass
class _Request:
    seq_id: int
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    rng: np.random.Generator
    out: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    streaming: bool = False  # text is needed at every step (streaming or stop strings), else only at the end


class TextStream:
    """Iterates over text pieces as they are generated; ``result`` is set once exhausted."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._pieces


class Engine:
    """A compiled model loaded on one device.

    The KV cache holds ``kv_memory`` (bytes, "4GiB", or a fraction of the device's free memory,
    ``kv_cache.parse_memory``) or else ``max_total_tokens`` tokens over all live sequences (default:
    the model's context window, at most 8192); a sequence holds at most the model's context window
    or the whole cache, whichever is less. ``max_batch_size`` bounds the sequences decoded together.
    """

    def __init__(self, path: str | Path, device: str = "cpu", max_total_tokens: int | None = None,
                 max_batch_size: int = 8, prefill_chunk_size: int = 2048, verify: bool = True,
                 kv_memory: int | float | str | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, verify=verify)
        self.config = ModelConfig.from_dict(self.manifest["model"])
        kind = self.manifest["target"]["kind"]
        if device not in ("cpu", "cuda"):
            raise QoqcError(f"invalid device {device!r} (choose cpu or cuda)")
        if (kind == "cuda") != (device == "cuda"):
            raise QoqcError(f"artifact {self.path} was compiled for {kind}; it cannot run on device {device!r}")
        self.device = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
        if not self.device.exist:
            raise QoqcError(f"no {device} device on this machine")
        if kind == "cuda":
            check_device_code(self.manifest, self.path, self.device.compute_version, self.device.device_name)
        cache = self.manifest.get("kv_cache", {"kind": "tvm-paged"})
        if cache["kind"] not in ("kv4-paged", "tvm-paged"):
            raise QoqcError(f"artifact {self.path} needs a KV cache of kind {cache['kind']!r}, "
                            "which this qoqc does not know (a newer qoqc wrote it?)")
        self.page_size = cache.get("page_size", PAGE_SIZE)
        self.kv_bytes_per_token = bytes_per_token(self.config, cache["kind"], self.manifest.get("dtype", "float16"))
        if kv_memory is not None:
            self.cache_tokens = capacity_tokens(parse_memory(kv_memory), self.kv_bytes_per_token, self.page_size,
                                                self.device)
        else:
            self.cache_tokens = max_total_tokens or min(self.config.context_window, 8192)

        self.vm = VirtualMachine(tvm.runtime.load_module(str(self.path / self.manifest["library"])), self.device)
        self.params = self._load_params()
        self.context_window = min(self.config.context_window, self.cache_tokens)
        self.max_batch_size = max_batch_size
        self.prefill_chunk_size = min(prefill_chunk_size, self.context_window)
        if cache["kind"] == "kv4-paged":
            self.kv = KV4PagedCache(self.config, self.device, self.cache_tokens, self.page_size)
        else:
            self.kv = TVMPagedCache(self.vm, self.device, max_batch_size, self.cache_tokens,
                                    self.prefill_chunk_size, PAGE_SIZE)
        self._f = {name: self.vm[name] for name in ("prefill", "decode")}
        # greedy tokens chosen on the device (artifacts older than this entry point choose on the host)
        self._argmax = self.vm["argmax"] if "argmax" in self.manifest.get("entry_points", ()) else None
        self._next_seq = 0
        self._lengths: dict[int, int] = {}  # tokens held per live sequence
        self._tokenizer = None

    # ---------------------------------------------------------------- loading
    def _load_params(self) -> list:
        spec = self.manifest["params"]
        if "random" in spec:  # an artifact compiled from a config alone (benchmarks)
            return [tvm.runtime.tensor(a, self.device) for a in random_params(spec)]
        arrays: dict[str, np.ndarray] = {}
        for f in spec["files"]:
            arrays.update(load_file(str(self.path / f)))
        missing = [n for n in spec["names"] if n not in arrays]
        if missing:
            raise QoqcError(f"corrupt artifact: parameter {missing[0]} missing from {self.path}")
        return [tvm.runtime.tensor(arrays[n], self.device) for n in spec["names"]]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            sub = self.manifest.get("tokenizer")
            if not sub:
                raise QoqcError(f"artifact {self.path} has no tokenizer: pass token ids instead of text")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path / sub))
        return self._tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _ids(self, prompt: str | Sequence[int], room: int = 1) -> list[int]:
        """Validated token ids of a prompt that leaves ``room`` free positions in the context."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
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

    # ---------------------------------------------------------------- sequence steps (the serving primitives)
    def add_sequence(self) -> int:
        """Open an empty sequence in the KV cache and return its id."""
        sid = self._next_seq
        self._next_seq += 1
        self.kv.add(sid)
        self._lengths[sid] = 0
        return sid

    def remove_sequence(self, seq_id: int) -> None:
        """Free a sequence's KV-cache pages."""
        self.kv.remove(seq_id)
        del self._lengths[seq_id]

    def sequence_length(self, seq_id: int) -> int:
        """Tokens a sequence holds in the KV cache."""
        return self._lengths[seq_id]

    def truncate_sequence(self, seq_id: int, length: int) -> None:
        """Drop a sequence's last tokens so that it holds ``length`` (e.g. to re-use a shared prefix)."""
        if not 0 <= length <= self._lengths[seq_id]:
            raise QoqcError(f"cannot truncate sequence {seq_id} of {self._lengths[seq_id]} tokens to {length}")
        if length < self._lengths[seq_id]:
            self.kv.truncate(seq_id, self._lengths[seq_id] - length)
            self._lengths[seq_id] = length

    def _reserve(self, seq_ids: list[int], lens: list[int]) -> None:
        """Check a step against the cache's limits before TVM's cache is touched."""
        unknown = [s for s in seq_ids if s not in self._lengths]
        if unknown:
            raise QoqcError(f"sequence {unknown[0]} is not open (add_sequence first)")
        if len(set(seq_ids)) > self.max_batch_size:
            raise QoqcError(f"{len(set(seq_ids))} sequences in one step; this engine batches at most "
                            f"{self.max_batch_size}")
        after = dict(self._lengths)
        for s, n in zip(seq_ids, lens):
            after[s] += n
            if after[s] > self.context_window:
                raise QoqcError(f"sequence {s} would hold {after[s]} tokens, over the context window of "
                                f"{self.context_window}")
        pages = sum(-(-n // self.page_size) for n in after.values())
        if pages > -(-self.cache_tokens // self.page_size):
            raise QoqcError(f"the KV cache is full: {sum(after.values())} tokens in {len(after)} sequences need "
                            f"{pages} pages of {self.page_size}, the cache holds {self.cache_tokens} tokens")
        self._lengths = after

    def _step(self, fn: str, seq_ids: list[int], lens: list[int], *args):
        """Run one step of an entry point; its logits stay on the device."""
        self._reserve(seq_ids, lens)
        return self.kv.run(lambda *a: self._f[fn](*a, self.params), seq_ids, lens, list(args))

    def _forward(self, fn: str, seq_ids: list[int], lens: list[int], *args) -> np.ndarray:
        logits = self._step(fn, seq_ids, lens, *args).numpy()
        return logits[0] if fn == "prefill" else logits[:, 0]

    def prefill(self, items: list[tuple[int, list[int]]], all_logits: bool = False) -> list[np.ndarray]:
        """Feed each (seq_id, tokens); return per item its last row of logits (or all rows)."""
        out: list[list[np.ndarray]] = [[] for _ in items]
        pending = [(i, sid, toks) for i, (sid, toks) in enumerate(items)]
        while pending:
            batch, budget = [], self.prefill_chunk_size
            while pending and budget > 0 and len(batch) < self.max_batch_size:
                i, sid, toks = pending.pop(0)
                take = toks[:budget]
                batch.append((i, sid, take))
                if len(toks) > budget:
                    pending.insert(0, (i, sid, toks[budget:]))
                budget -= len(take)
            ids = np.array([[t for _, _, tk in batch for t in tk]], dtype="int32")
            ends = np.cumsum([len(tk) for _, _, tk in batch])
            if all_logits:
                pos = np.arange(ends[-1], dtype="int32")
            else:
                pos = (ends - 1).astype("int32")
            logits = self._forward("prefill", [sid for _, sid, _ in batch], [len(tk) for _, _, tk in batch],
                                   tvm.runtime.tensor(ids, self.device), tvm.runtime.tensor(pos, self.device))
            starts = np.concatenate([[0], ends[:-1]])
            for k, (i, _, _) in enumerate(batch):
                out[i].append(logits[starts[k]:ends[k]] if all_logits else logits[k:k + 1])
        return [np.concatenate(rows) if all_logits else rows[-1][0] for rows in out]

    def decode(self, seq_ids: list[int], tokens: list[int]) -> np.ndarray:
        """Append one token to each sequence; return their next-token logits [B, vocab]."""
        ids = tvm.runtime.tensor(np.array(tokens, dtype="int32")[:, None], self.device)
        return self._forward("decode", seq_ids, [1] * len(seq_ids), ids)

    def decode_greedy(self, seq_ids: list[int], tokens: list[int]) -> list[int]:
        """``decode``, then each sequence's most likely next token (the first on ties), chosen on the
        device: B token ids cross to the host instead of B x vocab logits."""
        ids = tvm.runtime.tensor(np.array(tokens, dtype="int32")[:, None], self.device)
        logits = self._step("decode", seq_ids, [1] * len(seq_ids), ids)
        if self._argmax is None:
            return logits.numpy()[:, 0].argmax(axis=1).tolist()
        return self._argmax(logits).numpy().tolist()

    def _decode_next(self, reqs: list[_Request]) -> list[int]:
        """One decode step for ``reqs`` and each one's next token: on the device when all are greedy."""
        seq_ids, tokens = [r.seq_id for r in reqs], [r.out[-1] for r in reqs]
        if all(r.temperature == 0.0 for r in reqs):
            return self.decode_greedy(seq_ids, tokens)
        return [self._sample(row, r) for r, row in zip(reqs, self.decode(seq_ids, tokens))]

    # ---------------------------------------------------------------- public API
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [len(ids), vocab] (float32) of a whole sequence, for evaluation."""
        ids = self._ids(ids, room=0)
        sid = self.add_sequence()
        try:
            return self.prefill([(sid, ids)], all_logits=True)[0]
        finally:
            self.remove_sequence(sid)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, stop: str | Iterable[str] | None = None, seed: int | None = None
                 ) -> GenerationResult:
        return self.generate_batch([prompt], max_new_tokens, temperature, top_p, stop, seed)[0]

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, stop: str | Iterable[str] | None = None, seed: int | None = None,
               sequence: int | None = None) -> TextStream:
        """Like ``generate``, but iterating yields text pieces as they are decoded.

        With ``sequence`` (an open sequence id) the prompt continues what that sequence already
        holds in the KV cache, and the sequence stays open afterwards: multi-turn chat re-uses
        the conversation so far instead of computing it again.
        """
        held = 0 if sequence is None else self.sequence_length(sequence)
        req = self._request(prompt, max_new_tokens, temperature, top_p, stop, seed, held)
        if sequence is not None:
            req.seq_id = sequence
        return TextStream(self._run(req))

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 256,
                       temperature: float = 0.0, top_p: float = 1.0, stop: str | Iterable[str] | None = None,
                       seed: int | None = None) -> list[GenerationResult]:
        """Generate for several prompts, any number of them, by in-flight batching (``Scheduler``):
        up to ``max_batch_size`` decode together and the others join as they finish; results in
        prompt order (prompt i sampled with seed + i)."""
        from .scheduler import Scheduler

        if not prompts:
            raise QoqcError("generate_batch needs at least one prompt")
        sched = Scheduler(self)
        ids = [sched.submit(p, max_new_tokens, temperature, top_p, stop, None if seed is None else seed + i)
               for i, p in enumerate(prompts)]  # every prompt is validated before any runs
        results = sched.run()
        return [results[i] for i in ids]

    def _request(self, prompt, max_new_tokens, temperature, top_p, stop, seed, held: int = 0) -> _Request:
        if max_new_tokens < 1:
            raise QoqcError("max_new_tokens must be at least 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise QoqcError(f"invalid sampling parameters temperature={temperature}, top_p={top_p}")
        ids = self._ids(prompt, room=1 + held)
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return _Request(-1, ids, min(max_new_tokens, self.context_window - held - len(ids)), temperature, top_p,
                        stops, np.random.default_rng(seed))

    def _run(self, r: _Request):
        """Generator: yields the text pieces of one request as it decodes; returns its result."""
        r.streaming = True
        opened = r.seq_id < 0
        if opened:
            r.seq_id = self.add_sequence()
        try:
            t0 = time.perf_counter()
            (first,) = self.prefill([(r.seq_id, r.prompt)])
            t1 = time.perf_counter()
            piece = self._accept(r, self._sample(first, r))
            while True:
                if piece:
                    yield piece
                if r.finish is not None:
                    break
                (token,) = self._decode_next([r])
                piece = self._accept(r, token)
            t2 = time.perf_counter()
        finally:
            if opened:
                self.remove_sequence(r.seq_id)
        return GenerationResult(r.out, r.text if self.manifest.get("tokenizer") else "", len(r.prompt), r.finish,
                                t1 - t0, t2 - t1)

    @staticmethod
    def _sample(logits: np.ndarray, r: _Request) -> int:
        if r.temperature == 0.0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / r.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if r.top_p < 1.0:
            order = np.argsort(-p)
            keep = order[: int(np.searchsorted(np.cumsum(p[order]), r.top_p)) + 1]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(r.rng.choice(len(p), p=p))

    def _accept(self, r: _Request, token: int) -> str:
        """Append a token; update text and finish state; return the newly final text."""
        r.out.append(token)
        if token in self.config.eos_token_ids:
            r.out.pop()
            r.finish = "eos"
        elif len(r.out) >= r.max_new_tokens:
            r.finish = "length"
        if not self.manifest.get("tokenizer") or (r.finish is None and not r.streaming and not r.stop):
            return ""  # detokenizing every step costs O(n) each: only done when someone reads it
        text = self.decode_text(r.out)
        for s in r.stop:
            cut = text.find(s)
            if cut >= 0:
                text, r.finish = text[:cut], "stop"
        if r.finish is None:
            # hold back an incomplete UTF-8 character and any tail that may begin a stop string
            safe = len(text.rstrip("\ufffd"))
            for s in r.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
            text = text[:safe]
            if not text.startswith(r.text):  # the tokenizer re-merged earlier text: wait
                return ""
        piece = text[len(r.text):] if text.startswith(r.text) else ""
        r.text = text
        return piece
