"""In-flight batching: requests served together (admitted mid-run, prompts fed in chunks, preempted
and recomputed when the KV cache runs out) produce what each produces served alone."""

from __future__ import annotations

import pytest

from qoq_compiler import load
from qoq_compiler.errors import QoqcError
from qoq_compiler.runtime.scheduler import Scheduler

PROMPT = [1, 45, 300, 17, 99, 260, 4, 511, 128, 77, 300, 12, 5, 6, 8, 9, 10, 11, 12, 13, 14, 200, 31, 7]


def _alone(eng, requests):
    return [eng.generate(p, **kw) for p, kw in requests]


def test_inflight_batching_equals_alone(kv4_artifact):
    eng = load(kv4_artifact, max_batch_size=4)
    stop_text = eng.generate(PROMPT[2:9], max_new_tokens=12).text
    requests = [(PROMPT[:3], dict(max_new_tokens=15)),
                (PROMPT, dict(max_new_tokens=6)),                                  # prefilled in 3 chunks
                (PROMPT[4:11], dict(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=3)),
                (PROMPT[10:], dict(max_new_tokens=9)),
                (PROMPT[2:9], dict(max_new_tokens=12, stop=stop_text[4:7]))]
    sched = Scheduler(eng, max_batch_size=2, prefill_chunk_size=8)
    ids = [sched.submit(p, **kw) for p, kw in requests[:3]]
    for _ in range(4):  # the first requests are decoding when the others arrive
        sched.step()
    assert sched.running and sched.waiting
    ids += [sched.submit(p, **kw) for p, kw in requests[3:]]
    results = sched.run()
    alone = _alone(eng, requests)
    assert [results[i].token_ids for i in ids] == [r.token_ids for r in alone]
    assert [results[i].text for i in ids] == [r.text for r in alone]
    assert results[ids[4]].finish_reason == "stop" and not results[ids[4]].text.endswith(stop_text[4:7])
    assert eng.blocks.used == 0 and not eng.blocks.lengths  # every sequence's pages were freed


def test_preemption_by_recompute_equals_alone(kv4_artifact):
    eng = load(kv4_artifact, max_total_tokens=64)  # 4 pages of 16 tokens; each request needs 3
    requests = [(PROMPT[i:i + 12], dict(max_new_tokens=30)) for i in (0, 5, 9)]
    sched = Scheduler(eng, max_batch_size=3)
    ids = [sched.submit(p, **kw) for p, kw in requests]
    results = sched.run()
    assert sum(results[i].preemptions for i in ids) > 0
    assert [results[i].token_ids for i in ids] == [r.token_ids for r in _alone(eng, requests)]
    assert eng.blocks.used == 0 and not eng.blocks.lengths


def test_submit_validates_now(kv4_artifact):
    sched = Scheduler(load(kv4_artifact))
    with pytest.raises(QoqcError, match="context window"):
        sched.submit([5] * 3000)
    with pytest.raises(QoqcError, match="sampling parameters"):
        sched.submit(PROMPT, temperature=-1.0)
    assert sched.done


def test_inflight_batching_on_tvm_paged_cache(tiny_artifacts):
    """The fp32 build (TVM's paged cache): chunked prefill and admission mid-run, greedy as alone."""
    eng = load(tiny_artifacts["llama"], max_batch_size=4)
    requests = [(PROMPT[:3], dict(max_new_tokens=15)), (PROMPT, dict(max_new_tokens=6)),
                (PROMPT[4:11], dict(max_new_tokens=20)), (PROMPT[10:], dict(max_new_tokens=9))]
    sched = Scheduler(eng, max_batch_size=2, prefill_chunk_size=8)
    ids = [sched.submit(p, **kw) for p, kw in requests]
    results = sched.run()
    assert [results[i].token_ids for i in ids] == [r.token_ids for r in _alone(eng, requests)]
