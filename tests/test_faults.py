"""Fault injection: a seeded random workload through the scheduler, with failures injected into the
device calls, interrupts between a call and its bookkeeping, and aborts, over a KV cache that holds
a fraction of the demand. After each run every request has ended with a reason, no page is held,
and every greedy request that finished equals the same request served alone."""

from __future__ import annotations

import numpy as np
import pytest

from qoq_compiler import load
from qoq_compiler.runtime.request import Request
from qoq_compiler.runtime.scheduler import Scheduler

CHUNK = 16


class Fault(RuntimeError):
    pass


def _workload(rng, context: int, vocab: int, n: int):
    """(arrival step, prompt, params, abort step or None) of n requests: prompt lengths at +-1 of
    every multiple of the prefill chunk and anywhere in 1..context, greedy and sampled, stop strings."""
    edges = [k * CHUNK + d for k in range(1, 4) for d in (-1, 0, 1)]
    out = []
    for i in range(n):
        length = int(rng.choice(edges)) if i % 2 else int(rng.integers(1, context - 8))
        max_new = int(rng.integers(1, min(24, context - length)))
        params = dict(max_new_tokens=max_new)
        if rng.random() < 0.3:
            params.update(temperature=0.8, top_p=0.9, seed=int(rng.integers(1 << 30)))
        if rng.random() < 0.2:
            params["stop"] = ["e", "th"][int(rng.integers(2))]
        prompt = [1] + rng.integers(3, vocab, size=length - 1).tolist()
        arrival = int(rng.integers(0, 40))
        abort = arrival + int(rng.integers(0, 30)) if rng.random() < 0.15 else None
        out.append((arrival, prompt, params, abort))
    return out


def _inject(monkeypatch, eng, rng, p: float):
    """Make device calls fail (before or after their pages are granted) and token bookkeeping be
    interrupted, each with probability p."""
    def flaky(obj, name, error):
        original = getattr(obj, name)

        def call(*args, **kwargs):
            if rng.random() < p:
                raise error("injected")
            return original(*args, **kwargs)
        monkeypatch.setattr(obj, name, call)

    flaky(eng, "prefill", Fault)
    flaky(eng, "decode", Fault)
    flaky(eng, "decode_greedy", KeyboardInterrupt)
    flaky(eng.kv, "run", Fault)  # after the block manager granted the step
    accept = Request.accept

    def interrupted_accept(self, *args):
        if rng.random() < p / 4:
            raise KeyboardInterrupt
        return accept(self, *args)
    monkeypatch.setattr(Request, "accept", interrupted_accept)


@pytest.mark.parametrize("cache,seed", [("kv4", 0), ("kv4", 1), ("kv4", 2), ("fp32", 3)])
def test_random_workload_with_faults(monkeypatch, kv4_artifact, tiny_artifacts, cache, seed):
    art = kv4_artifact if cache == "kv4" else tiny_artifacts["llama"]
    eng = load(art, max_total_tokens=112, max_batch_size=4, prefill_chunk_size=CHUNK)
    rng = np.random.default_rng(seed)
    work = _workload(rng, eng.context_window, eng.config.vocab_size, 40)
    sched = Scheduler(eng)
    _inject(monkeypatch, eng, np.random.default_rng(seed + 100), p=0.02)
    ids, aborts, faults, step = {}, {}, 0, 0
    while step < 2000 and (len(ids) < len(work) or not sched.done):
        for i, (arrival, prompt, params, abort) in enumerate(work):
            if arrival == step:
                ids[i] = sched.submit(prompt, **params)
                if abort is not None:
                    aborts[abort] = aborts.get(abort, []) + [ids[i]]
        for rid in aborts.get(step, []):
            sched.abort(rid)
        try:
            sched.step()
        except (Fault, KeyboardInterrupt):
            faults += 1
        step += 1
    monkeypatch.undo()

    assert len(ids) == len(work) and sched.done and not sched.requests
    assert sorted(sched.results) == sorted(ids.values())  # nothing lost
    assert eng.blocks.used == 0 and not eng.blocks.lengths  # no page held
    reasons = [sched.results[rid].finish_reason for rid in ids.values()]
    assert set(reasons) <= {"eos", "stop", "length", "abort", "error"}
    assert faults > 0 and "error" in reasons and "abort" in reasons
    finished = [(i, rid) for i, rid in ids.items() if sched.results[rid].finish_reason in ("eos", "stop", "length")
                and "temperature" not in work[i][2]]
    assert len(finished) >= 8
    for i, rid in finished:
        _, prompt, params, _ = work[i]
        assert sched.results[rid].token_ids == eng.generate(prompt, **params).token_ids, (i, params)
