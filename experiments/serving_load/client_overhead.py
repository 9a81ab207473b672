"""What sweeper's OpenAI client itself costs, against one `vllm serve` of the tiny model on CPU.

    python experiments/serving_load/client_overhead.py [--count 64] [--rate 14] [--repeats 2]

One server (started by sweeper's engine, as experiments/serving_load/bench.py starts it); the
same `--count` text requests of 32 tokens each (ignore_eos), sent
- on the client's own event loop (`StreamingClient.answer`, no thread hop): one at a time, four at
  a time, all at once; output tokens/s, and the process's CPU time per streamed chunk;
- through the open loads' request loop (`sweeper.loads.load.drive`, its own loop in another
  thread, as a trial sends them): four at a time, all at once, and at `--rate` requests/s on a
  regular schedule, with the p99 of how late requests left against that schedule (send lag).
Prints one line per measurement. REPO=<checkout> measures another checkout's client with the
same script (the before/after in experiments/serving_load/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(os.environ.get("REPO", Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(REPO))  # tests.* (the trial helpers), or another checkout's sweeper

from sweeper.engines.openai.client import Sent  # noqa: E402
from sweeper.loads.load import drive  # noqa: E402
from sweeper.requests import DecodingParams, ServingParams  # noqa: E402
from tests.conftest import OPENAI_VLLM, cached_engine, compose_trial, trial_requests  # noqa: E402

TOKENS = 32


def on_client_loop(engine, requests, decoding, limit: int) -> str:
    async def send_all():
        slots = asyncio.Semaphore(limit)

        async def one(request):
            async with slots:
                encoded = engine.prepare(request, decoding)
                sent = Sent(encoded, encoded.body, time.perf_counter(), encoded.encode_s)
                return await engine.client.answer(sent)

        return await asyncio.gather(*(one(request) for request in requests))

    start, cpu = time.perf_counter(), os.times()
    completions = engine.client.call(send_all())
    wall, used = time.perf_counter() - start, os.times()
    cpu_s = used.user + used.system - cpu.user - cpu.system
    tokens = sum(c.timing.output_tokens for c in completions)
    chunks = sum(len(c.timing.itl_s) + 1 for c in completions)
    return f"{tokens / wall:6.0f} output tok/s, {cpu_s / chunks * 1e6:4.0f} us CPU per chunk"


def through_drive(engine, requests, decoding, limit: int | None, rate: float | None) -> str:
    schedule = [index / rate for index in range(len(requests))] if rate else None
    sent = asyncio.run(
        drive(engine, iter(requests), decoding, ServingParams(), schedule, limit, lambda n: None)
    )
    window = max(r.done for r in sent) - min(r.sent for r in sent)
    tokens = sum(r.completion.timing.output_tokens for r in sent)
    line = f"{tokens / window:6.0f} output tok/s"
    if rate:
        lag = np.percentile([r.ready - r.due for r in sent], 99)
        line += f", {len(sent) / window:.1f} req/s, send lag p99 {lag:.3f} s"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--rate", type=float, default=14.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    trial = compose_trial(
        *OPENAI_VLLM,
        "workload.images=false",
        f"dataset.limit={args.count}",
        "ignore_eos=true",
        f"max_new_tokens={TOKENS}",
    )
    engine = cached_engine(trial)
    requests = trial_requests(trial, engine)
    decoding = DecodingParams(max_new_tokens=TOKENS, ignore_eos=True)
    on_client_loop(engine, requests, decoding, 4)  # warm-up: connections, the server's caches
    cases = [
        ("client loop, 1 at a time", lambda: on_client_loop(engine, requests, decoding, 1)),
        ("client loop, 4 at a time", lambda: on_client_loop(engine, requests, decoding, 4)),
        ("client loop, all at once", lambda: on_client_loop(engine, requests, decoding, 10**6)),
        ("drive, 4 at a time", lambda: through_drive(engine, requests, decoding, 4, None)),
        ("drive, all at once", lambda: through_drive(engine, requests, decoding, None, None)),
        (
            f"drive, {args.rate:g}/s",
            lambda: through_drive(engine, requests, decoding, None, args.rate),
        ),
    ]
    for repeat in range(1, args.repeats + 1):
        for name, measure in cases:
            line = measure()
            print(f"{repeat} | {name:25s} | load {os.getloadavg()[0]:4.1f} | {line}", flush=True)
    engine.close()


if __name__ == "__main__":
    main()
