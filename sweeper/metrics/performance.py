"""The performance metrics every engine reports, defined once.

Per request (one question; with num_samples > 1, all its sequences), the same in every engine:
- `preprocess_s`: from the request's submission until its inputs are ready for the model - image
  decode (ahead, in a prefetch thread, still the sample's own time), chat template, tokens, image
  processing, hand-over to the engine. A static batch is made ready as a whole (engine=hf: one
  processor call; engine=vllm: every request rendered, then all handed to the engine core at
  once), so each of its requests waits for the batch's preprocessing; under continuous batching a
  request's own.
- `queue_s`: from inputs ready until the engine first schedules the request (0 in a static batch:
  it starts at once; vLLM: its scheduled_ts - queued_ts; transformers' continuous batching: the
  request's start - its creation).
- `prefill_s`: from the request's first scheduling until the logits of its first generated token
  exist (the prompt's forward pass; in a batch, the batch's prefill).
- `context_load_s` = `preprocess_s` + `prefill_s`: the time to load the request's context,
  queueing left out in every engine (`ttft_s` holds it).
- `ttft_s`: from submission to the engine until the request's first generated token is on the
  host (device synchronised): preprocess + queue + prefill. Submission is when the engine receives
  the request's batch (static batching) or the request (continuous batching); queueing behind
  other batches is not included for static batches, since a static server would not have
  accepted the request yet.
- `tpot_s`: (time of the last token - time of the first token) / (tokens - 1) over the request's
  longest sequence; requests with a single output token have none.
- `output_tokens`: generated tokens of all returned sequences, up to and including the EOS token,
  never padding or anything after EOS.
- `cached_prompt_tokens`: prompt tokens whose KV the engine reused from earlier requests instead
  of computing them (prefix caching), counted once per request like `prompt_tokens`. engine=hf
  matches whole blocks of 16 tokens, as vLLM does; the copy of one request's prompt KV to its
  `num_samples` sequences is not counted (it saves prefill time, not prompt tokens).

Per trial:
- `tps`: output tokens of all requests / wall time of the generation phase (all batches,
  preprocessing included, warm-up and calibration excluded).
- means and p50/p90/p99 of `ttft_s`; means of the rest.
- `prefix_cache_hit_rate` = cached prompt tokens / prompt tokens, over all requests.
- `batch_efficiency` = requests/s at batch_size / (batch x requests/s one at a time), both on
  the same calibration slice, where batch = min(batch_size, requests in the slice): the batch
  the slice can form (a slice of 4 cannot run 1024 at once); `batch_speedup` is the ratio
  without dividing by the batch. The two passes are timed `calibration_repeats` times,
  interleaved (batched, one at a time, batched, ...), and the median of the repeats' ratios is
  logged with their range (`batch_efficiency_min`, `_max`): one pair of passes on a shared machine
  gave anything from 0.11 to 1.00 for the same setting.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestTiming:
    preprocess_s: float
    prefill_s: float
    ttft_s: float
    latency_s: float
    tpot_s: float | None
    prompt_tokens: int
    output_tokens: int
    cached_prompt_tokens: int = 0
    queue_s: float = 0.0
    # Gaps between consecutive chunks streamed back (requests of the open loads), as vLLM's
    # bench serve pools them into ITL; empty where the engine returns a request whole.
    itl_s: list[float] = field(default_factory=list)

    @property
    def context_load_s(self) -> float:
        return self.preprocess_s + self.prefill_s


def tpot(first_token_t: float, last_token_t: float, tokens: int) -> float | None:
    return (last_token_t - first_token_t) / (tokens - 1) if tokens > 1 else None


def _mean(values: list[float]) -> float:
    """The mean of the known values (an HTTP engine cannot see a request's prefill: nan)."""
    known = [value for value in values if math.isfinite(value)]
    return float(np.mean(known)) if known else math.nan


def summarize(timings: list[RequestTiming], generation_wall_s: float) -> dict[str, float]:
    """Trial-level performance metrics from per-request timings and the phase's wall time."""
    if not timings:
        raise ValueError("no requests were measured")
    ttfts = [t.ttft_s for t in timings]
    tpots = [t.tpot_s for t in timings if t.tpot_s is not None]
    p50, p90, p99 = np.percentile(ttfts, [50, 90, 99])
    output_tokens = sum(t.output_tokens for t in timings)
    prompt_tokens = sum(t.prompt_tokens for t in timings)
    cached = sum(t.cached_prompt_tokens for t in timings)
    return {
        "tps": output_tokens / generation_wall_s,
        "ttft_s": _mean(ttfts),
        "ttft_p50_s": float(p50),
        "ttft_p90_s": float(p90),
        "ttft_p99_s": float(p99),
        "tpot_s": _mean(tpots),
        "preprocess_s": _mean([t.preprocess_s for t in timings]),
        "queue_s": _mean([t.queue_s for t in timings]),
        "prefill_s": _mean([t.prefill_s for t in timings]),
        "context_load_s": _mean([t.context_load_s for t in timings]),
        "latency_s": _mean([t.latency_s for t in timings]),
        "requests_per_s": len(timings) / generation_wall_s,
        "generation_s": generation_wall_s,
        "output_tokens": float(output_tokens),
        "prompt_tokens": float(prompt_tokens),
        "prefix_cache_hit_rate": cached / prompt_tokens if prompt_tokens else 0.0,
    }


def batch_efficiency(
    batched_requests_per_s: Sequence[float], single_requests_per_s: Sequence[float], batch: int
) -> dict[str, float]:
    """From the repeats' requests/s (batched and one at a time, pairwise); `batch`: the batch
    the calibration slice formed, min(batch_size, its requests)."""
    speedups = [b / s for b, s in zip(batched_requests_per_s, single_requests_per_s, strict=True)]
    efficiencies = [speedup / batch for speedup in speedups]
    return {
        "batch_efficiency": statistics.median(efficiencies),
        "batch_efficiency_min": min(efficiencies),
        "batch_efficiency_max": max(efficiencies),
        "batch_speedup": statistics.median(speedups),
    }
