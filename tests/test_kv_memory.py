"""KV-cache sizing: the 4-bit cache's page size is a compile option, its capacity a memory budget;
requests that do not fit stop with a clear error, and the compile reports bytes per token."""

from __future__ import annotations

import pytest

from qoq_compiler import QoqcError, compile, load
from qoq_compiler.config import QuantScheme
from qoq_compiler.runtime.kv_cache import bytes_per_token, parse_memory
from conftest import rel_err

PROMPT = [1, 45, 300, 17, 99, 260, 4, 511, 128, 77, 300, 12, 5, 6, 8, 9, 10, 11, 12, 13, 14, 200, 31, 7]
RTN_FP32 = QuantScheme("rtn-fp32", "float32", weights="int4", group=32, kv="int4")


@pytest.fixture(scope="module")
def kv4_artifacts(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("kv4")
    return {page: compile(tiny_dirs["llama"], target="llvm", quant=RTN_FP32, output=root / f"p{page}",
                          progress=False, kv_page_size=page) for page in (16, 5)}


def test_page_size_changes_nothing_but_the_pages(kv4_artifacts):
    a16, a5 = load(kv4_artifacts[16]), load(kv4_artifacts[5])
    assert a5.manifest["kv_cache"] == {"kind": "kv4-paged", "page_size": 5}
    ref = a16.logits(PROMPT)
    assert rel_err(a5.logits(PROMPT), ref) < 1e-6
    sid = a5.add_sequence()  # decode across several 5-token pages
    a5.prefill([(sid, PROMPT[:3])])
    for i, t in enumerate(PROMPT[3:12], start=3):
        assert rel_err(a5.decode([sid], [t])[0], ref[i]) < 1e-6


def test_memory_budget_sets_capacity_and_overflow_is_an_error(kv4_artifacts):
    eng = load(kv4_artifacts[5])
    per_token = eng.kv_bytes_per_token
    cfg = eng.config
    assert per_token == cfg.num_layers * 2 * cfg.num_kv_heads * (cfg.head_dim // 2 + 4)
    small = load(kv4_artifacts[5], kv_memory=per_token * 17)  # 17 tokens of budget: 3 whole pages
    assert small.cache_tokens == 15 and small.context_window == 15
    assert len(small.generate(PROMPT[:5], max_new_tokens=5).token_ids) == 5
    with pytest.raises(QoqcError, match="context window of 15"):
        small.generate(PROMPT, max_new_tokens=1)
    a, b = small.add_sequence(), small.add_sequence()
    small.prefill([(a, PROMPT[:10])])
    with pytest.raises(QoqcError, match="KV cache is full"):
        small.prefill([(b, PROMPT[:8])])
    small.remove_sequence(a)
    small.prefill([(b, PROMPT[:8])])  # freed pages are reused
    with pytest.raises(QoqcError, match="holds no page"):
        load(kv4_artifacts[5], kv_memory=per_token * 4)
    assert load(kv4_artifacts[5], kv_memory="0.001").cache_tokens > 0  # a fraction of free memory


def test_parse_memory():
    assert parse_memory("4GiB") == 4 * 2 ** 30 and parse_memory("512MB") == 512 * 10 ** 6
    assert parse_memory("123456") == 123456 and parse_memory(2048) == 2048 and parse_memory("0.5") == 0.5
    for bad in ("lots", "1.5", "0", "-1GB", "2 parsecs"):
        with pytest.raises(QoqcError, match="KV memory"):
            parse_memory(bad)


def test_compile_reports_kv_bytes_and_rejects_page_size_for_float_caches(tiny_dirs, kv4_artifacts, tmp_path,
                                                                         capsys):
    compile(tiny_dirs["llama"], target="llvm", quant=RTN_FP32, output=tmp_path / "a", kv_page_size=8)
    cfg = load(kv4_artifacts[16]).config
    kv4, fp16 = bytes_per_token(cfg, "kv4-paged"), bytes_per_token(cfg, "tvm-paged")
    assert f"KV cache {kv4:,} bytes/token in 4 bits, 8-token pages (fp16: {fp16:,}" in capsys.readouterr().out
    with pytest.raises(QoqcError, match="--kv-page-size"):
        compile(tiny_dirs["llama"], target="llvm", quant="fp16", output=tmp_path / "b", kv_page_size=8)
