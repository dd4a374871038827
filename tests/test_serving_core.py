"""The serving core never loses a request: prompts one token past a prefill chunk, a cache much
smaller than the demand, exceptions and interrupts in any device call, aborts, abandoned streams
and several threads on one engine all end every request with a reason and free every page."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from qoq_compiler import load
from qoq_compiler.errors import QoqcError
from qoq_compiler.runtime.request import RequestState
from qoq_compiler.runtime.scheduler import Scheduler

PROMPT = [1, 45, 300, 17, 99, 260, 4, 511, 128, 77, 300, 12, 5, 6, 8, 9, 10, 11, 12, 13, 14, 200, 31, 7]


def idle(eng) -> bool:
    """No page held, no sequence open, nothing queued."""
    return eng.blocks.used == 0 and not eng.blocks.lengths and eng.scheduler.done and not eng.scheduler.requests


@pytest.fixture
def eng(kv4_artifact):
    return load(kv4_artifact, max_batch_size=4, prefill_chunk_size=16)


def test_a_prompt_one_token_past_a_chunk(kv4_artifact, eng):
    """The last prompt token fed alone in a later step is prefill, not a decode with no output."""
    whole = load(kv4_artifact, prefill_chunk_size=256)
    for n in (15, 16, 17, 33):  # the chunk is 16 tokens
        prompt = [1] + [300 + i % 50 for i in range(n - 1)]
        assert eng.generate(prompt, max_new_tokens=5).token_ids == whole.generate(prompt, max_new_tokens=5).token_ids
    results = eng.generate_batch([PROMPT[:11], PROMPT[:6]], max_new_tokens=6)  # 11 + 6 = chunk + 1
    assert [r.token_ids for r in results] == [whole.generate(p, max_new_tokens=6).token_ids
                                              for p in (PROMPT[:11], PROMPT[:6])]
    assert idle(eng)


def test_fifty_requests_through_a_small_cache(kv4_artifact):
    eng = load(kv4_artifact, max_total_tokens=96, max_batch_size=6, prefill_chunk_size=16)
    rng = np.random.default_rng(0)
    sched = Scheduler(eng)
    ids = [sched.submit(rng.integers(3, 512, size=int(rng.integers(1, 60))).tolist(),
                       max_new_tokens=int(rng.integers(1, 30))) for _ in range(50)]
    results = sched.run()
    assert sorted(results) == sorted(ids)
    assert all(results[i].finish_reason in ("eos", "length") for i in ids)
    assert sum(results[i].preemptions for i in ids) > 0 and idle(eng)


class Boom(RuntimeError):
    pass


def _fail_on_call(monkeypatch, eng, name: str, k: int, error=Boom):
    """Make the k-th call of the model's ``name`` raise ``error``."""
    original, calls = getattr(eng, name), [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            raise error("injected")
        return original(*args, **kwargs)
    monkeypatch.setattr(eng, name, failing)


@pytest.mark.parametrize("name,k", [("prefill", 1), ("prefill", 2), ("decode_greedy", 3)])
@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_an_error_in_any_call_frees_everything(monkeypatch, eng, name, k, error):
    def tokens():
        return [r.token_ids for r in eng.generate_batch([PROMPT, PROMPT[3:]], max_new_tokens=8)]
    expected = tokens()
    _fail_on_call(monkeypatch, eng, name, k, error)
    with pytest.raises(error):
        tokens()
    assert idle(eng)
    monkeypatch.undo()
    assert tokens() == expected  # and it serves on


def test_scheduler_run_interrupted_aborts_the_rest(monkeypatch, eng):
    sched = Scheduler(eng)
    ids = [sched.submit(PROMPT[i:], max_new_tokens=10) for i in range(6)]
    _fail_on_call(monkeypatch, eng, "decode_greedy", 4, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        sched.run()
    assert sorted(sched.results) == sorted(ids) and idle(eng)
    reasons = {sched.results[i].finish_reason for i in ids}
    assert reasons <= {"abort", "length", "eos"} and "abort" in reasons


def test_failed_request_reports_its_reason(monkeypatch, eng):
    sched = Scheduler(eng)
    rid = sched.submit(PROMPT, max_new_tokens=5)
    _fail_on_call(monkeypatch, eng, "prefill", 1)
    with pytest.raises(Boom):
        sched.step()
    r = sched.results[rid]
    assert r.finish_reason == "error" and r.error == "Boom: injected" and idle(eng)


def test_abort_waiting_and_running(eng):
    sched = Scheduler(eng, max_batch_size=2)
    ids = [sched.submit(PROMPT[i:], max_new_tokens=12) for i in range(4)]
    for _ in range(3):
        sched.step()
    running = [r.rid for r in sched.running]
    waiting = [r.rid for r in sched.waiting]
    assert running and waiting
    assert sched.abort(running[0]) and sched.abort(waiting[0]) and not sched.abort(running[0])
    results = sched.run()
    assert results[running[0]].finish_reason == results[waiting[0]].finish_reason == "abort"
    rest = [i for i in ids if i not in (running[0], waiting[0])]
    assert [results[i].token_ids for i in rest] == [eng.generate(PROMPT[i:], max_new_tokens=12).token_ids
                                                    for i in rest]
    assert idle(eng)


def test_an_abandoned_stream_frees_its_pages(eng):
    stream = eng.stream(PROMPT, max_new_tokens=40)
    assert idle(eng)  # nothing is queued before iteration starts
    pieces = iter(stream)
    next(pieces)
    assert eng.blocks.used > 0
    stream.close()
    assert idle(eng)
    full = list(eng.stream(PROMPT, max_new_tokens=5))
    assert full and idle(eng)


def test_threads_share_one_engine(eng):
    prompts = [PROMPT[i:i + 9] for i in range(8)]
    expected = [eng.generate(p, max_new_tokens=10).token_ids for p in prompts]
    got, errors = [None] * len(prompts), []

    def worker(i):
        try:
            got[i] = eng.generate(prompts[i], max_new_tokens=10).token_ids
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and got == expected and idle(eng)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=float("nan")), "temperature=nan is not a finite number"),
    (dict(temperature=float("inf")), "not a finite number"),
    (dict(top_p=float("nan")), "top_p=nan"),
    (dict(top_p=0.0), "0 < top_p <= 1"),
    (dict(temperature=-0.5), "temperature >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens="8"), "max_new_tokens"),
    (dict(stop=[""]), "stop must be a non-empty string"),
    (dict(seed=1.5), "seed must be a whole number"),
])
def test_bad_sampling_parameters(eng, kwargs, message):
    with pytest.raises(QoqcError, match=message):
        eng.generate(PROMPT, **kwargs)
    with pytest.raises(QoqcError, match=message):
        eng.stream(PROMPT, **kwargs)
    assert idle(eng)


def test_bad_engine_options(kv4_artifact):
    for kwargs in (dict(max_batch_size=0), dict(prefill_chunk_size=-1), dict(max_total_tokens=True)):
        with pytest.raises(QoqcError, match="must be a whole number"):
            load(kv4_artifact, **kwargs)


def test_request_states_are_explicit(eng):
    sched = Scheduler(eng, max_batch_size=1, prefill_chunk_size=4)
    a, b = sched.submit(PROMPT[:9], max_new_tokens=3), sched.submit(PROMPT[:2], max_new_tokens=2)
    seen = {a: set(), b: set()}
    while not sched.done:
        for rid in seen:
            r = sched.requests.get(rid)
            seen[rid].add(r.state if r else None)
        sched.step()
    assert seen[a] >= {RequestState.WAITING, RequestState.PREFILLING, RequestState.DECODING}
    assert RequestState.WAITING in seen[b]  # the batch of one was full
    assert sched.results[a].finish_reason == "length" and idle(eng)


@pytest.mark.parametrize("which,tolerance", [("kv4", 0.0), ("fp32", 1e-5)])
def test_chunked_prefill_against_unchunked(kv4_artifact, tiny_artifacts, which, tolerance):
    """What README's "equals served alone" rests on: on the 4-bit cache a prompt fed in chunks gives
    the logits of the whole prompt bit for bit; TVM's fp32 paged cache differs by rounding."""
    art = kv4_artifact if which == "kv4" else tiny_artifacts["llama"]
    chunked, whole = load(art, prefill_chunk_size=7), load(art, prefill_chunk_size=256)
    rng = np.random.default_rng(5)
    for n in (20, 150, 240):
        prompt = [1] + rng.integers(3, 512, n).tolist()
        a, b = chunked.logits(prompt), whole.logits(prompt)
        assert np.linalg.norm(a - b) <= tolerance * np.linalg.norm(b)
