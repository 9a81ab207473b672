"""The generic request every engine answers, and what comes back: engines know nothing of tasks.

A task turns its samples into `Request`s (chat turns with zero or more images), a workload shapes
them (system prompt, history), an engine answers them under `DecodingParams` and `ServingParams`
with one `Completion` each: every returned sequence's text and token ids, and the request's
timing (`sweeper/metrics/performance.py` defines every field once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from sweeper.metrics.performance import RequestTiming


@dataclass
class Request:
    """One request: `messages` are chat turns as transformers' chat templates take them (content a
    string, or a list of parts `{"type": "text", "text": ...}` / `{"type": "image"}`); `images` are
    the pictures of the image parts, in order. `prepare_s` is client-side time already spent on
    it (decoding its images), counted in its `preprocess_s`."""

    id: str
    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    prepare_s: float = 0.0


@dataclass(frozen=True)
class DecodingParams:
    """How every request of a trial is decoded (temperature 0 is greedy, top_k 0 is off)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    beam_num: int = 1
    num_samples: int = 1
    seed: int = 0
    # EOS is not a stop: every sequence has exactly max_new_tokens tokens (performance runs).
    ignore_eos: bool = False

    @classmethod
    def from_trial(cls, trial: Any) -> DecodingParams:
        return cls(
            max_new_tokens=trial.max_new_tokens,
            temperature=trial.temperature,
            top_k=trial.top_k,
            top_p=trial.top_p,
            beam_num=trial.beam_num,
            num_samples=trial.num_samples,
            seed=trial.seed,
            ignore_eos=trial.ignore_eos,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def width(self) -> int:
        """Sequences the engine runs per request: the samples, or the live beams."""
        return max(self.num_samples, self.beam_num)


@dataclass(frozen=True)
class ServingParams:
    """How requests are served: `batch_size` requests per static batch, or at most that many
    running at once under continuous batching. An engine applies `kv_cache` and `prefix_caching`
    per call (engine=hf) or fixes them at load (engine=vllm: they are its load options)."""

    batch_size: int = 1
    continuous_batching: bool = False
    prefix_caching: bool = False
    kv_cache: str = "dynamic"

    @classmethod
    def from_trial(cls, trial: Any) -> ServingParams:
        return cls(
            batch_size=trial.batch_size,
            continuous_batching=trial.continuous_batching,
            prefix_caching=trial.prefix_caching,
            kv_cache=str(trial.kv_cache),
        )


@dataclass
class Completion:
    """An engine's answer to one request: each returned sequence's text and generated token ids
    (up to and including EOS, as `output_tokens` counts them), and the request's timing."""

    request_id: str
    texts: list[str]
    token_ids: list[list[int]]
    timing: RequestTiming
