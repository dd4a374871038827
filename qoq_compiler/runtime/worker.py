"""The engine thread: the one owner of an ``Engine`` and its scheduler while a server runs.

The HTTP side (an asyncio event loop) never touches the engine. It hands requests over through
the worker's inbox (``submit``, ``abort``) and reads each request's events from an asyncio queue
the worker feeds thread-safely (``Sink``):
    ("delta", text, token_ids, logprobs)    after every step that gave the request text or tokens
    ("done", GenerationResult)              once, when it ended (any way)
    ("error", status, message)              once, instead, when it was refused (bad prompt)
The worker loop: take every command waiting in the inbox (blocking only while the scheduler is
idle), turn submissions into requests (chat template and tokenizer run here, off the event
loop), step the scheduler, publish, and refresh the metrics. A step that raises has already ended
the requests it failed (their ``done`` events say so); the loop goes on. ``stop`` aborts whatever
is left and joins the thread.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from ..errors import QoqcError
from .engine import Engine
from .request import Request

#: histogram buckets (seconds) of time to first token and inter-token latency
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


@dataclass
class Sink:
    """Where one request's events go: an asyncio queue on the server's event loop."""

    loop: object
    queue: object
    request: Request | None = None
    sent_tokens: int = 0

    def put(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


@dataclass
class Submission:
    """What a client asked for: a prompt (text, token ids, or chat messages) and sampling options."""

    prompt: str | list[int] | None
    messages: list[dict] | None
    options: dict = field(default_factory=dict)


class Metrics:
    """Prometheus metrics of one server, in a registry of its own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.running = Gauge("qoqc_requests_running", "Requests prefilling or decoding", registry=r)
        self.waiting = Gauge("qoqc_requests_waiting", "Requests queued for a place in the batch", registry=r)
        self.pages_used = Gauge("qoqc_kv_pages_used", "KV-cache pages held by sequences", registry=r)
        self.pages_free = Gauge("qoqc_kv_pages_free", "KV-cache pages free", registry=r)
        self.generated = Counter("qoqc_generated_tokens", "Tokens generated", registry=r)
        self.prompt = Counter("qoqc_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.finished = Counter("qoqc_requests", "Requests ended, by finish reason", ["finish_reason"], registry=r)
        self.ttft = Histogram("qoqc_time_to_first_token_seconds", "Submission to first token", registry=r,
                              buckets=TTFT_BUCKETS)
        self.itl = Histogram("qoqc_inter_token_latency_seconds", "Mean time between a request's tokens",
                             registry=r, buckets=ITL_BUCKETS)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class EngineWorker:
    def __init__(self, engine: Engine):
        self.engine, self.scheduler = engine, engine.scheduler
        self.metrics = Metrics()
        self.inbox: queue.Queue = queue.Queue()
        self.sinks: dict[int, Sink] = {}
        self.queued = 0  # submissions not yet admitted to the batch (read by the event loop)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="qoqc-engine", daemon=True)
        self._refresh()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Abort what is left and end the thread."""
        self._stopping.set()
        self.inbox.put(("wake",))
        self._thread.join(timeout=60)

    # ---------------------------------------------------------------- called from the event loop
    def submit(self, submission: Submission, sink: Sink) -> None:
        self.queued += 1
        self.inbox.put(("submit", submission, sink))

    def abort(self, sink: Sink) -> None:
        self.inbox.put(("abort", sink))

    # ---------------------------------------------------------------- the engine thread
    def _loop(self) -> None:
        while True:
            idle = self.scheduler.done
            try:
                command = self.inbox.get(block=idle, timeout=1.0 if idle else None)
            except queue.Empty:
                command = None
            while command is not None:
                self._handle(command)
                try:
                    command = self.inbox.get_nowait()
                except queue.Empty:
                    command = None
            if self._stopping.is_set():
                for sink in list(self.sinks.values()):
                    self.scheduler.abort(sink.request.rid, "the server is stopping")
                self._publish()
                return
            if not self.scheduler.done:
                try:
                    self.scheduler.step()
                except Exception:  # noqa: BLE001  (the failed requests ended with the reason; serve on)
                    pass
                self._publish()
            self._refresh()

    def _handle(self, command: tuple) -> None:
        if command[0] == "submit":
            _, submission, sink = command
            try:
                sink.request = self._request(submission)
                self.scheduler.enqueue(sink.request)
                self.sinks[sink.request.rid] = sink
            except QoqcError as e:
                self.queued -= 1
                sink.put(("error", 400, str(e)))
        elif command[0] == "abort":
            sink = command[1]
            if sink.request is not None:
                self.scheduler.abort(sink.request.rid, "the client went away")
                self._publish()

    def _request(self, s: Submission) -> Request:
        engine = self.engine
        prompt = s.prompt
        if s.messages is not None:
            tok = engine.tokenizer
            if not getattr(tok, "chat_template", None):
                raise QoqcError("the model has no chat template: use /v1/completions")
            try:
                text = tok.apply_chat_template(s.messages, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # noqa: BLE001  (jinja's errors for messages the template refuses)
                raise QoqcError(f"the chat template refused these messages: {e}") from None
            prompt = engine.encode(text, add_special_tokens=False)
        options = dict(s.options)
        max_tokens = options.pop("max_new_tokens")
        ids = engine.prompt_ids(prompt)
        if max_tokens is not None and len(ids) + max_tokens > engine.context_window:
            raise QoqcError(f"this model's context holds {engine.context_window} tokens; the prompt has {len(ids)} "
                            f"and max_tokens asks for {max_tokens} more")
        room = engine.context_window - len(ids)
        return self.scheduler.make_request(ids, room if max_tokens is None else max_tokens,
                                           **options)

    def _publish(self) -> None:
        m = self.metrics
        for rid, sink in list(self.sinks.items()):
            r = sink.request
            new_tokens = len(r.out) - sink.sent_tokens
            text = "".join(r.pieces)
            r.pieces.clear()
            if text or new_tokens > 0:
                ids = r.out[sink.sent_tokens:] if new_tokens > 0 else []
                lps = r.logprobs[sink.sent_tokens:len(r.out)] if r.params.logprobs is not None else None
                sink.sent_tokens = len(r.out)
                m.generated.inc(len(ids))
                sink.put(("delta", text, ids, lps))
            if r.ended:
                result = self.scheduler.results.pop(rid)
                del self.sinks[rid]
                m.finished.labels(result.finish_reason).inc()
                m.prompt.inc(result.prompt_tokens)
                if result.token_ids:
                    m.ttft.observe(result.prefill_seconds)
                if len(result.token_ids) > 1:
                    m.itl.observe(result.decode_seconds / (len(result.token_ids) - 1))
                sink.put(("done", result))

    def _refresh(self) -> None:
        s, b = self.scheduler, self.engine.blocks
        self.queued = len(s.waiting) + sum(1 for c in list(self.inbox.queue) if c[0] == "submit")
        m = self.metrics
        m.running.set(len(s.running))
        m.waiting.set(len(s.waiting))
        m.pages_used.set(b.used)
        m.pages_free.set(len(b.free))
