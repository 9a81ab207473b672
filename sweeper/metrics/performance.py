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
  accepted the request yet. engine=openai submits a request by POSTing it, its body made: the
  client's encoding of it (images as data URLs) is made before, like the image decode (ahead
  of the send time under the open loads, `Engine.prepare`), and lies in `preprocess_s` only,
  as `vllm bench serve` times its requests from the POST.
- `tpot_s`: (time of the last token - time of the first token) / (tokens - 1) over the request's
  longest sequence; requests with a single output token have none.
- `output_tokens`: generated tokens of all returned sequences, up to and including the EOS token,
  never padding or anything after EOS.
- `cached_prompt_tokens`: prompt tokens whose KV the engine reused from earlier requests instead
  of computing them (prefix caching), counted once per request like `prompt_tokens`. engine=hf
  matches whole blocks of 16 tokens, as vLLM does; the copy of one request's prompt KV to its
  `num_samples` sequences is not counted (it saves prefill time, not prompt tokens).

Per trial:
- `tps`: output tokens of all requests / wall time of the measured window (all batches,
  preprocessing included, warm-up and calibration excluded; under an open load, from the first
  measured request's sending to the last one's answer, the load's warm-up and cool-down
  requests left out).
- means, and p50/p90/p99 of `ttft_s`, `tpot_s`, `itl_s` (every gap between streamed chunks,
  pooled over requests; open loads) and `latency_s` (E2EL); means of the rest.
- `goodput_rps`: requests/s over the window that met every service-level objective set
  (`slo.ttft_s`, `slo.tpot_s`, `slo.e2el_s`); `slo_attainment`: their share of the requests.
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
from typing import Any

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


def _percentiles(name: str, values: list[float]) -> dict[str, float]:
    """`<name>_p50_s`, `_p90_s`, `_p99_s` of the values (nan when there are none)."""
    stem = name.removesuffix("_s")
    found = np.percentile(values, [50, 90, 99]) if values else [math.nan] * 3
    return {f"{stem}_p{p}_s": float(v) for p, v in zip((50, 90, 99), found, strict=True)}


def meets(timing: RequestTiming, slo: Any) -> bool:
    """Whether the request met every service-level objective set (a request of one output token
    has no TPOT to miss)."""
    return (
        (slo.ttft_s is None or timing.ttft_s <= slo.ttft_s)
        and (slo.tpot_s is None or timing.tpot_s is None or timing.tpot_s <= slo.tpot_s)
        and (slo.e2el_s is None or timing.latency_s <= slo.e2el_s)
    )


def summarize(
    timings: list[RequestTiming], generation_wall_s: float, slo: Any | None = None
) -> dict[str, float]:
    """Trial-level performance metrics from per-request timings and the measured window's wall
    time: means, and the p50/p90/p99 of TTFT, TPOT, ITL (every gap between streamed chunks,
    pooled) and E2EL (`latency_s`), as vLLM's bench serve reports them; with objectives (`slo`:
    `ttft_s`, `tpot_s`, `e2el_s`) the goodput, requests/s that met them all, and their share."""
    if not timings:
        raise ValueError("no requests were measured")
    ttfts = [t.ttft_s for t in timings]
    tpots = [t.tpot_s for t in timings if t.tpot_s is not None]
    itls = [gap for t in timings for gap in t.itl_s]
    latencies = [t.latency_s for t in timings]
    output_tokens = sum(t.output_tokens for t in timings)
    prompt_tokens = sum(t.prompt_tokens for t in timings)
    cached = sum(t.cached_prompt_tokens for t in timings)
    metrics = {
        "tps": output_tokens / generation_wall_s,
        "ttft_s": _mean(ttfts),
        **_percentiles("ttft_s", ttfts),
        "tpot_s": _mean(tpots),
        **_percentiles("tpot_s", tpots),
        "preprocess_s": _mean([t.preprocess_s for t in timings]),
        "queue_s": _mean([t.queue_s for t in timings]),
        "prefill_s": _mean([t.prefill_s for t in timings]),
        "latency_s": _mean(latencies),
        **_percentiles("latency_s", latencies),
        "requests_per_s": len(timings) / generation_wall_s,
        "generation_s": generation_wall_s,
        "output_tokens": float(output_tokens),
        "prompt_tokens": float(prompt_tokens),
        "prefix_cache_hit_rate": cached / prompt_tokens if prompt_tokens else 0.0,
    }
    metrics["context_load_s"] = metrics["preprocess_s"] + metrics["prefill_s"]
    if itls:
        metrics.update({"itl_s": _mean(itls), **_percentiles("itl_s", itls)})
    if slo is not None and slo.any:
        good = sum(meets(t, slo) for t in timings)
        metrics["goodput_rps"] = good / generation_wall_s
        metrics["slo_attainment"] = good / len(timings)
    return metrics


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
