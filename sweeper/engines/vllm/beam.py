"""Beam search through vLLM (beam_num > 1, offline frontend only: `AsyncLLM`'s beam search is
another API). `LLM.beam_search` runs outside the scheduler: one synchronous round of requests per
output token, each live beam a new request for the next token's 2 x beam_num best log-probs, its
whole prompt sent again every round (with prefix caching the re-sent prefix is a cache hit). It
differs from HF beam search in semantics and cost:
- up to vLLM 0.32, scores are cumulative log-probs divided by the length of prompt + generated
  tokens (HF: the generated tokens only), so length_penalty weighs differently, and only the
  tokenizer's EOS token ends a beam; from 0.33 on, the generated tokens only, as in HF, and the
  generation config's EOS ids end a beam too (experiments/vllm/README.md);
- no beam sampling (temperature must be 0) and no early stopping: it runs max_new_tokens rounds
  unless every beam has ended;
- each round is a full engine round trip (scheduling, IPC, sampling on the host), where HF runs
  all steps in one `generate` call on the device; timing is per round: the first round's end
  gives the TTFT, the rounds up to a request's longest returned beam its latency and TPOT.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sweeper.engines.toolkit.timing import Marks, request_timing
from sweeper.requests import Completion, DecodingParams

if TYPE_CHECKING:
    from vllm import LLM, RequestOutput

    from sweeper.engines.vllm.frontends import Submission


class RoundClock:
    """Records when each beam-search round starts and ends, and the round's request outputs.

    `LLM.beam_search` returns beams only; its rounds go through `LLM._run_engine` (vLLM 0.26 and
    0.32), which is wrapped on this instance for the duration of one call.
    """

    def __init__(self, llm: LLM):
        self.llm = llm
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.outputs: list[list[RequestOutput]] = []

    def __enter__(self) -> RoundClock:
        run_engine = self.llm._run_engine

        def timed(*args: Any, **kwargs: Any) -> list[RequestOutput]:
            self.starts.append(time.time())
            outputs = run_engine(*args, **kwargs)
            self.ends.append(time.time())
            self.outputs.append(outputs)
            return outputs

        self.llm._run_engine = timed
        return self

    def __exit__(self, *exc: object) -> None:
        del self.llm._run_engine  # the class's method again


def beam_search(
    llm: LLM,
    batch: list[Submission],
    decoding: DecodingParams,
    decode: Callable[[list[list[int]]], list[str]],
) -> list[Completion]:
    """One static batch by beam search; `decode` turns token ids into texts."""
    from vllm.sampling_params import BeamSearchParams

    params = BeamSearchParams(beam_width=decoding.beam_num, max_tokens=decoding.max_new_tokens)
    submitted = batch[0].submitted
    with RoundClock(llm) as rounds:
        results = llm.beam_search([submission.prompt for submission in batch], params)
    # Round 1 holds one request per question (each starts from a single beam), in order.
    first = rounds.outputs[0]
    completions = []
    for submission, result, round_output in zip(batch, results, first, strict=True):
        prompt_len = len(round_output.prompt_token_ids)
        beams = [beam.tokens[prompt_len:] for beam in result.sequences[: decoding.num_samples]]
        longest = max(len(tokens) for tokens in beams)
        stats = round_output.metrics
        marks = Marks(submitted, rounds.ends[0], rounds.ends[longest - 1], longest)
        timing = request_timing(
            marks,
            preprocess_s=submission.request.prepare_s + rounds.starts[0] - submitted,
            prefill_s=stats.first_token_ts - stats.scheduled_ts,
            prompt_tokens=prompt_len,
            output_tokens=sum(len(tokens) for tokens in beams),
            cached_prompt_tokens=round_output.num_cached_tokens or 0,
        )
        completions.append(Completion(submission.request.id, decode(beams), beams, timing))
    return completions
