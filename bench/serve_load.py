"""Load generator for a running ``qoqc serve`` (or any OpenAI-compatible server): a bounded run of
N requests with Poisson arrivals, reporting throughput, time to first token and inter-token latency.

    python bench/serve_load.py --url http://127.0.0.1:8000/v1 [--model NAME] [--rate 4] [--requests 64]
                               [--prompt-len 64:512] [--output-len 16:128] [--seed 0] [--api-key KEY] [--out FILE]

Request i arrives at the i-th event of a Poisson process of ``--rate`` requests per second (``inf``:
all at once); its prompt is random token ids of a length drawn uniformly from ``--prompt-len``
(``A:B``, or one number), and it asks for ``max_tokens`` drawn from ``--output-len``, greedy,
streamed with usage. Per request: TTFT = first content chunk - send; inter-token latency = (last
chunk - first chunk) / (completion tokens - 1); end-to-end = last chunk - send. The run's output
throughput is the completion tokens of all requests over the wall time from the first send to the
last response; percentiles p50/p90/p99 of each latency. A request that fails is counted and its
error shown, not retried.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit_table  # noqa: E402


@dataclass
class Sample:
    ttft: float
    itl: float | None
    e2e: float
    prompt_tokens: int
    completion_tokens: int


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


async def _one(client, model: str, prompt: list[int], max_tokens: int) -> Sample:
    t0 = time.perf_counter()
    first = last = None
    usage = None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            first = first or now
            last = now
        if chunk.usage is not None:
            usage = chunk.usage
    first, last = first or time.perf_counter(), last or time.perf_counter()
    n = usage.completion_tokens if usage else 0
    return Sample(first - t0, (last - first) / (n - 1) if n > 1 else None, last - t0,
                  usage.prompt_tokens if usage else len(prompt), n)


async def run(args) -> tuple[list[Sample], list[str], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=args.url, api_key=args.api_key or "none", max_retries=0, timeout=3600)
    model = args.model or (await client.models.list()).data[0].id
    rng = np.random.default_rng(args.seed)
    plo, phi = _range(args.prompt_len)
    olo, ohi = _range(args.output_len)
    gaps = rng.exponential(1 / args.rate, args.requests) if args.rate != float("inf") else np.zeros(args.requests)
    prompts = [rng.integers(3, args.vocab, int(rng.integers(plo, phi + 1))).tolist() for _ in range(args.requests)]
    outputs = [int(rng.integers(olo, ohi + 1)) for _ in range(args.requests)]
    samples, errors = [], []

    async def request(i):
        try:
            samples.append(await _one(client, model, prompts[i], outputs[i]))
        except Exception as e:  # noqa: BLE001  (a failed request is reported, the run goes on)
            errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    tasks = []
    for i, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(request(i)))
    await asyncio.gather(*tasks)
    return samples, errors, time.perf_counter() - t0


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def table(args, samples: list[Sample], errors: list[str], seconds: float) -> list[str]:
    tokens = sum(s.completion_tokens for s in samples)
    lines = [f"Serving load, {date.today().isoformat()}, {platform.node()}: {args.requests} requests at "
             f"{args.rate} req/s (Poisson), prompt {args.prompt_len} tokens, output up to {args.output_len}, "
             f"against {args.url}",
             "Command: `python bench/serve_load.py " + " ".join(sys.argv[1:]) + "`", "",
             f"{len(samples)} done, {len(errors)} failed in {seconds:.1f} s: {len(samples) / seconds:.2f} req/s, "
             f"{tokens / seconds:.1f} output tokens/s "
             f"(mean {statistics.mean(s.completion_tokens for s in samples) if samples else 0:.1f} tokens a request)",
             "", "| latency | p50 | p90 | p99 | mean |", "|---|---|---|---|---|"]
    for name, values in (("time to first token (ms)", [s.ttft * 1e3 for s in samples]),
                         ("inter-token latency (ms)", [s.itl * 1e3 for s in samples if s.itl is not None]),
                         ("end to end (ms)", [s.e2e * 1e3 for s in samples])):
        mean = statistics.mean(values) if values else float("nan")
        lines.append(f"| {name} | {_pct(values, 50):.1f} | {_pct(values, 90):.1f} | {_pct(values, 99):.1f} | "
                     f"{mean:.1f} |")
    if errors:
        lines += ["", "Errors: " + "; ".join(sorted(set(errors))[:5])]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL")
    ap.add_argument("--model", default=None, help="model name (default: the server's first)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson); inf: all at once")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", default="64:512", help="prompt tokens, A:B uniform or one number")
    ap.add_argument("--output-len", default="16:128", help="max_tokens, A:B uniform or one number")
    ap.add_argument("--vocab", type=int, default=32000, help="draw prompt token ids below this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args()
    if args.requests < 1 or args.rate <= 0:
        ap.error("--requests and --rate must be positive")
    samples, errors, seconds = asyncio.run(run(args))
    emit_table(table(args, samples, errors, seconds), args.out)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
