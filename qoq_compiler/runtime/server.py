"""``qoqc serve``: an OpenAI-compatible HTTP server over one engine (FastAPI + uvicorn, the
``qoqc[serve]`` extra).

    GET  /v1/models             the served model
    POST /v1/completions        prompt (text, token ids, or a list of either) -> text
    POST /v1/chat/completions   messages, through the model's chat template -> a message
    GET  /health                200 while serving
    GET  /metrics               Prometheus text: requests running / waiting, KV pages used / free,
                                tokens, finish reasons, time to first token, inter-token latency

Both generation endpoints take ``max_tokens`` (chat: also ``max_completion_tokens``),
``temperature`` (default 1), ``top_p``, ``stop`` (a string or a list), ``seed``, ``n`` (choice i
sampled with seed + i), ``stream`` (server-sent events: text deltas, then ``data: [DONE]``;
``stream_options.include_usage`` adds a usage chunk) and log-probabilities (completions:
``logprobs`` = top alternatives 0..5; chat: ``logprobs`` and ``top_logprobs`` 0..20), computed
from the logits a step brings to the host anyway for such requests. Every choice is a request of
the engine thread (``worker.EngineWorker``); the event loop only parses, waits on queues and writes.

Errors are OpenAI-style bodies ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
JSON, unknown fields, wrong types or values, a prompt over the context or ``max_tokens`` that
cannot fit; 401 for a missing or wrong API key (``--api-key``); 404 for another model name; 429
when ``--max-queue`` requests already wait. A client that disconnects aborts its requests (their
pages are freed). SIGINT/SIGTERM stop accepting connections, let the requests in flight finish
(at most ``DRAIN_SECONDS``), then abort the rest and stop the engine thread.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from ..errors import QoqcError
from .engine import Engine, load
from .worker import EngineWorker, Sink, Submission

DRAIN_SECONDS = 30
MAX_CHOICES = 16
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError:  # the optional extra is missing: ``serve`` says how to get it
    FastAPI = None


def serve(artifact: str, host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
          kv_memory=None, max_batch_size: int = 32, max_queue: int = 256, api_key: str | None = None,
          served_model_name: str | None = None, log_level: str = "info") -> None:
    """Load ``artifact`` and serve it until SIGINT/SIGTERM."""
    if FastAPI is None:
        raise QoqcError("qoqc serve needs FastAPI and uvicorn: pip install 'qoqc[serve]'")
    from .artifact import read_manifest

    if max_queue < 1 or max_batch_size < 1:
        raise QoqcError("--max-queue and --max-batch-size must be at least 1")
    if not 0 < port < 65536:
        raise QoqcError(f"--port {port} is not a TCP port")
    kind = read_manifest(artifact, verify=False)["target"]["kind"]
    engine = load(artifact, device=device or ("cuda" if kind == "cuda" else "cpu"), kv_memory=kv_memory,
                  max_batch_size=max_batch_size)
    try:
        _run(engine, host, port, api_key, served_model_name, max_queue, log_level)
    finally:
        engine.close()


def _run(engine: Engine, host: str, port: int, api_key: str | None, served_model_name: str | None,
         max_queue: int, log_level: str) -> None:
    import uvicorn

    app = create_app(engine, served_model_name or engine.path.name, api_key, max_queue)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=DRAIN_SECONDS)
    server = uvicorn.Server(config)
    # uvicorn takes SIGINT/SIGTERM over while it serves (a graceful drain) and raises them again once
    # stopped, to the handlers it found: by then they mean a clean stop, so those do nothing
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    except (OSError, SystemExit) as e:  # the port is taken, or the host is not an address of this machine
        why = getattr(e, "strerror", None) or "the address is taken, or not one of this machine's"
        raise QoqcError(f"cannot serve on {host}:{port}: {why}") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise QoqcError(f"cannot serve on {host}:{port} (see the log above)")


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)


if FastAPI is not None:
    class _Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

    class StreamOptions(_Strict):
        include_usage: bool = False

    class TextPart(_Strict):
        type: Literal["text"]
        text: str

    class Message(_Strict):
        role: Literal["system", "user", "assistant"]
        content: str | list[TextPart]
        name: str | None = None

    class _Sampling(_Strict):
        model: str | None = None
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        n: int = Field(1, ge=1, le=MAX_CHOICES)
        stop: str | list[str] | None = None
        seed: int | None = None
        stream: bool = False
        stream_options: StreamOptions | None = None
        user: str | None = None
        presence_penalty: float | None = Field(None, ge=0, le=0)   # accepted at their neutral value only
        frequency_penalty: float | None = Field(None, ge=0, le=0)

    class CompletionRequest(_Sampling):
        prompt: str | list[int] | list[str] | list[list[int]]
        max_tokens: int | None = Field(16, ge=1)
        logprobs: int | None = Field(None, ge=0, le=5)
        echo: Literal[False] = False

    class ChatRequest(_Sampling):
        messages: list[Message] = Field(min_length=1)
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: bool = False
        top_logprobs: int | None = Field(None, ge=0, le=20)


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_queue: int = 256) -> "FastAPI":
    """The FastAPI app serving ``engine`` under ``model_name``."""
    worker = EngineWorker(engine)

    @asynccontextmanager
    async def lifespan(_app):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="qoqc", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e["type"] == "json_invalid" for e in errors):
            return _error(400, "invalid request: the body is not valid JSON")
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors[:5])
        return _error(400, f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                      "invalid_request_error")

    @app.exception_handler(Exception)
    async def crashed(_request, exc: Exception):  # never a traceback to the client
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return _error(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error",
                              "invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(worker.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "qoqc"}]}

    def check(body: _Sampling, n: int):
        if body.model is not None and body.model != model_name:
            return _error(404, f"the model {body.model!r} does not exist (this server serves {model_name!r})",
                          "not_found_error", "model_not_found")
        if worker.queued + n > max_queue:
            return _error(429, f"the server's queue is full ({worker.queued} requests wait, --max-queue "
                               f"{max_queue}): retry later", "rate_limit_exceeded", "queue_full")
        return None

    def options(body: _Sampling, max_tokens: int | None, logprobs: int | None, i: int) -> dict:
        return {"max_new_tokens": max_tokens, "temperature": 1.0 if body.temperature is None else body.temperature,
                "top_p": 1.0 if body.top_p is None else body.top_p, "stop": body.stop,
                "seed": None if body.seed is None else body.seed + i, "logprobs": logprobs}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = body.prompt if isinstance(body.prompt, list) and body.prompt and \
            isinstance(body.prompt[0], (str, list)) else [body.prompt]
        if not prompts:
            return _error(400, "invalid request: prompt is empty")
        subs = [Submission(p, None, options(body, body.max_tokens, body.logprobs, i))
                for p in prompts for i in range(body.n)]
        return await _respond(request, body, subs, "text_completion", "cmpl")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                     "".join(p.text for p in m.content)} for m in body.messages]
        top = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            return _error(400, "invalid request: top_logprobs needs logprobs: true")
        max_tokens = body.max_completion_tokens or body.max_tokens
        subs = [Submission(None, messages, options(body, max_tokens, top, i)) for i in range(body.n)]
        return await _respond(request, body, subs, "chat.completion", "chatcmpl")

    async def _respond(request: Request, body, subs: list[Submission], kind: str, prefix: str):
        refused = check(body, len(subs))
        if refused is not None:
            return refused
        loop = asyncio.get_running_loop()
        sinks = [Sink(loop, asyncio.Queue()) for _ in subs]
        for sub, sink in zip(subs, sinks):
            worker.submit(sub, sink)
        reply = Reply(engine, model_name, kind, f"{prefix}-{uuid.uuid4().hex}", body)
        if body.stream:
            return StreamingResponse(_stream(request, reply, sinks), media_type="text/event-stream")
        return await _gather(request, reply, sinks)

    async def _events(request: Request, sinks: list[Sink]):
        """(choice index, event) of every choice until each has ended; aborts them all if the
        client disconnects or the response is cancelled."""
        pending = {i: asyncio.ensure_future(s.queue.get()) for i, s in enumerate(sinks)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending.values(), timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                if not done and await request.is_disconnected():
                    return
                for i in [i for i, f in pending.items() if f in done]:
                    event = pending.pop(i).result()
                    if event[0] == "delta":
                        pending[i] = asyncio.ensure_future(sinks[i].queue.get())
                    yield i, event
        finally:
            for f in pending.values():
                f.cancel()
            for i in pending:
                worker.abort(sinks[i])

    async def _gather(request: Request, reply: "Reply", sinks: list[Sink]):
        choices = [Choice() for _ in sinks]
        async for i, event in _events(request, sinks):
            if event[0] == "error":
                return _error(event[1], event[2])
            choices[i].add(event)
        if any(c.result is None for c in choices):
            return _error(499, "the client went away")
        failed = next((c.result.error for c in choices if c.result.finish_reason == "error"), None)
        if failed is not None:
            return _error(500, f"generation failed: {failed}", "server_error")
        return JSONResponse(reply.complete(choices))

    async def _stream(request: Request, reply: "Reply", sinks: list[Sink]):
        choices = [Choice() for _ in sinks]
        if reply.chat:
            for i in range(len(sinks)):
                yield reply.chunk(i, {"role": "assistant", "content": ""}, None, None)
        async for i, event in _events(request, sinks):
            if event[0] == "error":
                yield "data: " + json.dumps({"error": {"message": event[2], "type": "invalid_request_error",
                                                       "param": None, "code": None}}) + "\n\n"
                return
            choices[i].add(event)
            if event[0] == "delta":
                entries = None if event[3] is None else list(zip(event[2], event[3]))
                if event[1] or entries:  # tokens whose text is held back (a stop string may begin) wait
                    yield reply.chunk(i, event[1], entries, None)
            else:
                result = event[1]
                reason = "error" if result.finish_reason == "error" else FINISH[result.finish_reason]
                yield reply.chunk(i, "", None, reason)
        if reply.include_usage:
            usage = {**reply.head(chunk=True), "choices": [], "usage": reply.usage(choices)}
            yield "data: " + json.dumps(usage) + "\n\n"
        yield "data: [DONE]\n\n"

    return app


class Choice:
    """What one choice received so far: text, token count, log-probabilities, the result."""

    def __init__(self):
        self.text, self.tokens, self.result = "", [], None

    def add(self, event: tuple) -> None:
        if event[0] == "delta":
            self.text += event[1]
            self.tokens += event[2]
        else:
            self.result = event[1]


class Reply:
    """The OpenAI response objects of one request."""

    def __init__(self, engine: Engine, model: str, kind: str, rid: str, body):
        self.engine, self.model, self.kind, self.id, self.body = engine, model, kind, rid, body
        self.chat = kind == "chat.completion"
        self.created = int(time.time())
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def head(self, chunk: bool = False) -> dict:
        kind = self.kind + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self, choices: list[Choice]) -> dict:
        """Prompt tokens once per prompt (choices are prompt-major, ``n`` per prompt), every new token."""
        prompt = sum(c.result.prompt_tokens for j, c in enumerate(choices) if j % self.body.n == 0 and c.result)
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _token(self, token: int) -> str:
        return self.engine.decode_text([token]) if self.engine.has_tokenizer else str(token)

    def _logprobs(self, entries) -> dict | None:
        asked = self.body.logprobs if self.chat else self.body.logprobs is not None
        if entries is None or not asked:
            return None
        if self.chat:
            def item(tok, lp):
                text = self._token(tok)
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}
            return {"content": [{**item(tok, lp), "top_logprobs": [item(t, v) for t, v in top]}
                                for tok, (lp, top) in entries]}
        return {"tokens": [self._token(tok) for tok, _ in entries], "token_logprobs": [lp for _, (lp, _) in entries],
                "top_logprobs": [{self._token(t): v for t, v in top} for _, (_, top) in entries]}

    def complete(self, choices: list[Choice]) -> dict:
        out = []
        for i, c in enumerate(choices):
            lps = self._logprobs(list(zip(c.result.token_ids, c.result.logprobs)) if c.result.logprobs is not None
                                 else None)
            finish = FINISH[c.result.finish_reason]
            if self.chat:
                out.append({"index": i, "message": {"role": "assistant", "content": c.result.text},
                            "logprobs": lps, "finish_reason": finish})
            else:
                out.append({"index": i, "text": c.result.text, "logprobs": lps, "finish_reason": finish})
        return {**self.head(), "choices": out, "usage": self.usage(choices)}

    def chunk(self, i: int, delta, entries, finish: str | None) -> str:
        """One server-sent event of choice i: a text delta (chat: a delta dict), the (token,
        log-probability) entries of its new tokens, and the finish reason of the last one."""
        lps = self._logprobs(entries) if entries else None
        if self.chat:
            body = {"index": i, "delta": delta if isinstance(delta, dict) else ({"content": delta} if delta else {}),
                    "logprobs": lps, "finish_reason": finish}
        else:
            body = {"index": i, "text": delta, "logprobs": lps, "finish_reason": finish}
        return "data: " + json.dumps({**self.head(chunk=True), "choices": [body]}) + "\n\n"
