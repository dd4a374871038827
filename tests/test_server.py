"""``qoqc serve`` through the official ``openai`` client, against servers started on 127.0.0.1 on the
tiny 4-bit model: chat and completions, streamed and not, ``n`` with a seed, stop strings, usage,
log-probabilities, 16 concurrent clients, a client leaving mid-stream, every error, SIGTERM."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
try:  # the HTTP client the openai package brings (httpx2 in its recent releases)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")

KEY = "test-key"
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def chat_kv4(kv4_artifact, tmp_path_factory) -> Path:
    """The tiny 4-bit model with a chat template in its tokenizer."""
    from transformers import AutoTokenizer

    from qoq_compiler.runtime.artifact import write_manifest

    art = tmp_path_factory.mktemp("serve") / "tiny"
    shutil.copytree(kv4_artifact, art)
    tok = AutoTokenizer.from_pretrained(str(art / "tokenizer"))
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(art / "tokenizer"))
    manifest = json.loads((art / "manifest.json").read_text())
    write_manifest(art, {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")})
    return art


class Server:
    def __init__(self, artifact: Path, *extra: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "qoq_compiler.cli", "serve", str(artifact), "--port",
                                      str(self.port), "--served-model-name", "tiny", "--log-level", "warning",
                                      *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError("server did not start:\n" + self.proc.stdout.read())

    def client(self, **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", KEY), max_retries=0, **kwargs)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=120)
        return self.proc.returncode, out


@pytest.fixture(scope="module")
def server(chat_kv4):
    srv = Server(chat_kv4, "--api-key", KEY, "--max-batch-size", "4")
    yield srv
    rc, out = srv.stop()
    assert rc == 0 and "Traceback" not in out, out


@pytest.fixture(scope="module")
def alone(chat_kv4):
    """The same model in this process: what a request served alone gives."""
    from qoq_compiler import load

    return load(chat_kv4)


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_completion_streamed_equals_not_and_alone(server, alone):
    c = server.client()
    full = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    parts = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
    r = alone.generate("Once upon a time", max_new_tokens=12)
    assert full.choices[0].text == r.text and full.choices[0].finish_reason == ("stop" if r.finish_reason == "eos"
                                                                                else r.finish_reason)
    assert full.usage.prompt_tokens == r.prompt_tokens and full.usage.completion_tokens == len(r.token_ids)
    assert full.usage.total_tokens == r.prompt_tokens + len(r.token_ids)


def test_chat_streamed_equals_not_with_usage(server, alone):
    c = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about Lily."}]
    full = c.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10, temperature=0)
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == full.choices[0].message.content
    assert chunks[-1].usage.model_dump() == full.usage.model_dump() and not chunks[-1].choices
    ids = alone.encode(alone.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)
    assert full.usage.prompt_tokens == len(ids)
    assert full.choices[0].message.content == alone.generate(ids, max_new_tokens=10).text


def test_n_with_a_seed_is_reproducible(server):
    c = server.client()
    kw = dict(model="tiny", prompt="The dog", max_tokens=10, temperature=1.0, top_p=0.95, n=3, seed=11)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices] and len(a.choices) == 3
    assert len({ch.text for ch in a.choices}) > 1  # choice i is sampled with seed + i
    assert a.usage.prompt_tokens == b.usage.prompt_tokens < a.usage.completion_tokens


def test_stop_strings(server):
    c = server.client()
    text = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0).choices[0].text
    stop = text[5:8]
    cut = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0,
                               stop=[stop, "zzz"])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:text.find(stop)]
    streamed = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0,
                                    stop=stop, stream=True)
    assert "".join(p.choices[0].text for p in streamed) == cut.choices[0].text


def test_logprobs(server):
    c = server.client()
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                  temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:  # greedy: the chosen token is the most likely one
        assert item.logprob <= 0 and len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob == item.logprob
    comp = c.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0, logprobs=2)
    assert len(comp.choices[0].logprobs.token_logprobs) == comp.usage.completion_tokens


def test_sixteen_concurrent_clients_get_what_they_get_alone(server, alone):
    prompts = [f"Story {i}: once" for i in range(16)]
    c = server.client()

    def ask(p):
        return c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, prompts))
    assert got == [alone.generate(p, max_new_tokens=12).text for p in prompts]
    assert server.metric("qoqc_kv_pages_used") == 0


def test_a_client_leaving_mid_stream_frees_its_pages(server):
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert server.metric("qoqc_kv_pages_used") > 0
    deadline = time.time() + 30
    while server.metric("qoqc_kv_pages_used") and time.time() < deadline:
        time.sleep(0.1)
    assert server.metric("qoqc_kv_pages_used") == 0 and server.metric("qoqc_requests_running") == 0
    assert 'finish_reason="abort"' in httpx.get(server.url + "/metrics").text


@pytest.mark.parametrize("call,status,message", [
    (lambda c: c.completions.create(model="tiny", prompt=[5] * 300, max_tokens=4), 400, "context window"),
    (lambda c: c.completions.create(model="tiny", prompt="hi", max_tokens=400), 400, "max_tokens asks for 400"),
    (lambda c: c.completions.create(model="other", prompt="hi"), 404, "does not exist"),
    (lambda c: c.completions.create(model="tiny", prompt="hi", temperature=3), 400, "temperature"),
    (lambda c: c.completions.create(model="tiny", prompt="hi", extra_body={"bogus": 1}), 400, "bogus"),
    (lambda c: c.completions.create(model="tiny", prompt="hi", extra_body={"n": "2"}), 400, "n: Input should be"),
    (lambda c: c.chat.completions.create(model="tiny", messages=[]), 400, "messages"),
    (lambda c: c.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}]), 400, "role"),
])
def test_bad_requests_are_openai_errors(server, call, status, message):
    with pytest.raises(openai.APIStatusError) as err:
        call(server.client())
    assert err.value.status_code == status and message in err.value.message


def test_bad_json_and_api_keys(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}",
                                                                                   "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "invalid request: the body is not valid JSON"
    for key in ("wrong", f"{KEY}x"):
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key=key).models.list()
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_a_full_queue_is_429_and_sigterm_drains(chat_kv4):
    srv = Server(chat_kv4, "--max-batch-size", "1", "--max-queue", "1")
    c = srv.client()
    outcomes = []

    def ask(_):
        try:
            return c.completions.create(model="tiny", prompt="Once", max_tokens=60, temperature=0).choices[0].text
        except openai.RateLimitError as e:
            outcomes.append(e.message)
    with ThreadPoolExecutor(6) as pool:
        texts = [t for t in pool.map(ask, range(6)) if t is not None]
    assert texts and outcomes and all("queue is full" in m for m in outcomes)

    expected = c.completions.create(model="tiny", prompt="Once", max_tokens=80, temperature=0).choices[0].text
    result = {}
    stream = c.completions.create(model="tiny", prompt="Once", max_tokens=80, temperature=0, stream=True)

    def drain():
        result["text"] = "".join(p.choices[0].text for p in stream)
    reader = threading.Thread(target=drain)
    reader.start()
    time.sleep(0.3)
    rc, out = srv.stop()  # SIGTERM while the stream is in flight: it finishes, then the server stops
    reader.join(timeout=60)
    assert rc == 0 and "Traceback" not in out, out
    assert result["text"] == expected  # drained, not cut
