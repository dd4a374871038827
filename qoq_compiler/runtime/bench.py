"""Serving speed of an artifact, measured as QServe measures it (``qserve_benchmark.py``).

throughput  B sequences of ``input_len`` random token ids each generate ``output_len`` tokens
            (greedy, EOS ignored), all admitted at once (QServe's non-IFB benchmark mode): one
            batched prefill (packed ``prefill_chunk_size`` tokens per call), then ``output_len - 1``
            batched decode steps. tokens/s = B x output_len / wall time of the round, prefill
            included. ``warmup`` rounds first (QServe: 2 of 3), then the mean of ``repeats`` rounds.
            B is the largest batch whose KV cache fits the memory budget (whole pages of
            input_len + output_len tokens per sequence), at most ``MAX_BATCH`` (QServe's
            max_num_seqs), or the batch asked for, refused when it does not fit.
latency     batch 1: time to first token (prefill of the prompt and its first token) and decode
            tokens/s over the other output_len - 1 tokens, medians over ``repeats`` rounds.

Decode steps choose tokens on the device (``Engine.decode_greedy``): B ids come back, not logits.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import QoqcError
from ..tvm_env import tvm
from .artifact import params_bytes, read_manifest
from .engine import Engine, load
from .model import PAGE_SIZE
from .kv_cache import bytes_per_token, free_memory, parse_memory

MAX_BATCH = 256
DEFAULT_KV_MEMORY = {"cuda": 0.9, "cpu": "4GiB"}  # of the memory left beside the weights, on GPUs


@dataclass
class ThroughputResult:
    batch: int
    input_len: int
    output_len: int
    cache_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.output_len / self.seconds


@dataclass
class LatencyResult:
    input_len: int
    output_len: int
    ttft_seconds: float
    decode_tokens_per_s: float


def plan_batch(path: str | Path, device: str, input_len: int, output_len: int, batch: int | None,
               kv_memory=None) -> tuple[int, int]:
    """(batch, KV-cache tokens) for ``input_len + output_len`` tokens per sequence.

    The budget is ``kv_memory`` (``kv_cache.parse_memory``; a fraction applies to the device's free
    memory less the artifact's weights) or ``DEFAULT_KV_MEMORY``; the batch is the largest that
    fits, at most ``MAX_BATCH``, or ``batch``, which must fit."""
    if input_len < 1 or output_len < 1:
        raise QoqcError(f"--input-len and --output-len must be at least 1 (got {input_len}, {output_len})")
    if batch is not None and batch < 1:
        raise QoqcError(f"--batch must be at least 1 (got {batch})")
    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    if not dev.exist:
        raise QoqcError(f"no {device} device on this machine")
    manifest = read_manifest(Path(path), verify=False)
    config = ModelConfig.from_dict(manifest["model"])
    if input_len + output_len > config.context_window:
        raise QoqcError(f"{input_len} + {output_len} tokens per sequence exceed the model's context window of "
                        f"{config.context_window}")
    cache = manifest.get("kv_cache", {"kind": "tvm-paged"})
    page = cache.get("page_size", PAGE_SIZE)
    # per device: a tensor-parallel shard holds 1/N of the KV heads
    per_token = bytes_per_token(config.shard(manifest.get("tensor_parallel", 1)), cache["kind"],
                                manifest.get("dtype", "float16"))
    budget = parse_memory(DEFAULT_KV_MEMORY[device] if kv_memory is None else kv_memory)
    if isinstance(budget, float):
        budget = int(budget * max(free_memory(dev) - params_bytes(manifest, Path(path)), 0))
    pages_per_seq = -(-(input_len + output_len) // page)
    fits = budget // (per_token * page) // pages_per_seq
    if batch is None:
        if fits == 0:
            raise QoqcError(f"a KV cache of {budget} bytes cannot hold one sequence of {input_len + output_len} "
                            f"tokens ({pages_per_seq * page * per_token} bytes)")
        batch = min(fits, MAX_BATCH)
    elif batch > fits:
        raise QoqcError(f"batch {batch} of {input_len + output_len} tokens needs "
                        f"{batch * pages_per_seq * page * per_token} bytes of KV cache; the budget of {budget} "
                        f"bytes holds {fits} sequences")
    return batch, batch * pages_per_seq * page


def _prompts(engine: Engine, batch: int, input_len: int, rng) -> list[list[int]]:
    return rng.integers(0, engine.config.vocab_size, size=(batch, input_len)).tolist()


def _round(engine: Engine, prompts: list[list[int]], output_len: int, bar) -> tuple[float, float]:
    """One round: (prefill seconds, decode seconds), sequences freed afterwards."""
    t0 = time.perf_counter()
    sids = [engine.add_sequence() for _ in prompts]
    try:
        tokens = [int(np.argmax(row)) for row in engine.prefill(list(zip(sids, prompts)))]
        t1 = time.perf_counter()
        for _ in range(output_len - 1):
            tokens = engine.decode_greedy(sids, tokens)
            bar.update(1)
        t2 = time.perf_counter()
    finally:
        for s in sids:
            engine.remove_sequence(s)
    return t1 - t0, t2 - t1


def _timed_rounds(engine: Engine, batch: int, input_len: int, output_len: int, warmup: int, repeats: int,
                  seed: int, progress: bool) -> list[tuple[float, float]]:
    """(prefill, decode) seconds of ``repeats`` rounds after ``warmup`` untimed ones, new prompts each."""
    rng = np.random.default_rng(seed)
    times = []
    with tqdm(total=(warmup + repeats) * (output_len - 1), unit="step", desc=f"batch {batch}",
              disable=not progress) as bar:
        for i in range(warmup + repeats):
            t = _round(engine, _prompts(engine, batch, input_len, rng), output_len, bar)
            if i >= warmup:
                times.append(t)
    return times


def throughput(path: str | Path, device: str, input_len: int = 1024, output_len: int = 512,
               batch: int | None = None, kv_memory=None, warmup: int = 2, repeats: int = 1, seed: int = 0,
               progress: bool = True) -> ThroughputResult:
    batch, cache_tokens = plan_batch(path, device, input_len, output_len, batch, kv_memory)
    with load(path, device=device, max_total_tokens=cache_tokens, max_batch_size=batch) as engine:
        times = _timed_rounds(engine, batch, input_len, output_len, warmup, repeats, seed, progress)
    return ThroughputResult(batch, input_len, output_len, cache_tokens, statistics.mean(t[0] for t in times),
                            statistics.mean(t[1] for t in times))


def latency(path: str | Path, device: str, input_len: int = 1024, output_len: int = 512, warmup: int = 1,
            repeats: int = 3, seed: int = 0, progress: bool = True) -> LatencyResult:
    if output_len < 2:
        raise QoqcError("latency mode needs --output-len of at least 2 (one decode step after the first token)")
    _, cache_tokens = plan_batch(path, device, input_len, output_len, 1)
    with load(path, device=device, max_total_tokens=cache_tokens, max_batch_size=1) as engine:
        times = _timed_rounds(engine, 1, input_len, output_len, warmup, repeats, seed, progress)
    return LatencyResult(input_len, output_len, statistics.median(t[0] for t in times),
                         statistics.median((output_len - 1) / t[1] for t in times))
