"""The interface every engine implements, and what they share: decoding params, batching, the
clock that synchronises the device before it is read."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from sweeper.config import ConfigError
from sweeper.data.base import LoadedSample, chunks
from sweeper.metrics.performance import RequestTiming


@dataclass(frozen=True)
class DecodingParams:
    """What every request of a trial is generated with (the prompt's system part included)."""

    beam_num: int
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    num_samples: int
    seed: int
    ignore_eos: bool = False
    system_prompt: str | None = None
    # Serving flags an engine may apply per call (engine=hf does; others fix theirs at load).
    kv_cache: str = "dynamic"
    prefix_caching: bool = False
    continuous_batching: bool = False

    @classmethod
    def from_trial(cls, trial: Any) -> DecodingParams:
        return cls(
            beam_num=trial.beam_num,
            max_new_tokens=trial.max_new_tokens,
            temperature=trial.temperature,
            top_k=trial.top_k,
            top_p=trial.top_p,
            num_samples=trial.num_samples,
            seed=trial.seed,
            ignore_eos=trial.ignore_eos,
            system_prompt=trial.system_prompt,
            kv_cache=trial.kv_cache,
            prefix_caching=trial.prefix_caching,
            continuous_batching=trial.continuous_batching,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """An engine's answer to one request: every returned sequence's text, and its timing."""

    question_id: str
    texts: list[str]
    timing: RequestTiming


class Engine(ABC):
    """Loads a model once; answers batches of VQA requests with per-request timing."""

    name: ClassVar[str]
    # Serving-flag values this engine honours; anything else is refused before loading.
    supported_flags: ClassVar[dict[str, tuple]] = {
        "prefix_caching": (False,),
        "continuous_batching": (False,),
        "kv_cache": ("dynamic",),
    }
    device: str

    @classmethod
    def check_supported(cls, trial: Any) -> None:
        for flag, allowed in cls.supported_flags.items():
            value = getattr(trial, flag)
            if value not in allowed:
                choices = ", ".join(str(v).lower() for v in allowed)
                raise ConfigError(flag, value, f"{choices} with engine={cls.name}")

    @classmethod
    def load_options(cls, trial: Any) -> dict[str, Any]:
        """Trial keys this engine fixes when it loads (e.g. vLLM's scheduler limits).

        They are passed to the constructor as keyword arguments and are part of the engine cache
        key, so a trial that changes one of them loads a new engine.
        """
        return {}

    def tags(self) -> dict[str, str]:
        """Facts about the loaded engine worth recording on every trial's run."""
        return {}

    @contextmanager
    def own_metrics(self) -> Iterator[dict[str, float]]:
        """Metrics the engine measures itself over the block, filled in when it exits (e.g. the
        difference of its own cumulative counters); logged beside the trial's metrics."""
        yield {}

    @abstractmethod
    def synchronize(self) -> None:
        """Wait for queued device work, so that a clock read after it means what it says."""

    def now(self) -> float:
        self.synchronize()
        return time.perf_counter()

    @abstractmethod
    def generate_batch(
        self, batch: list[LoadedSample], decoding: DecodingParams
    ) -> list[Completion]:
        """Answer one static batch, submitted to the engine at once."""

    def run(
        self,
        samples: Iterable[LoadedSample],
        decoding: DecodingParams,
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """Answer all samples in static batches, each started when the previous one is done."""
        completions: list[Completion] = []
        for batch in chunks(samples, batch_size):
            completions.extend(self.generate_batch(batch, decoding))
            if on_batch is not None:
                on_batch(len(batch))
        return completions

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` in this engine's tokenizer (workload=shared_prefix sizes its system
        prompt with it)."""
        raise NotImplementedError(f"engine={self.name} cannot count tokens")

    def reset_prefix_cache(self) -> None:
        """Forget cached prompt prefixes, so that a measured phase does not reuse the KV of the
        same prompts sent by an earlier phase (warm-up, calibration). No cache: nothing to do."""
        return None  # an engine without a prefix cache has nothing to forget

    @abstractmethod
    def close(self) -> None:
        """Free the model and its memory before another engine loads."""
