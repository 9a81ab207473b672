"""An engine's own cumulative counters, differenced over a measured run: the cross-checks logged
beside sweeper's own metrics. vLLM exposes them in-process (`get_metrics_snapshot`) and on a
server's `/metrics` (`scrape` reads that page); both become one flat `{sample name: total over
label sets}`."""

from __future__ import annotations

from collections.abc import Mapping

# vLLM's metric names (the same in-process and on /metrics, where counters end in _total).
TTFT = "vllm:time_to_first_token_seconds"
PREFIX_QUERIES = "vllm:prefix_cache_queries"
PREFIX_HITS = "vllm:prefix_cache_hits"
GENERATION_TOKENS = "vllm:generation_tokens"
PROMPT_TOKENS = "vllm:prompt_tokens"
# What `vllm_own_metrics` returns (each when its counters moved).
VLLM_TTFT = "vllm_ttft_s"
VLLM_PREFIX_CACHE_HIT_RATE = "vllm_prefix_cache_hit_rate"
VLLM_TOKEN_COUNTS = {"vllm_output_tokens": GENERATION_TOKENS, "vllm_prompt_tokens": PROMPT_TOKENS}
# Speculative decoding's counters: drafts proposed, the draft tokens in them, those accepted.
SPEC_DRAFTS = "vllm:spec_decode_num_drafts"
SPEC_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
SPEC_ACCEPTED_TOKENS = "vllm:spec_decode_num_accepted_tokens"
SPEC_ACCEPTANCE_RATE = "spec_acceptance_rate"
SPEC_MEAN_ACCEPTED_LENGTH = "spec_mean_accepted_length"
# ... and what a server's histograms stand in for (engine=openai: `vllm_server_means`).
OWN_METRICS = (
    VLLM_TTFT,
    VLLM_PREFIX_CACHE_HIT_RATE,
    *VLLM_TOKEN_COUNTS,
    SPEC_ACCEPTANCE_RATE,
    SPEC_MEAN_ACCEPTED_LENGTH,
    "prefill_s",
    "queue_s",
)
# Per request, recorded when it finishes: first scheduling -> first token, and arrival in the
# engine core -> first scheduling (what a client of a server cannot see itself).
PREFILL_TIME = "vllm:request_prefill_time_seconds"
QUEUE_TIME = "vllm:request_queue_time_seconds"
FINISHED_REQUESTS = "vllm:request_success"  # by finish reason (stop, length, abort, ...)
# Labels of a gauge of value 1 that describes the engine's cache config (enable_prefix_caching).
CACHE_CONFIG = "vllm:cache_config_info"


def totals(samples: Mapping[str, float] | list[tuple[str, float]]) -> dict[str, float]:
    """Samples summed over label sets; counters' `_total` suffix dropped."""
    items = samples.items() if isinstance(samples, Mapping) else samples
    summed: dict[str, float] = {}
    for name, value in items:
        name = name.removesuffix("_total")
        summed[name] = summed.get(name, 0.0) + value
    return summed


def scrape(page: str) -> tuple[dict[str, float], dict[str, dict[str, str]]]:
    """A Prometheus text page (a server's /metrics): its samples as `totals` (histogram buckets
    and `_created` stamps left out), and the labels of each `*_info` gauge."""
    from prometheus_client.parser import text_string_to_metric_families

    samples, infos = [], {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name.endswith("_info"):
                infos[sample.name] = dict(sample.labels)
            elif not sample.name.endswith(("_bucket", "_created")):
                samples.append((sample.name, sample.value))
    return totals(samples), infos


def _histogram_mean(
    before: Mapping[str, float], after: Mapping[str, float], name: str
) -> float | None:
    """The mean of the observations a histogram took between the two readings (None: none)."""
    count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    if not count:
        return None
    return (after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)) / count


def vllm_server_means(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """`prefill_s`, `queue_s`: the means of vLLM's per-request prefill and queue histograms over
    the run (sum / count), for a client that sees neither (engine=openai)."""
    means = {
        "prefill_s": _histogram_mean(before, after, PREFILL_TIME),
        "queue_s": _histogram_mean(before, after, QUEUE_TIME),
    }
    return {key: mean for key, mean in means.items() if mean is not None}


def vllm_own_metrics(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """`vllm_ttft_s`: the mean of vLLM's TTFT histogram over the run (sum / count);
    `vllm_prefix_cache_hit_rate`: prefix-cache hits / queries (both count tokens);
    `vllm_output_tokens`, `vllm_prompt_tokens`: the tokens vLLM counted generating and
    prefilling (its counters; the prompt's cached tokens included); under speculative decoding
    `spec_acceptance_rate`, accepted / proposed draft tokens, and `spec_mean_accepted_length`,
    the tokens a verification step yields on average (1 + accepted / drafts, as vLLM's own log
    line computes its "mean acceptance length")."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    metrics = {}
    if (ttft := _histogram_mean(before, after, TTFT)) is not None:
        metrics[VLLM_TTFT] = ttft
    if queries := delta(PREFIX_QUERIES):
        metrics[VLLM_PREFIX_CACHE_HIT_RATE] = delta(PREFIX_HITS) / queries
    for name, counter in VLLM_TOKEN_COUNTS.items():
        if counter in after:
            metrics[name] = delta(counter)
    if drafts := delta(SPEC_DRAFTS):
        metrics[SPEC_ACCEPTANCE_RATE] = delta(SPEC_ACCEPTED_TOKENS) / delta(SPEC_DRAFT_TOKENS)
        metrics[SPEC_MEAN_ACCEPTED_LENGTH] = 1 + delta(SPEC_ACCEPTED_TOKENS) / drafts
    return metrics
