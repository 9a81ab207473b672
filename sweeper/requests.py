"""The generic request every engine answers, and what comes back: engines know nothing of tasks.

A task turns its samples into `Request`s (chat turns with zero or more images), a workload shapes
them (system prompt, history), an engine answers them under `DecodingParams` and `ServingParams`
with one `Completion` each: every returned sequence's text and token ids, and the request's
timing (`sweeper/metrics/performance.py` defines every field once).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Self

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


class FromTrial:
    """Parameters named as the trial keys they take their values from."""

    @classmethod
    def from_trial(cls, trial: Any) -> Self:
        return cls(**{f.name: getattr(trial, f.name) for f in fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class DecodingParams(FromTrial):
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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def width(self) -> int:
        """Sequences the engine runs per request: the samples, or the live beams."""
        return max(self.num_samples, self.beam_num)


@dataclass(frozen=True)
class ServingParams(FromTrial):
    """How requests are served: `batch_size` requests per static batch, or at most that many
    running at once under continuous batching. An engine applies `kv_cache` and `prefix_caching`
    per call (engine=hf) or fixes them at load (engine=vllm: they are its load options)."""

    batch_size: int = 1
    continuous_batching: bool = False
    prefix_caching: bool = False
    kv_cache: str = "dynamic"


@dataclass
class Completion:
    """An engine's answer to one request: each returned sequence's text and generated token ids
    (up to and including EOS, as `output_tokens` counts them), and the request's timing."""

    request_id: str
    texts: list[str]
    token_ids: list[list[int]]
    timing: RequestTiming
