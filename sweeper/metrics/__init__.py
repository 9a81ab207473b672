"""Metric definitions: VQA accuracy, performance summaries, peak memory. One place for each."""

from sweeper.metrics.vqa import (
    majority_vote,
    normalize_answer,
    official_vqa_accuracy,
    top_answer_match,
    vqa_accuracy,
)

# The six metrics every trial logs, in the order tables show them.
HEADLINE_METRICS = (
    "tps",
    "ttft_s",
    "context_load_s",
    "peak_mem_gb",
    "batch_efficiency",
    "accuracy",
)

__all__ = [
    "HEADLINE_METRICS",
    "majority_vote",
    "normalize_answer",
    "official_vqa_accuracy",
    "top_answer_match",
    "vqa_accuracy",
]
