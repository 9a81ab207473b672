"""A request's `RequestTiming` from its clock marks: the arithmetic every engine shares."""

from __future__ import annotations

from dataclasses import dataclass

from sweeper.metrics.performance import RequestTiming, tpot


@dataclass(frozen=True)
class Marks:
    """Clock readings of one request, all on one clock: when it was submitted, when its first
    token was on the host, and its longest sequence's first and last tokens; `tokens`: that
    sequence's length. TTFT runs to the request's first token, TPOT over the longest sequence."""

    submitted: float
    first_token: float
    last_token: float
    tokens: int
    longest_first_token: float | None = None  # None: first_token (one sequence)


def request_timing(
    marks: Marks,
    *,
    preprocess_s: float,
    prefill_s: float,
    prompt_tokens: int,
    queue_s: float = 0.0,
    output_tokens: int,
    cached_prompt_tokens: int = 0,
) -> RequestTiming:
    return RequestTiming(
        preprocess_s=preprocess_s,
        queue_s=queue_s,
        prefill_s=prefill_s,
        ttft_s=marks.first_token - marks.submitted,
        latency_s=marks.last_token - marks.submitted,
        tpot_s=tpot(
            marks.first_token if marks.longest_first_token is None else marks.longest_first_token,
            marks.last_token,
            marks.tokens,
        ),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        cached_prompt_tokens=cached_prompt_tokens,
    )


def output_length(tokens: list[int], eos_ids: set[int]) -> int:
    """Generated tokens up to and including the first EOS; padding after it is not output."""
    for index, token in enumerate(tokens):
        if token in eos_ids:
            return index + 1
    return len(tokens)
