"""An engine's own cumulative counters, differenced over a measured run: the cross-checks logged
beside sweeper's own metrics. vLLM exposes them in-process (`get_metrics_snapshot`) and on a
server's `/metrics`; both become one flat `{sample name: total over label sets}`."""

from __future__ import annotations

from collections.abc import Mapping

# vLLM's metric names (the same in-process and on /metrics, where counters end in _total).
TTFT = "vllm:time_to_first_token_seconds"
PREFIX_QUERIES = "vllm:prefix_cache_queries"
PREFIX_HITS = "vllm:prefix_cache_hits"
GENERATION_TOKENS = "vllm:generation_tokens"
PROMPT_TOKENS = "vllm:prompt_tokens"
# What `vllm_own_metrics` returns (each when its counters moved), and what a server's means add.
VLLM_TTFT = "vllm_ttft_s"
VLLM_PREFIX_CACHE_HIT_RATE = "vllm_prefix_cache_hit_rate"
VLLM_TOKEN_COUNTS = {"vllm_output_tokens": GENERATION_TOKENS, "vllm_prompt_tokens": PROMPT_TOKENS}
OWN_METRICS = (VLLM_TTFT, VLLM_PREFIX_CACHE_HIT_RATE, *VLLM_TOKEN_COUNTS)


def totals(samples: Mapping[str, float] | list[tuple[str, float]]) -> dict[str, float]:
    """Samples summed over label sets; counters' `_total` suffix dropped."""
    items = samples.items() if isinstance(samples, Mapping) else samples
    summed: dict[str, float] = {}
    for name, value in items:
        name = name.removesuffix("_total")
        summed[name] = summed.get(name, 0.0) + value
    return summed


def vllm_own_metrics(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """`vllm_ttft_s`: the mean of vLLM's TTFT histogram over the run (sum / count);
    `vllm_prefix_cache_hit_rate`: prefix-cache hits / queries (both count tokens);
    `vllm_output_tokens`, `vllm_prompt_tokens`: the tokens vLLM counted generating and
    prefilling (its counters; the prompt's cached tokens included)."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    metrics = {}
    if count := delta(f"{TTFT}_count"):
        metrics[VLLM_TTFT] = delta(f"{TTFT}_sum") / count
    if queries := delta(PREFIX_QUERIES):
        metrics[VLLM_PREFIX_CACHE_HIT_RATE] = delta(PREFIX_HITS) / queries
    for name, counter in VLLM_TOKEN_COUNTS.items():
        if counter in after:
            metrics[name] = delta(counter)
    return metrics
